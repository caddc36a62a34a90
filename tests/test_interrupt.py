"""Ctrl-C during a long generation raises KeyboardInterrupt promptly, and the generator stays usable."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigint_interrupts_generation_promptly(kv_model):
    # Dynamic NTK RoPE has no context limit, so a very long generation is allowed.
    gen = kv_model("llama_dynamic_rope")
    # Python's own Ctrl-C handler for the test: a pytest started with SIGINT ignored (a background
    # job of a non-interactive shell) would otherwise never see the signal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        start = time.perf_counter()
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                gen.generate([[5, 6, 7]], max_new_tokens=50_000, min_new_tokens=50_000)
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - start
    finally:
        signal.signal(signal.SIGINT, previous)
    assert elapsed < 5.0, f"interrupt took {elapsed:.1f}s to land"
    assert len(gen.generate([[5, 6, 7]], max_new_tokens=3)[0]) == 6


def test_gil_released_while_generating(kv_model):
    gen = kv_model("llama_dynamic_rope")
    done = threading.Event()
    errors: list = []

    def work():
        try:
            gen.generate([[5, 6, 7]], max_new_tokens=1500, min_new_tokens=1500)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            done.set()

    worker = threading.Thread(target=work)
    worker.start()
    gaps, last = [], time.perf_counter()
    deadline = time.monotonic() + 60
    while not done.is_set():
        assert time.monotonic() < deadline, "the generation did not finish within 60 s"
        time.sleep(0.002)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join(10)
    assert not worker.is_alive()
    if errors:
        raise errors[0]
    assert len(gaps) > 20, "generation finished too fast to observe"
    assert max(gaps) < 0.1, f"the main thread was blocked for {max(gaps) * 1e3:.0f} ms"
