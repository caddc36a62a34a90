"""Text streaming: `gen.stream(...)` (iterator) and `gen.astream(...)` (async iterator) of text deltas.

Generation runs on a worker thread (the Rust loop releases the GIL); each new token id crosses a
queue and is turned into text here. Deltas concatenate to exactly the final text: a character
split across tokens is held back until complete, and when `stop_strings` are set the tail that
could still be the start of one is held back, so the stream ends right after the stop string
even when it ends in the middle of a token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Callable, Iterator

_DONE = object()


class _Cancelled(Exception):
    """Raised inside the token callback to stop a generation whose consumer went away."""


class TextAssembler:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: list[str]) -> None:
        self._decode = decode
        self._stops = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.ids: list[int] = []
        self.emitted = ""

    def _final_text(self, text: str) -> str:
        """Text cut right after the first stop string, if one occurs."""
        ends = [text.find(s) + len(s) for s in self._stops if s in text]
        return text[: min(ends)] if ends else text

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for the next token
        stopped = self._final_text(text)
        limit = len(stopped) if len(stopped) < len(text) else max(len(self.emitted), len(text) - self._hold)
        return self._advance(stopped[:limit])

    def finish(self) -> str:
        return self._advance(self._final_text(self._decode(self.ids)))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta


class _TokenSink:
    """An HF-style streamer (put/end) that forwards row 0's new tokens to a callback."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # the first put is the prompt
            return
        tokens = value.tolist() if hasattr(value, "tolist") else list(value)
        self._on_token(int(tokens[0]))

    def end(self) -> None:
        pass


def _single_prompt(inputs: Any) -> None:
    from .errors import InvalidInputError

    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str) and len(inputs) > 1:
        raise InvalidInputError("stream() takes one prompt; call it once per prompt (or use generate())")


def stream(gen: Any, inputs: Any, kwargs: dict) -> Iterator[str]:
    _single_prompt(inputs)
    tok = gen.tokenizer
    if tok is None:
        from .errors import InvalidInputError

        raise InvalidInputError("stream() needs the model's tokenizer to produce text")
    stops = kwargs.get("stop_strings") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    assembler = TextAssembler(lambda ids: tok.decode(ids, skip_special_tokens=True), stops)
    tokens: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    failure: list[BaseException] = []

    def on_token(t: int) -> None:
        if cancelled.is_set():
            raise _Cancelled()
        tokens.put(t)

    def work() -> None:
        try:
            gen.generate(inputs, streamer=_TokenSink(on_token), **kwargs)
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the consumer
            failure.append(e)
        finally:
            tokens.put(_DONE)

    worker = threading.Thread(target=work, name="kvgen-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = tokens.get()
            if item is _DONE:
                break
            delta = assembler.push(item)
            if delta:
                yield delta
        if failure:
            raise failure[0]
        tail = assembler.finish()
        if tail:
            yield tail
    finally:
        cancelled.set()


async def astream(gen: Any, inputs: Any, kwargs: dict) -> AsyncIterator[str]:
    """Async iterator over the same deltas; the event loop never waits on the model."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        iterator = stream(gen, inputs, kwargs)
        try:
            for delta in iterator:
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
            loop.call_soon_threadsafe(deltas.put_nowait, _DONE)
        except BaseException as e:
            loop.call_soon_threadsafe(deltas.put_nowait, e)
        finally:
            iterator.close()

    threading.Thread(target=pump, name="kvgen-astream", daemon=True).start()
    try:
        while True:
            item = await deltas.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
