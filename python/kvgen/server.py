"""An OpenAI-compatible HTTP service over a kvgen Generator (FastAPI).

    app = kvgen.server.create_app(kvgen.Generator.from_pretrained("SmolLM2-135M-Instruct"))
    # or: python -m kvgen serve --model SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000

Endpoints: POST /v1/completions, POST /v1/chat/completions (the model's chat template applied),
both with `"stream": true` as server-sent events in OpenAI's chunk format ending with
`data: [DONE]`; GET /v1/models; GET /health. Every HTTP request becomes one kvgen request (all
its prompts and choices as rows) in the engine's continuous-batching scheduler, so concurrent
clients share model steps; a client that disconnects cancels its generation and frees its cache
slots.

Every size a client controls is bounded (`ServerLimits`): the body, rows per request, prompt
tokens, max_tokens, stop strings, logprobs, requests in flight and requests queued for the model.
Over a limit a request gets an OpenAI-style error at once (400, 413, or 429 with Retry-After);
nothing a client sends is allocated or computed before its size is checked.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import _kvgen
from ._async import request_steps
from ._openai_schema import MAX_N, ChatCompletionRequest, CompletionRequest, ErrorResponse, TextPart, _Sampling
from .errors import InvalidInputError, KvgenError, OverloadedError
from .streaming import TextAssembler

# How often a non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.1


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server. Defaults are safe for a public endpoint."""

    max_tokens_limit: int = 4096
    """Largest max_tokens (max_completion_tokens) a request may ask for."""
    max_prompt_tokens: Optional[int] = None
    """Longest prompt in tokens; None: the model's context, at most 8192."""
    max_rows_per_request: int = 64
    """Prompts x n of one request."""
    max_body_bytes: int = 1 << 20
    """Request body size; larger bodies get 413 before they are read."""
    max_stop_strings: int = 4
    max_stop_length: int = 128
    """Characters per stop string."""
    max_logprobs: int = 5
    """Top entries per token for `logprobs` / `top_logprobs`."""
    max_concurrent_requests: int = 256
    """Generation requests being served at once (streams included); beyond it: 429."""
    max_queued_requests: int = 256
    """Requests waiting for the model (the scheduler's admission queue); beyond it: 429."""
    retry_after_s: int = 1
    """The Retry-After a 429 answer carries."""

    def resolved(self, context: int) -> "ServerLimits":
        prompt = self.max_prompt_tokens or (min(context, _DEFAULT_PROMPT_CAP) if context else _DEFAULT_PROMPT_CAP)
        limits = replace(self, max_prompt_tokens=int(prompt))
        for name, value in vars(limits).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_logprobs" else 1):
                raise InvalidInputError(f"server limit {name}={value!r} must be a positive integer")
        return limits


# Temperatures below this decode greedily, as vLLM's OpenAI server does (its _SAMPLING_EPS): dividing
# logits by less overflows f32 and the distribution is one-hot anyway.
_GREEDY_BELOW = 1e-5
_F32_TINY, _F32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def _f32_positive(x: float) -> float:
    """A positive setting that stays positive and finite in the engine's f32 (a top_p of 5e-324 would
    become 0, which the engine refuses; one that small keeps only the likeliest token either way)."""
    return min(max(x, _F32_TINY), _F32_MAX)


# "Well below the context" on big models: a long-context model keeps a prompt cap that one
# request cannot turn into gigabytes of KV cache.
_DEFAULT_PROMPT_CAP = 8192


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(message: str, kind: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class _Guard:
    """ASGI middleware in front of the app: answers 429 (with Retry-After) when too many
    generation requests are in flight, and 413 for a body over the limit, reading at most the
    limit (a declared Content-Length over it is refused without reading anything)."""

    def __init__(self, app: Any, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        limits = self.limits
        if self.in_flight >= limits.max_concurrent_requests:
            message = (
                f"the server is serving its limit of {limits.max_concurrent_requests} requests at once "
                f"(max_concurrent_requests); retry after {limits.retry_after_s} s"
            )
            return await _send_json(send, 429, _error_body(message, "rate_limit_error"), limits.retry_after_s)
        self.in_flight += 1
        try:
            body = await _read_body(scope, receive, limits.max_body_bytes)
            if body is None:
                message = (
                    f"the request body exceeds this server's limit of {limits.max_body_bytes} bytes "
                    "(max_body_bytes); send a smaller request"
                )
                return await _send_json(send, 413, _error_body(message, "invalid_request_error"))
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1


async def _read_body(scope: dict, receive: Any, limit: int) -> Optional[bytes]:
    """The whole body, or None as soon as it is known to exceed `limit` bytes."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app sees an empty body and the disconnect after it
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the app the buffered body first, then the real channel (so the app
    still hears of a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send: Any, status: int, payload: dict, retry_after: Optional[int] = None) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@dataclass
class _Choice:
    """One returned sequence while it is generated."""

    assembler: TextAssembler
    completion_tokens: int = 0
    done: bool = False
    finish_reason: Optional[str] = None
    text: list[str] = field(default_factory=list)


class _Job:
    """One HTTP request's generation: all its prompts x n choices as the rows of one kvgen
    request, yielding (choice index, text delta)."""

    def __init__(
        self, gen: Any, prompts: list[list[int]], n: int, settings: dict, stops: list[str], logprobs: Optional[int]
    ):
        sampling = bool(settings.get("do_sample"))
        kwargs = dict(settings)
        if sampling and n > 1:
            kwargs["num_return_sequences"] = n
            rows = prompts
        else:
            # Greedy choices are identical; transformers refuses num_return_sequences there, so
            # each prompt is repeated instead.
            rows = [p for p in prompts for _ in range(n)]
        ids, mask = _left_padded(rows)
        kwargs["attention_mask"] = mask
        self.request, call = gen._submit(ids, kwargs, stream_steps=True, doorbell=True, logprobs=logprobs)
        self.eos = set(call.engine_kwargs["eos_token_ids"])
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.logprobs: list = []
        tok = gen.tokenizer
        decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
        self.choices = [_Choice(TextAssembler(decode, stops, include_stop=False)) for _ in range(len(prompts) * n)]

    async def deltas(self) -> AsyncIterator[tuple[int, str]]:
        async for tokens in request_steps(self.request):
            for row, token in enumerate(tokens):
                choice = self.choices[row]
                if choice.done:
                    continue
                choice.completion_tokens += 1
                if token in self.eos:
                    choice.done, choice.finish_reason = True, "stop"
                    continue
                delta = choice.assembler.push(token)
                if choice.assembler.stopped:
                    choice.done, choice.finish_reason = True, "stop"
                if delta:
                    yield row, delta
        _, _, _, self.logprobs, _ = self.request.result()  # raises the generation's error, if any
        for row, choice in enumerate(self.choices):
            # Text held back (a possible stop-string start, a split character) is final now.
            tail = choice.assembler.finish()
            if tail:
                yield row, tail
            if choice.finish_reason is None:
                choice.finish_reason = "stop" if choice.assembler.stopped else "length"

    def token_logprobs(self, row: int) -> list:
        """(token, log-probability, [(id, log-probability)] of the top ones) per token the
        choice returned, computed by the engine from the raw logits (before any warper)."""
        return self.logprobs[row][: self.choices[row].completion_tokens]


def _left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


class _Service:
    def __init__(self, gen: Any, model_name: str, limits: ServerLimits):
        if gen.tokenizer is None:
            raise InvalidInputError("the server needs the model's tokenizer; load a model that has one")
        self.gen = gen
        self.model_name = model_name
        self.context = int(getattr(gen.config, "max_position_embeddings", 0) or 0)
        self.vocab = int(getattr(gen.config, "vocab_size", 0) or 0)
        self.limits = limits.resolved(self.context)
        self._executor = ThreadPoolExecutor(max_workers=_TOKENIZER_THREADS, thread_name_prefix="kvgen-tokenizer")

    async def bounded(self, work: Any, *args: Any, cost: Optional[int] = None) -> Any:
        """`work(*args)`: inline when cheap, else on a tokenizer thread (memory given back after
        large inputs). `cost` defaults to the characters of text in `args`."""
        cost = _input_chars(args) if cost is None else cost
        if cost <= _INLINE_COST:
            return work(*args)

        def run() -> Any:
            try:
                return work(*args)
            finally:
                if cost > _LARGE_INPUT_CHARS:
                    _kvgen._release_memory()

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    # ---- request -> kvgen settings ----------------------------------------------------------

    def _check_rows(self, prompts: int, n: int, param: str) -> None:
        rows, limit = prompts * n, self.limits.max_rows_per_request
        if rows > limit:
            raise ApiError(
                400,
                f"this request asks for {prompts} prompt(s) x n={n} = {rows} sequences, more than this server's limit "
                f"of {limit} per request (max_rows_per_request); split it into smaller requests",
                param,
            )

    def _check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise ApiError(400, f"{param} is empty after tokenization; send at least one token", param)
        limit = self.limits.max_prompt_tokens
        if len(ids) > limit:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens, more than this server's limit of {limit} (max_prompt_tokens); "
                "shorten it",
                param,
            )

    def _settings(self, body: _Sampling, max_tokens: Optional[int], longest_prompt: int, max_param: str) -> dict:
        limit = self.limits.max_tokens_limit
        if max_tokens is None:
            room = self.context - longest_prompt if self.context else limit
            max_tokens = max(1, min(limit, room))
        if max_tokens > limit:
            raise ApiError(
                400,
                f"{max_param}={max_tokens} exceeds this server's limit of {limit}; ask for fewer tokens",
                max_param,
            )
        settings: dict = {"max_new_tokens": max_tokens}
        # The extensions map onto Generator.generate's kwargs of the same meaning. Values past what
        # can change the output are clamped (a min_tokens over max_tokens suppresses EOS to the end
        # either way; a top_k over the vocabulary keeps every token), so no huge number reaches the engine.
        if body.min_tokens:
            settings["min_new_tokens"] = min(body.min_tokens, max_tokens)
        if body.repetition_penalty is not None:
            settings["repetition_penalty"] = body.repetition_penalty
        if body.ignore_eos:
            settings["eos_token_id"] = []
        if body.temperature < _GREEDY_BELOW:
            # Greedy: the sampling warpers (top_p, top_k, min_p) cannot change the argmax.
            settings["do_sample"] = False
        else:
            # OpenAI's sampling has no top-k: the model's default one is off unless top_k asks for it.
            top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
            if self.vocab:
                top_k = min(top_k, self.vocab)
            settings.update(do_sample=True, temperature=body.temperature, top_p=_f32_positive(body.top_p), top_k=top_k)
            if body.min_p is not None:
                settings["min_p"] = body.min_p
            if body.seed is not None:
                # Choice k of each prompt samples from the stream (seed, k): see seeding.row_seeds.
                settings["seed"] = body.seed
        if body.stop:
            settings["stop_strings"] = list(body.stop)
        return settings

    def _check_stops(self, stops: Optional[list[str]]) -> None:
        stops = stops or []
        if len(stops) > self.limits.max_stop_strings:
            raise ApiError(
                400,
                f"{len(stops)} stop sequences exceed this server's limit of {self.limits.max_stop_strings}; send fewer",
                "stop",
            )
        longest = max((len(s) for s in stops), default=0)
        if longest > self.limits.max_stop_length:
            raise ApiError(
                400,
                f"a stop sequence of {longest} characters exceeds this server's limit of {self.limits.max_stop_length} "
                "(max_stop_length); shorten it",
                "stop",
            )

    def _check_logprobs(self, top: Optional[int], param: str) -> None:
        if top is not None and top > self.limits.max_logprobs:
            raise ApiError(
                400, f"{param}={top} exceeds this server's limit of {self.limits.max_logprobs}; ask for fewer", param
            )

    @staticmethod
    def _prompt_count(prompt: Any) -> int:
        if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
            return 1
        return len(prompt)

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt (large ones off the event loop: see `_Service.bounded`)."""
        tok = self.gen.tokenizer
        if isinstance(prompt, str):
            batch = [tok.encode(prompt)]
        elif all(isinstance(p, int) for p in prompt):
            batch = [list(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            batch = [tok.encode(p) for p in prompt]
        elif all(isinstance(p, list) for p in prompt):
            batch = [list(p) for p in prompt]
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt")
        for ids in batch:
            self._check_prompt(ids, "prompt")
        return batch

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tok = self.gen.tokenizer
        if not tok.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as e:
            # A template may refuse a conversation (e.g. roles that do not alternate): the client's to fix.
            raise ApiError(400, f"the model's chat template refused these messages: {e}", "messages") from e
        ids = list(ids)
        self._check_prompt(ids, "messages")
        return ids

    def job(
        self,
        prompts: list[list[int]],
        body: _Sampling,
        max_tokens: Optional[int],
        logprobs: Optional[int],
        max_param: str = "max_tokens",
    ) -> _Job:
        if logprobs is not None and body.stream:
            raise ApiError(400, "logprobs with stream=true is not supported; drop one of them", "logprobs")
        settings = self._settings(body, max_tokens, max(len(p) for p in prompts), max_param)
        try:
            return _Job(self.gen, prompts, body.n, settings, list(body.stop or []), logprobs)
        except OverloadedError as e:
            raise ApiError(429, str(e), None, "rate_limit_error") from e

    # ---- responses --------------------------------------------------------------------------

    def _piece(self, token: int) -> str:
        return self.gen.tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(self, job: _Job, row: int, top: int) -> dict:
        entries = job.token_logprobs(row)
        tokens = [self._piece(t) for t, _, _ in entries]
        offsets, at = [], 0
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [self._top_dict(best) for _, _, best in entries] if top else None,
            "text_offset": offsets,
        }

    def _top_dict(self, best: list[tuple[int, float]]) -> dict:
        # Tokens that decode alike (partial UTF-8 bytes) share a key; keep the likeliest.
        out: dict = {}
        for token, lp in best:
            out.setdefault(self._piece(token), lp)
        return out

    def chat_logprobs(self, job: _Job, row: int) -> dict:
        def item(token: int, lp: float) -> dict:
            piece = self._piece(token)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {
            "content": [
                item(t, lp) | {"top_logprobs": [item(b, blp) for b, blp in best]} for t, lp, best in job.token_logprobs(row)
            ]
        }

    @staticmethod
    def usage(job: _Job) -> dict:
        completion = sum(c.completion_tokens for c in job.choices)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion, "total_tokens": job.prompt_tokens + completion}

    async def collect(self, http: Request, job: _Job) -> None:
        """Runs the job to the end, accumulating text; cancels it if the client leaves."""

        async def drain() -> None:
            async for index, delta in job.deltas():
                job.choices[index].text.append(delta)

        task = asyncio.ensure_future(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await http.is_disconnected():
                    raise ApiError(499, "the client disconnected")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def stream(self, job: _Job, chunk: Any, include_usage: bool, opening: Any = None) -> StreamingResponse:
        """SSE in OpenAI's chunk format: `chunk(index, delta_text, finish_reason)` builds each."""

        async def events() -> AsyncIterator[str]:
            deltas = job.deltas()
            try:
                if opening is not None:
                    for index in range(len(job.choices)):
                        yield _sse(opening(index))
                async for index, delta in deltas:
                    yield _sse(chunk(index, delta, None))
                for index, choice in enumerate(job.choices):
                    yield _sse(chunk(index, None, choice.finish_reason))
                if include_usage:
                    yield _sse(chunk(None, None, None) | {"choices": [], "usage": self.usage(job)})
            except KvgenError as e:
                yield _sse(_error_body(str(e), "invalid_request_error" if isinstance(e, ValueError) else "server_error"))
            finally:
                # Also reached when the client disconnects: stops and frees the generation.
                await deltas.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# Tokenizer work (encode, chat template, decoding logprob pieces) whose cost grows with the request
# runs on these threads, so the event loop keeps serving everyone else. Few threads, since each
# thread's malloc arena keeps what a huge prompt allocated (see _LARGE_INPUT_CHARS).
_TOKENIZER_THREADS = 2
# Work up to this many characters (or decoded tokens) runs inline: tens of microseconds, less than
# the hop to a thread, and a request submitted at once joins the scheduler's next step.
_INLINE_COST = 4096
# After tokenizing more characters than this, freed heap memory is given back to the OS.
_LARGE_INPUT_CHARS = 1 << 16


def _input_chars(value: Any) -> int:
    """Characters of text in a prompt, a chat request or the arguments holding them."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return _input_chars(list(value.values()))
    if isinstance(value, (list, tuple)):
        return sum(_input_chars(v) for v in value)
    if isinstance(value, ChatCompletionRequest):
        return _input_chars([m.content for m in value.messages])
    if isinstance(value, TextPart):
        return len(value.text)
    return 0


def _error_response(description: str, **extra: Any) -> dict:
    return {"model": ErrorResponse, "description": description, **extra}


# What the generation endpoints answer, for the OpenAPI schema: every status the server sends,
# each with OpenAI's error body (FastAPI's own 422 schema is replaced, since the handler below
# answers 422 in OpenAI's format too).
_GENERATION_RESPONSES: dict = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events in OpenAI's chunk format ending "
        "with `data: [DONE]`.",
        "content": {
            "text/event-stream": {
                "schema": {"type": "object", "properties": {"data": {"type": "string"}}},
                "description": "each event's data is a JSON chunk, the last one `[DONE]`",
            }
        },
    },
    400: _error_response(
        "Over one of this server's limits (max_tokens, prompt tokens, prompts x n, stop strings, logprobs), a token "
        "id outside the vocabulary, a chat template that refuses the messages, or fields kvgen does not combine"
    ),
    413: _error_response("The body is larger than this server's max_body_bytes"),
    422: _error_response("The body does not match this schema; `param` names the first field at fault"),
    429: _error_response(
        "Too many requests in flight or queued; retry after the Retry-After header's seconds",
        headers={"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    ),
}


def _branches(node: dict) -> list:
    return node.get("anyOf", [node])


def _is_token_list(node: dict) -> bool:
    return node.get("type") == "array" and node.get("items", {}).get("type") == "integer"


def _document_limits(schema: dict, limits: ServerLimits, vocab: int) -> None:
    """Writes this server's limits into its OpenAPI request schemas, so that a request valid by
    the published schema is one the server serves (the pydantic models carry the hard ceilings)."""
    models = schema.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = models.get(name, {}).get("properties", {})
        for field_name in ("max_tokens", "max_completion_tokens"):
            prop = props.get(field_name, {})
            if isinstance(prop.get("default"), int):
                prop["default"] = min(prop["default"], limits.max_tokens_limit)
            for b in _branches(prop):
                if b.get("type") == "integer":
                    b["maximum"] = limits.max_tokens_limit
        for field_name in ("logprobs", "top_logprobs"):
            for b in _branches(props.get(field_name, {})):
                if b.get("type") == "integer":
                    b["maximum"] = min(b.get("maximum", limits.max_logprobs), limits.max_logprobs)
        if "n" in props:
            props["n"]["maximum"] = min(props["n"].get("maximum", limits.max_rows_per_request), limits.max_rows_per_request)
        for b in _branches(props.get("stop", {})):
            if b.get("type") == "string":
                b["maxLength"] = limits.max_stop_length
            elif b.get("type") == "array":
                b["maxItems"] = limits.max_stop_strings
                b["items"]["maxLength"] = limits.max_stop_length
    completion = models.get("CompletionRequest", {})
    # prompts x n <= max_rows_per_request, as one if/then per n where the prompt cap drops.
    rows, caps = limits.max_rows_per_request, []
    for n in range(2, min(MAX_N, rows) + 1):
        if rows // n < rows // (n - 1):
            many = {"type": "array", "items": {"type": ["string", "array"]}, "maxItems": rows // n}
            prompt = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}, many]}
            caps.append({
                "if": {"properties": {"n": {"minimum": n}}, "required": ["n"]},
                "then": {"properties": {"prompt": prompt}},
            })
    if caps:
        completion.setdefault("allOf", []).extend(caps)
    for b in _branches(completion.get("properties", {}).get("prompt", {})):
        if b.get("type") != "array":
            continue
        token_lists = [b] if _is_token_list(b) else [b["items"]] if _is_token_list(b["items"]) else []
        if not _is_token_list(b):
            b["maxItems"] = limits.max_rows_per_request  # prompts per request
        for t in token_lists:
            t["maxItems"] = limits.max_prompt_tokens
            if vocab:
                t["items"]["maximum"] = vocab - 1


def create_app(
    generator: Any,
    *,
    model_name: Optional[str] = None,
    limits: Optional[ServerLimits] = None,
    **limit_overrides: Any,
) -> FastAPI:
    """A FastAPI app serving `generator` with OpenAI's completions and chat completions API.

    `limits` (a ServerLimits) or its fields as keywords (`max_tokens_limit=`, `max_prompt_tokens=`,
    `max_rows_per_request=`, `max_body_bytes=`, ...) bound what one client may ask; requests over
    a limit get a 400/413/429 naming it. The generator's scheduler gets
    `max_queued_requests` as its admission-queue bound."""
    import os

    unknown = set(limit_overrides) - set(ServerLimits.__dataclass_fields__)
    if unknown:
        raise InvalidInputError(f"unknown create_app arguments: {sorted(unknown)}; see kvgen.server.ServerLimits")
    limits = replace(limits or ServerLimits(), **{k: v for k, v in limit_overrides.items() if v is not None})
    name = model_name or os.path.splitext(os.path.basename(str(generator._engine.model_path).rstrip("/")))[0]
    service = _Service(generator, name, limits)
    generator.set_scheduler_limits(max_queued_requests=service.limits.max_queued_requests)
    app = FastAPI(title="kvgen", description="OpenAI-compatible text generation with kvgen")
    app.state.kvgen = service
    app.add_middleware(_Guard, limits=service.limits)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(service.limits.retry_after_s)} if e.status == 429 else None
        return JSONResponse(_error_body(e.message, e.kind, e.param), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (a body that is not JSON, an unknown path, a wrong method) in the
        # same OpenAI error format as everything else; the Allow header of a 405 is kept.
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(_error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return JSONResponse(_error_body("; ".join(problems), "invalid_request_error", param), status_code=422)

    @app.exception_handler(KvgenError)
    async def _kvgen_error(_: Request, e: KvgenError) -> JSONResponse:
        if isinstance(e, OverloadedError):
            headers = {"Retry-After": str(service.limits.retry_after_s)}
            return JSONResponse(_error_body(str(e), "rate_limit_error"), status_code=429, headers=headers)
        if isinstance(e, ValueError):
            return JSONResponse(_error_body(str(e), "invalid_request_error"), status_code=400)
        return JSONResponse(_error_body(str(e), "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "scheduler": generator.scheduler_stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "kvgen"}]}

    def openapi() -> dict:
        if app.openapi_schema is None:
            _document_limits(FastAPI.openapi(app), service.limits, service.vocab)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, http: Request) -> Any:
        service._check_rows(service._prompt_count(body.prompt), body.n, "prompt")
        service._check_stops(body.stop)
        service._check_logprobs(body.logprobs, "logprobs")
        prompts = await service.bounded(service._prompts, body.prompt)
        max_tokens = body.max_tokens
        if "max_tokens" not in body.model_fields_set:
            # OpenAI's default of 16, within a server limit below it.
            max_tokens = min(max_tokens, service.limits.max_tokens_limit)
        job = service.job(prompts, body, max_tokens, body.logprobs)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "text_completion", "created": now, "model": name}

        if body.stream:

            def chunk(index: Optional[int], text: Optional[str], finish: Optional[str]) -> dict:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
                return base | {"choices": [] if index is None else [choice]}

            return service.stream(job, chunk, body.include_usage)
        await service.collect(http, job)

        def choices() -> list:
            return [
                {
                    "index": i,
                    "text": "".join(c.text),
                    "logprobs": None if body.logprobs is None else service.completion_logprobs(job, i, body.logprobs),
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(job.choices)
            ]

        pieces = 0 if body.logprobs is None else service.usage(job)["completion_tokens"] * (body.logprobs + 1)
        return base | {"choices": await service.bounded(choices, cost=pieces), "usage": service.usage(job)}

    @app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        service._check_rows(1, body.n, "n")
        service._check_stops(body.stop)
        service._check_logprobs(body.top_logprobs, "top_logprobs")
        prompt = await service.bounded(service._chat_prompt, body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        limit = service.limits.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            # Also when max_completion_tokens takes precedence: the schema bounds both.
            raise ApiError(
                400, f"max_tokens={body.max_tokens} exceeds this server's limit of {limit}; ask for fewer tokens", "max_tokens"
            )
        job = service.job([prompt], body, body.token_budget, top, max_param)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": name}

        if body.stream:

            def chunk(index: Optional[int], text: Optional[str], finish: Optional[str]) -> dict:
                delta = {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                return base | {"choices": [] if index is None else [choice]}

            def opening(index: int) -> dict:
                choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                return base | {"choices": [choice]}

            return service.stream(job, chunk, body.include_usage, opening)
        await service.collect(http, job)

        def choices() -> list:
            return [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": service.chat_logprobs(job, i) if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(job.choices)
            ]

        pieces = service.usage(job)["completion_tokens"] * ((body.top_logprobs or 0) + 1) if body.logprobs else 0
        choices_out = await service.bounded(choices, cost=pieces)
        return base | {"object": "chat.completion", "choices": choices_out, "usage": service.usage(job)}

    return app


def serve(
    generator: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_connections: int = 1024,
    **app_kwargs: Any,
) -> None:
    """Runs `create_app(generator, **app_kwargs)` under uvicorn until interrupted. uvicorn itself
    refuses connections beyond `max_connections` (503), bounding the server's file descriptors."""
    import uvicorn

    uvicorn.run(
        create_app(generator, **app_kwargs),
        host=host,
        port=port,
        log_level="info",
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
    )
