"""Decode tok/s and time to first token: kvgen vs transformers, same random model, same run.

The model is shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads / 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings). Usage:

    python benches/bench_decode.py [--threads 2] [--repeats 3] [--new-tokens 64] [--out rows.md]

Each figure is the median of `--repeats` runs. The two engines alternate run by run, each run in a
fresh process, so that both see the same machine load (this VM's memory bandwidth drifts by +-15%
over minutes) and neither sees the other's idle thread pools. Prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import platform
import statistics
import sys
import time
from pathlib import Path


def build_model(path: Path, dtype: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = path / f"smollm2-shape-{dtype}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
        rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # never stop early: every run decodes all tokens
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out


def time_transformers(model_dir: Path, dtype: str, batch: int, prompt_len: int, new_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(3, 49152, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t0
    return ttft, batch * (new_tokens - 1) / max(total - ttft, 1e-9)


def time_kvgen(model_dir: Path, dtype: str, batch: int, prompt_len: int, new_tokens: int, compute: str = "auto"):
    import numpy as np
    import kvgen

    gen = kvgen.Generator.from_pretrained(
        str(model_dir), dtype="auto" if dtype != "float32" else "float32", compute_dtype=compute
    )
    ids = np.random.default_rng(1).integers(3, 49152, size=(batch, prompt_len), dtype=np.int64)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=2)
    gen.generate(ids, max_new_tokens=2, **kw)  # warm-up
    t0 = time.perf_counter()
    gen.generate(ids, max_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen.generate(ids, max_new_tokens=new_tokens, **kw)
    total = time.perf_counter() - t0
    return ttft, batch * (new_tokens - 1) / max(total - ttft, 1e-9)


def run_once(engine: str, model_dir: Path, dtype: str, batch: int, args) -> tuple[float, float]:
    """One timed run in a fresh interpreter; returns (ttft s, decode tok/s)."""
    cmd = [sys.executable, __file__, "--one", engine, str(model_dir), dtype, str(batch),
           "--threads", str(args.threads), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ttft, tps = json.loads(out.strip().splitlines()[-1])
    return ttft, tps


def one(argv: list[str], args) -> None:
    engine, model_dir, dtype, batch = argv
    if engine == "transformers":
        import torch

        torch.set_num_threads(args.threads)
    if engine == "transformers":
        fn = time_transformers
    else:
        fn = functools.partial(time_kvgen, compute="bfloat16" if engine == KV_BF16 else "auto")
    print(json.dumps(fn(Path(model_dir), dtype, int(batch), args.prompt_len, args.new_tokens)))


# kvgen with compute_dtype="bfloat16" (transformers' bf16 numerics, AVX512-BF16 dot products),
# run beside the default f32 arithmetic on bf16 weights.
KV_BF16 = "kvgen compute_dtype=bfloat16"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cache", default=".bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    if args.one:
        return one(args.one, args)
    cache = Path(args.cache)
    cache.mkdir(exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    header = (
        f"\n### {time.strftime('%Y-%m-%d')} — {cpu}, {args.threads} threads, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, median of {args.repeats} alternating runs\n\n"
        "| model | dtype | batch | engine | decode tok/s | TTFT ms | speed-up | of DRAM roofline |\n|---|---|---|---|---|---|---|---|\n"
    )
    # Decode reads every weight once per step (batch rows share it): roofline = batch x bandwidth /
    # weight bytes, bandwidth measured now (`benches/roofline.py`).
    from roofline import bandwidth_gbs, weight_bytes

    bw = bandwidth_gbs(args.threads)
    header = header.replace("alternating runs\n", f"alternating runs; memory bandwidth {bw:.1f} GB/s\n", 1)
    rows = []
    for dtype in args.dtypes.split(","):
        model_dir = build_model(cache, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            runs = {"transformers": [], "kvgen": []}
            if dtype == "bfloat16":
                runs[KV_BF16] = []
            for _ in range(args.repeats):
                for engine in runs:
                    runs[engine].append(run_once(engine, model_dir, dtype, batch, args))
            hf, kv = ([statistics.median(r[i] for r in runs[e]) for i in (0, 1)] for e in ("transformers", "kvgen"))
            # Each kvgen run is compared with the transformers run just before it.
            ratio = statistics.median(k[1] / h[1] for h, k in zip(runs["transformers"], runs["kvgen"]))
            roof = batch * bw * 1e9 / weight_bytes(str(model_dir))
            rows.append(f"| SmolLM2-135M shape (random) | {dtype} | {batch} | transformers {__import__('transformers').__version__} | {hf[1]:.1f} | {hf[0]*1e3:.0f} | 1.00x | {hf[1] / roof:.0%} |")
            rows.append(f"| SmolLM2-135M shape (random) | {dtype} | {batch} | kvgen | {kv[1]:.1f} | {kv[0]*1e3:.0f} | {ratio:.2f}x | {kv[1] / roof:.0%} |")
            if KV_BF16 in runs:
                kb = [statistics.median(r[i] for r in runs[KV_BF16]) for i in (0, 1)]
                r_hf = statistics.median(k[1] / h[1] for h, k in zip(runs["transformers"], runs[KV_BF16]))
                r_kv = statistics.median(k[1] / h[1] for h, k in zip(runs["kvgen"], runs[KV_BF16]))
                rows.append(
                    f"| SmolLM2-135M shape (random) | {dtype} | {batch} | {KV_BF16} | {kb[1]:.1f} | {kb[0]*1e3:.0f} | "
                    f"{r_hf:.2f}x ({r_kv:.2f}x f32 compute) | {kb[1] / roof:.0%} |"
                )
            print("\n".join(rows[-3:]), flush=True)
    text = header + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
