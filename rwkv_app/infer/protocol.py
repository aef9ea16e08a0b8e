"""The OpenAI wire format: request and response models, and the error shape.

Only data lives here (vLLM's split): nothing in this module knows about engines, slots or HTTP routing. Requests
ignore unknown fields (clients send many we do not use); every field we do read is validated, and a failure becomes
a 400 with the OpenAI error shape in the server.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_N = 16


# ---------------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered to the client as `{"error": {message, type, param, code}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(name: str, available: list[str]) -> APIError:
    return APIError(404, f"The model `{name}` does not exist; available: {', '.join(available) or 'none'}",
                    param="model", code="model_not_found")


def context_length_exceeded(limit: int, prompt_tokens: int, completion_tokens: Optional[int],
                            param: str = "messages") -> APIError:
    asked = f"{prompt_tokens} in the prompt" if completion_tokens is None else \
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, {completion_tokens} in the completion)"
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested {asked}. "
                         "Please reduce the length of the prompt or of the completion.",
                    param=param, code="context_length_exceeded")


# -------------------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    """Unknown fields are ignored, never rejected: clients send fields we have no use for. `null` means absent."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The fields both routes share; RWKV extras (`top_k`, `repetition_penalty`, `penalty_decay`) come from rwkv-rs."""

    model: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = all")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="rwkv-rs: like frequency, with penalty_decay")
    penalty_decay: float = Field(1.0, ge=0.0, le=1.0, description="occurrence counts x this after every token")
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed (got {len(stops)})")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            if not str(key).lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids (got {key!r})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100] (got {bias})")
        return value

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class TextPart(_Request):
    type: str = "text"
    text: str = ""


class ChatMessage(_Request):
    role: str
    content: Optional[Union[str, list[Union[TextPart, dict[str, Any]]]]] = None
    name: Optional[str] = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        role = value.strip().lower()  # rwkv-rs's own examples send "User"
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise ValueError(f"unknown role {value!r}; use system, developer, user, assistant or tool")
        return role

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if isinstance(part, TextPart):
                if part.type != "text":
                    raise ValueError(f"content parts of type {part.type!r} are not supported; send text parts")
                parts.append(part.text)
            else:
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported; send text parts")
        return "".join(parts)


class ResponseFormat(_Request):
    type: str = "text"


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format {self.response_format.type!r} is not supported; use \"text\"")
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            raise ValueError("this server cannot force tool calls; send tool_choice \"none\" or \"auto\"")
        for message in self.messages:
            message.text  # raises on non-text parts
        return self

    @property
    def token_limit(self) -> Optional[int]:
        """`max_completion_tokens` (LangChain sends only this one) wins over the older `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_k(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("`suffix` (insertion) is not supported by RWKV models")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"`best_of` ({self.best_of}) must be at least `n` ({self.n})")
            if self.stream and self.best_of > self.n:
                raise ValueError("`best_of` greater than `n` cannot be streamed")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("`prompt` must not be empty")
        return self

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_tokens

    @property
    def scores_prompt(self) -> bool:
        """`echo` with `logprobs`: the prompt's tokens get log-probabilities too (how evaluation harnesses score)."""
        return self.echo and self.logprobs is not None

    @property
    def top_logprobs_k(self) -> Optional[int]:
        return self.logprobs


class TokenizeRequest(_Request):
    model: str = Field(..., min_length=1)
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class DetokenizeRequest(_Request):
    model: str = Field(..., min_length=1)
    tokens: list[int]


class ReloadRequest(BaseModel):
    """rwkv-rs's admin body plus `dry_run`. Entries are `[[models]]` tables, validated like the TOML itself."""

    model_config = ConfigDict(extra="forbid")

    upsert: list[dict[str, Any]] = Field(default_factory=list)
    remove_model_names: list[str] = Field(default_factory=list)
    dry_run: bool = False


# ------------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]]
    text_offset: list[int]

    def __add__(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        """The entries of `self` followed by those of `other` (prompt, then completion)."""
        return CompletionLogprobs(tokens=self.tokens + other.tokens,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  top_logprobs=(self.top_logprobs or []) + (other.top_logprobs or []),
                                  text_offset=self.text_offset + other.text_offset)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rwkv_app"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
