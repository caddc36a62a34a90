"""GPU decode benchmark: kvgen's torch backend vs transformers (dynamic cache, and static cache,
whose step transformers compiles with torch.compile), same random bf16 model, same GPU, same run.

Shapes (random weights, bf16): Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads, intermediate
8192, vocab 128256, tied, llama3 rope) and Mistral-7B (hidden 4096, 32 layers, 32/8 heads,
intermediate 14336, vocab 32000). Prompt 128 random tokens, 128 new tokens (never stopping
early), batch 1 and 16. Engines: kvgen (decode steps as CUDA graphs), kvgen-eager
(KVGEN_CUDA_GRAPHS=0), hf (dynamic cache), hf-static (static cache, compiled). Per engine: decode tok/s (all rows, steps after the first), time to
first token, peak GPU memory (torch.cuda.max_memory_allocated: kvgen and torch share libtorch's
allocator). Usage:

    python benches/bench_gpu.py [--shapes llama1b,mistral7b] [--batches 1,16] [--engines kvgen,hf,hf-static]
                                [--repeats 3] [--out rows.md] [--json results.json]
    python benches/bench_gpu.py --smoke      # tiny shapes on libtorch's CPU: checks the script, not speed
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "llama1b": dict(
        arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "mistral7b": dict(
        arch="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None,
    ),
    # --smoke: a few MB, runs anywhere.
    "tiny": dict(
        arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
}


def build_model(root: Path, shape: str, device: str) -> Path:
    """Random weights, written as a bf16 safetensors checkpoint (initialised on the GPU: fast)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    out = root / f"{shape}-bf16"
    if (out / "config.json").exists():
        return out
    spec = dict(SHAPES[shape])
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[spec.pop("arch")]
    cfg = cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # never stop early: every run decodes all tokens
    model.save_pretrained(out)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def _ids(batch: int, prompt: int, vocab: int):
    import torch

    return torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(run, batch: int, new_tokens: int, repeats: int):
    """run(n) generates n new tokens for the whole batch. Returns (ttft s, decode tok/s, peak bytes)."""
    import torch

    cuda = torch.cuda.is_available()
    run(2)  # warm-up (and for the compiled path: compilation of both shapes' graphs)
    run(new_tokens)
    ttfts, rates = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        run(1)
        _sync()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(new_tokens)
        _sync()
        total = time.perf_counter() - t0
        ttfts.append(ttft)
        rates.append(batch * (new_tokens - 1) / max(total - ttft, 1e-9))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return statistics.median(ttfts), statistics.median(rates), peak


def time_kvgen(model_dir, device, batch, prompt, new_tokens, repeats, vocab, graphs: bool = True):
    import os

    import kvgen

    backend = "torch"  # also on --smoke's CPU device
    # KVGEN_CUDA_GRAPHS=0 (read when the model loads) gives the eager decode step, for comparison.
    old = os.environ.get("KVGEN_CUDA_GRAPHS")
    os.environ["KVGEN_CUDA_GRAPHS"] = "1" if graphs else "0"
    try:
        gen = kvgen.Generator.from_pretrained(str(model_dir), device=device, dtype="bfloat16", backend=backend)
    finally:
        if old is None:
            os.environ.pop("KVGEN_CUDA_GRAPHS")
        else:
            os.environ["KVGEN_CUDA_GRAPHS"] = old
    ids = _ids(batch, prompt, vocab)

    def run(n):
        gen.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    try:
        return _measure(run, batch, new_tokens, repeats)
    finally:
        del gen
        gc.collect()


def time_transformers(model_dir, device, batch, prompt, new_tokens, repeats, vocab, static: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    ids = _ids(batch, prompt, vocab).to(device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if static:
        # transformers compiles the decode step when the cache is static (generation_config.compile_config).
        kw["cache_implementation"] = "static"

    def run(n):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)

    try:
        return _measure(run, batch, new_tokens, repeats)
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama1b,mistral7b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--engines", default="kvgen,kvgen-eager,hf,hf-static")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=None, help="directory to keep the random checkpoints in")
    ap.add_argument("--out", default=None, help="append markdown rows here")
    ap.add_argument("--json", default=None, help="write all results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script runs")
    args = ap.parse_args()

    import torch

    if args.smoke:
        args.shapes, args.batches, args.engines = "tiny", "1,2", "kvgen,kvgen-eager,hf"
        args.prompt, args.new_tokens, args.repeats = 8, 6, 1
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA GPU (torch.cuda.is_available() is False); use --smoke to check the script", file=sys.stderr)
            return 2
        device = "cuda"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    import transformers

    root = Path(args.models) if args.models else Path(tempfile.mkdtemp(prefix="kvgen-bench-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in args.shapes.split(","):
        model_dir = build_model(root, shape, device)
        vocab = SHAPES[shape]["vocab_size"]
        for batch in [int(b) for b in args.batches.split(",")]:
            for engine in args.engines.split(","):
                t0 = time.perf_counter()
                try:
                    if engine in ("kvgen", "kvgen-eager"):
                        graphs = engine == "kvgen"
                        r = time_kvgen(model_dir, device, batch, args.prompt, args.new_tokens, args.repeats, vocab, graphs)
                    else:
                        static = engine == "hf-static"
                        r = time_transformers(
                            model_dir, device, batch, args.prompt, args.new_tokens, args.repeats, vocab, static
                        )
                    ttft, rate, peak = r
                    row = dict(shape=shape, batch=batch, engine=engine, ttft_ms=ttft * 1e3, tok_s=rate,
                               peak_gib=peak / 2**30, error=None)
                except Exception as e:  # one engine failing must not lose the others' figures
                    row = dict(shape=shape, batch=batch, engine=engine, error=f"{type(e).__name__}: {e}")
                row["wall_s"] = time.perf_counter() - t0
                results.append(row)
                print(json.dumps(row), flush=True)

    date = datetime.date.today().isoformat()
    lines = [
        f"\n{gpu}, {date}, torch {torch.__version__}, transformers {transformers.__version__}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, bf16, median of {args.repeats}\n",
        "| shape | batch | engine | decode tok/s | TTFT ms | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['engine']} | failed: {r['error'][:80]} | | |")
        else:
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['engine']} | {r['tok_s']:.1f} | {r['ttft_ms']:.1f} | {r['peak_gib']:.2f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(gpu=gpu, date=date, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
