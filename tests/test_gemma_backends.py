"""Gemma 3 text (Gemma3ForCausalLM) and Gemma 2 (Gemma2ForCausalLM) on every backend other than
the native single-rank one (that one is test_gemma.py), against transformers 5.x (f32, eager):

- "torch": the libtorch backend on libtorch's CPU device (Gemma 3's second rope for the sliding
  layers comes from the step plan; Gemma 2's attention softcap runs transformers' eager math,
  since SDPA has no softcap), and the same with KVGEN_CUDA_GRAPHS=emulate (the CUDA-graph decode
  path's fixed input buffers, refilled each step, attention over the whole cache bucket);
- "native-tp2": tensor parallelism on the native backend, two ranks (the sandwich and q/k norms
  replicated, query/kv heads and the MLP split, the vocab-split tied head);
- "neuron-tp2": the Neuron graphs, recorded for two ranks and run on XLA:CPU (jaxlib), with the
  sliding masks, the second rope's tables and the softcaps inside the graphs.

Per backend and kind: full-forward logits (gen.logits(), a left-padded batch whose longest row is
far longer than the sliding window, and that row alone; Neuron has no full forward, so there the
per-step logits of generate() are compared, the prefill step being the last position of each
row's full forward), greedy tokens of single prompts and of a left-padded batch with the window
(6) shorter than prompt + output, equal to transformers and to the native backend. Neuron's
default bf16 graphs are checked as test_neuron_xla.py checks every other kind's (measured here:
prefill ~1e-5 vs the native backend in bf16, the next step ~0.04, 0.4-2% of the logit scale vs
transformers f32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_models import (
    LONG_TEXT,
    PROMPTS,
    assert_sequences_match,
    build_gemma,
    eos_ids_of,
    hf_forward_logits,
    hf_generate,
    load_hf,
    logits_scale,
    max_abs_diff_valid,
    step_margins,
    to_torch,
)
from test_neuron_xla import assert_bf16_graphs_close

KINDS = ["gemma3", "gemma2"]
BACKENDS = ["torch", "native-tp2", "neuron-tp2"]
WINDOW = 6  # shorter than every prompt + NEW_TOKENS
NEW_TOKENS = 24
# f32 everywhere; each backend sums in another order than transformers (libtorch's CPU GEMMs, the
# two ranks' partial sums, XLA:CPU's dots), i.e. f32 rounding on logits of scale ~5-10.
LOGITS_ATOL = {"torch": 1e-4, "native-tp2": 1e-4, "neuron-tp2": 1e-4}
# The Neuron graph set: buckets 8/16/32/64 so the prompts (4, 9, 12, 36 tokens) take the 8-, 16-
# and 64-token context graphs and the generations cross into larger token-generation buckets.
NEURON_SET = dict(buckets=(8, 16, 32, 64), max_context=64, batch_sizes=(1, 4))


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer_dir):
    dirs: dict = {}

    def get(kind):
        if kind not in dirs:
            dirs[kind] = build_gemma(tmp_path_factory.mktemp(kind), kind, window=WINDOW, tokenizer_dir=tokenizer_dir)
        return dirs[kind]

    return get


@pytest.fixture(scope="module")
def gemma_mqa_dir(tmp_path_factory, tokenizer_dir):
    """Gemma 3 with one kv head (as Gemma 3 270M / 1B): at tp 2 both ranks hold it."""
    return build_gemma(
        tmp_path_factory.mktemp("gemma3-mqa"), "gemma3", window=WINDOW, tokenizer_dir=tokenizer_dir, num_key_value_heads=1
    )


@pytest.fixture(scope="module")
def gemma_hf(gemma_dir):
    cache: dict = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load_hf(gemma_dir(kind))
        return cache[kind]

    return get


def _load(kvgen, path, backend):
    if backend == "torch":
        if not kvgen._kvgen.HAS_TORCH:
            pytest.skip("kvgen was built without the `torch` feature (see README)")
        return kvgen.Generator.from_pretrained(path, backend="torch")
    if backend == "native-tp2":
        return kvgen.Generator.from_pretrained(path, backend="native", tp_degree=2)
    assert backend == "neuron-tp2", backend
    pytest.importorskip("jax", reason="jax==0.10.2 / jaxlib==0.10.2 run the Neuron graphs on XLA:CPU")
    # dtype: the Neuron default ("auto") is bfloat16 graphs; these checks are f32.
    return kvgen.Generator.from_pretrained(
        path, device="neuron", tp_degree=2, neuron_executor="xla-cpu", dtype="float32", **NEURON_SET
    )


@pytest.fixture(scope="module")
def gemma_gen(kvgen, gemma_dir):
    """kvgen.Generator of `kind` on `backend` ("native" = the single-rank native backend)."""
    cache: dict = {}

    def get(kind, backend):
        key = (kind, backend)
        if key not in cache:
            path = str(gemma_dir(kind))
            cache[key] = (
                kvgen.Generator.from_pretrained(path, backend="native") if backend == "native" else _load(kvgen, path, backend)
            )
        return cache[key]

    return get


def _left_padded(hf_tok, texts, return_tensors="pt"):
    return hf_tok(texts, padding=True, padding_side="left", return_tensors=return_tensors)


def _assert_step_logits(out, ref, prompt_len, eos_ids, atol, what):
    """generate()'s per-step logits (each step's last position) within `atol` of transformers'
    for every row still running and not past a near-tie of transformers' own (after one, the
    sequences may legitimately part)."""
    assert isinstance(out.logits, tuple) and len(out.logits) == len(ref.logits), (what, len(out.logits), len(ref.logits))
    margins = step_margins(ref.logits)
    sequences = to_torch(ref.sequences)
    compared = 0
    for step, (got, exp) in enumerate(zip(out.logits, ref.logits)):
        got = to_torch(got).float()
        assert tuple(got.shape) == tuple(exp.shape), (what, step, tuple(got.shape), tuple(exp.shape))
        rows = torch.ones(got.shape[0], dtype=torch.bool)
        for e in eos_ids:
            rows &= ~(sequences[:, prompt_len : prompt_len + step] == e).any(dim=1)
        if step:
            rows &= (margins[:, :step] > 1e-4).all(dim=1)
        else:
            assert rows.all(), f"{what}: the prefill step must be compared for every row"
        if not rows.any():
            continue
        compared += int(rows.sum())
        diff = (got - exp.float()).abs()[rows].max().item()
        assert diff <= atol, (
            f"{what}: step {step} logits max |diff| {diff:.3g} vs transformers (scale {logits_scale(exp):.3g})"
        )
    assert compared >= len(ref.logits), f"{what}: only {compared} (row, step) logits compared"


def test_fixture_window_is_shorter_than_the_sequences(hf_tok, gemma_hf):
    """The sliding layer really slides: every prompt + output, and LONG_TEXT, exceed the window."""
    lens = [len(hf_tok(p)["input_ids"]) for p in PROMPTS]
    assert min(lens) + NEW_TOKENS > WINDOW and len(hf_tok(LONG_TEXT)["input_ids"]) > 4 * WINDOW
    for kind in KINDS:
        cfg = gemma_hf(kind).config
        assert cfg.sliding_window == WINDOW and "sliding_attention" in cfg.layer_types, kind
        assert max(lens) + NEW_TOKENS <= NEURON_SET["max_context"] <= cfg.max_position_embeddings


def _without(kind, feature, model):
    """`model` (a fresh transformers copy) with one Gemma feature switched off."""
    if feature == "attn_softcap":
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    elif feature == "final_softcap":
        model.config.final_logit_softcapping = None
    elif feature == "local_rope":
        rot = model.model.rotary_emb
        rot.sliding_attention_inv_freq = rot.full_attention_inv_freq.clone()
    elif feature == "sliding_window":
        model.config.sliding_window = 4096
    return model


@pytest.mark.parametrize(
    "kind, feature",
    [("gemma2", "attn_softcap"), ("gemma2", "final_softcap"), ("gemma3", "local_rope"), ("gemma2", "sliding_window"),
     ("gemma3", "sliding_window")],
)
def test_fixture_logits_depend_on_each_feature(kind, feature, hf_tok, gemma_dir, gemma_hf):
    """A backend that skipped one of these (or got it wrong) would miss every tolerance here by
    orders of magnitude: transformers' own logits move by far more when it is switched off."""
    ids = hf_tok(LONG_TEXT, return_tensors="pt")["input_ids"]
    ref = hf_forward_logits(gemma_hf(kind), ids)
    off = hf_forward_logits(_without(kind, feature, load_hf(gemma_dir(kind))), ids)
    diff = (ref - off).abs().max().item()
    assert diff > 100 * max(LOGITS_ATOL.values()), f"{kind} without {feature}: logits move by only {diff:.3g}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "neuron-tp2"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_logits_match_transformers(kind, backend, hf_tok, gemma_hf, gemma_gen):
    """gen.logits() of a left-padded batch (every valid position) and of LONG_TEXT alone."""
    gen, hf, atol = gemma_gen(kind, backend), gemma_hf(kind), LOGITS_ATOL[backend]
    enc = _left_padded(hf_tok, PROMPTS + [LONG_TEXT], return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    ref = hf_forward_logits(hf, torch.from_numpy(ids), torch.from_numpy(mask))
    got = gen.logits(ids, attention_mask=mask)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == tuple(ref.shape), got.shape
    diff = max_abs_diff_valid(got, ref, mask)
    assert diff <= atol, f"{kind} {backend}: max |logits diff| {diff:.3g} (scale {logits_scale(ref):.3g})"
    ids1 = ids[-1:][:, mask[-1].astype(bool)]
    assert ids1.shape[1] == ids.shape[1] > 4 * WINDOW
    ref1 = hf_forward_logits(hf, torch.from_numpy(ids1))
    diff1 = float(np.abs(gen.logits(ids1) - ref1.numpy()).max())
    assert diff1 <= atol, f"{kind} {backend}: LONG_TEXT alone max |logits diff| {diff1:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_left_padded_batch(kind, backend, hf_tok, gemma_hf, gemma_gen):
    """Tokens equal to transformers' and to the native backend's; per-step logits (the prefill's
    is the full forward's last position of each row) within the backend's tolerance."""
    gen, hf = gemma_gen(kind, backend), gemma_hf(kind)
    enc = _left_padded(hf_tok, PROMPTS)
    assert (enc["attention_mask"] == 0).any(), "fixture: the prompts must need left padding"
    prompt_len = enc["input_ids"].shape[1]
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref = hf_generate(hf, **enc, **kw)
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    what = f"{kind} {backend} left-padded batch"
    eos = eos_ids_of(hf)
    assert_sequences_match(out.sequences, ref, prompt_len, what=what, eos_ids=eos, min_compared=len(PROMPTS) * len(ref.logits))
    _assert_step_logits(out, ref, prompt_len, eos, LOGITS_ATOL[backend], what)
    native = gemma_gen(kind, "native").generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert torch.equal(to_torch(out.sequences), to_torch(native)), f"{what}: tokens differ from the native backend's"


@pytest.mark.parametrize("index", [0, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_single_prompt(kind, backend, index, hf_tok, gemma_hf, gemma_gen):
    gen, hf = gemma_gen(kind, backend), gemma_hf(kind)
    enc = hf_tok(PROMPTS[index], return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    assert prompt_len + NEW_TOKENS > WINDOW
    ref = hf_generate(
        hf, **enc, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    out = gen.generate(
        enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )
    what, eos = f"{kind} {backend} prompt {index}", eos_ids_of(hf)
    assert_sequences_match(out.sequences, ref, prompt_len, what=what, eos_ids=eos, min_compared=len(ref.logits))
    _assert_step_logits(out, ref, prompt_len, eos, LOGITS_ATOL[backend], what)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_graph_path_emulated_equals_eager(kind, kvgen, hf_tok, gemma_dir, gemma_gen, monkeypatch, capfd):
    """KVGEN_CUDA_GRAPHS=emulate: decode steps read the CUDA-graph path's fixed buffers (both
    ropes' cos/sin refilled every step, masks over the whole cache bucket, softcapped attention
    over the bucket) without recording. Same tokens as the eager torch backend, logits within f32
    rounding; on a GPU the recorded graph replays exactly these buffers (test_torch_cuda.py)."""
    if not kvgen._kvgen.HAS_TORCH:
        pytest.skip("kvgen was built without the `torch` feature (see README)")
    monkeypatch.setenv("KVGEN_CUDA_GRAPHS", "emulate")
    emulated = kvgen.Generator.from_pretrained(str(gemma_dir(kind)), backend="torch")
    eager = gemma_gen(kind, "torch")
    enc = _left_padded(hf_tok, PROMPTS)
    kw = dict(
        attention_mask=enc["attention_mask"], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )
    a = emulated.generate(enc["input_ids"], **kw)
    b = eager.generate(enc["input_ids"], **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits) == NEW_TOKENS
    for step, (x, y) in enumerate(zip(a.logits, b.logits)):
        diff = np.abs(np.asarray(x) - np.asarray(y)).max()
        assert diff <= LOGITS_ATOL["torch"], f"{kind}: step {step} emulated-graph vs eager logits differ by {diff:.3g}"
    # A second batch shape (three rows) records and fills another layout.
    c = emulated.generate(enc["input_ids"][1:], attention_mask=enc["attention_mask"][1:], max_new_tokens=30, do_sample=False)
    d = eager.generate(enc["input_ids"][1:], attention_mask=enc["attention_mask"][1:], max_new_tokens=30, do_sample=False)
    assert torch.equal(c, d)
    assert "CUDA graph" not in capfd.readouterr().err, "the graph path failed and fell back to eager"


@pytest.mark.parametrize("kind", KINDS)
def test_neuron_bf16_graphs_within_tolerance(kind, kvgen, hf_tok, gemma_dir, gemma_hf):
    pytest.importorskip("jax", reason="jax==0.10.2 / jaxlib==0.10.2 run the Neuron graphs on XLA:CPU")
    path = str(gemma_dir(kind))
    gen = kvgen.Generator.from_pretrained(path, device="neuron", tp_degree=2, neuron_executor="xla-cpu", **NEURON_SET)
    assert gen.dtype == "bfloat16"
    cpu = kvgen.Generator.from_pretrained(path, backend="native", dtype="bfloat16")
    enc = hf_tok(PROMPTS[3], return_tensors="pt")
    assert enc["input_ids"].shape[1] > WINDOW
    # The bounds of test_neuron_xla.py: weights and caches in bf16, arithmetic in f32.
    ref = hf_forward_logits(gemma_hf(kind), enc["input_ids"])[0, -1]
    assert_bf16_graphs_close(gen, cpu, enc["input_ids"], ref, kind)


@pytest.mark.parametrize("backend", ["native-tp2", "neuron-tp2"])
def test_one_kv_head_replicated_at_tp2(backend, kvgen, hf_tok, gemma_mqa_dir):
    """One kv head (and its k_norm) held by both ranks while the query heads split."""
    hf = load_hf(gemma_mqa_dir)
    assert hf.config.num_key_value_heads == 1
    gen = _load(kvgen, str(gemma_mqa_dir), backend)
    enc = _left_padded(hf_tok, PROMPTS)
    prompt_len = enc["input_ids"].shape[1]
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref = hf_generate(hf, **enc, **kw)
    out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    what, eos = f"gemma3 1 kv head {backend}", eos_ids_of(hf)
    assert_sequences_match(out.sequences, ref, prompt_len, what=what, eos_ids=eos, min_compared=len(PROMPTS) * len(ref.logits))
    _assert_step_logits(out, ref, prompt_len, eos, LOGITS_ATOL[backend], what)
