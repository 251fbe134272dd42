"""The wire format: OpenAI's chat completions request and response, and its errors.

Requests are pydantic models that ignore fields they do not know (clients send many OpenAI
fields that change nothing here), except in the ``dycoke`` extra body, where an unknown key is
refused. Shapes are checked here (a wrong shape is a 422); values that need the model or the
server's limits are checked in app.py (a 400).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from ..errors import one_line


class ApiError(Exception):
    """An error response: HTTP ``status``, OpenAI ``type`` and ``code``, one-line ``message``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, one_line(message), code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code)


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"message": one_line(message), "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "code": code}}


def valid_unicode(text: str) -> bool:
    """False for a string that cannot be written as UTF-8: JSON's \\ud800 escapes decode to lone
    surrogates, which the tokenizer and the file system cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_a_boolean(value):
    """JSON's true and false are not numbers: pydantic's lax mode would take true as 1."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean), Field(strict=True)]
Number = Annotated[float, BeforeValidator(_not_a_boolean)]

# OpenAI fields that ask for something this server does not do: a request that sets one gets a
# 400 naming it, rather than an answer that silently lacks it. The value that asks for nothing
# (false, none, an empty list, text) is accepted, as clients send it by default.
UNSUPPORTED = {"tools": lambda v: bool(v), "functions": lambda v: bool(v),
               "tool_choice": lambda v: v not in (None, "none", "auto"),
               "function_call": lambda v: v not in (None, "none", "auto"),
               "logprobs": lambda v: bool(v), "top_logprobs": lambda v: bool(v),
               "response_format": lambda v: not (v is None or (isinstance(v, dict) and v.get("type") == "text"))}


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
    ttm_k: Optional[Number] = None
    prune_p: Optional[Number] = None
    prune_layer: Optional[Int] = None
    refresh_threshold: Optional[Number] = None
    frame_coverage: Optional[Number] = None
    selection: Optional[str] = None
    positions: Optional[str] = None
    frames: Union[Int, Literal["max"], None] = None  # a count, or "max": as many as the context and memory hold
    fps: Optional[Number] = None  # the model's rule at this rate (vLLM: media_io_kwargs.video.fps)
    max_frames: Optional[Int] = None  # the rule's ceiling (within the server's --max-frames)
    timestamps: Optional[bool] = None  # LLaVA-OneVision's time instruction
    kept: Optional[StrictBool] = None  # add what the answer kept to the dycoke object (results.KeptTrace)


class ChatRequest(_Open):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[Int] = None
    max_completion_tokens: Optional[Int] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    seed: Optional[Int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[Int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # vLLM's extra sampling field: always generate max_tokens (benchmarks)
    media_io_kwargs: Optional[dict[str, Any]] = None  # vLLM's: {"video": {"num_frames": N, "fps": F}}
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's: {"enable_thinking": bool} (Qwen3.5)
    reasoning_effort: Optional[str] = None  # OpenAI's: none, minimal, low, medium, high (thinking off or on)
    dycoke: Optional[DycokeOptions] = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None

    def unsupported(self) -> str | None:
        """The first field that asks for what this server does not do (see UNSUPPORTED), or None."""
        return next((name for name, asks in UNSUPPORTED.items() if asks(getattr(self, name))), None)


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
