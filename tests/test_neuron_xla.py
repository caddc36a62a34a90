"""The whole Neuron path on a CPU: `Generator.from_pretrained(d, device="neuron", tp_degree=2,
neuron_executor="xla-cpu")` records the model's graph set (context encoding per bucket, token
generation per batch size and bucket), and a worker process runs the very `.hlo.pb` bytes that
neuronx-cc would compile on XLA's CPU backend with two host devices, one per rank. Everything but
the compiler and libnrt runs: bucket choice, right-padding, positions, cache rows, the scheduler,
host sampling, the vocab-split logits.

Checked: greedy tokens and per-step f32 logits (1e-4) against transformers on every fixture
architecture, left-padded batches and single prompts, prompts and generations that cross bucket
boundaries; seeded sampling equal to the native CPU backend; the KV caches read back from the
device, concatenated over heads, equal transformers' past_key_values; with one replicated kv head
(MQA) both ranks' caches are bit-identical (so every all-reduce left the ranks bit-identical);
bf16 graphs within a stated tolerance; export -> manifest.json consistent with the graph bytes
themselves; stale or tampered exports refused; a worker that dies is a BackendError, and errors
a user can cause name the value, the limit and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import pytest
import torch

from test_tensor_parallel import (  # noqa: F401 - tp_dir/tp_hf are fixtures
    _alive,
    _greedy_vs_hf,
    _left_padded,
    _single_vs_hf,
    tp_dir,
    tp_hf,
)
from tiny_models import ALL_KINDS, PROMPTS, load_hf, to_torch

pytest.importorskip("jax", reason="jax==0.10.2 / jaxlib==0.10.2 run the Neuron graphs on XLA:CPU")

KINDS = [k for k in ALL_KINDS if k != "llama_dynamic_rope"]  # refused: see test_dynamic_rope_is_refused
# Buckets 8/16/32/64: the prompts (4, 9, 12 and 36 tokens) run the 8-, 16- and 64-token context
# graphs, and 24 new tokens take the 12-token prompt from the 16- into the 32- and 64-position
# token-generation graphs.
SET = dict(buckets=(8, 16, 32, 64), max_context=64, batch_sizes=(1, 4))
# bf16 graphs: weights and caches in bf16, arithmetic in f32. Against the CPU backend with the same
# bf16 weights (f32 arithmetic) and against transformers in f32 (measured: see the test).
# Measured on these fixtures (logit scale ~7-10): <= 1e-3 / <= 0.17 / <= 0.045.
BF16_ATOL = 1e-3
BF16_CACHE_ATOL = 0.25
BF16_VS_F32 = 0.06


@pytest.fixture(scope="module")
def neuron_gen(kvgen, tp_dir):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32", **kw):
        key = (kind, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            opts = dict(SET, **kw)
            cache[key] = kvgen.Generator.from_pretrained(
                str(tp_dir(kind)), device="neuron", tp_degree=2, neuron_executor="xla-cpu", dtype=dtype, **opts
            )
        return cache[key]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_left_padded_batch_matches_transformers_and_the_cpu_backend(kind, kvgen, hf_tok, tp_hf, tp_dir, neuron_gen):
    gen = neuron_gen(kind)
    _greedy_vs_hf(gen, tp_hf(kind), hf_tok, kind, f"{kind} neuron xla-cpu tp2")
    enc = _left_padded(hf_tok, PROMPTS)
    kw = dict(attention_mask=enc["attention_mask"], max_new_tokens=24, do_sample=False)
    cpu = kvgen.Generator.from_pretrained(str(tp_dir(kind)))
    assert torch.equal(to_torch(gen.generate(enc["input_ids"], **kw)), to_torch(cpu.generate(enc["input_ids"], **kw)))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_single_prompts_match_transformers(kind, hf_tok, tp_hf, neuron_gen):
    gen = neuron_gen(kind)
    for index in (0, 3):
        _single_vs_hf(gen, tp_hf(kind), hf_tok, kind, index, f"{kind} neuron xla-cpu tp2")


def test_prompts_and_generations_cross_buckets(hf_tok):
    """The fixtures above do cross the buckets they are meant to."""
    lens = [len(hf_tok(p)["input_ids"]) for p in PROMPTS]
    assert sorted(lens)[0] <= 8 < sorted(lens)[1] <= 16 < 32 < max(lens), lens  # context graphs n8, n16, n64
    assert 16 < sorted(lens)[2] + 24 > 32 and max(lens) + 24 <= 64  # token generation n16 -> n32 -> n64


@pytest.mark.parametrize("kind", ["llama_mqa", "llama_8q2kv"])
def test_head_layouts_match_transformers(kind, hf_tok, tp_hf, neuron_gen):
    _greedy_vs_hf(neuron_gen(kind), tp_hf(kind), hf_tok, kind, f"{kind} neuron xla-cpu tp2")


@pytest.mark.parametrize("kind", ["llama_tied", "qwen3"])
def test_seeded_sampling_equals_the_cpu_backend(kind, kvgen, hf_tok, tp_dir, neuron_gen):
    cpu = kvgen.Generator.from_pretrained(str(tp_dir(kind)))
    gen = neuron_gen(kind)
    enc = _left_padded(hf_tok, PROMPTS)
    for seed in (0, 7, 1234):
        kw = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=16, seed=seed)
        a = cpu.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        b = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        assert torch.equal(to_torch(a), to_torch(b)), f"{kind} seed {seed}"


def _caches(gen, layer: int, kind: str, cfg, max_batch: int) -> list[np.ndarray]:
    """Each rank's K or V cache of `layer`: [max_batch, max_context, kv_heads_per_rank, head_dim]."""
    shape = (max_batch, SET["max_context"], -1, cfg.head_dim)
    return [np.frombuffer(b, np.float32).reshape(shape) for b in gen._debug_tensor(f"layers.{layer}.{kind}_cache")]


def test_caches_concatenated_over_heads_equal_transformers(kvgen, tp_dir, neuron_gen):
    """After one generation (slot 0), each layer's K/V cache rows of both ranks, concatenated
    over kv heads, equal transformers' past_key_values for the same tokens."""
    kind = "llama"
    gen = neuron_gen(kind, batch_sizes=(1,))
    prompt = [1, 5, 9, 22, 7, 31, 40, 2, 17, 3, 11]
    out = gen.generate(np.array([prompt]), max_new_tokens=8, do_sample=False)
    seq = torch.tensor(np.asarray(out))[:, :-1]  # the last token is sampled, never written
    hf = load_hf(tp_dir(kind))
    with torch.no_grad():
        pkv = hf(seq, use_cache=True).past_key_values
    n = seq.shape[1]
    for layer in range(hf.config.num_hidden_layers):
        for which in ("k", "v"):
            ranks = _caches(gen, layer, which, hf.config, max_batch=1)
            ours = np.concatenate([r[0, :n] for r in ranks], axis=1)  # [n, kv_heads, head_dim]
            lay = pkv.layers[layer]
            ref = (lay.keys if which == "k" else lay.values)[0].permute(1, 0, 2).numpy()
            np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5, err_msg=f"layer {layer} {which}")


def test_replicated_kv_head_caches_are_bit_identical_across_ranks(neuron_gen):
    """llama_mqa: one kv head, held by both ranks. Its cache at layer >= 1 is computed from the
    residual stream after the all-reduces, so bit-identical caches mean every all-reduce left the
    two ranks with the same bits."""
    gen = neuron_gen("llama_mqa", batch_sizes=(1,))
    gen.generate(np.array([[1, 5, 9, 22, 7, 31, 40, 2, 17]]), max_new_tokens=6, do_sample=False)
    for layer in range(gen.config.num_hidden_layers):
        a, b = gen._debug_tensor(f"layers.{layer}.k_cache")
        assert a == b, f"layer {layer}: the ranks' caches differ"
        assert any(a), "the cache was written"


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_graphs_within_tolerance(kind, kvgen, hf_tok, tp_hf, tp_dir, neuron_gen):
    """bfloat16 graphs (weights and caches in bf16, arithmetic in f32): every graph compiles on
    XLA; the prefill logits are within BF16_ATOL of the native CPU backend's with the same
    bf16-rounded weights (the prompt attends to its fresh f32 keys), the next step's within
    BF16_CACHE_ATOL (it reads keys/values stored in bf16; the CPU backend keeps f32 caches), the
    tokens equal, and the prefill logits within BF16_VS_F32 of transformers' f32 ones (relative to
    the logit scale: the weights' rounding)."""
    gen = neuron_gen(kind, "bfloat16")
    cpu = kvgen.Generator.from_pretrained(str(tp_dir(kind)), dtype="bfloat16")
    enc = hf_tok(PROMPTS[3], return_tensors="pt")
    assert_bf16_graphs_close(gen, cpu, enc["input_ids"], tp_hf(kind)(**enc).logits[0, -1].detach(), kind)


def assert_bf16_graphs_close(gen, cpu, input_ids, ref_last_logits, what):
    """Two greedy steps of the bf16 graphs `gen` against the native backend `cpu` in bf16 (prefill
    within BF16_ATOL, the step reading bf16 caches within BF16_CACHE_ATOL, tokens equal), and the
    prefill's last logits within BF16_VS_F32 of transformers' f32 `ref_last_logits`, relative to
    the logit scale."""
    kw = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ours, theirs = gen.generate(input_ids, **kw), cpu.generate(input_ids, **kw)
    assert torch.equal(to_torch(ours.sequences), to_torch(theirs.sequences)), what
    for step, tol in enumerate((BF16_ATOL, BF16_CACHE_ATOL)):
        a, b = to_torch(ours.logits[step]).float(), to_torch(theirs.logits[step]).float()
        diff = (a - b).abs().max().item()
        assert diff <= tol, f"{what} bf16 step {step}: max |diff| {diff:.3g} vs the CPU backend in bf16"
    got = to_torch(ours.logits[0])[0].float()
    rel = (got - ref_last_logits).abs().max().item() / ref_last_logits.abs().max().item()
    assert rel <= BF16_VS_F32, f"{what} bf16: max |diff| {rel:.3g} of the logit scale vs transformers f32"


def test_export_manifest_matches_the_graph_bytes(kvgen, tp_dir, tmp_path):
    out = tmp_path / "export"
    path = kvgen.neuron.export(str(tp_dir("qwen2")), out, tp_degree=2, batch_sizes=(1, 2), buckets=(8,), max_context=16, dtype="float32")
    manifest = json.loads(open(path).read())
    assert manifest["tp_degree"] == 2 and manifest["buckets"] == [8, 16] and manifest["batch_sizes"] == [1, 2]
    names = sorted(g["name"] for g in manifest["graphs"])
    assert names == sorted(["cte_b1_n8", "cte_b1_n16", "tkg_b1_n8", "tkg_b1_n16", "tkg_b2_n8", "tkg_b2_n16"])
    dtype_code = {"float32": 11, "bfloat16": 16, "int32": 4}
    import hashlib

    for g in manifest["graphs"]:
        pb = (out / g["file"]).read_bytes()
        assert hashlib.sha256(pb).hexdigest() == g["sha256"]
        params, out_names, aliases = kvgen._kvgen._hlo_graph_io(pb)
        assert [p[0] for p in params] == list(range(len(g["inputs"])))
        for p, i in zip(params, g["inputs"]):
            assert p[1] == i["name"] and p[1] in (i["neff_name"], i["neff_name"].removesuffix(".must_alias_input"))
            assert (p[2], list(p[3])) == (dtype_code[i["dtype"]], i["shape"]), i["name"]
            assert i["neff_name"].endswith(".must_alias_input") == (i["role"] == "cache")
        assert out_names == [o["neff_name"] for o in g["outputs"]]
        by_name = {i["name"]: n for n, i in enumerate(g["inputs"])}
        want = [(n, by_name[o["aliases"]], 2) for n, o in enumerate(g["outputs"]) if o["aliases"]]
        assert sorted(aliases) == want and len(want) == 2 * 2  # two layers, K and V, must-alias
        assert g["outputs"][0]["name"] == "logits"
    # The tensors' shard rules (every rank binds the same names).
    rules = {t["name"]: t["shard"] for t in manifest["tensors"]}
    assert rules["layers.0.q_proj.weight"] == "column" and rules["layers.0.q_proj.bias"] == "column"
    assert rules["layers.0.o_proj.weight"] == "row" and rules["layers.1.down_proj.weight"] == "row"
    assert rules["embed_tokens.weight"] == "replicated" and rules["lm_head.weight"] == "vocab"
    mem = manifest["memory_per_rank"]
    assert mem["total"] == mem["weights"] + mem["kv_caches"] + mem["margin"] > 0


def test_an_export_runs_and_stale_or_tampered_ones_are_refused(kvgen, tp_dir, tmp_path):
    out = tmp_path / "export"
    kvgen.neuron.export(str(tp_dir("llama")), out, tp_degree=2, buckets=(8,), max_context=64, dtype="float32")
    kw = dict(device="neuron", tp_degree=2, neuron_executor="xla-cpu", dtype="float32", neuron_dir=str(out))
    gen = kvgen.Generator.from_pretrained(str(tp_dir("llama")), **kw)
    cpu = kvgen.Generator.from_pretrained(str(tp_dir("llama")))
    assert gen.generate(PROMPTS[3], max_new_tokens=12) == cpu.generate(PROMPTS[3], max_new_tokens=12)
    with pytest.raises(kvgen.ModelFormatError, match="export again"):
        kvgen.Generator.from_pretrained(str(tp_dir("qwen2")), **kw)  # another model
    with pytest.raises(kvgen.InvalidInputError, match="tp_degree=2"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama_8q4kv")), **dict(kw, tp_degree=4))
    graph = next(out.glob("tkg_*.hlo.pb"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")
    with pytest.raises(kvgen.ModelFormatError, match="sha256"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), **kw)


def test_streaming_and_concurrent_requests(neuron_gen):
    gen = neuron_gen("llama")
    full = gen.generate(PROMPTS[1], max_new_tokens=20)
    deltas = list(gen.stream(PROMPTS[1], max_new_tokens=20))
    assert len(deltas) > 1 and "".join(deltas) == full
    want = [gen.generate(p, max_new_tokens=16) for p in PROMPTS]
    got: dict = {}

    def run(i):
        got[i] = gen.generate(PROMPTS[i], max_new_tokens=16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(PROMPTS))] == want


def test_user_errors_name_the_limit_and_the_fix(kvgen, tp_dir, neuron_gen):
    gen = neuron_gen("llama")
    with pytest.raises(kvgen.ContextLengthError, match="max_context=64"):
        gen.generate(np.array([list(range(1, 60))]), max_new_tokens=10, do_sample=False)
    with pytest.raises(kvgen.InvalidInputError, match="batch"):
        gen.generate(np.array([[1, 2, 3]] * 5), max_new_tokens=2, do_sample=False)
    with pytest.raises(kvgen.InvalidInputError, match="neuron"):
        gen.logits(np.array([[1, 2, 3]]))
    bad = dict(device="neuron", tp_degree=2, neuron_executor="xla-cpu")
    with pytest.raises(kvgen.InvalidInputError, match="max_context=999"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), max_context=999, **bad)
    with pytest.raises(kvgen.InvalidInputError, match="neuron_executor='tpu'"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), **dict(bad, neuron_executor="tpu"))
    with pytest.raises(kvgen.InvalidInputError, match="float16"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), dtype="float16", **bad)
    with pytest.raises(kvgen.InvalidInputError, match="neuron"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), neuron_dir="x")  # device="cpu"


def test_dynamic_rope_is_refused(kvgen, tp_dir):
    with pytest.raises(kvgen.InvalidInputError, match="dynamic"):
        kvgen.Generator.from_pretrained(
            str(tp_dir("llama_dynamic_rope")), device="neuron", tp_degree=2, neuron_executor="xla-cpu", max_context=16, buckets=(16,)
        )


def test_nrt_without_an_export_says_what_to_run(kvgen, tp_dir):
    with pytest.raises(kvgen.BackendUnavailableError, match="kvgen neuron compile"):
        kvgen.Generator.from_pretrained(str(tp_dir("llama")), device="neuron", tp_degree=2)


def _worker_pids() -> set[int]:
    pids = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read()
                stat = open(f"/proc/{p}/stat").read().split()
            except OSError:
                continue
            if b"_neuron_xla.py" in cmd and int(stat[3]) == os.getpid():
                pids.add(int(p))
    return pids


def test_a_worker_that_dies_is_a_backend_error(kvgen, tp_dir):
    before = _worker_pids()
    gen = kvgen.Generator.from_pretrained(
        str(tp_dir("llama")), device="neuron", tp_degree=2, neuron_executor="xla-cpu", dtype="float32", max_context=16, buckets=(16,)
    )
    (pid,) = _worker_pids() - before
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(kvgen.BackendError, match="XLA:CPU worker"):
        gen.generate(PROMPTS[0], max_new_tokens=3)
