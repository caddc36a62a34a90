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
    """Turns a growing list of token ids into text deltas, decoding only a short window of recent
    tokens per push (never the whole text: O(tokens) over a generation, not O(tokens^2)).

    The window starts one settled step back: decoding ids[prefix:] and ids[prefix:read] and taking
    the difference gives the new text with the context a tokenizer needs to place spaces (as
    vLLM's and TGI's incremental detokenizers do). Text that could still begin a stop string is
    held back (the longest stop string minus one character), so stop strings are looked for only
    in text not yet emitted."""

    # Tokens to wait for a split UTF-8 character to complete (it has at most 4 bytes) before the
    # replacement character is taken as the real output.
    _MAX_PENDING_TOKENS = 8

    def __init__(
        self, decode: Callable[[list[int]], str], stop_strings: list[str], include_stop: bool = True
    ) -> None:
        self._decode = decode
        self._stops = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        # transformers keeps the stop string in the text; OpenAI's API leaves it out.
        self._include_stop = include_stop
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read]: the settled context of the next decode
        self._read = 0  # ids[:_read] are turned into text (emitted or pending)
        self._pending = ""  # text not emitted yet
        self.stopped = False

    def _take_new_text(self, force: bool) -> None:
        """Moves the text of ids[_read:] into `_pending` unless it ends in a split character."""
        if self._read == len(self.ids):
            return
        text = self._decode(self.ids[self._prefix :])
        waiting = len(self.ids) - self._read < self._MAX_PENDING_TOKENS
        if text.endswith("\ufffd") and waiting and not force:
            return  # an incomplete UTF-8 character: wait for the next token
        settled = self._decode(self.ids[self._prefix : self._read])
        self._pending += text[len(settled) :]
        self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        """The pending text that is safe to emit: cut at a stop string, else all but the tail
        that could begin one (everything when `final`)."""
        pending = self._pending
        hits = [(pending.find(s), len(s)) for s in self._stops if s in pending]
        if hits:
            self.stopped = True
            self._pending = ""
            return pending[: min(start + (length if self._include_stop else 0) for start, length in hits)]
        keep = 0 if final else min(self._hold, len(pending))
        out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        return out

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self._take_new_text(force=False)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._take_new_text(force=True)
        return self._release(final=True)


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
