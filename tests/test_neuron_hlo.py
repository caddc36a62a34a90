"""The Neuron path's HLO emitter against XLA itself: jaxlib 0.10.2's XLA:CPU verifies, compiles and
runs the very bytes kvgen writes, on two host devices, one per tensor-parallel rank: a pinned
self-check module (a row-parallel matmul shard, an all-reduce over replicas {0, 1} with
replica_groups in field 49, a KV-cache dynamic-update-slice aliased input->output), and the
family forward of src/model/ recorded through the HLO Ops backend at tp_degree=2 (context
encoding on every fixture architecture; prefill then decode graphs generating greedily).

The XLA harness runs in a subprocess: a malformed module can crash jaxlib, not just raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tiny_models import ALL_KINDS

pytest.importorskip("jax", reason="jax==0.10.2 / jaxlib==0.10.2 run the emitted HLO on XLA:CPU")

HARNESS = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np
    import jax, jax.extend
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    d = sys.argv[1]
    pb = open(os.path.join(d, "graph.pb"), "rb").read()
    be = jax.extend.backend.get_backend("cpu")
    devs = be.local_devices()[:2]
    opts = jax.extend.backend.get_compile_options(
        num_replicas=2, num_partitions=1, device_assignment=np.array(devs).reshape(2, 1))
    exe = be.compile_and_load(jax.extend.mlir.hlo_to_stablehlo(pb), devs, opts)
    mesh = Mesh(devs, ("rank",))

    def sharded(per_rank):
        parts = [jax.device_put(a, devs[r]) for r, a in enumerate(per_rank)]
        if per_rank[0].ndim == 0:
            return jax.make_array_from_single_device_arrays((), NamedSharding(mesh, P()), parts)
        shape = (2 * per_rank[0].shape[0],) + per_rank[0].shape[1:]
        return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, P("rank")), parts)

    inputs = np.load(os.path.join(d, "inputs.npz"))
    names = json.loads(open(os.path.join(d, "names.json")).read())
    args = [sharded([inputs[f"{n}_0"], inputs[f"{n}_1"]]) for n in names]
    outs = exe.execute_sharded(args).disassemble_into_single_device_arrays()
    np.savez(os.path.join(d, "outputs.npz"),
             **{f"out{i}_{r}": np.asarray(a) for i, per in enumerate(outs) for r, a in enumerate(per)})
    """
)


def run_on_xla(tmp_path, pb: bytes, inputs: dict[str, list[np.ndarray]]) -> list[list[np.ndarray]]:
    (tmp_path / "graph.pb").write_bytes(pb)
    (tmp_path / "names.json").write_text(json.dumps(list(inputs)))
    np.savez(tmp_path / "inputs.npz", **{f"{n}_{r}": a for n, per in inputs.items() for r, a in enumerate(per)})
    done = subprocess.run([sys.executable, "-c", HARNESS, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"XLA rejected or crashed on kvgen's module:\n{done.stderr[-4000:]}"
    out = np.load(tmp_path / "outputs.npz")
    n_out = len({k.rsplit("_", 1)[0] for k in out.files})
    return [[out[f"out{i}_{r}"] for r in (0, 1)] for i in range(n_out)]


def test_xla_runs_kvgen_module_with_field_49_all_reduce_and_aliased_cache(kvgen, tmp_path):
    n, k, m, rows, pos = 2, 8, 3, 6, 3
    pb = kvgen._kvgen._hlo_selfcheck_graph(n, k, m, rows)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 2 * k), dtype=np.float32)
    w = rng.standard_normal((m, 2 * k), dtype=np.float32)
    cache = rng.standard_normal((rows, m), dtype=np.float32)
    # Row-parallel shards: rank r holds columns [r*k, (r+1)*k) of x and w.
    inputs = {
        "x": [x[:, :k].copy(), x[:, k:].copy()],
        "w": [w[:, :k].copy(), w[:, k:].copy()],
        "cache": [cache, cache.copy()],
        "pos": [np.int32(pos), np.int32(pos)],
    }
    (y0, y1), (c0, c1) = run_on_xla(tmp_path, pb, inputs)
    want = x @ w.T
    np.testing.assert_allclose(y0, want, rtol=1e-5, atol=1e-5)
    # The all-reduce leaves both ranks with the same bits.
    assert y0.tobytes() == y1.tobytes()
    expected_cache = cache.copy()
    expected_cache[pos : pos + n] = y0
    np.testing.assert_array_equal(c0, expected_cache)
    assert c0.tobytes() == c1.tobytes()


def test_selfcheck_graph_sizes_are_validated(kvgen):
    with pytest.raises(kvgen.InvalidInputError, match="sizes"):
        kvgen._kvgen._hlo_selfcheck_graph(0, 8, 3, 6)
    with pytest.raises(kvgen.InvalidInputError, match="sizes"):
        kvgen._kvgen._hlo_selfcheck_graph(8, 8, 3, 4)  # the update is taller than the cache


PREFILL = [1, 5, 9, 22, 7, 31, 40, 2, 17, 3, 11]  # longer than the Mistral fixture's window (8)


def _inputs_of(ranks) -> dict[str, list[np.ndarray]]:
    """Each graph input's per-rank array, from `_hlo_record_step`'s bindings."""
    names = [b[0] for b in ranks[0][1]]
    assert all([b[0] for b in r[1]] == names for r in ranks)
    return {
        name: [
            np.frombuffer(bytes(r[1][i][3]), dtype=np.float32 if r[1][i][2] == "f32" else np.int32)
            .reshape(r[1][i][1])
            .copy()
            for r in ranks
        ]
        for i, name in enumerate(names)
    }


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_recorded_forward_at_tp2_runs_on_xla_and_matches_the_cpu_backend(kind, kvgen, kv_model, model_dir, tmp_path):
    """The family forward of src/model/, recorded through the HLO Ops backend for each rank of
    tp_degree=2 (context encoding of one prompt), runs on XLA:CPU as one graph on two replicas;
    the rank-order concatenation of the vocab-split logits equals the native CPU backend's."""
    ranks = kvgen._kvgen._hlo_record_step(str(model_dir(kind)), 2, PREFILL, 0, len(PREFILL))
    assert len(ranks) == 2
    assert bytes(ranks[0][0]) == bytes(ranks[1][0]), "both ranks must run the same graph"
    outs = run_on_xla(tmp_path, bytes(ranks[0][0]), _inputs_of(ranks))
    logits = np.concatenate([outs[0][0], outs[0][1]], axis=-1)[0]
    ref = kv_model(kind).logits(np.array([PREFILL]))[0, -1]
    assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), kind
    # Caches come back per rank (its kv heads), one k and one v per layer.
    assert len(outs) == 1 + 2 * kv_model(kind).config.num_hidden_layers


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_recorded_prefill_then_decode_graphs_generate_the_cpu_backends_tokens(kind, kvgen, kv_model, model_dir, tmp_path):
    """Greedy generation through the recorded graphs at tp_degree=2: one context-encoding graph,
    then one token-generation graph replayed every step (the same bytes whatever the position),
    the caches each step returns fed to the next; the tokens equal the native CPU backend's."""
    prompt, steps, bucket = PREFILL[:6], 6, 16  # 12 positions > the Mistral window (8)
    gen = kv_model(kind)
    want = [int(t) for t in gen.generate(np.array([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)[0][len(prompt):]]
    record = lambda toks, pos: kvgen._kvgen._hlo_record_step(str(model_dir(kind)), 2, toks, pos, bucket)
    ranks = record(prompt, 0)
    (tmp_path / "prefill").mkdir()
    outs = run_on_xla(tmp_path / "prefill", bytes(ranks[0][0]), _inputs_of(ranks))
    cache_names = [n for n in _inputs_of(ranks) if n.endswith("_cache")]
    got, decode_graph = [], None
    for step in range(steps):
        logits = np.concatenate([outs[0][0], outs[0][1]], axis=-1)[0]
        token = int(np.argmax(logits))
        got.append(token)
        if step == steps - 1:
            break
        ranks = record([token], len(prompt) + step)
        graph = bytes(ranks[0][0])
        assert decode_graph in (None, graph), "a token-generation graph must not depend on the position"
        decode_graph = graph
        inputs = _inputs_of(ranks)
        for i, name in enumerate(cache_names):
            inputs[name] = [outs[1 + i][0], outs[1 + i][1]]
        d = tmp_path / f"decode{step}"
        d.mkdir()
        outs = run_on_xla(d, graph, inputs)
    assert got == want, f"{kind}: XLA graphs {got} vs CPU backend {want}"
