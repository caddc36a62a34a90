"""Quantization quality on the packaged GGUF files, kvgen vs llama.cpp on the same file and text:
teacher-forced over the first 512 positions of the prose of tests/test_gguf_quality.py, each
engine's top-1 agreement with kvgen's exact path (dtype="float32", the dequantized model that is
token-identical to transformers) and its perplexity.

    python benches/quality_gguf.py [--model all|smollm2|gemma-3-270m] [--append]

Needs the model packages and `pip install llama-cpp-python` (without it only kvgen is reported).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benches"))
from bench_gguf import MODELS, cpu_model, gguf_path  # noqa: E402
from test_gguf_quality import PROSE, perplexity  # noqa: E402

POSITIONS = 512
HEADING = "## GGUF quality (teacher-forced, 512 positions)"


def llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=1024, logits_all=True, verbose=False)
    llm.eval(ids[:POSITIONS])
    return np.asarray(llm.scores[:POSITIONS], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=["all", *MODELS])
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args()
    import kvgen

    rows = []
    for model in MODELS if a.model == "all" else [a.model]:
        path = gguf_path(model)
        quant = kvgen.Generator.from_pretrained(path)
        ids = quant.tokenizer(PROSE)["input_ids"][: POSITIONS + 1]
        got = quant.logits([ids[:POSITIONS]])[0]
        del quant
        exact = kvgen.Generator.from_pretrained(path, dtype="float32")
        ref = exact.logits([ids[:POSITIONS]])[0]
        del exact
        engines = {"kvgen exact (f32)": ref, "kvgen quantized": got}
        lc = llama_cpp_logits(path, ids)
        if lc is not None:
            engines["llama.cpp"] = lc
        for name, logits in engines.items():
            agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            ppl = perplexity(logits, ids)
            rows.append(f"| {MODELS[model][0]} | {name} | {agree * 100:.1f}% | {ppl:.3f} |")
            print(rows[-1], flush=True)
    block = (
        f"\n`python benches/quality_gguf.py` — {datetime.date.today().isoformat()}, {cpu_model()}: top-1 "
        "agreement with kvgen's exact path and perplexity over the same 512 positions.\n\n"
        "| model | engine | top-1 vs exact | perplexity |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(block)
    if a.append:
        bench = ROOT / "BENCHMARKS.md"
        text = bench.read_text()
        if HEADING not in text:
            text = text.rstrip("\n") + f"\n\n{HEADING}\n"
        start = text.index(HEADING)
        nxt = text.find("\n## ", start + len(HEADING))
        end = len(text) if nxt < 0 else nxt
        bench.write_text(text[:end].rstrip("\n") + "\n" + block + text[end:])


if __name__ == "__main__":
    main()
