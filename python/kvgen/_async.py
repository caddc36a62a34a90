"""Waiting for a native Request from asyncio without a thread: the event loop watches the
request's doorbell socket and polls it when it rings, so the loop only ever does
non-blocking work. Leaving the wait early (the task was cancelled, the consumer stopped)
cancels the generation, which frees its cache slots at the scheduler's next step."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable

# The longest the loop runs this module's work before letting other tasks in.
_TURN_S = 0.002


async def request_steps(request: Any) -> AsyncIterator[list[int]]:
    """Yields each step's tokens (one per row) as they come; the request's result is ready
    (`request.result()`) when the iteration ends. Cancels the request if abandoned."""
    loop = asyncio.get_running_loop()
    fd = request.fileno()
    rang = asyncio.Event()
    loop.add_reader(fd, rang.set)
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
        loop.remove_reader(fd)
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
