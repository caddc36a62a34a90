"""compute_dtype="bfloat16": the native backend runs transformers' bfloat16 forward (bf16
activations rounded where torch rounds each op's output, bf16 x bf16 products accumulated in f32),
so its logits are compared with transformers' own bf16 compute, not with f32 compute.

transformers' bf16 logits are not one fixed target: its two attention implementations (sdpa, the
default, and eager) already disagree by a mean |diff| of 0.023-0.043 on these fixtures, because
they round attention scores and probabilities at different points and sum in different orders.
kvgen sums each dot in its own order too (`vdpbf16ps`'s 16 lanes), so the checks are relative:
against transformers' default (sdpa) bf16 logits, kvgen's bf16 numerics must be closer than
transformers' eager bf16 logits are, and clearly closer than f32 arithmetic on the same weights
(kvgen's default) is. Measured mean |diff| (this machine, 2026-12-02): kvgen bf16 0.017-0.028,
eager 0.023-0.043, kvgen f32 compute 0.026-0.055 (worst ratios: qwen3 0.82 and 0.73)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_models import ALL_KINDS, LONG_TEXT, PROMPTS, build_gemma, hf_forward_logits, load_hf

GEMMA_KINDS = ["gemma2", "gemma3"]

# Bounds on the measured ratios above (qwen3 0.82 and 0.73). Gemma 2 has only eager attention in
# transformers, which rounds the softcapped scores and the probabilities to bf16 where kvgen keeps
# them in f32: measured 0.84 there, bounded at 0.95.
WITHIN_TRANSFORMERS_SPREAD = 1.0
CLOSER_THAN_F32 = {"gemma2": 0.95}


def _left_padded(hf_tok, texts):
    enc = hf_tok(texts, padding=True, padding_side="left", return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


@pytest.fixture(scope="module")
def bf16_dir(model_dir, tmp_path_factory, tokenizer_dir):
    """A bf16 checkpoint of every Llama-family fixture and of Gemma 2/3 (whose RMSNorm scales by
    1 + w in f32 before rounding, unlike Llama's)."""
    gemma: dict = {}

    def get(kind: str):
        if kind not in GEMMA_KINDS:
            return model_dir(kind, "bfloat16")
        if kind not in gemma:
            gemma[kind] = build_gemma(tmp_path_factory.mktemp(f"{kind}-bf16c"), kind, dtype=torch.bfloat16,
                                      tokenizer_dir=tokenizer_dir)
        return gemma[kind]

    return get


@pytest.fixture(scope="module")
def bf16_compute(bf16_dir, kvgen):
    cache: dict = {}

    def get(kind: str, compute: str = "bfloat16"):
        if (kind, compute) not in cache:
            cache[kind, compute] = kvgen.Generator.from_pretrained(str(bf16_dir(kind)), compute_dtype=compute)
        return cache[kind, compute]

    return get


def _is_bf16(a: np.ndarray) -> bool:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return bool(torch.equal(t.to(torch.bfloat16).float(), t))


def _mean_diff(a, b, mask) -> float:
    d = (torch.as_tensor(np.asarray(a)).float() - torch.as_tensor(np.asarray(b)).float()).abs()
    return d[torch.from_numpy(mask).bool()].mean().item()


@pytest.mark.parametrize("kind", ALL_KINDS + GEMMA_KINDS)
def test_logits_track_transformers_bf16_compute(kind, hf_tok, bf16_dir, bf16_compute):
    ids, mask = _left_padded(hf_tok, PROMPTS + [LONG_TEXT])
    refs = {}
    # Gemma 2's softcapped attention has only the eager implementation in transformers.
    for attn in ("eager",) if kind == "gemma2" else ("sdpa", "eager"):
        hf = load_hf(bf16_dir(kind), attn_implementation=attn, dtype=torch.bfloat16)
        refs[attn] = hf_forward_logits(hf, torch.from_numpy(ids), torch.from_numpy(mask))
    gen = bf16_compute(kind)
    assert gen.compute_dtype == "bfloat16" and gen.dtype == "bfloat16"
    got = gen.logits(ids, attention_mask=mask)
    assert _is_bf16(got), "bf16 numerics return bf16 logits (as transformers' bf16 lm_head)"
    f32 = bf16_compute(kind, "auto").logits(ids, attention_mask=mask)
    ref = refs.get("sdpa", refs["eager"])
    d_bf16, d_f32 = _mean_diff(got, ref, mask), _mean_diff(f32, ref, mask)
    spread = _mean_diff(refs["eager"], ref, mask) if "sdpa" in refs else None
    print(f"\n{kind}: mean |diff| to transformers bf16 ({'sdpa' if spread else 'eager'}): kvgen bf16 {d_bf16:.3g}, "
          f"transformers eager {spread or float('nan'):.3g}, kvgen f32 compute {d_f32:.3g}")
    if spread is not None:
        assert d_bf16 <= WITHIN_TRANSFORMERS_SPREAD * spread, f"{kind}: {d_bf16:.3g} vs eager's {spread:.3g}"
    assert d_bf16 <= CLOSER_THAN_F32.get(kind, 0.85) * d_f32, f"{kind}: {d_bf16:.3g} vs f32 compute's {d_f32:.3g}"


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_rows_keep_their_bits_whatever_the_batch(kind, hf_tok, bf16_compute):
    """Batch invariance holds for the bf16 numerics too: a row alone = the row in a batch."""
    gen = bf16_compute(kind)
    ids, mask = _left_padded(hf_tok, PROMPTS)
    both = gen.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                        output_logits=True)
    for r in range(len(PROMPTS)):
        one_ids, one_mask = _left_padded(hf_tok, [PROMPTS[r]])
        alone = gen.generate(one_ids, attention_mask=one_mask, max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        for step in range(12):
            np.testing.assert_array_equal(np.asarray(alone.logits[step])[0], np.asarray(both.logits[step])[r])


def test_refusals(model_dir, kvgen):
    d = str(model_dir("llama", "bfloat16"))
    with pytest.raises(ValueError, match=r'compute_dtype="bfloat16".*dtype="float32"'):
        kvgen.Generator.from_pretrained(d, dtype="float32", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"compute_dtype=.*float64.*not supported"):
        kvgen.Generator.from_pretrained(d, compute_dtype="float64")
    # f32 compute stays the default, and says so.
    assert kvgen.Generator.from_pretrained(d).compute_dtype == "float32"


def test_torch_backend_computes_in_the_weights_dtype(model_dir, kvgen):
    d = str(model_dir("llama", "bfloat16"))
    try:
        gen = kvgen.Generator.from_pretrained(d, backend="torch", compute_dtype="bfloat16")
    except kvgen.BackendUnavailableError:
        pytest.skip("this kvgen build has no torch backend")
    assert (gen.dtype, gen.compute_dtype) == ("bfloat16", "bfloat16")
    with pytest.raises(ValueError, match=r'torch backend computes in the weights\' dtype.*backend="native"'):
        kvgen.Generator.from_pretrained(d, backend="torch", dtype="bfloat16", compute_dtype="float32")
