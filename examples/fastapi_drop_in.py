"""A text-generation service written the usual transformers way, running on kvgen.

Switching it from transformers to kvgen changed two lines, the import and the loading line
(README, "Serving: a transformers service on kvgen"):

    -from transformers import AutoModelForCausalLM, AutoTokenizer
    +import kvgen
    -model, tokenizer = AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)
    +model = kvgen.Generator.from_pretrained(MODEL); tokenizer = model.tokenizer

Everything else is the transformers code as it was: `tokenizer(...)`, `model.generate(**inputs, ...)`,
`tokenizer.decode(...)`, a plain `def` endpoint that FastAPI runs in its thread pool. With
kvgen, the concurrent `generate()` calls of those threads share model steps (continuous
batching) instead of queueing behind each other.

    MODEL=path/to/model uvicorn examples.fastapi_drop_in:app --port 8000
    curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"prompt": "Hello"}'
"""

import os

from fastapi import FastAPI
from pydantic import BaseModel, Field

import kvgen

MODEL = os.environ.get("MODEL", "SmolLM2-135M-Instruct")
model = kvgen.Generator.from_pretrained(MODEL); tokenizer = model.tokenizer  # noqa: E702

app = FastAPI()


class GenerateRequest(BaseModel):
    prompt: str
    max_new_tokens: int = Field(default=64, ge=1, le=512)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


@app.post("/generate")
def generate(req: GenerateRequest) -> dict:
    messages = [{"role": "user", "content": req.prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    sampling = {"do_sample": True, "temperature": req.temperature} if req.temperature > 0 else {"do_sample": False}
    output = model.generate(**inputs, max_new_tokens=req.max_new_tokens, **sampling)
    new_tokens = output[0][inputs["input_ids"].shape[1] :]
    return {"text": tokenizer.decode(new_tokens, skip_special_tokens=True)}
