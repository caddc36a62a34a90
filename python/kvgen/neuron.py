"""AWS Neuron (inf2/trn) export and offline compilation.

    manifest = kvgen.neuron.export("path/to/model", "out/", tp_degree=2, batch_sizes=(1, 4))
    kvgen.neuron.compile("out/")        # on a host with neuronx-cc: one NEFF per graph, cached

`export` records every (phase, batch, bucket) graph as a per-rank `.hlo.pb` plus `manifest.json`
(no Neuron software needed). `compile` runs `neuronx-cc` on each graph with the flags
transformers-neuronx / NxDI use, caches the NEFFs by graph hash + flags + target + compiler
version, puts `<graph>.neff` next to the manifest and records it in the manifest's `neff` field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

from .errors import (
    BackendError,
    BackendUnavailableError,
    InvalidInputError,
    ModelFormatError,
    ModelNotFoundError,
)

__all__ = ["compile", "export", "print_memory_estimate"]

FORMAT = "kvgen-neuron/1"
MANIFEST = "manifest.json"
DTYPES = ("float32", "bfloat16")
# inf2: 32 GiB HBM per Inferentia2 chip, 2 NeuronCore-v2 -> 16 GiB per core (one rank per core).
CORE_MEMORY_GIB = 16
# Context encoding is compiled once per bucket and runs once per prompt: -O1 compiles faster;
# token generation runs every step, so it gets -O2 (NxDI's split).
OPT_LEVEL = {"context_encoding": "-O1", "token_generation": "-O2"}
ERROR_TAIL_LINES = 40

log = logging.getLogger("kvgen.neuron")

_GIB = float(1 << 30)
# Graph names become file names next to the manifest: keep them to one plain path component.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------
# export


def _positive_int(value: Any, what: str, fix: str) -> int:
    # bool is an int subclass; True as a batch size is a caller bug, not 1. operator.index takes numpy ints too.
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise InvalidInputError(f"{what}={value!r}: must be an integer >= 1; {fix}")
    return n


def _int_list(values: Any, what: str, fix: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidInputError(f"{what}={values!r}: must be a list of integers >= 1; {fix}")
    out = [_positive_int(v, f"{what} entry", fix) for v in values]
    if not out:
        raise InvalidInputError(f"{what}=[]: needs at least one integer >= 1; {fix}")
    return out


def _validate_export(tp_degree, batch_sizes, dtype, max_context, buckets) -> tuple:
    tp = _positive_int(tp_degree, "tp_degree", "inf2 runs one rank per NeuronCore, e.g. tp_degree=2 on inf2.xlarge")
    batches = _int_list(batch_sizes, "batch_sizes", "pass the batch sizes to compile, e.g. batch_sizes=(1, 4)")
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype={dtype!r}: Neuron exports support {' or '.join(DTYPES)}; "
                                "pass dtype=\"bfloat16\" (half the memory) or dtype=\"float32\"")
    if max_context is not None:
        max_context = _positive_int(max_context, "max_context", "pass the longest prompt + generation, e.g. 2048")
    bucket_list = None
    if buckets:
        bucket_list = _int_list(buckets, "buckets", "pass the prompt lengths to compile, e.g. buckets=(128, 512)")
        if max_context is not None and max(bucket_list) > max_context:
            raise InvalidInputError(f"bucket {max(bucket_list)} is longer than max_context={max_context}: a bucket "
                                    "is a cache length; drop it or raise max_context")
    return tp, batches, dtype, max_context, bucket_list


def export(model, out_dir, tp_degree: int = 2, batch_sizes: Sequence[int] = (1,), dtype: str = "bfloat16",
           max_context: int | None = None, buckets: Sequence[int] | None = None) -> str:
    """Record the model's per-rank Neuron graphs and `manifest.json` into `out_dir`; returns the
    manifest path and prints the per-NeuronCore memory estimate. Compile with `compile(out_dir)`."""
    tp, batches, dtype, max_context, bucket_list = _validate_export(tp_degree, batch_sizes, dtype, max_context, buckets)
    from . import _kvgen

    native = getattr(_kvgen, "_neuron_export", None)
    if native is None:
        raise BackendUnavailableError("this kvgen build has no Neuron export (kvgen._kvgen._neuron_export is "
                                      "missing); install a kvgen build that includes the neuron backend")
    path = native(str(model), str(out_dir), tp, batches, bucket_list, max_context, dtype)
    with open(path, encoding="utf-8") as f:
        print_memory_estimate(json.load(f))
    return str(path)


def print_memory_estimate(manifest: dict, file: IO[str] | None = None) -> None:
    """Print `memory_per_rank` (bytes) as GiB against a NeuronCore's 16 GiB, warning when over."""
    file = sys.stdout if file is None else file
    mem = manifest["memory_per_rank"]
    gib = {k: mem[k] / _GIB for k in ("weights", "kv_caches", "margin", "total")}
    tp = manifest.get("tp_degree", "?")
    print(f"memory per rank (tp_degree={tp}): weights {gib['weights']:.2f} GiB + KV caches "
          f"{gib['kv_caches']:.2f} GiB + margin {gib['margin']:.2f} GiB = {gib['total']:.2f} GiB "
          f"of {CORE_MEMORY_GIB} GiB per NeuronCore (inf2)", file=file)
    if mem["total"] > CORE_MEMORY_GIB * (1 << 30):
        fixes = ["a larger tp_degree", "a smaller max_context or fewer/smaller batch sizes"]
        if manifest.get("dtype") == "float32":
            fixes.insert(0, "dtype=bfloat16")
        print(f"warning: {gib['total']:.2f} GiB per rank is over the {CORE_MEMORY_GIB} GiB of an inf2 NeuronCore; "
              f"it will not fit. Export again with {', or '.join(fixes)}", file=file)


# --------------------------------------------------------------------------------------------
# compile


def _manifest_path(manifest) -> Path:
    p = Path(manifest).expanduser()
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise ModelNotFoundError(f"{p}: no Neuron manifest there; run `python -m kvgen neuron export MODEL "
                                 f"{p.parent}` first (or pass the export directory)")
    return p.resolve()


def _load_manifest(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: not a kvgen Neuron manifest ({e}); export again") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ModelFormatError(f"{path}: manifest format {got!r}, this kvgen reads {FORMAT!r}; export again")
    graphs = m.get("graphs")
    if not isinstance(graphs, list) or not graphs:
        raise ModelFormatError(f"{path}: the manifest lists no graphs; export again")
    for i, g in enumerate(graphs):
        missing = [k for k in ("name", "phase", "file", "sha256") if not isinstance(g, dict) or k not in g]
        if missing:
            raise ModelFormatError(f"{path}: graphs[{i}] lacks {', '.join(missing)}; export again")
        if not _SAFE_NAME.match(str(g["name"])):
            raise ModelFormatError(f"{path}: graphs[{i}] name {g['name']!r} is not a plain file name; export again")
        if g["phase"] not in OPT_LEVEL:
            raise ModelFormatError(f"{path}: graphs[{i}] phase {g['phase']!r}, expected one of "
                                   f"{', '.join(OPT_LEVEL)}; export again")
    return m


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_graph_file(export_dir: Path, g: dict) -> Path:
    src = export_dir / g["file"]
    if not src.is_file():
        raise ModelFormatError(f"{src}: graph {g['name']} is missing from the export; export again")
    actual = _sha256_file(src)
    if actual != g["sha256"]:
        raise ModelFormatError(f"{src}: sha256 {actual} does not match the manifest's {g['sha256']}; the export "
                               "was modified after it was written; export again")
    return src


def _flags(phase: str, target: str, extra_flags: Sequence[str]) -> list[str]:
    """Everything on the command line except the compiler, the input and the output: what the cache key covers."""
    env = shlex.split(os.environ.get("NEURON_CC_FLAGS", ""))
    return ["--framework=XLA", f"--target={target}", "--model-type=transformer", "--auto-cast=none",
            OPT_LEVEL[phase], *extra_flags, *env]


def _command(compiler: str, src: str, flags: list[str], out: str) -> list[str]:
    # The input goes right after `compile`, the flags after it, as transformers-neuronx orders them.
    return [compiler, "compile", flags[0], src, *flags[1:], "--output", out]


def _cache_key(graph_sha: str, flags: list[str], target: str, version: str) -> str:
    # JSON of the parts: unambiguous where a plain join could let "a b"+"c" equal "a"+"b c".
    return hashlib.sha256(json.dumps([graph_sha, flags, target, version]).encode()).hexdigest()


def _cache_dir(cache_dir) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("KVGEN_NEURON_CACHE") or Path.home() / ".cache" / "kvgen" / "neuron"
    d = Path(cache_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _no_compiler(export_dir: Path, manifest: dict, target: str, extra_flags: Sequence[str], why: str) -> Exception:
    # First line: the summary the CLI prints alone; then the commands for whoever copies the export over.
    lines = [f"{why}: compile on a Neuron host (AWS Neuron SDK installed) or pass the compiler's path",
             "the commands to run there, in the export directory:",
             f"  cd {shlex.quote(str(export_dir))}"]
    for g in manifest["graphs"]:
        cmd = _command("neuronx-cc", g["file"], _flags(g["phase"], target, extra_flags), f"{g['name']}.neff")
        lines.append("  " + shlex.join(cmd))
    lines.append("or do it all (NEFF cache, manifest.json updated with each graph's neff), with kvgen installed there:")
    lines.append(f"  python -m kvgen neuron compile {shlex.quote(str(export_dir))}")
    return BackendUnavailableError("\n".join(lines))


def _compiler_version(compiler: str) -> str:
    try:
        res = subprocess.run([compiler, "--version"], capture_output=True, text=True, errors="replace", timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendUnavailableError(f"`{compiler} --version` could not run ({e}); pass compiler= the path of a "
                                      "working neuronx-cc") from e
    version = res.stdout.strip() or res.stderr.strip()
    if res.returncode != 0 or not version:
        raise BackendUnavailableError(f"`{compiler} --version` exited {res.returncode} with "
                                      f"{version or 'no output'!r}; pass compiler= the path of a working neuronx-cc")
    return version


def _tail(text: str, n: int = ERROR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def _copy_atomic(src: Path, dst: Path) -> None:
    # Copy beside the destination and rename: a reader never sees half a NEFF.
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)  # mkstemp makes it 0600; keep the cache entry's (umask) mode
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compile_graph(compiler: str, src: Path, flags: list[str], cached: Path, name: str) -> None:
    """Run neuronx-cc into a scratch dir beside the cache entry; only a complete NEFF is renamed into it."""
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cached.parent))
    try:
        out = work / f"{name}.neff"
        cmd = _command(compiler, str(src), flags, str(out))
        log.info("%s: compiling (%s)", name, shlex.join(cmd))
        try:
            # cwd=work: neuronx-cc leaves its work files and logs in the current directory.
            res = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace")
        except OSError as e:
            raise BackendError(f"could not run the compiler: {shlex.join(cmd)}: {e}") from e
        if res.returncode != 0 or not out.is_file():
            what = f"exited {res.returncode}" if res.returncode != 0 else "exited 0 but wrote no NEFF"
            raise BackendError(f"neuronx-cc {what} compiling graph {name}:\n  {shlex.join(cmd)}\n"
                               f"last {ERROR_TAIL_LINES} lines of its output:\n{_tail(res.stdout)}\n"
                               "fix the flags (extra_flags, NEURON_CC_FLAGS) or report the compiler error; "
                               "nothing was cached for this graph")
        os.replace(out, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_manifest_atomic(path: Path, manifest: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        shutil.copymode(path, tmp)  # mkstemp makes it 0600; keep the manifest's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compile(manifest, *, target: str = "inf2", compiler: str | None = None, cache_dir=None,
            extra_flags: Sequence[str] = (), force: bool = False, jobs: int = 1) -> str:
    """Compile every graph of a Neuron export with neuronx-cc; returns the manifest path.

    `manifest`: manifest.json or its directory. Each NEFF is cached under `cache_dir` (default
    `$KVGEN_NEURON_CACHE`, else ~/.cache/kvgen/neuron) by graph sha256 + flags + target + compiler
    version and reused unless `force`; `<graph>.neff` is written next to the manifest and recorded
    in its `neff` field. Extra flags: `extra_flags`, then `$NEURON_CC_FLAGS`. `jobs` > 1 compiles
    graphs in parallel (each neuronx-cc uses several cores and GiBs of memory)."""
    if isinstance(extra_flags, str):
        # A string would iterate as one flag per character.
        raise InvalidInputError(f"extra_flags={extra_flags!r}: must be a list of flags, not one string; pass "
                                f"extra_flags={shlex.split(extra_flags)!r}")
    extra = [str(f) for f in extra_flags]
    jobs = _positive_int(jobs, "jobs", "pass jobs=1 to compile one graph at a time")
    if not isinstance(target, str) or not target or any(c.isspace() for c in target):
        raise InvalidInputError(f"target={target!r}: must be a neuronx-cc --target name such as inf2, trn1 or trn2")

    path = _manifest_path(manifest)
    export_dir = path.parent
    m = _load_manifest(path)
    # Check every graph before compiling any: a modified export fails in seconds, not after an hour.
    sources = [_check_graph_file(export_dir, g) for g in m["graphs"]]

    if compiler is None:
        found = shutil.which("neuronx-cc")
        if found is None:
            raise _no_compiler(export_dir, m, target, extra, "neuronx-cc was not found on PATH")
    else:
        found = shutil.which(str(compiler))
        if found is None:
            raise _no_compiler(export_dir, m, target, extra, f"compiler={str(compiler)!r} is not an executable")
    # Absolute: the compiler runs with its scratch dir as cwd, where a relative path would not resolve.
    found = os.path.abspath(found)
    version = _compiler_version(found)
    cache = _cache_dir(cache_dir)

    def one(i: int) -> str:
        g = m["graphs"][i]
        flags = _flags(g["phase"], target, extra)
        cached = cache / f"{_cache_key(g['sha256'], flags, target, version)}.neff"
        if force or not cached.is_file():
            _compile_graph(found, sources[i], flags, cached, g["name"])
        else:
            log.info("%s: cached NEFF %s", g["name"], cached)
        neff = f"{g['name']}.neff"
        _copy_atomic(cached, export_dir / neff)
        return neff

    if jobs == 1 or len(m["graphs"]) == 1:
        neffs = [one(i) for i in range(len(m["graphs"]))]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            neffs = list(pool.map(one, range(len(m["graphs"]))))
    # The manifest changes only once every graph has compiled; earlier NEFFs of a failed run stay cached.
    for g, neff in zip(m["graphs"], neffs):
        g["neff"] = neff
    _write_manifest_atomic(path, m)
    return str(path)
