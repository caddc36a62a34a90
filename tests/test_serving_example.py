"""examples/fastapi_drop_in.py: the transformers-style service answers the same as its
transformers original (the README's two-line diff undone) on the same model, concurrently."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_drop_in.py"
KVGEN_LINES = (
    "import kvgen\n",
    "model = kvgen.Generator.from_pretrained(MODEL); tokenizer = model.tokenizer  # noqa: E702\n",
)
TRANSFORMERS_LINES = (
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n",
    "model, tokenizer = AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)\n",
)


def _load(source: str, model_dir: Path, monkeypatch) -> types.ModuleType:
    monkeypatch.setenv("MODEL", str(model_dir))
    module = types.ModuleType("fastapi_drop_in")
    exec(compile(source, str(EXAMPLE), "exec"), module.__dict__)
    return module


def _ask(app, prompts):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            rs = await asyncio.gather(
                *(client.post("/generate", json={"prompt": p, "max_new_tokens": 12}) for p in prompts)
            )
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json()["text"] for r in rs]

    return asyncio.run(go())


def test_drop_in_answers_like_the_transformers_original(model_dir, monkeypatch):
    source = EXAMPLE.read_text()
    for line in KVGEN_LINES:
        assert line in source, line
    original = source
    for kv, hf in zip(KVGEN_LINES, TRANSFORMERS_LINES):
        original = original.replace(kv, hf)
    directory = model_dir("llama")
    prompts = ["Hello there", "What is two plus two?", "Tell me a story"]
    kv_texts = _ask(_load(source, directory, monkeypatch).app, prompts)
    hf_texts = _ask(_load(original, directory, monkeypatch).app, prompts)
    assert kv_texts == hf_texts
