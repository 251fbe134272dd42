"""The wire format: OpenAI's chat completions request and response, and its errors.

Requests are pydantic models that ignore fields they do not know (clients send many OpenAI
fields that change nothing here), except in the ``dycoke`` extra body, where an unknown key is
refused. Shapes are checked here (a wrong shape is a 422); values that need the model or the
server's limits are checked in app.py (a 400).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import one_line


class ApiError(Exception):
    """An error response: HTTP ``status``, OpenAI ``type`` and ``code``, one-line ``message``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, one_line(message), code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code)


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"message": one_line(message), "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "code": code}}


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class VideoURL(_Open):
    url: str


class InputAudio(_Open):
    data: str = ""
    format: Optional[str] = None


class ContentPart(_Open):
    """One part of a message's content. ``text`` and ``video_url`` are served, and an
    ``input_audio`` part is taken as base64 video: it is how `llm`'s OpenAI plugin sends any
    attachment that is not an image (``llm --at clip.mp4 audio/mpeg``). The type is checked in
    conversation.py so that an image part gets a clear 400."""

    type: str
    text: Optional[str] = None
    video_url: Union[VideoURL, str, None] = None
    input_audio: Optional[InputAudio] = None

    @property
    def is_video(self) -> bool:
        return self.type in ("video_url", "input_audio")

    @property
    def url(self) -> str | None:
        if self.type == "input_audio":  # the bytes go through the same reader as any data: URL
            return f"data:video/mp4;base64,{self.input_audio.data if self.input_audio else ''}"
        return self.video_url.url if isinstance(self.video_url, VideoURL) else self.video_url


class Message(_Open):
    role: str
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Open):
    include_usage: bool = False


class DycokeOptions(BaseModel):
    """Per-request overrides of the server's defaults (the ``dycoke`` extra body field)."""

    model_config = ConfigDict(extra="forbid")

    method: Optional[str] = None
    ttm_k: Optional[float] = None
    prune_p: Optional[float] = None
    prune_layer: Optional[int] = None
    refresh_threshold: Optional[float] = None
    frame_coverage: Optional[float] = None
    selection: Optional[str] = None
    positions: Optional[str] = None
    frames: Optional[int] = None


class ChatRequest(_Open):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # vLLM's extra sampling field: always generate max_tokens (benchmarks)
    media_io_kwargs: Optional[dict[str, Any]] = None  # vLLM's: {"video": {"num_frames": N}}
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's: {"enable_thinking": bool} (Qwen3.5)
    dycoke: Optional[DycokeOptions] = None


# -------------------------------------------------------------------------------- responses


class Completion:
    """The ids and times one response shares between its chunks."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, usage: dict, dycoke: dict, reasoning: str | None = None) -> dict:
        message = {"role": "assistant", "content": text}
        if reasoning is not None:  # thinking on: the reasoning apart, as vLLM's reasoning parsers return it
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage, "dycoke": dycoke}

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion.chunk"), "choices": [choice], **extra}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
