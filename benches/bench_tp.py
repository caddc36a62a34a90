"""Decode tok/s and time to first token of kvgen at tp_degree=1 and 2 on the CPU, same model, same run.

SmolLM2-135M's width (hidden 576, 30 layers, intermediate 1536, vocab 49152, tied embeddings) with
8 query / 4 kv heads (head_dim 72), since SmolLM2's 9 heads do not split in two. Usage:

    python benches/bench_tp.py [--threads 2] [--repeats 3] [--new-tokens 64] [--batches 1,8] [--out rows.md]

The two degrees alternate run by run, each run in a fresh process with the same thread count (at
tp_degree=2 each rank gets half of the threads). Prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build_model(cache: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = cache / "smollm2-width-8q4kv-float32"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
        num_key_value_heads=4, head_dim=72, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out


def time_kvgen(model_dir: str, tp: int, batch: int, prompt_len: int, new_tokens: int):
    import numpy as np
    import kvgen

    gen = kvgen.Generator.from_pretrained(model_dir, dtype="float32", tp_degree=tp)
    ids = np.random.default_rng(1).integers(3, 49152, size=(batch, prompt_len), dtype=np.int64)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=2)
    gen.generate(ids, max_new_tokens=2, **kw)  # warm-up
    t0 = time.perf_counter()
    gen.generate(ids, max_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen.generate(ids, max_new_tokens=new_tokens, **kw)
    total = time.perf_counter() - t0
    return ttft, batch * (new_tokens - 1) / max(total - ttft, 1e-9), gen.memory_stats()["weight_bytes_per_rank"]


def run_once(model_dir: Path, tp: int, batch: int, args):
    cmd = [sys.executable, __file__, "--one", str(model_dir), str(tp), str(batch), "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--cache", default=".bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    if args.one:
        model_dir, tp, batch = args.one
        print(json.dumps(time_kvgen(model_dir, int(tp), int(batch), args.prompt_len, args.new_tokens)))
        return
    cache = Path(args.cache)
    cache.mkdir(exist_ok=True)
    model_dir = build_model(cache)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    header = (
        f"\n### {time.strftime('%Y-%m-%d')} — {cpu}, {args.threads} threads, tensor parallelism on the CPU, prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats} alternating runs\n\n"
        "| model | batch | tp_degree | decode tok/s | TTFT ms | weight MB per rank | vs tp 1 |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for tp in runs:
                runs[tp].append(run_once(model_dir, tp, batch, args))
        ratio = statistics.median(b[1] / a[1] for a, b in zip(runs[1], runs[2]))
        for tp, r in runs.items():
            ttft, tps = (statistics.median(x[i] for x in r) for i in (0, 1))
            rel = "1.00x" if tp == 1 else f"{ratio:.2f}x"
            rows.append(f"| SmolLM2 width, 8q/4kv heads (random, f32) | {batch} | {tp} | {tps:.1f} | {ttft*1e3:.0f} | "
                        f"{r[0][2] / 1e6:.0f} | {rel} |")
            print(rows[-1], flush=True)
    text = header + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
