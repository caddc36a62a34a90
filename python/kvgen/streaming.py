"""Text streaming: `gen.stream(...)` (iterator) and `gen.astream(...)` (async iterator) of text deltas.

Generation runs in kvgen's scheduler (Rust, GIL released); each step's token reaches the
request's inbox and is turned into text here. Deltas concatenate to exactly the final text: a character
split across tokens is held back until complete, and when `stop_strings` are set the tail that
could still be the start of one is held back, so the stream ends right after the stop string
even when it ends in the middle of a token.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator

# How long a blocking wait lasts before Python gets a chance to handle signals.
_WAIT_S = 0.05


class TextAssembler:
    """Turns a growing list of token ids into text deltas."""

    def __init__(
        self, decode: Callable[[list[int]], str], stop_strings: list[str], include_stop: bool = True
    ) -> None:
        self._decode = decode
        self._stops = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        # transformers keeps the stop string in the text; OpenAI's API leaves it out.
        self._include_stop = include_stop
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _final_text(self, text: str) -> str:
        """Text cut at the first stop string (after it, or before it without include_stop)."""
        hits = [(text.find(s), len(s)) for s in self._stops if s in text]
        if not hits:
            return text
        self.stopped = True
        ends = [start + (length if self._include_stop else 0) for start, length in hits]
        return text[: min(ends)]

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


def _single_prompt(inputs: Any) -> None:
    from .errors import InvalidInputError

    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str) and len(inputs) > 1:
        raise InvalidInputError("stream() takes one prompt; call it once per prompt (or use generate())")


def _start(gen: Any, inputs: Any, kwargs: dict, doorbell: bool) -> tuple[Any, TextAssembler]:
    """Submits the generation and builds the assembler of row 0's text."""
    _single_prompt(inputs)
    tok = gen.tokenizer
    if tok is None:
        from .errors import InvalidInputError

        raise InvalidInputError("stream() needs the model's tokenizer to produce text")
    stops = kwargs.get("stop_strings") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    assembler = TextAssembler(lambda ids: tok.decode(ids, skip_special_tokens=True), stops)
    request, _ = gen._submit(inputs, kwargs, stream_steps=True, doorbell=doorbell)
    return request, assembler


def stream(gen: Any, inputs: Any, kwargs: dict) -> Iterator[str]:
    request, assembler = _start(gen, inputs, kwargs, doorbell=False)
    finished = False
    try:
        while not finished:
            # The wait releases the GIL; returning to Python between waits lets Ctrl-C land.
            steps, finished = request.wait_steps(_WAIT_S)
            for tokens in steps:
                delta = assembler.push(tokens[0])
                if delta:
                    yield delta
        request.result()  # raises the generation's error, if any
        tail = assembler.finish()
        if tail:
            yield tail
    finally:
        request.cancel()  # a closed or abandoned stream stops its generation


async def astream(gen: Any, inputs: Any, kwargs: dict) -> AsyncIterator[str]:
    """Async iterator over the same deltas; the event loop never waits on the model."""
    from ._async import request_steps

    request, assembler = _start(gen, inputs, kwargs, doorbell=True)
    steps = request_steps(request)
    try:
        async for tokens in steps:
            delta = assembler.push(tokens[0])
            if delta:
                yield delta
    finally:
        await steps.aclose()
    request.result()
    tail = assembler.finish()
    if tail:
        yield tail
