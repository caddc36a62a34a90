"""Waiting for native Requests from asyncio without a thread or a socket per request: each event
loop has one doorbell (a socket pair in Rust) that every request submitted from it rings; the
loop watches it with `add_reader` and wakes just the waiters whose tickets it returns, so the
loop only ever does non-blocking work. Leaving a wait early (the task was cancelled, the consumer
stopped) cancels the generation, which frees its cache slots at the scheduler's next step."""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, AsyncIterator, Callable

from . import _kvgen

# The longest the loop runs this module's work before letting other tasks in.
_TURN_S = 0.002


class _LoopBell:
    """The doorbell of one event loop and the waiters registered on it, by ticket."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.bell = _kvgen.Doorbell()
        self.waiters: dict[int, asyncio.Event] = {}
        loop.add_reader(self.bell.fileno(), self._ring)

    def _ring(self) -> None:
        for ticket in self.bell.take_ready():
            event = self.waiters.get(ticket)
            if event is not None:
                event.set()


_BELLS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBell]" = weakref.WeakKeyDictionary()


def _loop_bell() -> _LoopBell:
    loop = asyncio.get_running_loop()
    bell = _BELLS.get(loop)
    if bell is None:
        bell = _BELLS[loop] = _LoopBell(loop)
    return bell


def loop_doorbell() -> Any:
    """The running event loop's native Doorbell, to submit requests with."""
    return _loop_bell().bell


async def request_steps(request: Any) -> AsyncIterator[list[int]]:
    """Yields each step's tokens (one per row) as they come; the request's result is ready
    (`request.result()`) when the iteration ends. Cancels the request if abandoned. The request
    must have been submitted with this loop's doorbell (`loop_doorbell()`)."""
    bell = _loop_bell()
    ticket = request.ticket
    rang = asyncio.Event()
    bell.waiters[ticket] = rang
    finished = False
    try:
        while True:
            # Clear before polling: a step that arrives after the poll rings again.
            rang.clear()
            steps, finished = request.poll()
            turn_start = time.perf_counter()
            for tokens in steps:
                yield tokens
                # A consumer that decodes each step (text streaming) must not hold the loop
                # for a long backlog of steps at once.
                if time.perf_counter() - turn_start > _TURN_S:
                    await asyncio.sleep(0)
                    turn_start = time.perf_counter()
            if finished:
                return
            await rang.wait()
    finally:
        bell.waiters.pop(ticket, None)
        if not finished:
            request.cancel()


async def wait_request(request: Any, on_step: Callable[[list[int]], None] | None = None) -> Any:
    """Awaits the end of a request, calling `on_step` per streamed step; returns its result."""
    steps = request_steps(request)
    try:
        async for tokens in steps:
            if on_step is not None:
                on_step(tokens)
    finally:
        await steps.aclose()
    return request.result()
