"""The Neuron path's HLO emitter against XLA itself: jaxlib 0.10.2's XLA:CPU verifies, compiles and
runs the very bytes kvgen writes, on two host devices, one per tensor-parallel rank: a pinned
self-check module (a row-parallel matmul shard, an all-reduce over replicas {0, 1} with
replica_groups in field 49, a KV-cache dynamic-update-slice aliased input->output). The model
graphs run end to end in test_neuron_xla.py.

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
