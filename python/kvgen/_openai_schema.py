"""Request bodies of kvgen's OpenAI-compatible endpoints (pydantic): what is accepted, with the
ranges checked before any work. Fields OpenAI defines but kvgen does not implement are accepted
only at their neutral value, so a client never silently gets something else than it asked for.

Types are strict (`strict=True`): `true` is not an integer and `1` is not a boolean, as in
OpenAI's schema; an integer is still a valid number. The published OpenAPI schema states every
bound a request is checked against (see `document_limits` for the per-server ones), so a request
valid by the schema is served."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Hard ceilings of the schema; each server applies its own (lower, configurable) ServerLimits.
MAX_STOP = 64
MAX_N = 16
MAX_LOGPROBS = 20
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


def _integral(v: Any) -> Any:
    # JSON Schema counts 2.0 as an integer, so it is one here too; booleans, strings and 2.5 are not
    # (the strict int check after this refuses them). A model validator rather than an Annotated
    # type, so that the published schema keeps plain `minimum`/`maximum` on these fields.
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


_INT_FIELDS = ("max_tokens", "n", "seed", "top_k", "min_tokens", "prompt", "best_of", "logprobs",
               "max_completion_tokens", "top_logprobs")


_NonEmpty = Annotated[str, StringConstraints(min_length=1)]
_TokenId = Annotated[int, Field(ge=0)]
_Tokens = Annotated[list[_TokenId], Field(min_length=1)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: what every 4xx/5xx answer of the server carries."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: Optional[Union[_NonEmpty, Annotated[list[_NonEmpty], Field(max_length=MAX_STOP)]]] = None
    seed: Optional[int] = Field(
        default=None,
        ge=0,
        lt=2**64,
        description="Sampling seed. Choice k (of each prompt) draws from kvgen's ChaCha stream (seed, k), as "
        "Generator.generate(seed=seed, num_return_sequences=n) does: choice k is the same whatever n is, and "
        "choice 0 is the n=1 answer.",
    )
    user: Optional[str] = None
    # Only the neutral value is served; the schema says so (minimum = maximum = 0).
    presence_penalty: float = Field(default=0.0, json_schema_extra={"minimum": 0, "maximum": 0})
    frequency_penalty: float = Field(default=0.0, json_schema_extra={"minimum": 0, "maximum": 0})
    logit_bias: Optional[dict[str, float]] = Field(default=None, json_schema_extra={"maxProperties": 0})
    stream_options: Optional[StreamOptions] = None

    # Sampling extensions of vLLM's and llama.cpp's OpenAI servers, with transformers' meaning.
    top_k: Optional[int] = Field(
        default=None, ge=-1, description="Keep the k likeliest tokens; 0 or -1 (vLLM's spelling) disables top-k."
    )
    min_p: Optional[float] = Field(
        default=None, ge=0.0, le=1.0, description="Drop tokens less likely than min_p x the likeliest one's probability."
    )
    # Bounded so that logits / penalty / temperature stays finite in the engine's f32; 100 already
    # rules a repeated token out, and transformers' users pick 1.0 to 1.5.
    repetition_penalty: Optional[float] = Field(
        default=None,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="transformers' repetition penalty (1 = none); applies to greedy decoding too.",
    )
    min_tokens: int = Field(
        default=0, ge=0, description="End of sequence is suppressed until this many tokens are generated (min_new_tokens)."
    )
    ignore_eos: bool = Field(default=False, description="Generate past the end-of-sequence token(s), up to max_tokens.")

    @field_validator(*_INT_FIELDS, mode="before", check_fields=False)
    @classmethod
    def _integral_floats(cls, v: Any) -> Any:
        return _integral(v)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Optional[list[str]]:
        if v is None:
            return None
        return ([v] if isinstance(v, str) else list(v)) or None

    # Field validators (not a model validator), so the error's `param` names the field.
    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float, info: Any) -> float:
        if v != 0.0:
            raise ValueError(f"{info.field_name}={v} is not supported by kvgen; leave it at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: Any) -> Any:
        if v:
            raise ValueError("logit_bias is not supported by kvgen; leave it unset")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# `logprobs` with `stream: true` is refused (400); the schema states it so that a valid request is served.
_NO_LOGPROBS_WHEN_STREAMING = {
    "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
    "then": {"properties": {"logprobs": {"enum": [None, False]}}},
}


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_NO_LOGPROBS_WHEN_STREAMING)

    prompt: Union[
        _NonEmpty,
        Annotated[list[_NonEmpty], Field(min_length=1)],
        _Tokens,
        Annotated[list[_Tokens], Field(min_length=1)],
    ] = Field(description="A text, texts, token ids, or lists of token ids; none empty.")
    max_tokens: Optional[int] = Field(default=16, ge=1)
    # Not Literal[False] / Literal[1]: a Literal matches by ==, which lets 0 pass as False and True as 1.
    echo: bool = Field(default=False, json_schema_extra={"const": False})
    best_of: Optional[int] = Field(default=None, json_schema_extra={"const": 1})
    suffix: Optional[Literal[None]] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo=true is not supported by kvgen; leave it false")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, v: Optional[int]) -> Optional[int]:
        if v not in (None, 1):
            raise ValueError(f"best_of={v} is not supported by kvgen; leave it at 1")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


_Content = Union[str, Annotated[list[TextPart], Field(min_length=1)]]


class _Message(BaseModel):
    # Other OpenAI message fields (name, tool_call_id, ...) are accepted and not used.
    model_config = ConfigDict(extra="allow", strict=True)

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content)


# OpenAI requires `content` on every message but the assistant's (which may carry tool calls instead).
class SystemMessage(_Message):
    role: Literal["system"]
    content: _Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: _Content


class UserMessage(_Message):
    role: Literal["user"]
    content: _Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Optional[_Content] = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: _Content


ChatMessage = Annotated[
    Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")
]

_TOP_LOGPROBS_NEED_LOGPROBS = {
    "allOf": [
        _NO_LOGPROBS_WHEN_STREAMING,
        {
            "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        },
    ]
}


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_TOP_LOGPROBS_NEED_LOGPROBS)

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def token_budget(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
