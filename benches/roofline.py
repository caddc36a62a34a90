"""Memory-bandwidth probe for the benchmarks' roofline figures: decode at batch 1 must read every
weight once per token, so tokens/s can be at most bandwidth / weight bytes.

    python benches/roofline.py [--threads 2] [--mib 1024]

Reads a buffer larger than any cache (default 1 GiB, f32) with `torch.sum` on `--threads` threads
(one read per element, as a matvec's weight stream), median of 5 passes after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def bandwidth_gbs(threads: int = 2, mib: int = 1024, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mib * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # warm-up (pages touched, threads started)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(path: str) -> int:
    """Bytes of a GGUF file or of a directory's safetensors (the weights one token reads)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.getsize(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=1024)
    a = ap.parse_args()
    print(f"{bandwidth_gbs(a.threads, a.mib):.1f} GB/s")
