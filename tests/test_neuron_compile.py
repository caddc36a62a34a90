"""kvgen.neuron.compile / export's Python side, without neuronx-cc: a fake export (arbitrary graph
bytes, a manifest in the kvgen-neuron/1 schema with real sha256s) and a fake `neuronx-cc` script
that logs its argv and writes the --output file. Covers the command lines per phase, the manifest
update, the NEFF cache (hits, misses, force), tampered graphs, compiler failures, the no-compiler
message, the CLI, and export's argument checks and memory estimate."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kvgen
from kvgen import neuron

FAKE_CC = textwrap.dedent("""\
    #!{python}
    # Fake neuronx-cc: logs argv (one JSON line per call), writes --output.
    import json, os, sys
    with open(os.environ["FAKE_CC_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if sys.argv[1:] == ["--version"]:
        print(os.environ.get("FAKE_CC_VERSION", "NeuronX Compiler version 2.99.0+fake"))
        sys.exit(0)
    assert sys.argv[1] == "compile", sys.argv
    if os.environ.get("FAKE_CC_FAIL"):
        for i in range(60):
            print(f"noise line {{i}}")
        sys.stdout.flush()  # a pipe buffers stdout: keep the error after the noise, as a compiler logs
        print("ERROR 000: [EVRF001] fake compiler rejected the graph", file=sys.stderr)
        out = sys.argv[sys.argv.index("--output") + 1]
        open(out, "wb").write(b"half a neff")  # a partial output must not reach the cache
        sys.exit(1)
    src = sys.argv[3]
    out = sys.argv[sys.argv.index("--output") + 1]
    with open(out, "wb") as f:
        f.write(b"NEFF:" + open(src, "rb").read())
""")

GRAPHS = [("cte_b1_n128", "context_encoding", 1, 128), ("tkg_b1_n128", "token_generation", 1, 128)]


def _graph_entry(name, phase, batch, bucket, data):
    return {
        "name": name, "phase": phase, "batch": batch, "bucket": bucket, "file": f"{name}.hlo.pb",
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": [{"name": "tokens", "shape": [batch, bucket], "dtype": "int32", "role": "step",
                    "neff_name": "tokens"},
                   {"name": "l0.k_cache", "shape": [batch, 1, 512, 8], "dtype": "bfloat16", "role": "cache",
                    "neff_name": "l0.k_cache.must_alias_input"}],
        "outputs": [{"name": "logits", "shape": [batch, 16], "dtype": "float32", "aliases": None,
                     "neff_name": "output0"},
                    {"name": "l0.k_cache", "shape": [batch, 1, 512, 8], "dtype": "bfloat16",
                     "aliases": "l0.k_cache", "neff_name": "l0.k_cache"}],
        "neff": None,
    }


def _manifest(graphs, total=3 << 30):
    return {
        "format": "kvgen-neuron/1", "kvgen_version": "0.1.0",
        "model": {"architecture": "LlamaForCausalLM", "num_hidden_layers": 1, "hidden_size": 16,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32,
                  "vocab_size": 32},
        "tp_degree": 2, "dtype": "bfloat16", "max_context": 512, "max_batch": 1, "batch_sizes": [1],
        "buckets": [128],
        "tensors": [{"name": "embed", "shape": [32, 16], "dtype": "bfloat16", "role": "weight", "shard": "replicated"}],
        "graphs": graphs,
        "memory_per_rank": {"weights": 2 << 30, "kv_caches": 512 << 20, "margin": 512 << 20, "total": total},
    }


@pytest.fixture
def export_dir(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    graphs = []
    for i, (name, phase, batch, bucket) in enumerate(GRAPHS):
        data = bytes([i + 1]) * 64 + name.encode()
        (d / f"{name}.hlo.pb").write_bytes(data)
        graphs.append(_graph_entry(name, phase, batch, bucket, data))
    (d / "manifest.json").write_text(json.dumps(_manifest(graphs), indent=2) + "\n")
    return d


@pytest.fixture
def fake_cc(tmp_path, monkeypatch):
    """A fake neuronx-cc alone on PATH; returns the reader of its argv log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cc = bindir / "neuronx-cc"
    cc.write_text(FAKE_CC.format(python=sys.executable))
    cc.chmod(0o755)
    logf = tmp_path / "cc.log"
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("FAKE_CC_LOG", str(logf))
    monkeypatch.delenv("FAKE_CC_FAIL", raising=False)
    monkeypatch.delenv("FAKE_CC_VERSION", raising=False)
    monkeypatch.delenv("NEURON_CC_FLAGS", raising=False)

    def calls(kind="compile"):
        if not logf.exists():
            return []
        argvs = [json.loads(line) for line in logf.read_text().splitlines()]
        return [a for a in argvs if (a[:1] == ["compile"]) == (kind == "compile")]

    calls.path = cc
    return calls


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    d = tmp_path / "neff-cache"
    monkeypatch.setenv("KVGEN_NEURON_CACHE", str(d))
    return d


def _by_input(calls):
    return {Path(argv[2]).name: argv for argv in calls}


def test_flags_per_phase(export_dir, fake_cc, monkeypatch):
    monkeypatch.setenv("NEURON_CC_FLAGS", "--lnc=1 '--tensorizer-options=--a --b'")
    kvgen.neuron.compile(export_dir, extra_flags=["--verbose=35"])
    calls = _by_input(fake_cc())
    assert set(calls) == {"cte_b1_n128.hlo.pb", "tkg_b1_n128.hlo.pb"}
    for name, phase, _, _ in GRAPHS:
        argv = calls[f"{name}.hlo.pb"]
        opt = "-O1" if phase == "context_encoding" else "-O2"
        assert argv[:-1] == ["compile", "--framework=XLA", str(export_dir / f"{name}.hlo.pb"), "--target=inf2",
                             "--model-type=transformer", "--auto-cast=none", opt, "--verbose=35", "--lnc=1",
                             "--tensorizer-options=--a --b", "--output"]
        assert Path(argv[-1]).name == f"{name}.neff"
    assert fake_cc("version") == [["--version"]]


def test_manifest_records_neffs_and_keeps_the_rest(export_dir, fake_cc):
    before = json.loads((export_dir / "manifest.json").read_text())
    (export_dir / "manifest.json").chmod(0o644)
    path = neuron.compile(str(export_dir / "manifest.json"))
    assert Path(path).stat().st_mode & 0o777 == 0o644  # the atomic rewrite keeps the file's mode
    assert Path(path) == (export_dir / "manifest.json").resolve()
    after = json.loads(Path(path).read_text())
    for g in after["graphs"]:
        assert g["neff"] == f"{g['name']}.neff"
        src = (export_dir / g["file"]).read_bytes()
        assert (export_dir / g["neff"]).read_bytes() == b"NEFF:" + src
        g["neff"] = None
    assert after == before
    assert list(after) == list(before)  # key order kept too
    assert not [p for p in export_dir.iterdir() if p.name.endswith(".tmp")]


def test_second_compile_hits_the_cache(export_dir, fake_cc, cache):
    neuron.compile(export_dir)
    assert len(fake_cc()) == 2 and len(list(cache.glob("*.neff"))) == 2
    for g in GRAPHS:
        (export_dir / f"{g[0]}.neff").unlink()
    neuron.compile(export_dir)
    assert len(fake_cc()) == 2  # not invoked again for compile
    assert all((export_dir / f"{g[0]}.neff").is_file() for g in GRAPHS)


@pytest.mark.parametrize("change", ["extra_flags", "env_flags", "target", "version"])
def test_cache_misses_on_other_flags_target_or_compiler(export_dir, fake_cc, monkeypatch, change):
    neuron.compile(export_dir)
    kw = {}
    if change == "extra_flags":
        kw["extra_flags"] = ["--lnc=1"]
    elif change == "env_flags":
        monkeypatch.setenv("NEURON_CC_FLAGS", "--verbose=35")
    elif change == "target":
        kw["target"] = "trn1"
    else:
        monkeypatch.setenv("FAKE_CC_VERSION", "NeuronX Compiler version 2.100.0+fake")
    neuron.compile(export_dir, **kw)
    assert len(fake_cc()) == 4
    if change == "target":
        assert all("--target=trn1" in a for a in fake_cc()[2:])


def test_force_recompiles(export_dir, fake_cc):
    neuron.compile(export_dir)
    neuron.compile(export_dir, force=True)
    assert len(fake_cc()) == 4


def test_parallel_jobs(export_dir, fake_cc):
    neuron.compile(export_dir, jobs=2)
    assert len(fake_cc()) == 2
    m = json.loads((export_dir / "manifest.json").read_text())
    assert [g["neff"] for g in m["graphs"]] == [f"{g[0]}.neff" for g in GRAPHS]


def test_cache_dir_argument(export_dir, fake_cc, tmp_path, cache):
    other = tmp_path / "other-cache"
    neuron.compile(export_dir, cache_dir=other)
    assert len(list(other.glob("*.neff"))) == 2 and not list(cache.glob("*.neff"))


def test_explicit_compiler_relative_path(export_dir, fake_cc, tmp_path, monkeypatch):
    # Not on PATH, given relative to the cwd: it must still run from the compile's scratch dir.
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.chdir(tmp_path)
    neuron.compile(export_dir, compiler=os.path.join("bin", "neuronx-cc"))
    assert len(fake_cc()) == 2


def test_tampered_graph_is_a_format_error(export_dir, fake_cc):
    (export_dir / "tkg_b1_n128.hlo.pb").write_bytes(b"edited")
    with pytest.raises(kvgen.ModelFormatError, match=r"tkg_b1_n128\.hlo\.pb.*sha256.*export again"):
        neuron.compile(export_dir)
    assert fake_cc() == []  # checked before compiling anything


def test_failing_compiler_reports_command_and_output(export_dir, fake_cc, cache, monkeypatch):
    monkeypatch.setenv("FAKE_CC_FAIL", "1")
    before = (export_dir / "manifest.json").read_text()
    with pytest.raises(kvgen.BackendError) as ei:
        neuron.compile(export_dir)
    msg = str(ei.value)
    assert "exited 1" in msg and "cte_b1_n128" in msg
    assert f"{fake_cc.path} compile --framework=XLA {export_dir / 'cte_b1_n128.hlo.pb'} --target=inf2" in msg
    assert "EVRF001" in msg and "noise line 59" in msg
    assert "noise line 20" not in msg  # only the last 40 lines
    assert not list(cache.glob("*.neff")) and not [p for p in cache.iterdir()]  # no partial NEFF, no scratch
    assert (export_dir / "manifest.json").read_text() == before
    monkeypatch.delenv("FAKE_CC_FAIL")
    neuron.compile(export_dir)  # a later good run compiles rather than reusing anything
    assert len(fake_cc()) == 3


def test_no_compiler_lists_the_commands(export_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("NEURON_CC_FLAGS", "--lnc=1")
    with pytest.raises(kvgen.BackendUnavailableError) as ei:
        neuron.compile(export_dir)
    msg = str(ei.value)
    assert "neuronx-cc was not found" in msg
    assert f"cd {export_dir}" in msg
    assert ("neuronx-cc compile --framework=XLA cte_b1_n128.hlo.pb --target=inf2 --model-type=transformer "
            "--auto-cast=none -O1 --lnc=1 --output cte_b1_n128.neff") in msg
    assert ("neuronx-cc compile --framework=XLA tkg_b1_n128.hlo.pb --target=inf2 --model-type=transformer "
            "--auto-cast=none -O2 --lnc=1 --output tkg_b1_n128.neff") in msg
    assert f"python -m kvgen neuron compile {export_dir}" in msg


def test_missing_manifest_and_bad_arguments(tmp_path, fake_cc, export_dir):
    with pytest.raises(kvgen.ModelNotFoundError, match="neuron export"):
        neuron.compile(tmp_path / "nowhere")
    with pytest.raises(kvgen.InvalidInputError, match="list of flags"):
        neuron.compile(export_dir, extra_flags="--lnc=1")
    with pytest.raises(kvgen.InvalidInputError, match="jobs=0"):
        neuron.compile(export_dir, jobs=0)


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "kvgen", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_cli_compile(export_dir, fake_cc, tmp_path):
    env = dict(os.environ)
    res = _cli(["neuron", "compile", str(export_dir), "--flag=--lnc=1", "--flag=--verbose=35"], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str((export_dir / "manifest.json").resolve())
    assert all(a[7:9] == ["--lnc=1", "--verbose=35"] for a in fake_cc())
    m = json.loads((export_dir / "manifest.json").read_text())
    assert all(g["neff"] == f"{g['name']}.neff" for g in m["graphs"])
    res = _cli(["neuron", "compile", str(export_dir), "--flag=--lnc=1", "--flag=--verbose=35"], env)
    assert res.returncode == 0 and "cached NEFF" in res.stderr and len(fake_cc()) == 2


def test_cli_without_compiler_is_one_line(export_dir, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))
    res = _cli(["neuron", "compile", str(export_dir)], env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvgen: neuronx-cc was not found"), res.stderr


@pytest.mark.parametrize("kw, match", [
    ({"tp_degree": 0}, "tp_degree=0"),
    ({"tp_degree": True}, "tp_degree=True"),
    ({"batch_sizes": (1, 0)}, "batch_sizes entry=0"),
    ({"batch_sizes": ()}, r"batch_sizes=\[\]"),
    ({"batch_sizes": "1,4"}, "batch_sizes='1,4'"),
    ({"dtype": "float16"}, "dtype='float16'.*bfloat16"),
    ({"max_context": -1}, "max_context=-1"),
    ({"buckets": (128, 4096), "max_context": 2048}, "bucket 4096.*max_context=2048"),
])
def test_export_validates_arguments(tmp_path, kw, match):
    # Validation runs before the native export is looked up, so this needs no Neuron build.
    with pytest.raises(kvgen.InvalidInputError, match=match):
        neuron.export(tmp_path / "model", tmp_path / "out", **kw)


def test_memory_estimate_fits():
    out = io.StringIO()
    neuron.print_memory_estimate(_manifest([]), file=out)
    assert out.getvalue() == ("memory per rank (tp_degree=2): weights 2.00 GiB + KV caches 0.50 GiB + margin "
                              "0.50 GiB = 3.00 GiB of 16 GiB per NeuronCore (inf2)\n")


def test_memory_estimate_over_16_gib_warns(capsys):
    m = _manifest([], total=17 << 30)
    m["memory_per_rank"].update(weights=15 << 30, kv_caches=1 << 30, margin=1 << 30)
    m["dtype"] = "float32"
    neuron.print_memory_estimate(m)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("= 17.00 GiB of 16 GiB per NeuronCore (inf2)")
    assert lines[1].startswith("warning: 17.00 GiB per rank is over the 16 GiB")
    assert "dtype=bfloat16" in lines[1] and "tp_degree" in lines[1]
