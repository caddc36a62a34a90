"""Gemma 3 text (Gemma3ForCausalLM) and Gemma 2 (Gemma2ForCausalLM) on the native CPU backend
against transformers 5.x (f32, eager): full-forward logits and greedy tokens, one prompt alone and a
left-padded batch.

The fixtures exercise what the family adds: (1 + w) norms with random (non-zero) weights, the four
norms per layer, q/k norms (Gemma 3), query_pre_attn_scalar != head_dim, GeGLU, one sliding and one
full layer with a window shorter than prompt + output, Gemma 3's local/global ropes (linear scaling
on the global one), and Gemma 2's attention and final logit softcapping (caps small enough to bend
the logits of this large-init model).
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import (
    build_gemma,
    PROMPTS,
    assert_sequences_match,
    eos_ids_of,
    hf_forward_logits,
    hf_generate,
    load_hf,
    max_abs_diff_valid,
)

KINDS = ["gemma3", "gemma2"]
NEW_TOKENS = 24
LOGITS_ATOL = 1e-4
WINDOW = 6  # shorter than every prompt + NEW_TOKENS


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    dirs = {}

    def get(kind):
        if kind not in dirs:
            dirs[kind] = build_gemma(tmp_path_factory.mktemp(kind), kind, window=WINDOW)
        return dirs[kind]

    return get


@pytest.fixture(scope="module")
def models(gemma_dir, kvgen):
    cache = {}

    def get(kind):
        if kind not in cache:
            d = gemma_dir(kind)
            cache[kind] = (load_hf(d), kvgen.Generator.from_pretrained(str(d), backend="native"))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits(kind, hf_tok, models):
    hf, gen = models(kind)
    text = PROMPTS[-1] + " " + PROMPTS[-2]
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 2 * WINDOW, "fixture: the text must be longer than the sliding window"
    ref = hf_forward_logits(hf, ids)
    got = torch.as_tensor(gen.logits(ids))
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{kind}: max |logits diff| {diff:.3g} (logit scale {ref.abs().max().item():.3g})"


@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits_left_padded(kind, hf_tok, models):
    hf, gen = models(kind)
    enc = hf_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = hf_forward_logits(hf, ids, mask)
    got = gen.logits(ids, attention_mask=mask)
    diff = max_abs_diff_valid(got, ref, mask)
    assert diff <= LOGITS_ATOL, f"{kind}: max |logits diff| {diff:.3g}"


@pytest.mark.parametrize("index", [0, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_single_prompt(kind, index, hf_tok, models):
    hf, gen = models(kind)
    enc = hf_tok(PROMPTS[index], return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert_sequences_match(
        out, ref, prompt_len, what=f"{kind} prompt {index}", eos_ids=eos_ids_of(hf), min_compared=len(ref.logits)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_batch_left_padded(kind, hf_tok, models):
    hf, gen = models(kind)
    enc = hf_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    prompt_len = enc["input_ids"].shape[1]
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert_sequences_match(
        out,
        ref,
        prompt_len,
        what=f"{kind} left-padded batch",
        eos_ids=eos_ids_of(hf),
        min_compared=len(PROMPTS) * len(ref.logits),
    )
