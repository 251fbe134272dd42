"""The FastAPI app of `dycoke serve`: its routes, and running it with uvicorn.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET``/``HEAD
/health`` (open, also with an API key); the web page and ``GET /v1/clips`` in page.py. A request is
checked (shape: 422; values, messages and media: 400; the model: 404), its video opened once
(media.py), and its generation queued (runner.py: 429 with Retry-After when full). The response
starts once the first token is out, so a bad video is a 400 with the reader's own one-line reason,
never a stream that fails. Every error has OpenAI's shape and names no path the client did not
send. Before the routes: guard.py (key, Host, body); serving logic: service.py; streams: streaming.py."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from functools import partial

import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import UsageError
from .answers import Reply
from .guard import Guard
from .page import add_page
from .protocol import ApiError, ChatRequest, Completion
from .runner import Ended, Job, QueueFull, Stopping
from .service import TEXT_ALLOWANCE, Server, ServerConfig, api_error
from .streaming import ClientLeft, disconnected, rest, sse, until_answering

HEAD_TIMEOUT_S = 10.0  # a request line and headers must arrive within this (slowloris)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait


def create_app(lm, config: ServerConfig):
    state = Server(lm, config)
    app = FastAPI(title="dycoke", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.server = state
    _error_handlers(app)
    add_page(app, state.policy.allowed)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return state.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here (this server serves {state.model_id!r})",
                           "model_not_found")
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        try:
            return await _complete(state, request, body)
        except ClientLeft:  # nobody reads the answer: an empty response, no traceback
            return Response(status_code=499)

    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, with the headers HTTP asks for (Allow, Retry-After)."""

    def error_response(error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

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
        return error_response(ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}",
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # guard.py writes the one line on stderr
        return error_response(ApiError(500, "internal error", "server_error"))


async def _complete(state: Server, request: Request, body: ChatRequest):
    plan = state.plan(body)
    video = await run_in_threadpool(state.policy.open, plan.url)
    job = Job(partial(state.work, plan, video), asyncio.get_running_loop(), cleanup=video.close)
    try:
        state.runner.submit(job)
    except (QueueFull, Stopping) as exc:
        video.close()
        if isinstance(exc, Stopping):
            raise api_error(exc, None) from None
        raise ApiError(429, f"the server is busy: {state.config.queue} requests wait already; retry later",
                       "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    reply = Reply(plan.stops, plan.sampling.max_new_tokens)
    completion = Completion(state.model_id)
    left = asyncio.ensure_future(disconnected(request))
    try:
        first, text = await until_answering(job, left, reply)
        if isinstance(first, Ended) and first.error is not None:
            raise api_error(first.error, video)
        if not body.stream:
            end = first if isinstance(first, Ended) else await rest(job, left, reply)
            if end.error is not None:
                raise api_error(end.error, video)
            reply.finish()
            return completion.response(reply.text, reply.finish_reason, reply.usage(),
                                       reply.dycoke(state.model_info, video.label), reply.final_reasoning)
    except BaseException:
        job.cancel()
        raise
    finally:
        left.cancel()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    events = sse(job, first, text, reply, completion, include_usage, state.model_info, video)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head: a client that has not sent
    its request line and headers within HEAD_TIMEOUT_S of connecting (or of the previous response)
    is disconnected, so a client trickling its headers cannot hold a connection for ever."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer, self._cycle_seen = None, None
        self._arm()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._cycle_seen:  # a whole request head came in
            self._cycle_seen = self.cycle
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._disarm()
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


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


class _Uvicorn:
    """uvicorn's server, made at call time (uvicorn is imported only to serve): a stop finishes
    the current token first, and a signal is a stop, exit 0 (uvicorn's own handler re-raises the
    signal after a graceful shutdown, which would turn a SIGTERM into a kill)."""

    @staticmethod
    def make(config, runner):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                runner.stop()  # the worker ends the current job after its current token
                super().handle_exit(sig, frame)

            @contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

        return Server(config)


def serve(lm, config: ServerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM: the current token is finished, the stream ended, exit."""
    import uvicorn

    config = config.check()
    app = create_app(lm, config)
    runner = app.state.server.runner
    max_body = 4 * (-(-config.max_upload_bytes // 3)) + TEXT_ALLOWANCE
    sock = _listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    guard = Guard(app, config.api_key, max_body, hosts=config.host_names(host))
    server = _Uvicorn.make(uvicorn.Config(guard, http=_Protocol, log_config=None, log_level="warning",
                                          access_log=False, lifespan="off", timeout_graceful_shutdown=None), runner)
    for line in [] if config.quiet else config.announcement(app.state.server.model_id, host, port):
        print(f"[dycoke] {line}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        runner.stop(wait=True)
        sock.close()
