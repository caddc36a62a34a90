"""The transformers service bench_serve.py measures kvgen's server against: the same streaming
`/v1/completions` job (OpenAI chunk format, one chunk per token, usage at the end), written the
usual transformers way: one `model.generate()` per request on its own thread, tokens handed to
the response through a streamer.

    python benches/hf_serve_baseline.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --port 8001
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
from typing import Optional

import torch
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class _TokenQueue:
    """An HF streamer (put/end) that forwards each new token id; the first put is the prompt."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.queue.put(None)


class CompletionBody(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = True
    model: Optional[str] = None
    stream_options: Optional[dict] = None


def create_app(gguf: str) -> FastAPI:
    directory, name = os.path.split(os.path.abspath(gguf))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: CompletionBody) -> StreamingResponse:
        inputs = tokenizer(body.prompt, return_tensors="pt")
        streamer = _TokenQueue()
        sampling = {"do_sample": True, "temperature": body.temperature} if body.temperature > 0 else {"do_sample": False}

        def run() -> None:
            try:
                with torch.inference_mode():
                    model.generate(**inputs, max_new_tokens=body.max_tokens, streamer=streamer, **sampling)
            finally:
                streamer.end()

        threading.Thread(target=run, daemon=True).start()

        def events():
            ids: list[int] = []
            emitted = ""
            while (token := streamer.queue.get()) is not None:
                ids.append(token)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                delta, emitted = text[len(emitted) :], text
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": delta, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": len(ids)}
            yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    uvicorn.run(create_app(args.gguf), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
