"""An OpenAI-compatible HTTP service over a kvgen Generator (FastAPI).

    app = kvgen.server.create_app(kvgen.Generator.from_pretrained("SmolLM2-135M-Instruct"))
    # or: python -m kvgen serve --model SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000

Endpoints: POST /v1/completions, POST /v1/chat/completions (the model's chat template applied),
both with `"stream": true` as server-sent events in OpenAI's chunk format ending with
`data: [DONE]`; GET /v1/models; GET /health. Every request becomes one kvgen request per prompt
in the engine's continuous-batching scheduler, so concurrent clients share model steps; a
client that disconnects cancels its generation and frees its cache slots.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ._async import request_steps
from ._openai_schema import ChatCompletionRequest, CompletionRequest, _Sampling
from .errors import InvalidInputError, KvgenError
from .streaming import TextAssembler

# How often a non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.1


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(message: str, kind: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class _Choice:
    """One returned sequence while it is generated."""

    assembler: TextAssembler
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: Optional[str] = None
    text: list[str] = field(default_factory=list)


class _PromptJob:
    """One prompt's generation (its n choices) in the scheduler, yielding (choice index, delta)."""

    def __init__(
        self, gen: Any, ids: list[int], n: int, settings: dict, stops: list[str], first_index: int, logits: bool = False
    ):
        sampling = bool(settings.get("do_sample"))
        kwargs = dict(settings)
        if logits:  # for logprobs: the raw logits of every step come with the result
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        self.step_logits: list = []
        if sampling and n > 1:
            kwargs["num_return_sequences"] = n
        # Greedy choices are identical; transformers refuses num_return_sequences there, so
        # the prompt is repeated instead.
        inputs = [ids] if sampling or n == 1 else [ids] * n
        self.request, call = gen._submit(inputs, kwargs, stream_steps=True, doorbell=True)
        self.eos = set(call.engine_kwargs["eos_token_ids"])
        self.prompt_tokens = len(ids)
        self.first_index = first_index
        tok = gen.tokenizer
        decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
        self.choices = [_Choice(TextAssembler(decode, stops, include_stop=False)) for _ in range(n)]

    async def deltas(self) -> AsyncIterator[tuple[int, str]]:
        async for tokens in request_steps(self.request):
            for row, token in enumerate(tokens):
                choice = self.choices[row]
                if choice.done:
                    continue
                choice.completion_tokens += 1
                choice.token_ids.append(token)
                if token in self.eos:
                    choice.done, choice.finish_reason = True, "stop"
                    continue
                delta = choice.assembler.push(token)
                if choice.assembler.stopped:
                    choice.done, choice.finish_reason = True, "stop"
                if delta:
                    yield self.first_index + row, delta
        _, _, self.step_logits = self.request.result()  # raises the generation's error, if any
        for row, choice in enumerate(self.choices):
            # Text held back (a possible stop-string start, a split character) is final now.
            tail = choice.assembler.finish()
            if tail:
                yield self.first_index + row, tail
            if choice.finish_reason is None:
                choice.finish_reason = "stop" if choice.assembler.stopped else "length"


def _token_logprobs(job: "_PromptJob", row: int, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token, its log-probability, the `top` most likely (token, log-probability)) per generated
    token of a choice, from the model's raw logits (log-softmax; before any sampling warper)."""
    import numpy as np

    out = []
    for step, token in enumerate(job.choices[row].token_ids):
        logits = np.asarray(job.step_logits[step][row], dtype=np.float64)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argsort(-logprobs, kind="stable")[:top] if top else []
        out.append((token, float(logprobs[token]), [(int(t), float(logprobs[t])) for t in best]))
    return out


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Items of several async iterators as they come; closing this closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as e:  # handed to the consumer
            await queue.put(e)
        finally:
            await queue.put(finished)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Service:
    def __init__(self, gen: Any, model_name: str, max_tokens_limit: int, max_prompt_tokens: int):
        if gen.tokenizer is None:
            raise InvalidInputError("the server needs the model's tokenizer; load a model that has one")
        self.gen = gen
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens
        self.context = int(getattr(gen.config, "max_position_embeddings", 0) or 0)

    # ---- request -> kvgen settings ----------------------------------------------------------

    def _check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise ApiError(400, f"{param} is empty after tokenization; send at least one token", param)
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens, more than this server's limit of {self.max_prompt_tokens}; "
                "shorten it",
                param,
            )

    def _settings(self, body: _Sampling, max_tokens: Optional[int], longest_prompt: int) -> dict:
        if max_tokens is None:
            room = self.context - longest_prompt if self.context else self.max_tokens_limit
            max_tokens = max(1, min(self.max_tokens_limit, room))
        if max_tokens > self.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {self.max_tokens_limit}; ask for fewer tokens",
                "max_tokens",
            )
        settings: dict = {"max_new_tokens": max_tokens}
        if body.temperature == 0:
            settings["do_sample"] = False
        else:
            # OpenAI's sampling has no top-k: switch off the model's default one.
            settings.update(do_sample=True, temperature=body.temperature, top_p=body.top_p, top_k=0)
            if body.seed is not None:
                settings["seed"] = body.seed
        if body.stop:
            settings["stop_strings"] = list(body.stop)
        return settings

    def _prompts(self, prompt: Any) -> list[list[int]]:
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
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from e
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids)
        self._check_prompt(ids, "messages")
        return ids

    def _jobs(
        self, prompts: list[list[int]], body: _Sampling, max_tokens: Optional[int], logprobs: bool = False
    ) -> list[_PromptJob]:
        if logprobs and body.stream:
            raise ApiError(400, "logprobs with stream=true is not supported; drop one of them", "logprobs")
        settings = self._settings(body, max_tokens, max(len(p) for p in prompts))
        stops = list(body.stop or [])
        return [
            _PromptJob(self.gen, ids, body.n, settings, stops, i * body.n, logits=logprobs) for i, ids in enumerate(prompts)
        ]

    def _job_rows(self, jobs: list[_PromptJob]) -> dict[int, tuple[_PromptJob, int]]:
        return {j.first_index + r: (j, r) for j in jobs for r in range(len(j.choices))}

    # ---- responses --------------------------------------------------------------------------

    def _piece(self, token: int) -> str:
        return self.gen.tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(self, job: _PromptJob, row: int, top: int) -> dict:
        entries = _token_logprobs(job, row, top)
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

    def chat_logprobs(self, job: _PromptJob, row: int, top: int) -> dict:
        def item(token: int, lp: float) -> dict:
            piece = self._piece(token)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {
            "content": [
                item(t, lp) | {"top_logprobs": [item(b, blp) for b, blp in best]}
                for t, lp, best in _token_logprobs(job, row, top)
            ]
        }

    @staticmethod
    def _usage(jobs: list[_PromptJob]) -> dict:
        prompt = sum(j.prompt_tokens for j in jobs)
        completion = sum(c.completion_tokens for j in jobs for c in j.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _choices(jobs: list[_PromptJob]) -> list[tuple[int, _Choice]]:
        return [(j.first_index + r, c) for j in jobs for r, c in enumerate(j.choices)]

    async def collect(self, http: Request, jobs: list[_PromptJob]) -> None:
        """Runs the jobs to the end, accumulating text; cancels them if the client leaves."""

        by_index = dict(self._choices(jobs))

        async def drain() -> None:
            async for index, delta in _merge([j.deltas() for j in jobs]):
                by_index[index].text.append(delta)

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

    def stream(self, jobs: list[_PromptJob], chunk: Any, include_usage: bool, opening: Any = None) -> StreamingResponse:
        """SSE in OpenAI's chunk format: `chunk(index, delta_text, finish_reason)` builds each."""

        async def events() -> AsyncIterator[str]:
            merged = _merge([j.deltas() for j in jobs])
            try:
                if opening is not None:
                    for index, _ in self._choices(jobs):
                        yield _sse(opening(index))
                async for index, delta in merged:
                    yield _sse(chunk(index, delta, None))
                for index, choice in self._choices(jobs):
                    yield _sse(chunk(index, None, choice.finish_reason))
                if include_usage:
                    yield _sse(chunk(None, None, None) | {"choices": [], "usage": self._usage(jobs)})
            except KvgenError as e:
                yield _sse(_error_body(str(e), "invalid_request_error" if isinstance(e, ValueError) else "server_error"))
            finally:
                # Also reached when the client disconnects: stops and frees the generations.
                await merged.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(
    generator: Any,
    *,
    model_name: Optional[str] = None,
    max_tokens_limit: int = 4096,
    max_prompt_tokens: Optional[int] = None,
) -> FastAPI:
    """A FastAPI app serving `generator` with OpenAI's completions and chat completions API.

    `max_tokens_limit` caps max_tokens per request; `max_prompt_tokens` caps prompt length
    (default: the model's context). Requests over either get a 400 naming the limit."""
    import os

    name = model_name or os.path.splitext(os.path.basename(str(generator._engine.model_path).rstrip("/")))[0]
    context = int(getattr(generator.config, "max_position_embeddings", 0) or 0)
    service = _Service(generator, name, int(max_tokens_limit), int(max_prompt_tokens or context or 1 << 30))
    app = FastAPI(title="kvgen", description="OpenAI-compatible text generation with kvgen")
    app.state.kvgen = service
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(e.message, e.kind, e.param), status_code=e.status)

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
        if isinstance(e, ValueError):
            return JSONResponse(_error_body(str(e), "invalid_request_error"), status_code=400)
        return JSONResponse(_error_body(str(e), "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "scheduler": generator.scheduler_stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "kvgen"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        jobs = service._jobs(service._prompts(body.prompt), body, body.max_tokens, logprobs=body.logprobs is not None)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "text_completion", "created": now, "model": name}

        if body.stream:

            def chunk(index: Optional[int], text: Optional[str], finish: Optional[str]) -> dict:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
                return base | {"choices": [] if index is None else [choice]}

            return service.stream(jobs, chunk, body.include_usage)
        await service.collect(http, jobs)
        rows = service._job_rows(jobs)
        choices = [
            {
                "index": i,
                "text": "".join(c.text),
                "logprobs": None if body.logprobs is None else service.completion_logprobs(*rows[i], body.logprobs),
                "finish_reason": c.finish_reason,
            }
            for i, c in service._choices(jobs)
        ]
        return base | {"choices": choices, "usage": service._usage(jobs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Any:
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        jobs = service._jobs([service._chat_prompt(body)], body, body.token_budget, logprobs=body.logprobs)
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

            return service.stream(jobs, chunk, body.include_usage, opening)
        await service.collect(http, jobs)
        rows = service._job_rows(jobs)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": service.chat_logprobs(*rows[i], body.top_logprobs or 0) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in service._choices(jobs)
        ]
        return base | {"object": "chat.completion", "choices": choices, "usage": service._usage(jobs)}

    return app


def serve(generator: Any, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: Any) -> None:
    """Runs `create_app(generator)` under uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(generator, **app_kwargs), host=host, port=port, log_level="info")
