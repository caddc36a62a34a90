"""Neuron export of a Mistral-7B-shaped model: time, graph sizes, instruction counts, and the
per-NeuronCore memory estimate at tp_degree=2 (README "Neuron", BENCHMARKS.md).

The checkpoint is a sparse bf16 safetensors file of Mistral-7B's exact tensor names and shapes
(14.5 GB of holes: graphs do not depend on weight values, and the file takes no disk space).
No Neuron hardware is involved; this measures kvgen's recording and serialization only.

    python benches/bench_neuron_export.py [--max-context 4096] [--batch-sizes 1,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

MISTRAL_7B = dict(
    architectures=["MistralForCausalLM"],
    model_type="mistral",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=4096,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    hidden_act="silu",
)


def sparse_checkpoint(d: Path, cfg: dict) -> int:
    """config.json + model.safetensors whose tensor data are holes; returns the file size."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q, kv, v = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(L):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
            p + "self_attn.q_proj.weight": [q, h], p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, q],
            p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i],
        })
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = d / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (d / "config.json").write_text(json.dumps(cfg))
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import kvgen

    batch = tuple(int(x) for x in args.batch_sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "mistral-7b-shaped"
        model.mkdir()
        size = sparse_checkpoint(model, MISTRAL_7B)
        times = []
        for r in range(args.repeats):
            out = Path(tmp) / f"export{r}"
            t = time.perf_counter()
            path = kvgen.neuron.export(str(model), out, tp_degree=2, batch_sizes=batch, dtype="bfloat16", max_context=args.max_context)
            times.append(time.perf_counter() - t)
        manifest = json.loads(Path(path).read_text())
        graphs = [(g["name"], (out / g["file"]).stat().st_size) for g in manifest["graphs"]]
        mem = manifest["memory_per_rank"]
        gib = lambda b: b / (1 << 30)  # noqa: E731
        print(f"checkpoint: Mistral-7B shapes, bf16, {size / 1e9:.1f} GB (sparse)")
        print(f"export tp_degree=2 max_context={args.max_context} batch_sizes={batch}: {len(graphs)} graphs, "
              f"median {statistics.median(times):.2f} s over {len(times)} runs ({', '.join(f'{t:.2f}' for t in times)})")
        total = sum(s for _, s in graphs)
        print(f"graph bytes: total {total / 1e6:.2f} MB; " + ", ".join(f"{n} {s / 1e3:.0f} kB" for n, s in graphs))
        params = len(manifest["graphs"][0]["inputs"])
        print(f"parameters per graph: {params} ({sum(1 for t in manifest['tensors'] if t['role'] == 'weight')} weights)")
        print(f"memory per NeuronCore: weights {gib(mem['weights']):.2f} GiB + KV caches {gib(mem['kv_caches']):.2f} GiB "
              f"+ margin {gib(mem['margin']):.2f} GiB = {gib(mem['total']):.2f} GiB of 16 GiB")
        import subprocess

        cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout.strip()
        print(f"machine: {cpu}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
