"""OpenAI chat-completions request schema, API errors in the OpenAI error shape, and response bodies."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 200


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.message = message
        self.code = code
        self.error_type = error_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.code, self.param)


def error_body(message: str, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request that this server honours; `top_k`, `repetition_penalty` and
    `ignore_eos` are extensions (as in vLLM), passed by the openai client through `extra_body`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool = False
    logprobs: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list[Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        for stop in stops:
            if not stop:
                raise ValueError("a stop string must not be empty")
            if len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"a stop string is limited to {MAX_STOP_LENGTH} characters")
        return stops

    def check_supported(self) -> None:
        """Reject what this server would otherwise silently ignore."""
        if self.n not in (None, 1):
            raise APIError(400, f"n must be 1 (got {self.n}): one choice per request", "unsupported_n", param="n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", "unsupported_parameter", param="logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported", "unsupported_parameter", param="tools")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", "unsupported_parameter",
                               param=name)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # the validator turned it into a list


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; every problem becomes a 400 naming the offending field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_request")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        count = exc.error_count()
        more = f" (and {count - 1} more problem(s))" if count > 1 else ""
        raise APIError(400, f"invalid request: {where}: {first['msg']}{more}", "invalid_request",
                       param=where) from None
    request.check_supported()
    return request


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, model: str, text: str, finish_reason: str, grounding: list[dict],
                    prompt_tokens: int, completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "grounding": grounding},
            "finish_reason": finish_reason,
            "logprobs": None,
        }],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }


def chunk_body(completion_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk_body(completion_id: str, model: str, created: int, prompt_tokens: int,
                     completion_tokens: int) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }
