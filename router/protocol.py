"""The OpenAI-compatible HTTP schema (pydantic only at this boundary).

Validation is strict: a wrong type is an error, not a coercion ("5" is not an integer), NaN
and infinities are refused, and a parameter pdserve does not implement (``n`` > 1,
penalties, ``logit_bias``, tools, JSON mode, ``echo``, ``suffix``, ``best_of``) is a 400 that
says so, never silently ignored. Fields pdserve does not know at all are ignored, as OpenAI
clients send extras (``user``, ``metadata``). Each validator's message names what to send.

Documented choices: ``max_tokens`` beyond the context is rejected (the message gives the
largest value that fits), not clamped; without ``max_tokens`` a completion gets 16 tokens
(OpenAI's default) and a chat completion the rest of the context.

The gRPC service converts its requests into these same models, so both protocols share
every check.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .errors import error_body

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "PdserveOptions",
           "StreamOptions", "error_body", "new_id", "now"]

MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_MESSAGES = 4096
MAX_LOGPROBS = 20
INT64 = (-(2**63), 2**63 - 1)  # seeds seed a torch.Generator, which takes 64-bit integers

_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _integral(v: Any) -> Any:
    # JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees), 16.5 is not one.
    return int(v) if isinstance(v, float) and v.is_integer() else v


# Integers in strict mode ("16" and true are refused) that accept JSON's 16.0.
Int = Annotated[int, BeforeValidator(_integral)]


def _neutral_only(**schema: Any) -> dict[str, Any]:
    """JSON-schema keywords for a parameter pdserve accepts only at its neutral value, so the
    OpenAPI document (and a fuzzer reading it) says so; the validators give the 400 message."""
    return {**schema, "description": "accepted only at its neutral value (pdserve does not "
                                     "implement other values)"}


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


MAX_CHUNKS = 64


class PdserveOptions(BaseModel):
    """The ``pdserve`` extension object of a request body (OpenAI clients: ``extra_body``).

    ``chunks`` marks document chunks (RAG) whose KV pdserve may compute once and reuse at any
    position (CacheBlend): each is an exact substring of the prompt (or of a message's
    content), listed in prompt order; with a token-id prompt, a list of token ids occurring
    in it. The prompt itself still says everything, so the body means the same to any
    OpenAI-compatible server. ``recompute_ratio``: the fraction of chunk tokens recomputed
    (1 = a full prefill; default: the server's, 0.15)."""

    model_config = _STRICT

    chunks: list[str | list[Int]] = Field(default_factory=list, max_length=MAX_CHUNKS)
    recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("chunks", mode="before")
    @classmethod
    def _chunks(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError("pdserve.chunks must be a list of strings or of token-id lists")  # noqa: TRY004
        for i, c in enumerate(v):
            ok = (isinstance(c, str) and c) or (
                isinstance(c, list) and c and all(
                    isinstance(_integral(t), int) and not isinstance(t, bool) for t in c))
            if not ok:
                raise ValueError(f"pdserve.chunks[{i}] must be a non-empty string or a "
                                 "non-empty list of token ids")
        return v


class _Sampling(BaseModel):
    model_config = _STRICT

    model: str | None = None
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default 1.0")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="default 1.0")
    top_k: Int = Field(default=0, ge=0, description="extension (as vLLM): 0 disables")
    seed: Int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = Field(default=None, json_schema_extra={
        "minLength": 1, "maxLength": MAX_STOP_LEN, "maxItems": MAX_STOP,
        "items": {"minLength": 1, "maxLength": MAX_STOP_LEN}})
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted for compatibility, but only at their neutral values (the schema says so).
    n: Int | None = Field(default=1, ge=1, json_schema_extra=_neutral_only(maximum=1))
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                           json_schema_extra=_neutral_only(minimum=0, maximum=0))
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                            json_schema_extra=_neutral_only(minimum=0, maximum=0))
    logit_bias: dict[str, float] | None = Field(default=None,
                                                json_schema_extra=_neutral_only(maxProperties=0))
    ignore_eos: bool = False  # extension, used by benchmarks
    pdserve: PdserveOptions | None = None  # extension: RAG chunks (see PdserveOptions)
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            v = [] if v is None else [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(v)}")
        if any(not s or len(s) > MAX_STOP_LEN for s in v):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_LEN} characters")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported; send several requests for more samples")
        return 1

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float | None, info) -> float | None:
        if v:
            raise ValueError(f"{info.field_name} is not supported by pdserve; omit it or send 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported by pdserve; omit it")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    # Defaults applied after validation, so null and absent mean the same.
    @property
    def temperature_value(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def top_p_value(self) -> float:
        return 1.0 if self.top_p is None else self.top_p

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # the validator made it a list


class CompletionRequest(_Sampling):
    prompt: str | list[Int] = Field(..., description="text, or token ids",
                                    json_schema_extra={"minLength": 1, "minItems": 1,
                                                       "items": {"minimum": 0}})
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = Field(default=False, json_schema_extra=_neutral_only(enum=[False, None]))
    best_of: Int | None = Field(default=None, ge=1, json_schema_extra=_neutral_only(maximum=1))
    suffix: str | None = Field(default=None, json_schema_extra=_neutral_only(maxLength=0))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt token list must not be empty")
            ids = [_integral(t) for t in v]
            if all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                return ids
            if all(isinstance(t, (str, list)) for t in v):
                raise ValueError("batched prompts are not supported; send one prompt (a string "
                                 "or a list of token ids) per request")
        raise ValueError("prompt must be a string or a list of token ids (integers)")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool | None) -> bool:
        if v:
            raise ValueError("echo=true is not supported by pdserve; the prompt is not returned")
        return False

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of > 1 is not supported; send several requests instead")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix (insertion) is not supported by pdserve; omit it")


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        # ValueError even for wrong types: pydantic turns only ValueError into a 400 message
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of text parts")  # noqa: TRY004
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} must be an object like "  # noqa: TRY004
                                 '{"type": "text", "text": "..."}')
            if part.get("type") != "text":
                raise ValueError(f"content part {i} has type {part.get('type')!r}; only 'text' "
                                 "parts are supported (this model reads text only)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i}: text must be a string")  # noqa: TRY004
        return v

    @model_validator(mode="after")
    def _needs_content(self):
        # The assistant may omit content (a tool-call turn); anyone else must say something.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role!r} message")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str = Field(json_schema_extra={"enum": ["text"]})


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(default=None,
                                               json_schema_extra=_neutral_only(maxItems=0))
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, json_schema_extra=_neutral_only(enum=["none", "auto", None]))
    response_format: ResponseFormat | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("messages must contain at least one message")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tools (function calling) are not supported by pdserve; omit them")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by pdserve; omit it")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: ResponseFormat | None) -> ResponseFormat | None:
        if v is not None and v.type != "text":
            raise ValueError(f"response_format type {v.type!r} is not supported; pdserve "
                             "returns plain text (omit response_format)")
        return v

    @model_validator(mode="after")
    def _lp(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def max_tokens_value(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
