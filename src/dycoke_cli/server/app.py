"""The FastAPI app of `dycoke serve`, and running it with uvicorn.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` (open, also with an
API key). A request is checked (shape: 422; values, messages and media: 400; the model: 404),
its video made local (media.py), and its generation queued (runner.py: 429 when full). The
response starts once the first token is out, so a bad video is a 400 with the reader's own
one-line reason, never a stream that fails. Every error has OpenAI's shape, no traceback, and
names no path but what the client sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import DycokeError, UsageError, VideoError
from ..feature_cache import FeatureCache
from ..options import CompressionOptions, OptionError, SamplingOptions
from ..pipeline import reuses_prefix
from ..results import Done, Planned, Token
from ..session import Session
from ..video.read import probe_video
from .answers import Prompt, Reply, Reused
from .conversation import parse
from .media import LocalVideo, MediaPolicy
from .protocol import ApiError, ChatRequest, Completion, error_body
from .runner import Ended, Job, QueueFull, Runner, Stopping
from .sessions import SessionLRU

# A request names these fields; the library's errors name its own (options.py).
_FIELD = {"max_new_tokens": "max_tokens", "frames": "dycoke.frames", "method": "dycoke.method",
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
    frames: int | None = None  # the default of a request that names none (None: the model's)
    compression: CompressionOptions = CompressionOptions()
    sampling: SamplingOptions = SamplingOptions()
    cache: FeatureCache | None = None
    timeout_s: float = 60.0
    quiet: bool = False

    def check(self) -> "ServerConfig":
        """Refuse limits that make no sense, naming the flag (UsageError)."""
        for flag, value, low in (("--port", self.port, 0), ("--max-frames", self.max_frames, 1),
                                 ("--max-tokens", self.max_tokens, 1), ("--max-upload-mb", self.max_upload_bytes, 1),
                                 ("--queue", self.queue, 0), ("--sessions", self.sessions, 0)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low} (got {value})")
        if self.port > 65535:
            raise UsageError(f"--port must be in [0, 65535] (got {self.port})")
        if self.frames is not None and self.frames > self.max_frames:
            raise UsageError(f"--frames must be at most --max-frames {self.max_frames} (got {self.frames})")
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
    frames: int | None
    compression: CompressionOptions  # resolved
    sampling: SamplingOptions
    stops: list[str]


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
        conv = parse(self.lm, body)
        self.policy.check_url(conv.url)
        return Plan(conv.url, conv.question, conv.system, self._frames(body), self._compression(body),
                    self._sampling(body), self._stops(body))

    def _frames(self, body: ChatRequest) -> int | None:
        frames = body.dycoke.frames if body.dycoke is not None else None
        io = body.media_io_kwargs
        if io is not None:
            video = io.get("video")
            if set(io) != {"video"} or not isinstance(video, dict) or set(video) - {"num_frames"}:
                raise ApiError(400, "media_io_kwargs: only {\"video\": {\"num_frames\": N}} is supported",
                               "invalid_value")
            n = video.get("num_frames")
            if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
                raise ApiError(400, f"media_io_kwargs.video.num_frames must be an integer (got {n!r})", "invalid_value")
            if n is not None and frames is not None and n != frames:
                raise ApiError(400, f"dycoke.frames ({frames}) and media_io_kwargs.video.num_frames ({n}) differ",
                               "invalid_value")
            frames = n if n is not None else frames
        if frames is not None and not 1 <= frames <= self.config.max_frames:
            raise ApiError(400, f"dycoke.frames must be in [1, {self.config.max_frames}] on this server (got {frames})",
                           "frames_over_limit")
        return frames if frames is not None else self.config.frames

    def _compression(self, body: ChatRequest) -> CompressionOptions:
        given = body.dycoke.model_dump(exclude_none=True, exclude={"frames"}) if body.dycoke is not None else {}
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
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", "invalid_value")
        return stops

    # ---------------------------------------------------------------- the worker's side

    def work(self, plan: Plan, video: LocalVideo):
        """The generation, run on the worker thread: find or start the session, stream."""
        lm = self.lm
        frames = plan.frames
        if frames is None and lm.default_frames(video.path) > self.config.max_frames:
            frames = self.config.max_frames  # the model's default, within the server's ceiling
        key = (video.digest, frames, plan.compression, plan.system) if video.digest else None
        session = self.sessions.take(key) if key is not None else None
        found = session is not None
        if session is None:
            probe_video(video.path, timeout_s=self.config.timeout_s)  # as the CLI does first: its reasons
            session = Session(lm, video.path, frames=frames, compression=plan.compression, cache=self.config.cache,
                              timeout_s=self.config.timeout_s, system=plan.system)
        session.video = video.path
        before, failed = session.encoded, True
        try:
            for event in session.stream(plan.question, plan.sampling, plan.compression):
                if isinstance(event, Planned):
                    yield Reused(found and session.encoded is before
                                 and reuses_prefix(lm, plan.compression, plan.question, plan.system))
                    yield Prompt(self._prompt_tokens(session, plan.question, event))
                yield event
            failed = False
        except GeneratorExit:  # cancelled: the session is whole, keep it
            failed = False
            raise
        finally:
            session.answers.clear()
            if key is not None and not failed:
                self.sessions.keep(key, session)

    def _prompt_tokens(self, session, question: str, planned: Planned) -> int:
        before, after = self.lm.prompt_ids(question, session.system)
        newline = 1 if session.encoded is not None and session.encoded.newline is not None else 0
        return len(before) + planned.visual_tokens_prefill + newline + len(after)

    def health(self) -> dict:
        r = self.runner
        return {"status": "stopping" if r.stopping.is_set() else "ok", "model": self.model_id,
                "running": r.running, "waiting": r.waiting, "served": r.served, "cancelled": r.cancelled,
                "failed": r.failed, "refused": r.refused, "sessions": len(self.sessions),
                "session_bytes": self.sessions.bytes}


@contextmanager
def _request_fields():
    """Library option errors as 400s that name the request's fields."""
    try:
        yield
    except OptionError as exc:
        raise ApiError(400, f"{_FIELD.get(exc.name, exc.name)} {exc.problem}", "invalid_value") from None
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_value") from None


def api_error(exc: BaseException, video: LocalVideo | None) -> ApiError:
    """What a failed job answers."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Stopping):
        return ApiError(503, "the server is stopping", "server_stopping")
    if isinstance(exc, OptionError):
        return ApiError(400, f"{_FIELD.get(exc.name, exc.name)} {exc.problem}", "invalid_value")
    if isinstance(exc, (VideoError, UsageError)):
        message = str(exc).replace("--frames", "dycoke.frames")
        return ApiError(400, video.shown(message) if video is not None else message,
                        "invalid_video" if isinstance(exc, VideoError) else "invalid_value")
    if isinstance(exc, DycokeError):
        return ApiError(500, str(exc), "server_error")
    print(f"dycoke serve: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
          file=sys.stderr)
    return ApiError(500, f"internal error ({type(exc).__name__})", "server_error")


# -------------------------------------------------------------------------------- the ASGI app


class Guard:
    """ASGI middleware: the API key on ``/v1`` routes (constant-time), then the body size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            problem = self._auth_problem(dict(scope["headers"]).get(b"authorization"))
            if problem:
                return await _send(send, ApiError(401, problem, "invalid_api_key"))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send(send, ApiError(413, f"the request body is larger than the server's limit "
                                                       f"({self.max_body} bytes)", "body_too_large"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _auth_problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing API key (send Authorization: Bearer <key>)"
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return "invalid API key"
        return None


async def _send(send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(lm, config: ServerConfig):
    state = Server(lm, config)
    app = FastAPI(title="dycoke", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    def error_response(error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(ApiError(400, "the request body is not valid JSON", "invalid_json"))
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return error_response(ApiError(422, f"{where}: {first.get('msg', 'invalid')}{more}", "invalid_request"))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}"))

    @app.get("/health")
    async def health():
        return state.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "dycoke"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        plan = state.plan(body)
        video = await run_in_threadpool(state.policy.open, plan.url)
        job = Job(partial(state.work, plan, video), asyncio.get_running_loop(), cleanup=video.close)
        try:
            state.runner.submit(job)
        except (QueueFull, Stopping) as exc:
            video.close()
            if isinstance(exc, Stopping):
                raise api_error(exc, None) from None
            raise ApiError(429, f"the server is busy: {config.queue} requests wait already; retry later",
                           "queue_full") from None
        reply = Reply(plan.stops, plan.sampling.max_new_tokens)
        completion = Completion(state.model_id)
        left = asyncio.ensure_future(_disconnected(request))
        try:
            first, text = await _until_answering(job, left, reply)
        except BaseException:
            job.cancel()
            left.cancel()
            raise
        if isinstance(first, Ended) and first.error is not None:
            left.cancel()
            raise api_error(first.error, video)
        if not body.stream:
            try:
                end = first if isinstance(first, Ended) else await _rest(job, left, reply)
            finally:
                left.cancel()
            if end.error is not None:
                raise api_error(end.error, video)
            reply.finish()
            return {**completion.response(reply.text, reply.finish_reason, reply.usage(),
                                          reply.dycoke(state.model_info, video.label), reply.final_reasoning)}
        left.cancel()
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(job, first, text, reply, completion, include_usage, state.model_info, video)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _thinking(body: ChatRequest, default: bool | None) -> bool | None:
    """chat_template_kwargs (vLLM's): only ``enable_thinking``, a boolean, is taken."""
    kwargs = body.chat_template_kwargs
    if kwargs is None:
        return default
    value = kwargs.get("enable_thinking")
    if set(kwargs) - {"enable_thinking"} or (value is not None and not isinstance(value, bool)):
        raise ApiError(400, "chat_template_kwargs: only {\"enable_thinking\": true|false} is supported",
                       "invalid_value")
    return default if value is None else value


async def _disconnected(request: Request) -> None:
    """Returns when the client leaves (its body was read already: only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next(job: Job, left: asyncio.Future):
    get = asyncio.ensure_future(job.items.get())
    done, _ = await asyncio.wait({get, left}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    job.cancel()
    raise asyncio.CancelledError("the client left")


async def _until_answering(job: Job, left: asyncio.Future, reply: Reply):
    """Items up to the first token, fed to ``reply``: (that token's item or Ended, the text released)."""
    while True:
        item = await _next(job, left)
        if isinstance(item, Ended):
            return item, ""
        text = reply.feed(item)
        if isinstance(item, (Token, Done)):
            if reply.stopped:
                job.cancel()
            return item, text


async def _rest(job: Job, left: asyncio.Future, reply: Reply) -> Ended:
    while True:
        item = await _next(job, left)
        if isinstance(item, Ended):
            return item
        reply.feed(item)
        if reply.stopped:
            job.cancel()


def _data(obj) -> str:
    return f"data: {json.dumps(obj, default=str)}\n\n"


async def _sse(job: Job, first, text: str, reply: Reply, completion: Completion, include_usage: bool, model: dict,
               video: LocalVideo):
    """The stream: a role chunk, content chunks, the last chunk with finish_reason and the
    ``dycoke`` object, a usage chunk when asked, then ``[DONE]``. Leaving stops the job."""
    extra = {"usage": None} if include_usage else {}
    end = first if isinstance(first, Ended) else None
    if end is not None:
        text += reply.finish()
    try:
        yield _data(completion.chunk({"role": "assistant", "content": ""}, **extra))
        while True:
            if reasoning := reply.take_reasoning():  # thinking on: vLLM's reasoning_content deltas
                yield _data(completion.chunk({"reasoning_content": reasoning}, **extra))
            if text:
                yield _data(completion.chunk({"content": text}, **extra))
                # let the loop run its callbacks: a lost connection is noticed before the next
                # write (items can arrive faster than the loop would otherwise look)
                await asyncio.sleep(0)
            if end is not None:
                break
            item = await job.items.get()
            if isinstance(item, Ended):
                end = item
                text = reply.finish()
                continue
            text = reply.feed(item)
            if reply.stopped:
                job.cancel()
        if end.error is not None and not (end.cut == "cancelled" and reply.stopped):
            error = api_error(end.error, video)
            yield _data(error_body(error.status, error.message, error.code))
        else:
            yield _data(completion.chunk({}, reply.finish_reason, dycoke=reply.dycoke(model, video.label), **extra))
            if include_usage:
                yield _data(completion.usage_chunk(reply.usage()))
        yield "data: [DONE]\n\n"
    finally:
        if end is None:
            job.cancel()


# -------------------------------------------------------------------------------- running


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(lm, config: ServerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM: the current token is finished, the stream ended, exit."""
    import uvicorn

    config = config.check()
    app = create_app(lm, config)
    runner: Runner = app.state.server.runner
    max_body = 4 * (-(-config.max_upload_bytes // 3)) + TEXT_ALLOWANCE

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            runner.stop()  # the worker ends the current job after its current token
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after a graceful shutdown, which would turn a
            # SIGTERM into a kill; here a stop is a stop, exit 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    sock = _listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server = _Uvicorn(uvicorn.Config(Guard(app, config.api_key, max_body), log_config=None, log_level="warning",
                                     access_log=False, lifespan="off", timeout_graceful_shutdown=None))
    if not config.quiet:
        where = f"[{host}]" if ":" in host else host
        print(f"[dycoke] serving {app.state.server.model_id} at http://{where}:{port}/v1 (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        if config.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            print("[dycoke] warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        runner.stop(wait=True)
        sock.close()
