"""The libnrt executor (src/backend/neuron/nrt) against a test double of libnrt.

tests/nrt_double is a stand-in `libnrt.so.1` (built here with cargo) exporting the runtime's C
symbols. It never runs a NEFF: it checks how kvgen calls the runtime (init first, core range,
tensor sizes against the NEFF's tensor info, every tensor bound by name, caches bound to the same
tensor in the input and output set, ranks loaded and executed concurrently, teardown order) and
writes a call log with a `VIOLATION: ...` line for every broken contract. A "NEFF" here is a small
JSON document listing the tensors the double reports from nrt_get_model_tensor_info.

kvgen opens libnrt once per process (KVGEN_LIBNRT, set by the `double` fixture before the first
open), so every test here talks to the same double. Tests steer it through environment variables
it reads at call time (NRT_DOUBLE_LOG, NRT_DOUBLE_CORES, NRT_DOUBLE_BUDGET_BYTES,
NRT_DOUBLE_PEER_TIMEOUT_MS, NRT_DOUBLE_STALL_RANK/_MS, NRT_DOUBLE_NUM_ERR; see its lib.rs). Its
one-shot faults re-arm at each nrt_init, and every test closes its executor (the last close calls
nrt_close), so each test starts from a fresh runtime. The missing-library case runs in a
subprocess, since a loaded library stays loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvgen
from kvgen import _kvgen
from kvgen import errors

Probe = _kvgen._NrtExecutorProbe
ROOT = Path(__file__).resolve().parent.parent
TP = 2
DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "int32": 4}


@pytest.fixture(scope="session")
def double_path(tmp_path_factory) -> Path:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not installed: it is needed to build the libnrt test double (tests/nrt_double)")
    target = tmp_path_factory.mktemp("nrt_double_target")
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    subprocess.run(
        [cargo, "build", "--release", "--quiet", "--manifest-path", str(ROOT / "tests/nrt_double/Cargo.toml")],
        check=True,
        env=env,
    )
    lib = target / "release" / "libnrt_double.so"
    assert lib.exists(), lib
    return lib


@pytest.fixture
def double(double_path, tmp_path, monkeypatch) -> Path:
    """Points kvgen at the double and gives the test its own call log; returns the log's path."""
    monkeypatch.setenv("KVGEN_LIBNRT", str(double_path))
    log = tmp_path / "nrt_calls.log"
    monkeypatch.setenv("NRT_DOUBLE_LOG", str(log))
    for var in ("NRT_DOUBLE_CORES", "NRT_DOUBLE_BUDGET_BYTES", "NRT_DOUBLE_STALL_RANK", "NRT_DOUBLE_NUM_ERR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KVGEN_NEURON_EXEC_TIMEOUT", raising=False)
    return log


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def violations(log: Path) -> list[str]:
    return [line for line in log_lines(log) if line.startswith("VIOLATION")]


# ---- a small hand-written export: 1 layer, V=8 split over 2 ranks, caches of 8 positions ----

def spec(name, shape, dtype="float32"):
    return {"name": name, "shape": shape, "dtype": dtype}


def nbytes(t) -> int:
    n = 1
    for d in t["shape"]:
        n *= d
    return n * DTYPE_SIZE[t["dtype"]]


PERSISTENT = [
    {**spec("embed", [8, 4]), "role": "weight", "shard": "replicated"},
    {**spec("lm_head", [4, 4]), "role": "weight", "shard": "vocab"},
    {**spec("rope.cos", [8, 1]), "role": "table", "shard": "replicated"},
    {**spec("l0.k_cache", [1, 8, 1, 2], "bfloat16"), "role": "cache", "shard": "local"},
    {**spec("l0.v_cache", [1, 8, 1, 2], "bfloat16"), "role": "cache", "shard": "local"},
]


def graph(phase: str, n: int, default_names: bool = False):
    """One graph; with `default_names` its NEFF uses the compiler's input{i}/output{j} for the
    step tensors (the executor's fallback)."""
    name = f"{'cte' if phase == 'context_encoding' else 'tkg'}_b1_n{n}"
    inputs = []
    for t in PERSISTENT:
        neff = t["name"] + (".must_alias_input" if t["role"] == "cache" else "")
        inputs.append({**spec(t["name"], t["shape"], t["dtype"]), "role": t["role"], "neff_name": neff})
    inputs.append({**spec("input_ids", [1, n], "int32"), "role": "step", "neff_name": "input_ids"})
    inputs.append({**spec("position", [1], "int32"), "role": "step", "neff_name": "position"})
    outputs = [{**spec("logits", [1, 4]), "aliases": None, "neff_name": "logits"}]
    for c in ("l0.k_cache", "l0.v_cache"):
        outputs.append({**spec(c, [1, 8, 1, 2], "bfloat16"), "aliases": c, "neff_name": c})
    neff_tensors = []
    for i, t in enumerate(inputs):
        nm = f"input{i}" if default_names and t["role"] == "step" else t["neff_name"]
        neff_tensors.append({"name": nm, "usage": "input", "size": nbytes(t), "dtype": 10, "shape": t["shape"]})
    for j, t in enumerate(outputs):
        nm = f"output{j}" if default_names and t["aliases"] is None else t["neff_name"]
        neff_tensors.append({"name": nm, "usage": "output", "size": nbytes(t), "dtype": 10, "shape": t["shape"]})
    entry = {
        "name": name,
        "phase": phase,
        "batch": 1,
        "bucket": 8,
        "file": f"{name}.hlo.pb",
        "sha256": "",
        "inputs": inputs,
        "outputs": outputs,
        "neff": f"{name}.neff",
    }
    return entry, {"tensors": neff_tensors}


def write_export(d: Path, neff_edit=None, drop_neff: str | None = None) -> dict:
    graphs, neffs = [], {}
    for phase, n, default in (("context_encoding", 4, True), ("token_generation", 1, False)):
        entry, neff = graph(phase, n, default)
        if neff_edit:
            neff_edit(entry["name"], neff)
        graphs.append(entry)
        neffs[entry["neff"]] = neff
    manifest = {
        "format": "kvgen-neuron/1",
        "kvgen_version": kvgen.__version__,
        "model": {
            "architecture": "LlamaForCausalLM",
            "num_hidden_layers": 1,
            "hidden_size": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 2,
            "intermediate_size": 8,
            "vocab_size": 8,
        },
        "tp_degree": TP,
        "dtype": "float32",
        "max_context": 8,
        "max_batch": 1,
        "batch_sizes": [1],
        "buckets": [8],
        "tensors": PERSISTENT,
        "graphs": graphs,
        "memory_per_rank": {"weights": 0, "kv_caches": 0, "margin": 0, "total": 0},
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for file, neff in neffs.items():
        if file != drop_neff:
            (d / file).write_text(json.dumps(neff))
    return manifest


def put_all(ex) -> None:
    for rank in range(TP):
        for t in PERSISTENT:
            data = None if t["role"] == "cache" else bytes([rank + 1]) * nbytes(t)
            ex.put(rank, t["name"], t["shape"], t["dtype"], data)


def step_inputs(n: int, pos: int) -> list[list[bytes]]:
    ids = b"".join(int(7).to_bytes(4, "little") for _ in range(n))
    return [[ids, pos.to_bytes(4, "little")] for _ in range(TP)]


def opened(export: Path):
    ex = Probe.open(TP)
    put_all(ex)
    ex.load(str(export))
    return ex


# ---- tests ----------------------------------------------------------------------------------

def test_missing_library_is_backend_unavailable(tmp_path):
    missing = tmp_path / "no" / "libnrt.so.1"
    code = (
        "import kvgen\n"
        "from kvgen import _kvgen\n"
        "try:\n"
        "    _kvgen._NrtExecutorProbe.open(2)\n"
        "except kvgen.errors.BackendUnavailableError as e:\n"
        "    print('UNAVAILABLE', e)\n"
    )
    env = dict(os.environ, KVGEN_LIBNRT=str(missing))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("UNAVAILABLE"), out.stdout + out.stderr
    # Every place looked in is named, in search order.
    msg = out.stdout
    assert str(missing) in msg and "/opt/aws/neuron/lib/libnrt.so.1" in msg and "libnrt.so.1 (" in msg, msg
    assert msg.index(str(missing)) < msg.index("/opt/aws/neuron/lib/libnrt.so.1"), msg
    assert "KVGEN_LIBNRT" in msg


def test_fewer_cores_than_tp_is_backend_unavailable(double, monkeypatch):
    monkeypatch.setenv("NRT_DOUBLE_CORES", "1")
    with pytest.raises(errors.BackendUnavailableError, match=r"libnrt sees 1 NeuronCores; tp_degree=2 needs 2"):
        Probe.open(TP)
    # Refused before nrt_init: nothing was started.
    assert not any(line.startswith("nrt_init") for line in log_lines(double))


def test_load_and_run_keep_every_contract(double, tmp_path):
    export = tmp_path / "export"
    write_export(export)
    ex = opened(export)
    try:
        assert ex.ranks() == TP
        out = ex.run("cte_b1_n4", step_inputs(4, 0))
        assert [len(r) for r in out] == [1, 1]
        assert all(len(o) == 16 for r in out for o in r)  # logits [1, 4] f32 per rank
        for pos in range(4, 7):
            out = ex.run("tkg_b1_n1", step_inputs(1, pos))
            assert len(out) == TP and all(o == bytes(16) for r in out for o in r)
    finally:
        ex.close()
    lines = log_lines(double)
    assert violations(double) == []
    assert any("NEURON_RT_VISIBLE_CORES=0-1" in line for line in lines if line.startswith("nrt_init")) or os.environ.get(
        "NEURON_RT_VISIBLE_CORES"
    )
    loads = [line for line in lines if line.startswith("nrt_load_collectives size=")]
    assert len(loads) == 2 * TP and all("ctx_device_count=2" in line and "vnc_count=1" in line for line in loads)
    done = [line for line in lines if line.startswith("nrt_execute") and line.endswith("-> 0")]
    # 4 steps, each on both ranks.
    assert sum("vnc=0 rank=0" in line for line in done) == 4
    assert sum("vnc=1 rank=1" in line for line in done) == 4
    started = [line for line in lines if line.startswith("nrt_execute") and "aliased=" in line]
    assert len(started) == 8 and all(line.endswith("aliased=l0.k_cache,l0.v_cache") for line in started)
    # Caches zeroed once per rank, weights written, step inputs written every step.
    assert sum(line.startswith("nrt_tensor_memset l0.k_cache") for line in lines) == TP
    # The context graph's NEFF names its step tensors input{i}/output{j} (the fallback binding).
    assert sum(line.startswith("nrt_tensor_write position") for line in lines) == 3 * TP
    assert sum(line.startswith("nrt_tensor_write input6") for line in lines) == TP
    assert sum(line.startswith("nrt_tensor_read output0") for line in lines) == TP


def test_neff_that_disagrees_with_the_manifest_names_the_tensor(double, tmp_path):
    def shrink(name, neff):
        if name == "tkg_b1_n1":
            for t in neff["tensors"]:
                if t["name"] == "l0.v_cache.must_alias_input":
                    t["size"] = 16

    export = tmp_path / "export"
    write_export(export, neff_edit=shrink)
    ex = Probe.open(TP)
    try:
        put_all(ex)
        with pytest.raises(errors.ModelFormatError) as info:
            ex.load(str(export))
    finally:
        ex.close()
    msg = str(info.value)
    assert "l0.v_cache.must_alias_input" in msg and "16 bytes" in msg and "32 bytes" in msg, msg
    assert "tkg_b1_n1" in msg, msg
    assert violations(double) == []


def test_graph_without_neff_says_to_compile(double, tmp_path):
    export = tmp_path / "export"
    write_export(export, drop_neff="tkg_b1_n1.neff")
    ex = Probe.open(TP)
    try:
        with pytest.raises(errors.BackendUnavailableError, match="python -m kvgen neuron compile"):
            ex.load(str(export))
    finally:
        ex.close()


def test_stuck_rank_is_reported_and_the_executor_recovers(double, tmp_path, monkeypatch):
    export = tmp_path / "export"
    write_export(export)
    monkeypatch.setenv("NRT_DOUBLE_STALL_RANK", "1")
    monkeypatch.setenv("NRT_DOUBLE_STALL_MS", "2500")
    monkeypatch.setenv("NRT_DOUBLE_PEER_TIMEOUT_MS", "500")
    monkeypatch.setenv("KVGEN_NEURON_EXEC_TIMEOUT", "1.5")
    ex = opened(export)
    try:
        with pytest.raises(errors.BackendError, match=r"rank 1 did not answer within 1\.5 s") as info:
            ex.run("tkg_b1_n1", step_inputs(1, 0))
        assert "rank 0" not in str(info.value)
        # The next step waits for rank 1 to come back, then runs normally.
        out = ex.run("tkg_b1_n1", step_inputs(1, 1))
        assert len(out) == TP
    finally:
        ex.close()
    lines = log_lines(double)
    assert any("rank=0 exec=1 -> NRT_TIMEOUT" in line for line in lines)
    assert sum(line.startswith("nrt_execute") and line.endswith("exec=2 -> 0") for line in lines) == TP
    assert violations(double) == []


def test_runtime_timeout_names_the_rank(double, tmp_path, monkeypatch):
    # The stalled rank comes back within kvgen's watchdog: the peer's NRT_TIMEOUT is reported.
    export = tmp_path / "export"
    write_export(export)
    monkeypatch.setenv("NRT_DOUBLE_STALL_RANK", "1")
    monkeypatch.setenv("NRT_DOUBLE_STALL_MS", "800")
    monkeypatch.setenv("NRT_DOUBLE_PEER_TIMEOUT_MS", "300")
    monkeypatch.setenv("KVGEN_NEURON_EXEC_TIMEOUT", "5")
    ex = opened(export)
    try:
        with pytest.raises(errors.BackendError, match=r"rank 0 did not answer.*NRT_TIMEOUT \(5\)"):
            ex.run("tkg_b1_n1", step_inputs(1, 0))
        ex.run("tkg_b1_n1", step_inputs(1, 1))
    finally:
        ex.close()
    assert violations(double) == []


def test_device_memory_budget_is_out_of_memory_before_any_execute(double, tmp_path, monkeypatch):
    monkeypatch.setenv("NRT_DOUBLE_BUDGET_BYTES", "224")  # weights and table fit (224 B), caches do not
    ex = Probe.open(TP)
    try:
        with pytest.raises(errors.OutOfMemoryError) as info:
            put_all(ex)
    finally:
        ex.close()
    msg = str(info.value)
    assert "rank 0" in msg and "l0.k_cache" in msg and "32 bytes" in msg and "tp_degree" in msg, msg
    lines = log_lines(double)
    assert not any(line.startswith("nrt_execute") for line in lines)
    assert violations(double) == []


def test_nan_on_device_is_numerical_error(double, tmp_path, monkeypatch):
    export = tmp_path / "export"
    write_export(export)
    monkeypatch.setenv("NRT_DOUBLE_NUM_ERR", "1")
    ex = opened(export)
    try:
        with pytest.raises(errors.NumericalError, match="NaN"):
            ex.run("tkg_b1_n1", step_inputs(1, 0))
        ex.run("tkg_b1_n1", step_inputs(1, 1))  # only the first execute was poisoned
    finally:
        ex.close()
    assert violations(double) == []


def test_teardown_frees_everything_before_nrt_close(double, tmp_path):
    export = tmp_path / "export"
    write_export(export)
    ex = opened(export)
    ex.run("tkg_b1_n1", step_inputs(1, 0))
    ex.close()
    lines = log_lines(double)
    assert violations(double) == []
    close = [i for i, line in enumerate(lines) if line.startswith("nrt_close")]
    assert len(close) == 1 and close[0] == len(lines) - 1, lines[-5:]
    assert lines[close[0]] == "nrt_close live: tensors=0 models=0 sets=0 infos=0"
    frees = [i for i, line in enumerate(lines) if line.startswith(("nrt_tensor_free", "nrt_unload", "nrt_destroy_tensor_set"))]
    # Sets are built at a graph's first run (one graph ran): 2 ranks x 2 sets; 2 ranks x (5
    # persistent + 2 graphs x 3 step) tensors; 2 graphs x 2 ranks models.
    assert len(frees) == 4 + TP * (5 + 2 * 3) + 4
    destroys = [i for i in frees if lines[i].startswith("nrt_destroy_tensor_set")]
    tensor_frees = [i for i in frees if lines[i].startswith("nrt_tensor_free")]
    unloads = [i for i in frees if lines[i].startswith("nrt_unload")]
    assert max(destroys) < min(tensor_frees) and max(tensor_frees) < min(unloads) < close[0]
    # A closed probe refuses further use, and the runtime can be started again.
    with pytest.raises(errors.InvalidInputError, match="closed"):
        ex.run("tkg_b1_n1", step_inputs(1, 1))
    Probe.open(TP).close()
    assert log_lines(double)[-1].startswith("nrt_close live: tensors=0")


DOUBLE_SELF_CHECK = r"""
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
ref = ctypes.byref
lib.nrt_init.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p]
lib.nrt_load_collectives.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_int32,
                                     ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(P)]
lib.nrt_tensor_allocate.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(P)]
lib.nrt_allocate_tensor_set.argtypes = [ctypes.POINTER(P)]
lib.nrt_add_tensor_to_tensor_set.argtypes = [P, ctypes.c_char_p, P]
lib.nrt_execute.argtypes = [P, P, P]
codes = {}
s = P()
codes["set_before_init"] = lib.nrt_allocate_tensor_set(ref(s))
codes["init"] = lib.nrt_init(1, b"", b"")
neff = json.dumps({"tensors": [{"name": "kc.must_alias_input", "usage": "input", "size": 8},
                               {"name": "kc", "usage": "output", "size": 8}]}).encode()
m = P()
codes["load"] = lib.nrt_load_collectives(neff, len(neff), 0, 1, 0, 1, ref(m))
a, b, c = P(), P(), P()
codes["alloc_bad_vnc"] = lib.nrt_tensor_allocate(0, 5, 8, b"x", ref(c))
lib.nrt_tensor_allocate(0, 0, 8, b"a", ref(a))
lib.nrt_tensor_allocate(0, 0, 8, b"b", ref(b))
ins, outs = P(), P()
lib.nrt_allocate_tensor_set(ref(ins))
lib.nrt_allocate_tensor_set(ref(outs))
codes["unbound"] = lib.nrt_execute(m, ins, outs)
lib.nrt_add_tensor_to_tensor_set(ins, b"kc.must_alias_input", a)
lib.nrt_add_tensor_to_tensor_set(outs, b"kc", b)
codes["not_aliased"] = lib.nrt_execute(m, ins, outs)
lib.nrt_add_tensor_to_tensor_set(outs, b"kc", a)
codes["aliased"] = lib.nrt_execute(m, ins, outs)
lib.nrt_close()
print(json.dumps(codes))
"""


def test_the_double_catches_broken_contracts(double_path, tmp_path):
    """The double is not vacuous: calls that break the contracts are refused and logged."""
    log = tmp_path / "calls.log"
    env = dict(os.environ, NRT_DOUBLE_LOG=str(log))
    out = subprocess.run(
        [sys.executable, "-c", DOUBLE_SELF_CHECK, str(double_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    codes = json.loads(out.stdout)
    assert codes == {
        "set_before_init": 2,
        "init": 0,
        "load": 0,
        "alloc_bad_vnc": 2,
        "unbound": 2,
        "not_aliased": 2,
        "aliased": 0,
    }, codes
    found = "\n".join(violations(log))
    for what in ("before nrt_init", "vnc=5 outside", "is not bound", "must alias", "nrt_close while"):
        assert what in found, found


# ---- the whole device="neuron" path on the double: export -> (fake) compile -> generate ----

def fake_compile(export_dir: Path) -> None:
    """What `kvgen.neuron.compile` leaves behind, with the double's JSON "NEFFs" listing each
    graph's tensors by the names and sizes neuronx-cc would give them."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for g in manifest["graphs"]:
        tensors = [{"name": t["neff_name"], "usage": "input", "size": nbytes(t), "dtype": 10, "shape": t["shape"]} for t in g["inputs"]]
        tensors += [{"name": t["neff_name"], "usage": "output", "size": nbytes(t), "dtype": 10, "shape": t["shape"]} for t in g["outputs"]]
        (export_dir / f"{g['name']}.neff").write_text(json.dumps({"tensors": tensors}))
        g["neff"] = f"{g['name']}.neff"
    (export_dir / "manifest.json").write_text(json.dumps(manifest))


def test_generator_on_the_double_keeps_every_contract(double, model_dir, tmp_path, monkeypatch):
    """from_pretrained(device="neuron", tp_degree=2, neuron_dir=...) with libnrt = the double:
    weights and tables uploaded once per rank, caches zeroed once, one NEFF per graph per rank
    loaded concurrently, every step's graphs executed by both ranks together with the caches
    bound in both sets, no contract broken. (The double computes nothing: its logits are zeros,
    so greedy picks token 0.) A stalled rank times its peer out, and the generator stays usable."""
    import gc

    import numpy as np

    out = tmp_path / "export"
    model = str(model_dir("llama"))
    kvgen.neuron.export(model, out, tp_degree=2, batch_sizes=(1, 2), buckets=(8,), max_context=16, dtype="bfloat16")
    fake_compile(out)
    # Rank 1's first execute stalls past kvgen's deadline.
    monkeypatch.setenv("KVGEN_NEURON_EXEC_TIMEOUT", "1.5")
    monkeypatch.setenv("NRT_DOUBLE_STALL_RANK", "1")
    monkeypatch.setenv("NRT_DOUBLE_STALL_MS", "2200")  # back within the retry's bounded wait
    gen = kvgen.Generator.from_pretrained(model, device="neuron", tp_degree=2, neuron_dir=str(out))
    # The scheduler retries a failed step's requests one by one, so the call still succeeds.
    first = gen.generate(np.array([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert np.asarray(first).shape == (1, 5)
    assert any("NRT_TIMEOUT" in line for line in log_lines(double)), "rank 0 timed out waiting for rank 1"
    stalled = len([line for line in log_lines(double) if line.startswith("nrt_execute") and "aliased=" in line])
    got = gen.generate(np.array([[1, 5, 9, 22, 7, 31, 40, 2, 17, 3]]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert np.asarray(got)[0, -4:].tolist() == [0, 0, 0, 0]
    lines = log_lines(double)
    assert violations(double) == []
    executes = [line for line in lines if line.startswith("nrt_execute") and "aliased=" in line]
    assert len(executes) - stalled == 2 * 4, executes  # 1 context encoding + 3 token generations, 2 ranks each
    loads = [line for line in lines if line.startswith("nrt_load_collectives size=")]
    assert len(loads) == 2 * 6, loads  # cte n8/n16 + tkg b1/b2 x n8/n16, on 2 ranks
    del gen
    gc.collect()
    assert violations(double) == []
