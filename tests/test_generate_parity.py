"""Numerical parity of kvgen against transformers 5.x on tiny random models of every supported
architecture variant: greedy tokens, full-forward logits, per-step generate logits, bf16 / reduced
precision checkpoints and sharded checkpoints.

Reference: transformers, f32, attn_implementation="eager" (see conftest.py). Greedy tokens are
compared exactly, except after a step where transformers' own top-1/top-2 margin is <= 1e-4 (a
near-tie where either token is a legitimate f32 result); the fixtures are seeded so that this
never happens in practice, and a mismatch message reports HF's margin at the differing step.
Because a near-tie shortens what is compared, every greedy comparison also requires a minimum
number of compared tokens (all of them where the threshold is 1e-4: none is a near-tie today).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_models import (
    ALL_KINDS,
    LONG_TEXT,
    PROMPTS,
    assert_sequences_match,
    eos_ids_of,
    hf_forward_logits,
    hf_generate,
    load_hf,
    logits_scale,
    max_abs_diff_valid,
    step_margins,
    to_torch,
)

NEW_TOKENS = 40
LOGITS_ATOL = 1e-4
# bf16 / f16 weights against HF f32 compute on the same (rounded) weights: kvgen's CPU kernels
# compute in f32 on them, so only f32 rounding noise remains. Measured max |diff| / logit scale
# (printed by the tests), 8 kinds x bf16 checkpoint and llama/qwen3 x {bf16, f16} on f32
# checkpoints: 1.0e-6 .. 5.9e-6 (worst: qwen2, bf16 checkpoint, 6.5e-5 at scale 11). The bound is
# the tightest round one with a safety factor of ~3.4 over that worst value (not 1e-3 x scale: the
# errors this must catch are small too; dtype="float16" ignored, i.e. the f32 weights kept, is
# 2.4e-3 (qwen3) .. 5e-3 (llama) relative, inside the former 1e-2; f16 rounding in place of bf16
# is 1.3e-2 .. 4.5e-2; computing activations in bf16 as transformers does is 2.2e-2 .. 8.8e-2).
REDUCED_RTOL = 2e-5

DYNAMIC_NOTE = (
    " [llama_dynamic_rope: transformers recomputes the dynamic-NTK inv_freq at every forward from "
    "seq_len = max(position_ids) + 1 over the whole batch (>= max_position_embeddings), applies it to "
    "the new tokens only (cached keys keep the rotation they were computed with), so a short row in "
    "a batch with a longer one is rotated differently than when run alone]"
)


def _note(kind):
    return DYNAMIC_NOTE if kind == "llama_dynamic_rope" else ""


def _left_padded(hf_tok, texts, return_tensors="pt"):
    return hf_tok(texts, padding=True, padding_side="left", return_tensors=return_tensors)


def _alive(sequences: torch.Tensor, prompt_len: int, step: int, eos_ids) -> torch.Tensor:
    """Rows that had not produced an eos before new token `step` (so their step logits are real)."""
    new = sequences[:, prompt_len : prompt_len + step]
    if new.shape[1] == 0:
        return torch.ones(sequences.shape[0], dtype=torch.bool)
    done = torch.zeros(sequences.shape[0], dtype=torch.bool)
    for e in eos_ids:
        done |= (new == e).any(dim=1)
    return ~done


# -- (a) greedy tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_greedy_batch_left_padded(kind, hf_tok, hf_model, kv_model):
    enc = _left_padded(hf_tok, PROMPTS)
    assert (enc["attention_mask"] == 0).any(), "fixture: prompts must need left padding"
    prompt_len = enc["input_ids"].shape[1]
    hf = hf_model(kind)
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    assert ref.sequences.shape[1] - prompt_len >= 32, "fixture: HF stopped before 32 new tokens"

    gen = kv_model(kind)
    out = gen.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert_sequences_match(
        out,
        ref,
        prompt_len,
        what=f"{kind} left-padded batch{_note(kind)}",
        eos_ids=eos_ids_of(hf),
        min_compared=len(PROMPTS) * len(ref.logits),
    )


@pytest.mark.parametrize("index", range(len(PROMPTS)))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_greedy_single_prompt(kind, index, hf_tok, hf_model, kv_model):
    enc = hf_tok(PROMPTS[index], return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    hf = hf_model(kind)
    ref = hf_generate(
        hf,
        **enc,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    out = kv_model(kind).generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert_sequences_match(
        out,
        ref,
        prompt_len,
        what=f"{kind} prompt {index} alone{_note(kind)}",
        eos_ids=eos_ids_of(hf),
        min_compared=len(ref.logits),
    )


# -- (b) logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_logits_left_padded_batch(kind, hf_tok, hf_model, kv_model):
    """gen.logits(input_ids, attention_mask) == HF forward logits on every non-pad position.
    HF is run with position_ids = cumsum(mask) - 1 (what generate() uses for left padding)."""
    enc = _left_padded(hf_tok, PROMPTS + [LONG_TEXT], return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    assert ids.shape[1] > 20, "fixture: longest row must exceed the sliding window and dynamic max_pos"
    ref = hf_forward_logits(hf_model(kind), torch.from_numpy(ids), torch.from_numpy(mask))

    got = kv_model(kind).logits(ids, attention_mask=mask)
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == np.float32
    assert got.shape == tuple(ref.shape) == (ids.shape[0], ids.shape[1], len(hf_tok))
    diff = max_abs_diff_valid(got, ref, mask)
    assert diff <= LOGITS_ATOL, (
        f"{kind}: max |logits diff| {diff:.3g} on valid positions (HF logit scale {logits_scale(ref):.3g})"
        f"{_note(kind)}"
    )


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_logits_unpadded(kind, hf_tok, hf_model, kv_model):
    ids = np.asarray([hf_tok(LONG_TEXT)["input_ids"]], dtype=np.int64)
    ref = hf_forward_logits(hf_model(kind), torch.from_numpy(ids))
    got = kv_model(kind).logits(ids)
    assert got.shape == tuple(ref.shape)
    diff = np.abs(got - ref.numpy()).max()
    assert diff <= LOGITS_ATOL, f"{kind}: max |logits diff| {diff:.3g} (no mask, {ids.shape[1]} tokens)"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generate_step_logits(kind, hf_tok, hf_model, kv_model):
    """output_logits of generate(): the last-position logits of each step, HF names and shapes.
    Compared for every row still running at that step (HF keeps computing finished rows on pad
    tokens; those values are not meaningful)."""
    enc = _left_padded(hf_tok, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    hf = hf_model(kind)
    ref = hf_generate(hf, **enc, **kwargs)
    out = kv_model(kind).generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)

    assert_sequences_match(
        out.sequences,
        ref,
        prompt_len,
        what=f"{kind} sequences{_note(kind)}",
        eos_ids=eos_ids_of(hf),
        min_compared=len(PROMPTS) * len(ref.logits),
    )
    assert isinstance(out.logits, tuple), type(out.logits)
    assert len(out.logits) == len(ref.logits) == 12, (len(out.logits), len(ref.logits))
    margins = step_margins(ref.logits)
    compared = 0  # (row, step) pairs whose logits were compared
    for step, (got, exp) in enumerate(zip(out.logits, ref.logits)):
        got = to_torch(got)
        assert tuple(got.shape) == tuple(exp.shape) == (len(PROMPTS), len(hf_tok)), got.shape
        rows = _alive(ref.sequences, prompt_len, step, [hf_tok.eos_token_id])
        # once a row passed a near-tie its later steps may legitimately diverge
        if step:
            rows &= (margins[:, :step] > 1e-4).all(dim=1)
        if step == 0:
            assert rows.all(), f"{kind}: step 0 (the prefill) must be compared for every row"
        if not rows.any():
            continue
        compared += int(rows.sum())
        diff = (got.float() - exp.float()).abs()[rows].max().item()
        assert diff <= LOGITS_ATOL, f"{kind}: step {step} logits max |diff| {diff:.3g}{_note(kind)}"
    # every row runs all 12 steps on these fixtures (no eos, no near-tie): at least 3/4 of them
    assert compared >= len(PROMPTS) * 12 * 3 // 4, f"{kind}: only {compared} (row, step) logits compared"


# -- (c) bf16 and reduced precision -------------------------------------------------------------


def _safetensors_dtypes(model_dir) -> set:
    dtypes = set()
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def _greedy_agreement(kind, gen, hf, hf_tok, threshold, what):
    """Greedy tokens equal HF's wherever HF's margin is above `threshold`; on these fixtures no
    margin in the 16 steps is near any threshold the tests use (smallest HF margin: 2.3e-3 against
    thresholds <= 4 * REDUCED_RTOL * scale ~ 1e-3), so every token of every row must be compared."""
    enc = _left_padded(hf_tok, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    ref = hf_generate(
        hf, **enc, max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=16, do_sample=False)
    assert len(ref.logits) == 16
    assert_sequences_match(
        out, ref, prompt_len, threshold=threshold, what=what, eos_ids=eos_ids_of(hf), min_compared=len(PROMPTS) * 16
    )


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bf16_checkpoint_auto_dtype(kind, hf_tok, model_dir, hf_model, kv_model):
    """A bf16 checkpoint loads with dtype="auto"; its logits agree with HF's f32 logits of the same
    (exactly upcast) bf16 weights within REDUCED_RTOL relative, and greedy agrees wherever HF's
    margin is clearly larger than the observed logits error (every token, on these fixtures)."""
    d = model_dir(kind, "bfloat16")
    assert _safetensors_dtypes(d) == {"BF16"}, "fixture: checkpoint must be stored in bf16"
    hf = hf_model(kind, "bfloat16")
    gen = kv_model(kind, "bfloat16", kv_dtype="auto")

    enc = _left_padded(hf_tok, PROMPTS + [LONG_TEXT], return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    ref = hf_forward_logits(hf, torch.from_numpy(ids), torch.from_numpy(mask))
    got = gen.logits(ids, attention_mask=mask)
    assert got.dtype == np.float32 and got.shape == tuple(ref.shape)
    diff = max_abs_diff_valid(got, ref, mask)
    scale = logits_scale(ref)
    print(f"\n{kind} bf16 checkpoint, dtype=auto: max |diff| {diff:.3g}, scale {scale:.3g}, ratio {diff / scale:.3g}")
    assert diff <= REDUCED_RTOL * scale, f"{kind} bf16: max |diff| {diff:.3g} > {REDUCED_RTOL:g} * {scale:.3g}"

    threshold = max(1e-4, 4 * diff)
    _greedy_agreement(kind, gen, hf, hf_tok, threshold, f"{kind} bf16 auto (margin threshold {threshold:.3g})")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bf16_checkpoint_as_float32(kind, hf_tok, hf_model, kv_model):
    """dtype="float32" on a bf16 checkpoint: weights upcast exactly, so f32 parity applies."""
    hf = hf_model(kind, "bfloat16")
    gen = kv_model(kind, "bfloat16", kv_dtype="float32")
    enc = _left_padded(hf_tok, PROMPTS + [LONG_TEXT], return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    ref = hf_forward_logits(hf, torch.from_numpy(ids), torch.from_numpy(mask))
    diff = max_abs_diff_valid(gen.logits(ids, attention_mask=mask), ref, mask)
    assert diff <= LOGITS_ATOL, f"{kind} bf16 checkpoint as f32: max |diff| {diff:.3g}"
    _greedy_agreement(kind, gen, hf, hf_tok, 1e-4, f"{kind} bf16 checkpoint as float32{_note(kind)}")


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_f32_checkpoint_reduced_precision(kind, kv_dtype, hf_tok, model_dir, kv_model):
    """dtype="bfloat16"/"float16" on an f32 checkpoint: compared with HF f32 compute on the weights
    rounded to that dtype; within REDUCED_RTOL relative."""
    hf = load_hf(model_dir(kind))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(getattr(torch, kv_dtype)).float())
    gen = kv_model(kind, kv_dtype=kv_dtype)
    enc = _left_padded(hf_tok, PROMPTS, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    ref = hf_forward_logits(hf, torch.from_numpy(ids), torch.from_numpy(mask))
    got = gen.logits(ids, attention_mask=mask)
    assert got.dtype == np.float32
    diff = max_abs_diff_valid(got, ref, mask)
    scale = logits_scale(ref)
    print(f"\n{kind} f32 checkpoint, dtype={kv_dtype}: max |diff| {diff:.3g}, scale {scale:.3g}, ratio {diff / scale:.3g}")
    assert diff <= REDUCED_RTOL * scale, f"{kind} {kv_dtype}: max |diff| {diff:.3g} > {REDUCED_RTOL:g} * {scale:.3g}"


# -- (d) sharded checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
def test_sharded_equals_unsharded(kind, hf_tok, model_dir, kv_model):
    d = model_dir(kind, sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "fixture: expected several shards"
    assert not (d / "model.safetensors").exists()

    sharded, plain = kv_model(kind, sharded=True), kv_model(kind)
    enc = _left_padded(hf_tok, PROMPTS, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    np.testing.assert_array_equal(sharded.logits(ids, attention_mask=mask), plain.logits(ids, attention_mask=mask))
    a = sharded.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    b = plain.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    np.testing.assert_array_equal(a, b)
