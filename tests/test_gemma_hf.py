"""Gemma from transformers checkpoints, the details beyond the f32 forward (tests/test_gemma.py):
bf16 checkpoints with transformers' dtype rounding, float16 Gemma 3 (computed in f32 with one
warning), Gemma3ForConditionalGeneration checkpoints (text only), generation defaults from a
Gemma 3 IT generation_config.json, and the Gemma 2 / Gemma 3 IT chat templates. Native CPU backend,
against transformers 5.x (eager attention).

Facts: ../shared/notes/beam-and-gemma.md sections 2.2 (embedding scale in the weight dtype, the
(1 + w) norms), 2.3 (the multimodal checkpoint's language model) and 2.5 (template, defaults).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import (
    PROMPTS,
    assert_sequences_match,
    build_gemma,
    eos_ids_of,
    hf_forward_logits,
    hf_generate,
    load_hf,
    logits_scale,
    max_abs_diff_valid,
)

LOGITS_ATOL = 1e-4
NEW_TOKENS = 16
# bf16 checkpoints: the tests/test_generate_parity.py convention (kvgen computes in f32 on the bf16
# weights; the reference is transformers' f32 compute on the same, exactly upcast, weights) and its
# bound, relative to the logit scale. The reference also takes the one value transformers rounds
# differently in a bf16 model: the embedding scale, `embed_scale.to(weight.dtype)` (notes 2.2).
REDUCED_RTOL = 2e-5
# sqrt(96) = 9.798 is 9.8125 in bf16 (0.15% apart); sqrt(64), the other fixtures' size, is exact.
BF16_HIDDEN = 96


def _left_padded(hf_tok, texts):
    return hf_tok(texts, padding=True, padding_side="left", return_tensors="pt")


# -- 1. bf16 checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer_dir):
    dirs = {}

    def get(kind):
        if kind not in dirs:
            d = tmp_path_factory.mktemp(f"{kind}-bf16")
            dirs[kind] = build_gemma(
                d, kind, dtype=torch.bfloat16, tokenizer_dir=tokenizer_dir, hidden_size=BF16_HIDDEN
            )
        return dirs[kind]

    return get


def _bf16_reference(model_dir):
    """transformers' f32 compute on the bf16 weights with the embedding scale its bf16 model uses
    (read from that model, not restated here); and the plain f32 load, whose scale is f32."""
    as_bf16 = load_hf(model_dir, dtype=torch.bfloat16)
    emb = as_bf16.model.embed_tokens
    bf16_scale = emb.embed_scale.to(emb.weight.dtype).float()
    plain = load_hf(model_dir)
    ref = load_hf(model_dir)
    with torch.no_grad():
        ref.model.embed_tokens.embed_scale.copy_(bf16_scale)
    return ref, plain, bf16_scale.item()


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_bf16_checkpoint_logits_match_transformers_rounding(kind, kvgen, hf_tok, bf16_dir):
    d = bf16_dir(kind)
    ref, plain, bf16_scale = _bf16_reference(d)
    assert bf16_scale != pytest.approx(BF16_HIDDEN**0.5, abs=1e-3), "fixture: the scale must round in bf16"
    gen = kvgen.Generator.from_pretrained(str(d), backend="native")
    assert gen.dtype == "bfloat16"
    enc = _left_padded(hf_tok, PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    want = hf_forward_logits(ref, ids, mask)
    got = gen.logits(ids.numpy(), attention_mask=mask.numpy())
    diff = max_abs_diff_valid(got, want, mask)
    scale = logits_scale(want)
    # The test can fail: the f32 scale (what kvgen used before) is far outside the bound.
    f32_scale_gap = max_abs_diff_valid(hf_forward_logits(plain, ids, mask), want, mask)
    print(f"\n{kind} bf16: max |diff| {diff:.3g} (f32-scale gap {f32_scale_gap:.3g}), scale {scale:.3g}")
    assert f32_scale_gap > 10 * REDUCED_RTOL * scale, "fixture: the embedding scale's rounding must show"
    assert diff <= REDUCED_RTOL * scale, f"{kind} bf16: max |diff| {diff:.3g} > {REDUCED_RTOL:g} * {scale:.3g}"


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_bf16_checkpoint_greedy_identical(kind, kvgen, hf_tok, bf16_dir):
    d = bf16_dir(kind)
    ref, _, _ = _bf16_reference(d)
    gen = kvgen.Generator.from_pretrained(str(d), backend="native")
    enc = _left_padded(hf_tok, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    want = hf_generate(
        ref, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert_sequences_match(
        out, want, prompt_len, what=f"{kind} bf16", eos_ids=eos_ids_of(ref), min_compared=len(PROMPTS) * len(want.logits)
    )


# -- 2. float16 Gemma 3 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f16_dir(tmp_path_factory, tokenizer_dir):
    """A Gemma 3 stored in float16 whose activations overflow float16, as real Gemma 3's do: the
    first layer's post-feedforward norm scales its output by ~6e4, so the residual passes
    float16's 65504 (transformers in float16: inf, then NaN); every weight is a float16 value."""
    d = build_gemma(tmp_path_factory.mktemp("gemma3-f16"), "gemma3", dtype=torch.float16, tokenizer_dir=tokenizer_dir)
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.post_feedforward_layernorm.weight"
    tensors[name] = torch.full_like(tensors[name], 60000.0)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return d


def _load_warnings(kvgen, d, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = kvgen.Generator.from_pretrained(str(d), backend="native", **kwargs)
    return gen, [w for w in caught if "float16" in str(w.message)]


def test_f16_gemma3_overflows_in_transformers(hf_tok, f16_dir):
    """The fixture reproduces the trap: transformers computing in float16 returns NaN/inf."""
    hf16 = load_hf(f16_dir, dtype=torch.float16)
    ids = hf_tok(PROMPTS[-1], return_tensors="pt")["input_ids"]
    logits = hf_forward_logits(hf16, ids)
    assert not torch.isfinite(logits).all(), "fixture: float16 compute must overflow"


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_f16_gemma3_computes_in_f32_and_warns_once(dtype, kvgen, hf_tok, f16_dir):
    gen, caught = _load_warnings(kvgen, f16_dir, dtype=dtype)
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert "Gemma 3" in msg and "NaN" in msg and 'dtype="float32"' in msg and 'dtype="bfloat16"' in msg, msg
    assert gen.dtype == "float32"
    hf = load_hf(f16_dir)  # f32 compute on the exactly upcast float16 weights
    enc = _left_padded(hf_tok, PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    want = hf_forward_logits(hf, ids, mask)
    got = gen.logits(ids.numpy(), attention_mask=mask.numpy())
    assert np.isfinite(got).all()
    diff = max_abs_diff_valid(got, want, mask)
    assert diff <= LOGITS_ATOL, f"f16 Gemma 3 as f32: max |diff| {diff:.3g}"
    # Generating warns no more: the warning is the load's, once.
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert not later, [str(w.message) for w in later]
    ref = hf_generate(hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert_sequences_match(
        out, ref, ids.shape[1], what=f"f16 Gemma 3 dtype={dtype}", eos_ids=eos_ids_of(hf),
        min_compared=len(PROMPTS) * len(ref.logits),
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_f16_gemma3_explicit_dtype_is_silent(dtype, kvgen, f16_dir):
    gen, caught = _load_warnings(kvgen, f16_dir, dtype=dtype)
    assert not caught, [str(w.message) for w in caught]
    assert gen.dtype == dtype


# -- 3. Gemma3ForConditionalGeneration (text only) -------------------------------------------------

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def _to_5x_layout(src: Path, dst: Path):
    """The same checkpoint under 5.x's in-memory names (model.language_model.*,
    model.vision_tower.*, model.multi_modal_projector.*): transformers' save writes the older ones."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith(VISION_PREFIXES):
            name = "model." + name
        else:
            raise AssertionError(f"fixture: unexpected tensor {name}")
        renamed[name] = t
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory, tokenizer_dir):
    legacy = build_gemma(tmp_path_factory.mktemp("gemma3-vlm"), "gemma3_vlm", tokenizer_dir=tokenizer_dir)
    names = load_file(str(legacy / "model.safetensors")).keys()
    assert any(n.startswith("language_model.model.") for n in names), "fixture: transformers' saved layout"
    assert not any("lm_head" in n for n in names), "fixture: lm_head tied, not stored"
    return {"language_model.model": legacy, "model.language_model": _to_5x_layout(legacy, legacy.parent / "5x")}


@pytest.fixture(scope="module")
def vlm_hf(vlm_dirs):
    hf = load_hf(vlm_dirs["language_model.model"])
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    return hf


@pytest.mark.parametrize("layout", ["language_model.model", "model.language_model"])
def test_vlm_text_logits_and_greedy(layout, kvgen, hf_tok, vlm_dirs, vlm_hf, caplog):
    d = vlm_dirs[layout]
    with caplog.at_level(logging.INFO, logger="kvgen"):
        gen = kvgen.Generator.from_pretrained(str(d), backend="native")
    n_vision = sum(1 for n in load_file(str(d / "model.safetensors")) if "vision_tower" in n or "multi_modal_projector" in n)
    lines = [r.getMessage() for r in caplog.records if r.name == "kvgen"]
    assert len(lines) == 1 and f"{n_vision} vision tensors" in lines[0] and "text" in lines[0], lines
    enc = _left_padded(hf_tok, PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    want = hf_forward_logits(vlm_hf, ids, mask)
    if layout == "model.language_model":
        # transformers reads this layout to the same model (not a random init of missing weights)
        again = hf_forward_logits(load_hf(d), ids, mask)
        assert torch.equal(again, want)
    got = gen.logits(ids.numpy(), attention_mask=mask.numpy())
    diff = max_abs_diff_valid(got, want, mask)
    assert diff <= LOGITS_ATOL, f"{layout}: max |logits diff| {diff:.3g}"
    ref = hf_generate(vlm_hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert_sequences_match(
        out, ref, ids.shape[1], what=f"Gemma3ForConditionalGeneration {layout}", eos_ids=eos_ids_of(vlm_hf),
        min_compared=len(PROMPTS) * len(ref.logits),
    )
    # gen.config is transformers' composite config; the text fields read through.
    assert gen.config.text_config["vocab_size"] == gen.config.vocab_size == vlm_hf.config.text_config.vocab_size


def test_vlm_image_token_is_refused(kvgen, hf_tok, tmp_path, tokenizer_dir, vlm_dirs):
    # An image token inside the embedding (as on the 4B+ models: 262144 < 262208 rows) ...
    d = build_gemma(tmp_path / "img", "gemma3_vlm", tokenizer_dir=tokenizer_dir, image_token_index=300)
    gen = kvgen.Generator.from_pretrained(str(d), backend="native")
    ids = hf_tok(PROMPTS[1], return_tensors="np")["input_ids"].astype(np.int64)
    with_image = np.concatenate([ids[:, :2], [[300]], ids[:, 2:]], axis=1)
    for call in (lambda: gen.generate(with_image, max_new_tokens=2), lambda: gen.logits(with_image)):
        with pytest.raises(kvgen.InvalidInputError) as e:
            call()
        msg = str(e.value)
        assert "300" in msg and "image token" in msg and "text only" in msg and "position 2" in msg, msg
    # ... a padded-out one is not in the prompt.
    mask = np.ones_like(with_image)
    mask[:, 2] = 0
    assert gen.logits(with_image, attention_mask=mask).shape[1] == with_image.shape[1]
    # ... and the default 262144, past this embedding: named as the image token, not just out of range.
    gen = kvgen.Generator.from_pretrained(str(vlm_dirs["language_model.model"]), backend="native")
    with pytest.raises(kvgen.InvalidInputError, match=r"262144 .*image token.*text only"):
        gen.generate(np.concatenate([ids, [[262144]]], axis=1), max_new_tokens=2)


def test_vlm_checkpoint_without_a_language_model_is_a_format_error(kvgen, tmp_path, vlm_dirs):
    src = vlm_dirs["language_model.model"]
    d = tmp_path / "renamed"
    d.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    tensors = {n.replace("language_model.model.", "text.", 1): t for n, t in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(kvgen.ModelFormatError, match=r"Gemma3ForConditionalGeneration.*language_model\.model\.embed_tokens"):
        kvgen.Generator.from_pretrained(str(d), backend="native")


# -- 4. generation_config.json defaults (Gemma 3 IT) -----------------------------------------------

GEMMA3_IT_GENERATION = {"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106], "cache_implementation": "hybrid"}


@pytest.fixture(scope="module")
def it_dir(tmp_path_factory, tokenizer_dir):
    """Gemma 3 with the IT generation_config.json. A final softcap of 1 keeps the next-token
    distribution flat enough that top_k=64 and top_p=0.95 both cut (a peaked one would make
    top_p alone decide)."""
    d = build_gemma(tmp_path_factory.mktemp("gemma3-it"), "gemma3", tokenizer_dir=tokenizer_dir, final_logit_softcapping=1.0)
    path = d / "generation_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(GEMMA3_IT_GENERATION)
    path.write_text(json.dumps(cfg))
    return d


def test_generation_config_defaults_are_read(kvgen, it_dir):
    gc = kvgen.Generator.from_pretrained(str(it_dir), backend="native").generation_config
    assert (gc.do_sample, gc.top_k, gc.top_p, list(gc.eos_token_id)) == (True, 64, 0.95, [1, 106])


def test_sampling_uses_top_k_top_p_from_the_file(kvgen, hf_tok, it_dir):
    gen = kvgen.Generator.from_pretrained(str(it_dir), backend="native")
    hf = load_hf(it_dir)
    assert hf.generation_config.top_k == 64
    enc = _left_padded(hf_tok, PROMPTS)
    # The first step's processed scores depend only on the prompt: equal to transformers'
    # (the same -inf positions), with no sampling argument given to either.
    want = hf_generate(hf, **enc, max_new_tokens=1, return_dict_in_generate=True, output_scores=True).scores[0]
    got = gen.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=1, return_dict_in_generate=True,
        output_scores=True, seed=0,
    ).scores[0]
    got, want = torch.as_tensor(np.asarray(got)), want.float()
    kept = torch.isfinite(want)
    counts = kept.sum(dim=1).tolist()
    assert all(40 < c < 64 for c in counts), f"fixture: top_p must cut inside top_k's 64 (kept {counts})"
    assert torch.equal(torch.isfinite(got), kept), (torch.isfinite(got).sum(dim=1).tolist(), counts)
    assert (got[kept] - want[kept]).abs().max().item() <= 1e-5
    # Seeded sampling with the file's defaults is the same as with them passed explicitly, and
    # differs from transformers' global defaults (top_k=50, top_p=1.0).
    kw = dict(attention_mask=enc["attention_mask"], max_new_tokens=12, seed=[11, 12, 13, 14])
    implicit = gen.generate(enc["input_ids"], **kw)
    explicit = gen.generate(enc["input_ids"], do_sample=True, top_k=64, top_p=0.95, **kw)
    global_defaults = gen.generate(enc["input_ids"], do_sample=True, top_k=50, top_p=1.0, **kw)
    greedy = gen.generate(enc["input_ids"], do_sample=False, **{k: v for k, v in kw.items() if k != "seed"})
    assert torch.equal(torch.as_tensor(implicit), torch.as_tensor(explicit))
    assert not torch.equal(torch.as_tensor(implicit), torch.as_tensor(global_defaults))
    assert not torch.equal(torch.as_tensor(implicit), torch.as_tensor(greedy))


class _ForceAt:
    """Forces `token` at new-token `step` of `row` and bans the eos ids elsewhere (so no sampled
    token ends a row early); transformers' LogitsProcessor call shape."""

    def __init__(self, prompt_len, plan, eos):
        self.prompt_len, self.plan, self.eos = prompt_len, plan, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        scores = scores.clone()
        scores[:, self.eos] = -float("inf")
        for row, (at, token) in self.plan.items():
            if step == at:
                scores[row, :] = -float("inf")
                scores[row, token] = 0.0
        return scores


def test_both_eos_ids_stop(kvgen, hf_tok, it_dir):
    gen = kvgen.Generator.from_pretrained(str(it_dir), backend="native")
    enc = _left_padded(hf_tok, PROMPTS[:3])
    prompt_len = enc["input_ids"].shape[1]
    plan = {0: (2, 106), 1: (4, 1)}  # row 2 never gets an eos: it runs until the others stop
    out = gen.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=10, seed=[1, 2, 3],
        logits_processor=[_ForceAt(prompt_len, plan, [1, 106])],
    )
    new = torch.as_tensor(out)[:, prompt_len:]
    pad = gen.generation_config.pad_token_id
    assert new.shape[1] == 10, "row 2 has no eos: the batch runs to max_new_tokens"
    assert new[0, 2] == 106 and (new[0, 3:] == pad).all(), new[0]
    assert new[1, 4] == 1 and (new[1, 5:] == pad).all(), new[1]
    assert not ((new[2] == 1) | (new[2] == 106)).any(), new[2]
    # the same rows alone stop there too (the batch ends when its last row does)
    out = gen.generate(
        enc["input_ids"][:2], attention_mask=enc["attention_mask"][:2], max_new_tokens=10, seed=[1, 2],
        logits_processor=[_ForceAt(prompt_len, plan, [1, 106])],
    )
    assert torch.as_tensor(out).shape[1] == prompt_len + 5


# -- 5. chat templates -----------------------------------------------------------------------------

# The Gemma 3 IT chat template as the google/gemma-3-*-it tokenizer_config.json ships it (notes 2.5).
GEMMA3_IT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Gemma 2 IT's (google/gemma-2-*-it tokenizer_config.json).
GEMMA2_IT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello, world!"}],
    "system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "  Hello!  "},
        {"role": "assistant", "content": "I am fine, thank you. And you?"},
        {"role": "user", "content": "Can you help me write a short poem about the sea?"},
    ],
    "content_list": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "The cat"}, {"type": "text", "text": " walks to the park."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is Paris."}]},
        {"role": "user", "content": [{"type": "text", "text": "Numbers like 1, 2, 3"}]},
    ],
}


def _chat_tokenizer(out: Path, template: str) -> Path:
    """The test tokenizer made Gemma-like: `<s>` added at the start when add_special_tokens=True
    (Gemma's add_bos_token), <start_of_turn>/<end_of_turn> special, and `template` in
    tokenizer_config.json (as the Gemma IT checkpoints ship it)."""
    from transformers import AutoTokenizer

    from tiny_tokenizer import build_tokenizer

    build_tokenizer(out, add_bos_token=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]})
    tok.save_pretrained(str(out))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def chat_toks(tmp_path_factory, kvgen):
    from transformers import AutoTokenizer

    toks = {}
    for name, template in (("gemma3", GEMMA3_IT_TEMPLATE), ("gemma2", GEMMA2_IT_TEMPLATE)):
        d = _chat_tokenizer(tmp_path_factory.mktemp(f"{name}-chat"), template)
        hf = AutoTokenizer.from_pretrained(str(d))
        assert hf.chat_template == template, "fixture: transformers must read the template from tokenizer_config.json"
        toks[name] = (hf, kvgen.Tokenizer.from_pretrained(str(d)))
    return toks


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_gemma3_chat_template_equals_transformers(conv, add_generation_prompt, chat_toks):
    hf, kv = chat_toks["gemma3"]
    messages = CONVERSATIONS[conv]
    kw = dict(add_generation_prompt=add_generation_prompt)
    text = kv.apply_chat_template(messages, tokenize=False, **kw)
    assert text == hf.apply_chat_template(messages, tokenize=False, **kw)
    ids = kv.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert list(ids) == list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))
    # The quirks, spelled out: one <bos> (the template's), "model" for the assistant, the system
    # text inside the first user turn, the generation prompt.
    bos = hf.bos_token_id
    assert ids[0] == bos and list(ids).count(bos) == 1, ids[:4]
    assert text.startswith("<s><start_of_turn>user\n")
    assert "<start_of_turn>system" not in text and "<start_of_turn>assistant" not in text
    if conv in ("system", "content_list"):
        assert text.startswith("<s><start_of_turn>user\n" + ("Be brief." if conv == "content_list" else "You are a helpful assistant.") + "\n\n")
    if conv in ("multi_turn", "content_list"):
        assert "<end_of_turn>\n<start_of_turn>model\n" in text
    assert text.endswith("<start_of_turn>model\n") == add_generation_prompt


def test_gemma3_generation_prompt_tokens_feed_generate(kvgen, chat_toks):
    """A rendered chat tokenised by the tokenizer again (add_special_tokens=True) gets a second
    <bos>, in transformers as in kvgen; apply_chat_template(tokenize=True) does not."""
    hf, kv = chat_toks["gemma3"]
    messages = CONVERSATIONS["system"]
    text = kv.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    twice = kv(text)["input_ids"]
    assert list(twice) == list(hf(text)["input_ids"]) and list(twice[:2]) == [hf.bos_token_id] * 2
    once = kv.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert list(once) == list(twice[1:])


@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_alternation_error_is_a_kvgen_error(name, kvgen, chat_toks):
    from jinja2.exceptions import TemplateError

    hf, kv = chat_toks[name]
    bad = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "again"}]
    with pytest.raises(TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(kvgen.TokenizerError, match="rejects these messages: Conversation roles must alternate user/assistant"):
        kv.apply_chat_template(bad, tokenize=False)


def test_gemma2_system_role_is_a_kvgen_error(kvgen, chat_toks):
    from jinja2.exceptions import TemplateError

    hf, kv = chat_toks["gemma2"]
    with pytest.raises(TemplateError, match="System role not supported"):
        hf.apply_chat_template(CONVERSATIONS["system"], tokenize=False)
    with pytest.raises(kvgen.TokenizerError, match="rejects these messages: System role not supported") as e:
        kv.apply_chat_template(CONVERSATIONS["system"], tokenize=True)
    assert isinstance(e.value, ValueError)
    # without the system turn, the Gemma 2 rendering equals transformers'
    for conv in ("single", "multi_turn"):
        msgs = CONVERSATIONS[conv]
        assert kv.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False) == list(
            hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
        )
