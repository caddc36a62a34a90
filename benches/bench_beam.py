"""Beam search: kvgen vs transformers, same random SmolLM2-shaped model (f32), same run.

num_beams=4, 64 new tokens (eos disabled, so both decode every step), one 32-token prompt. Each
engine runs in a fresh process per repeat, alternating, so both see the same machine load; the
figure is the median wall time of `generate()` after a warm-up call. Also checks that both
engines return the same sequences.

    python benches/bench_beam.py [--threads 2] [--repeats 3] [--new-tokens 64] [--beams 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_model  # noqa: E402


def run_one(engine: str, model_dir: str, beams: int, new_tokens: int, dtype: str) -> dict:
    import numpy as np
    import torch

    ids = torch.randint(3, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=beams, do_sample=False, eos_token_id=None, pad_token_id=2)
    if engine == "kvgen":
        import kvgen

        gen = kvgen.Generator.from_pretrained(model_dir)
        call = lambda n: gen.generate(ids.numpy(), max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

        def call(n):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    call(2)
    t0 = time.perf_counter()
    out = call(new_tokens)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "sequence": np.asarray(out).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, model_dir = args.child
        print(json.dumps(run_one(engine, model_dir, args.beams, args.new_tokens, args.dtype)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads), KVGEN_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_model(Path(tmp), args.dtype))
        times: dict = {"kvgen": [], "transformers": []}
        seqs: dict = {}
        for _ in range(args.repeats):
            for engine in ("kvgen", "transformers"):
                cmd = [sys.executable, __file__, "--child", engine, model_dir, "--beams", str(args.beams),
                       "--new-tokens", str(args.new_tokens), "--dtype", args.dtype]
                r = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                times[engine].append(r["seconds"])
                seqs[engine] = r["sequence"]
    k, t = statistics.median(times["kvgen"]), statistics.median(times["transformers"])
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout.split(":")[-1].strip()
    print(f"machine: {cpu}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(f"num_beams={args.beams}, {args.new_tokens} new tokens, SmolLM2-shaped {args.dtype}, median of {args.repeats}")
    print(f"| kvgen | {k:.2f} s | {args.new_tokens / k:.1f} tok/s | runs {', '.join(f'{x:.2f}' for x in times['kvgen'])} |")
    print(f"| transformers | {t:.2f} s | {args.new_tokens / t:.1f} tok/s | runs {', '.join(f'{x:.2f}' for x in times['transformers'])} |")
    print(f"ratio kvgen/transformers: {t / k:.2f}x; same sequences: {seqs['kvgen'] == seqs['transformers']}")


if __name__ == "__main__":
    main()
