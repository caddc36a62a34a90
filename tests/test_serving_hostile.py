"""Hostile clients against the real server: `python -m kvgen serve` (uvicorn on loopback) with the
SmolLM2 GGUF in its own process, so its memory and file descriptors can be measured. Every attack
gets its 4xx/429 within a second, the server's RSS grows by less than 50 MB, a normal request
right after still works, and connections opened and dropped leave no descriptors behind."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MAX_RSS_GROWTH = 50 << 20
# Small bounds, so the flood tests need few requests: 4 sequences run, 2 wait, 8 in flight.
SERVER_FLAGS = [
    "--max-batch-size", "4",
    "--max-queued-requests", "2",
    "--max-concurrent-requests", "8",
    "--max-cache-tokens", "10000",
    "--max-connections", "400",
]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(gguf_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvgen", "serve", "--model", gguf_path, "--port", str(port), *SERVER_FLAGS],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = Server(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(srv.url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)
    try:
        _normal(srv)  # warm: first-use allocations are not growth
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode in (0, -15), log.read_text()[-3000:]


def _normal(srv: Server) -> None:
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def _error(r: httpx.Response, status: int, needle: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert needle in err["message"], err
    return err


@pytest.fixture
def guarded(server):
    """Runs one attack: the answer within a second, RSS growth under the bound, then a normal request."""

    def attack(send) -> httpx.Response:
        before = server.rss()
        start = time.perf_counter()
        r = send()
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"the answer took {elapsed:.2f} s"
        grown = server.rss() - before
        status = [x.status_code for x in r[0]] if isinstance(r, tuple) else r.status_code
        print(f"\n  answered {status} in {elapsed * 1e3:.0f} ms, server RSS {grown / 2**20:+.1f} MB")
        assert grown < MAX_RSS_GROWTH, f"RSS grew by {grown >> 20} MB"
        _normal(server)
        return r

    return attack


def _post(srv: Server, body, path="/v1/completions", **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=30, **kw)


def test_prompt_batch_times_n_is_bounded(server, guarded):
    r = guarded(lambda: _post(server, {"prompt": [[1, 2, 3]] * 300, "n": 16, "max_tokens": 64}))
    err = _error(r, 400, "max_rows_per_request")
    assert "300 prompt(s) x n=16 = 4800" in err["message"] and err["param"] == "prompt"


def test_declared_oversized_body_is_refused_unread(server, guarded):
    body = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    r = guarded(lambda: httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30))
    _error(r, 413, "max_body_bytes")


def test_chunked_oversized_body_is_refused(server, guarded):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(17):  # just over the 1 MiB limit
            yield b"y" * 65536
        yield b'"}'

    r = guarded(lambda: httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30))
    _error(r, 413, "1048576 bytes")


def test_stop_strings_are_bounded(server, guarded):
    err = _error(guarded(lambda: _post(server, {"prompt": "hi", "stop": ["x" * 5000]})), 400, "max_stop_length")
    assert err["param"] == "stop" and "5000 characters" in err["message"]
    _error(guarded(lambda: _post(server, {"prompt": "hi", "stop": [f"s{i}" for i in range(10)]})), 400, "10 stop sequences")


def test_long_prompts_are_refused_and_the_loop_keeps_serving(server, guarded):
    """Four ~300 KB prompts at once (~50k tokens each): tokenized off the event loop, on few
    threads whose memory is given back, then refused."""
    text = "hello world " * 25_000

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            attack = asyncio.gather(*(client.post("/v1/completions", json={"prompt": text}) for _ in range(4)))
            worst = 0.0
            while not attack.done():
                start = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                worst = max(worst, time.perf_counter() - start)
            return await attack, worst

    responses, worst = guarded(lambda: asyncio.run(main()))
    for r in responses:
        _error(r, 400, "max_prompt_tokens")
    assert worst < 0.5, f"/health waited {worst:.2f} s while the prompts were tokenized"


def test_generation_bounds(server, guarded):
    _error(guarded(lambda: _post(server, {"prompt": "hi", "max_tokens": 10**9})), 400, "max_tokens=1000000000")
    # 4 rows x (prompt + 4000) positions exceed the 10000-position cache budget: refused, not run alone.
    _error(guarded(lambda: _post(server, {"prompt": "hi", "n": 4, "max_tokens": 4000})), 400, "max_cache_tokens=10000")
    _error(guarded(lambda: _post(server, {"prompt": "hi", "logprobs": 20})), 400, "logprobs=20")
    _error(guarded(lambda: _post(server, {"prompt": "hi", "n": 8, "max_tokens": 4})), 400, "max_sequences=4")


def test_logprobs_keep_no_logits(server, guarded):
    body = {"prompt": "Once upon a time", "max_tokens": 24, "n": 4, "logprobs": 5, "temperature": 0.8, "seed": 1}
    before = server.rss()
    r = _post(server, body)
    assert r.status_code == 200, r.text
    assert server.rss() - before < MAX_RSS_GROWTH
    for choice in r.json()["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
        assert all(len(top) <= 5 and all(v <= 0 for v in top.values()) for top in lp["top_logprobs"])
    guarded(lambda: _post(server, dict(body, max_tokens=1)))


def test_full_queue_and_full_door_answer_429_with_retry_after(server):
    """6 streams hold the model's 4 sequences and its 2 queue places: the next request is refused
    by the scheduler's queue; 2 clients stuck sending their bodies fill the 8 places in flight:
    the next is refused at the door. Both at once, with Retry-After; then the server recovers."""
    port = int(server.url.rsplit(":", 1)[1])
    # Greedy SmolLM2 counts on past 600 tokens without an eos: the streams hold until released.
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 600, "temperature": 0, "stream": True}
    before = server.rss()

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            release = asyncio.Event()

            async def hold():
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        if release.is_set():
                            return  # leaving the stream disconnects, which cancels the generation

            async def refused(needle: str) -> None:
                start = time.perf_counter()
                r = await client.post("/v1/completions", json=dict(body, stream=False, max_tokens=4))
                elapsed = time.perf_counter() - start
                _error(r, 429, needle)
                assert r.headers.get("retry-after") == "1" and r.json()["error"]["type"] == "rate_limit_error"
                assert elapsed < 1.0, f"the 429 took {elapsed:.2f} s"

            holders = []
            for i in range(6):
                # One at a time: a request counts as queued until the scheduler's next step admits it.
                holders.append(asyncio.ensure_future(hold()))
                deadline = time.monotonic() + 20
                while True:
                    sched = (await client.get("/health")).json()["scheduler"]
                    if sched["running_sequences"] == min(i + 1, 4) and sched["queued_requests"] == max(0, i - 3):
                        break
                    failed = [h.exception() for h in holders if h.done()]
                    assert not failed and time.monotonic() < deadline, (sched, failed)
                    await asyncio.sleep(0.02)
            await refused("max_queued_requests=2")
            stuck = []
            for _ in range(2):  # in flight, still sending their bodies
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                stuck.append(s)
            await asyncio.sleep(0.3)
            await refused("max_concurrent_requests")
            for s in stuck:
                s.close()
            release.set()
            await asyncio.gather(*holders)

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["scheduler"]["running_sequences"]:
        assert time.monotonic() < deadline, "the held streams were not cancelled"
        time.sleep(0.05)
    assert server.rss() - before < MAX_RSS_GROWTH
    _normal(server)


def test_dropped_connections_leave_no_descriptors(server):
    _normal(server)
    baseline = server.fds()
    socks = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        socks.append(s)
    for s in socks:
        s.close()
    deadline = time.monotonic() + 10
    while server.fds() > baseline + 2:
        assert time.monotonic() < deadline, f"{server.fds()} descriptors open, {baseline} before"
        time.sleep(0.1)
    _normal(server)
