"""Helpers for tests that drive the scheduler from several threads: start generate() calls on
threads, wait for scheduler states, join with a deadline, hold the scheduler until calls queue."""

from __future__ import annotations

import threading
import time


def wait_for(predicate, what: str = "condition", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def run_threads(gen, calls: list[dict]):
    """One thread per `gen.generate(**call)`: (threads, results, errors by call index)."""
    results: list = [None] * len(calls)
    errors: dict = {}

    def work(i: int) -> None:
        try:
            results[i] = gen.generate(**calls[i])
        except BaseException as e:  # reported by the caller
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, results, errors


def join_all(threads, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"a request did not finish within {timeout:.0f} s"


def queue_then_release(gen, calls: list[dict], timeout: float = 10.0):
    """`run_threads` with the scheduler held until all calls are queued, so they are admitted
    together (the scheduler's bounds, not thread timing, decide what runs together)."""
    gen._engine.reset_scheduler_peaks()
    gen._engine._pause_scheduler(True)
    try:
        started = run_threads(gen, calls)
        wait_for(lambda: gen.scheduler_stats()["queued_requests"] == len(calls), f"{len(calls)} queued requests", timeout)
    finally:
        gen._engine._pause_scheduler(False)
    return started


def mixed_call(i: int, sample: bool) -> dict:
    """Request i of a concurrency test: different prompts, lengths and budgets per request, so the
    batch mixes shapes; seeded sampling when `sample`."""
    prompt = [3 + (i * 7 + t * 5) % 90 for t in range(2 + i % 5)]
    kw = dict(max_new_tokens=8 + (i * 3) % 17, min_new_tokens=4)
    if sample:
        kw.update(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, seed=100 + i)
    return dict(inputs=[prompt], **kw)
