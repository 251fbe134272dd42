"""The serving logic of `dycoke serve`: its configuration, a request checked into a Plan, the
generation run on the worker thread against kept sessions, and the one place that turns a
failure into an API error (:func:`api_error`, with the request's own field names).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DycokeError, SettingError, UsageError, VideoError
from ..feature_cache import FeatureCache
from ..options import FPS_LIMIT, CompressionOptions, FrameOptions, SamplingOptions
from ..results import Planned
from ..session import Session
from ..video.read import open_clip
from .answers import PromptTokens, Reused
from .conversation import parse
from .media import LocalVideo, MediaPolicy
from .protocol import ApiError, ChatRequest, valid_unicode
from .runner import Runner, Stopping
from .sessions import SessionLRU

# The request's words for the library's settings (errors.SettingError): the server's one table. A setting
# not listed is a top-level field of the same name (temperature, top_p, seed).
_FIELD = {"max_new_tokens": "max_tokens", "frames": "dycoke.frames", "fps": "dycoke.fps",
          "max_frames": "dycoke.max_frames", "timestamps": "dycoke.timestamps", "method": "dycoke.method",
          "memory_budget": "the server's --memory-budget",
          "ttm_k": "dycoke.ttm_k", "prune_p": "dycoke.prune_p", "prune_layer": "dycoke.prune_layer",
          "refresh_threshold": "dycoke.refresh_threshold", "frame_coverage": "dycoke.frame_coverage",
          "selection": "dycoke.selection", "positions": "dycoke.positions"}
MAX_STOPS = 4  # as OpenAI
TEXT_ALLOWANCE = 2 * 2**20  # body bytes beside a data: URL (messages, options)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_media: Path | None = None
    max_frames: int = 64
    max_tokens: int = 1024
    max_upload_bytes: int = 100 * 2**20
    queue: int = 16
    sessions: int = 8
    sessions_bytes: int = 2048 * 2**20
    frames: FrameOptions = FrameOptions()  # the defaults of a request that names none (frames None: the model's rule)
    compression: CompressionOptions = CompressionOptions()
    sampling: SamplingOptions = SamplingOptions()
    cache: FeatureCache | None = None
    timeout_s: float = 60.0
    quiet: bool = False
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted beside the bound address and localhost

    def host_names(self, bound: str) -> frozenset[str] | None:
        """The Host names a request may carry (guard.py), or None where any is taken: a server
        bound to every interface and given no --allowed-host is reached by names it cannot know."""
        extra = {h.strip().lower().strip("[]") for h in self.allowed_hosts}
        if bound in ("0.0.0.0", "::", "") and not extra:
            return None
        return frozenset({"localhost", "127.0.0.1", "::1", bound.lower()} | extra)

    def announcement(self, model_id: str, host: str, port: int) -> list[str]:
        """What the server says on stderr once it listens (the tests read the first line's URL)."""
        root = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        lines = [f"serving {model_id} at {root}/v1 (Ctrl-C stops)", f"the page: {root}/"]
        if self.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            lines.append("warning: listening beyond this machine without --api-key")
        return lines

    def check(self) -> "ServerConfig":
        """Refuse limits that make no sense, naming the flag (UsageError)."""
        for flag, value, low in (("--port", self.port, 0), ("--max-frames", self.max_frames, 1),
                                 ("--max-tokens", self.max_tokens, 1), ("--max-upload-mb", self.max_upload_bytes, 1),
                                 ("--queue", self.queue, 0), ("--sessions", self.sessions, 0)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low} (got {value})")
        if self.port > 65535:
            raise UsageError(f"--port must be in [0, 65535] (got {self.port})")
        if self.frames.counted and self.frames.frames > self.max_frames:
            raise UsageError(f"--frames must be at most --max-frames {self.max_frames} (got {self.frames.frames})")
        if self.sampling.max_new_tokens > self.max_tokens:
            raise UsageError(f"--max-new-tokens must be at most --max-tokens {self.max_tokens} "
                             f"(got {self.sampling.max_new_tokens})")
        if self.allowed_media is not None and not self.allowed_media.is_dir():
            raise UsageError(f"--allowed-local-media-path must be a folder (got {self.allowed_media})")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty")
        return self


def served_name(name: str) -> str:
    """The model's id on the wire: a local folder is named by its last part (no server path)."""
    path = Path(name).expanduser()
    return path.name if path.is_dir() else name


@dataclass(frozen=True)
class Plan:
    """A checked request, before its video is opened."""

    url: str
    question: str
    system: str | None
    frames: FrameOptions
    compression: CompressionOptions  # resolved
    sampling: SamplingOptions
    stops: list[str]
    trace: bool = False  # dycoke.kept: the answer's KeptTrace in its dycoke object


class Server:
    """The state behind the routes: the model, its limits, the queue and the kept sessions."""

    def __init__(self, lm, config: ServerConfig):
        self.lm, self.config = lm, config
        self.model_id = served_name(lm.name)
        self.model_info = {**{k: v for k, v in lm.describe().items() if k != "path"}, "name": self.model_id}
        self.policy = MediaPolicy(config.allowed_media, config.max_upload_bytes)
        self.runner = Runner(config.queue)
        self.sessions = SessionLRU(config.sessions, config.sessions_bytes)

    # ---------------------------------------------------------------- checking a request

    def plan(self, body: ChatRequest) -> Plan:
        if body.model != self.model_id:
            raise ApiError(404, f"model {body.model!r} is not served here (this server serves {self.model_id!r})",
                           "model_not_found")
        if body.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (got {body.n})", "invalid_value")
        unsupported = body.unsupported()
        if unsupported is not None:
            raise ApiError(400, f"{unsupported} is not supported by this server", "unsupported_field")
        conv = parse(self.lm, body)
        self.policy.check_url(conv.url)
        return Plan(conv.url, conv.question, conv.system, self._frames(body), self._compression(body),
                    self._sampling(body), self._stops(body), bool(body.dycoke and body.dycoke.kept))

    def _frames(self, body: ChatRequest) -> FrameOptions:
        """The request's frame options: ``dycoke`` (frames, fps, max_frames, timestamps) and vLLM's
        ``media_io_kwargs.video`` (num_frames, fps), over the server's defaults, within its ceiling."""
        given = body.dycoke.model_dump(include={"frames", "fps", "max_frames", "timestamps"}, exclude_none=True) \
            if body.dycoke is not None else {}
        for field, value in _media_io(body.media_io_kwargs).items():
            name = {"num_frames": "frames", "fps": "fps"}[field]
            if name in given and given[name] != value:
                raise ApiError(400, f"dycoke.{name} ({given[name]}) and media_io_kwargs.video.{field} ({value}) differ",
                               "invalid_value")
            given[name] = value
        if "frames" in given:  # a request's count or "max" replaces the server's default rule...
            given.setdefault("fps", None)
        elif "fps" in given:  # ...and its rate the server's default count
            given["frames"] = None
        with _request_fields():
            frames = replace(self.config.frames, **given).validate()
        top = self.config.max_frames
        if frames.counted and frames.frames > top:
            raise ApiError(400, f"dycoke.frames must be in [1, {top}] on this server (got {frames.frames})",
                           "frames_over_limit")
        if frames.max_frames is not None and frames.max_frames > top:
            raise ApiError(400, f"dycoke.max_frames must be in [1, {top}] on this server (got {frames.max_frames})",
                           "frames_over_limit")
        return frames

    def _compression(self, body: ChatRequest) -> CompressionOptions:
        given = body.dycoke.model_dump(exclude_none=True, exclude={"frames", "fps", "max_frames", "timestamps", "kept"}) \
            if body.dycoke is not None else {}
        if body.seed is not None:
            given["seed"] = body.seed
        with _request_fields():
            return replace(self.config.compression, **given).validate().resolve(self.lm)

    def _sampling(self, body: ChatRequest) -> SamplingOptions:
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is not None and not 1 <= asked <= self.config.max_tokens:
            name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise ApiError(400, f"{name} must be in [1, {self.config.max_tokens}] on this server (got {asked})",
                           "tokens_over_limit")
        default = self.config.sampling
        with _request_fields():
            return replace(default, max_new_tokens=asked if asked is not None else default.max_new_tokens,
                           temperature=default.temperature if body.temperature is None else body.temperature,
                           top_p=default.top_p if body.top_p is None else body.top_p,
                           seed=default.seed if body.seed is None else body.seed,
                           ignore_eos=body.ignore_eos, thinking=_thinking(body, default.thinking)).validate()

    @staticmethod
    def _stops(body: ChatRequest) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if not all(valid_unicode(x) for x in stops):
            raise ApiError(400, "stop: not valid Unicode (a lone UTF-16 surrogate)", "invalid_value")
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", "invalid_value")
        return stops

    # ---------------------------------------------------------------- the worker's side

    def work(self, plan: Plan, video: LocalVideo):
        """The generation, run on the worker thread: find or start the session, stream. The clip
        is probed once, for a new session (the open file: never reopened by name); a kept session
        of the same bytes has its probe already."""
        lm = self.lm
        key = (video.digest, plan.frames, plan.compression, plan.system) if video.digest else None
        session = self.sessions.take(key) if key is not None else None
        found = session is not None
        if session is None:
            clip = open_clip(video.path, name=video.label, digest=video.digest, timeout_s=self.config.timeout_s)
            session = Session(lm, clip, frames=plan.frames, compression=plan.compression, cache=self.config.cache,
                              timeout_s=self.config.timeout_s, system=plan.system, ceiling=self.config.max_frames)
        else:
            session.rebind(replace(session.clip, path=video.path, name=video.label))
        before, failed = session.encoded, True
        try:
            for event in session.stream(plan.question, plan.sampling, plan.compression, plan.trace):
                if isinstance(event, Planned):
                    yield Reused(found and session.encoded is before and event.prefix_reused)
                    yield PromptTokens(event.prompt_tokens)
                yield event
            failed = False
        except GeneratorExit:  # cancelled: the session is whole, keep it
            failed = False
            raise
        finally:
            session.forget_answers()
            if key is not None and not failed:
                self.sessions.keep(key, session)

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "dycoke"}

    def health(self) -> dict:
        r = self.runner
        return {"status": "stopping" if r.stopping.is_set() else "ok", "model": self.model_id,
                "running": r.running, "waiting": r.waiting, "served": r.served, "cancelled": r.cancelled,
                "failed": r.failed, "refused": r.refused, "sessions": len(self.sessions),
                "session_bytes": self.sessions.bytes}


def _media_io(kwargs: dict | None) -> dict:
    """vLLM's ``media_io_kwargs``: only ``{"video": {"num_frames": N, "fps": F}}`` is taken."""
    if kwargs is None:
        return {}
    video = kwargs.get("video")
    if set(kwargs) != {"video"} or not isinstance(video, dict) or set(video) - {"num_frames", "fps"}:
        raise ApiError(400, "media_io_kwargs: only {\"video\": {\"num_frames\": N, \"fps\": F}} is supported",
                       "invalid_value")
    n, fps = video.get("num_frames"), video.get("fps")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise ApiError(400, f"media_io_kwargs.video.num_frames must be an integer (got {n!r})", "invalid_value")
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool)):
        raise ApiError(400, f"media_io_kwargs.video.fps must be a number (got {fps!r})", "invalid_value")
    if fps is not None and not 0 < fps <= FPS_LIMIT:  # False for NaN
        raise ApiError(400, f"media_io_kwargs.video.fps must be in (0, {FPS_LIMIT:g}] (got {fps})", "invalid_value")
    return {k: v for k, v in (("num_frames", n), ("fps", fps)) if v is not None}


# OpenAI's reasoning efforts -> thinking (off, or on at one of options.EFFORTS)
_EFFORT_OF = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high"}


def _thinking(body: ChatRequest, default: bool | str | None) -> bool | str | None:
    """Reasoning on or off: OpenAI's ``reasoning_effort``, or chat_template_kwargs (vLLM's):
    ``enable_thinking`` (a boolean) or ``reasoning_effort``."""
    kwargs = body.chat_template_kwargs or {}
    if set(kwargs) - {"enable_thinking", "reasoning_effort"} or not isinstance(kwargs.get("enable_thinking", False), bool):
        raise ApiError(400, "chat_template_kwargs: only {\"enable_thinking\": true|false} and {\"reasoning_effort\": "
                            "...} are supported", "invalid_value")
    effort = body.reasoning_effort if body.reasoning_effort is not None else kwargs.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in _EFFORT_OF:
            raise ApiError(400, f"reasoning_effort must be one of {', '.join(_EFFORT_OF)} (got {effort!r})",
                           "invalid_value")
        return _EFFORT_OF[effort]
    value = kwargs.get("enable_thinking")
    return default if value is None else value


@contextmanager
def _request_fields():
    """Library option errors as 400s that name the request's fields."""
    try:
        yield
    except SettingError as exc:
        raise ApiError(400, exc.worded(_FIELD), "invalid_value") from None
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None


def api_error(exc: BaseException, video: LocalVideo | None) -> ApiError:
    """What a failed job answers."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Stopping):
        return ApiError(503, "the server is stopping", "server_stopping")
    if isinstance(exc, (VideoError, UsageError)):
        message = exc.worded(_FIELD) if isinstance(exc, SettingError) else str(exc)
        return ApiError(400, video.shown(message) if video is not None else message,
                        "invalid_video" if isinstance(exc, VideoError) else "invalid_value")
    if isinstance(exc, DycokeError):
        return ApiError(500, str(exc), "server_error")
    print(f"dycoke serve: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
          file=sys.stderr)
    return ApiError(500, f"internal error ({type(exc).__name__})", "server_error")
