"""Time to first token (prompt processing + one token) for prompts of 32, 256 and 1024 tokens at
batch 1 and 8: kvgen vs llama.cpp on the packaged GGUF files, kvgen vs transformers on the dense
SmolLM2-shaped random model (f32 and bf16, as `bench_decode.py` builds it). Same ids for every
engine, greedy, one new token.

    python benches/bench_prefill.py [--suite gguf,dense] [--lens 32,256,1024] [--batches 1,8]
                                    [--threads 2] [--repeats 3] [--append]

Each engine runs in its own process (one per model), warms up once per shape, and reports the
median of `--repeats` runs per shape. llama-cpp-python runs one sequence at a time, so its batch-8
rows are n/a. `--append` adds the tables to BENCHMARKS.md under "## Prefill".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import build_model  # noqa: E402
from bench_gguf import MODELS, cpu_model, gguf_path  # noqa: E402


def prompt_ids(vocab_hi: int, batch: int, length: int) -> list[list[int]]:
    import random

    rng = random.Random(length * 31 + batch)
    # Ordinary-text ids (no specials); the same rows for every engine.
    return [[rng.randrange(300, vocab_hi) for _ in range(length)] for _ in range(batch)]


def kvgen_runner(target: str, dtype: str, compute: str = "auto"):
    import kvgen

    gen = kvgen.Generator.from_pretrained(target, dtype=dtype, compute_dtype=compute)

    def once(rows):
        t0 = time.perf_counter()
        gen.generate(rows, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t0

    return once


def llama_cpp_runner(target: str, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=target, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                          n_batch=2048, verbose=False)

    def once(rows):
        if len(rows) != 1:
            return None
        llm.reset()  # no prefix reuse between runs
        t0 = time.perf_counter()
        for _tok in llm.generate(rows[0], top_k=1, top_p=1.0, temp=0.0, reset=True):
            break
        return time.perf_counter() - t0

    return once


def transformers_runner(target: str, dtype: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, dtype)).eval()

    def once(rows):
        x = torch.tensor(rows)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones_like(x))
        return time.perf_counter() - t0

    return once


def child(spec: dict) -> dict:
    engine, target, dtype, threads = spec["engine"], spec["target"], spec["dtype"], spec["threads"]
    if engine == "kvgen":
        once = kvgen_runner(target, dtype)
    elif engine == KV_BF16:
        once = kvgen_runner(target, dtype, "bfloat16")
    elif engine == "llama.cpp":
        once = llama_cpp_runner(target, threads)
    else:
        once = transformers_runner(target, dtype, threads)
    out = {}
    for key, rows in spec["shapes"].items():
        if once(rows) is None:  # warm-up; None: the engine does not run this shape
            continue
        out[key] = statistics.median(once(rows) for _ in range(spec["repeats"]))
    return out


def run_child(spec: dict, threads: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        print(f"{spec['engine']}: skipped ({' | '.join(tail)})", file=sys.stderr)
        return {}
    return json.loads(line[len("RESULT "):])


# kvgen with compute_dtype="bfloat16" (transformers' bf16 numerics), beside its f32 arithmetic.
KV_BF16 = "kvgen bf16 compute"


def table(title: str, engines: list[str], results: dict, shapes: list[tuple[int, int]], base: str) -> str:
    mine = [e for e in engines if e.startswith("kvgen")]
    head = "| batch | prompt | " + " | ".join(f"{e} ms" for e in engines)
    head += "".join(f" | {e} vs {base}" for e in mine) + " |\n"
    head += "|---" * (len(engines) + len(mine) + 2) + "|\n"
    rows = []
    for b, n in shapes:
        key = f"{b}x{n}"
        cells = [f"{results[e][key] * 1000:.0f}" if key in results.get(e, {}) else "n/a" for e in engines]
        r = results.get(base, {}).get(key)
        ratios = []
        for e in mine:
            k = results.get(e, {}).get(key)
            ratios.append(f"{k / r:.2f}x" if k and r else "n/a")
        rows.append(f"| {b} | {n} | " + " | ".join(cells + ratios) + " |")
    return f"\n{title}\n\n" + head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="gguf,dense")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lens", default="32,256,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=".bench")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))))
        return
    shapes = [(b, n) for b in map(int, a.batches.split(",")) for n in map(int, a.lens.split(","))]
    load = os.getloadavg()[0]
    intro = (f"`python benches/bench_prefill.py --suite {a.suite} --lens {a.lens} --batches {a.batches} "
             f"--repeats {a.repeats}` — {datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} vCPU, "
             f"shared; load {load:.1f}), {a.threads} threads; time to first token, median of {a.repeats} runs "
             "after a warm-up (lower is better).\n")
    blocks = [intro]
    for suite in a.suite.split(","):
        if suite == "gguf":
            for model in a.models.split(","):
                path = gguf_path(model)
                spec = {"target": path, "dtype": "auto", "threads": a.threads, "repeats": a.repeats,
                        "shapes": {f"{b}x{n}": prompt_ids(30000, b, n) for b, n in shapes}}
                res = {e: run_child(dict(spec, engine=e), a.threads) for e in ("kvgen", "llama.cpp")}
                blocks.append(table(f"{os.path.basename(path)} (kvgen: default quantized kernels)",
                                    ["kvgen", "llama.cpp"], res, shapes, "llama.cpp"))
                print(blocks[-1], flush=True)
        else:
            for dtype in a.dtypes.split(","):
                model_dir = str(build_model(Path(a.cache), dtype))
                spec = {"target": model_dir, "dtype": dtype, "threads": a.threads, "repeats": a.repeats,
                        "shapes": {f"{b}x{n}": prompt_ids(49152, b, n) for b, n in shapes}}
                engines = ["kvgen", KV_BF16, "transformers"] if dtype == "bfloat16" else ["kvgen", "transformers"]
                res = {e: run_child(dict(spec, engine=e), a.threads) for e in engines}
                blocks.append(table(f"SmolLM2-135M shape (random), {dtype} weights", engines, res,
                                    shapes, "transformers"))
                print(blocks[-1], flush=True)
    if a.append:
        bench = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = bench.read_text()
        heading = "## Prefill (time to first token, CPU)"
        if heading not in text:
            text = text.rstrip("\n") + f"\n\n{heading}\n"
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n\n" + "".join(blocks) + text[end:]
        bench.write_text(text)


if __name__ == "__main__":
    main()
