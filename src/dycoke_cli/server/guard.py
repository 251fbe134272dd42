"""The ASGI middleware in front of every route of `dycoke serve`, in order:

1. the Host header must name this server (DNS rebinding: a web page whose name resolves to
   127.0.0.1 would otherwise reach a server that has no API key), as Jupyter checks it: 403;
2. at most one Authorization header (400), and on ``/v1`` routes the API key (401,
   constant-time);
3. the body, read with an idle deadline (408) and a size limit (413);
4. the last resort: an exception that escapes a route is a 500 in OpenAI's shape ("internal
   error", no path) and one line on stderr; the traceback only with DYCOKE_DEBUG=1. A client
   that went away is not an error at all.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import traceback

from .protocol import ApiError

READ_IDLE_S = 30.0  # the longest wait for the next piece of a request body


class Guard:
    def __init__(self, app, api_key: str | None, max_body: int, hosts: frozenset[str] | None = None):
        """``hosts``: the Host header values accepted, lower case, without the port (None: any)."""
        self.app, self.api_key, self.max_body, self.hosts = app, api_key, max_body, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._head_problem(scope)
        if problem is not None:
            return await _send(send, problem)
        try:
            body = await self._body(receive)
        except ApiError as error:
            return await _send(send, error)
        if body is None:
            return  # the client left
        started = False

        async def replay():
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": bytes(body), "more_body": False}, None
                return message
            return await receive()

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except Exception as exc:  # noqa: BLE001 - the last resort (see the module's note)
            if _client_left(exc):
                return
            _report(exc)
            if not started:
                await _send(send, ApiError(500, "internal error", "server_error"))

    def _head_problem(self, scope) -> ApiError | None:
        headers = scope["headers"]
        if self.hosts is not None:
            host = _host_name(next((v for k, v in headers if k == b"host"), b"").decode("latin-1"))
            if host not in self.hosts:
                return ApiError(403, f"the Host header {host!r} does not name this server (--allowed-host adds "
                                     "names)", "host_not_allowed")
        auth = [v for k, v in headers if k == b"authorization"]
        if len(auth) > 1:
            return ApiError(400, "more than one Authorization header", "invalid_api_key")
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            problem = self._auth_problem(auth[0] if auth else None)
            if problem:
                return ApiError(401, problem, "invalid_api_key")
        return None

    async def _body(self, receive) -> bytearray | None:
        body, more = bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(receive(), READ_IDLE_S)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stopped coming (nothing for {READ_IDLE_S:g} s)",
                               "request_timeout") from None
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                raise ApiError(413, f"the request body is larger than the server's limit ({self.max_body} bytes)",
                               "body_too_large")
        return body

    def _auth_problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing API key (send Authorization: Bearer <key>)"
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return "invalid API key"
        return None


def _host_name(value: str) -> str:
    """The Host header's name, lower case, without the port: ``[::1]:8000`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _client_left(exc: BaseException) -> bool:
    """A write to a client that went away: uvicorn's ClientDisconnected, starlette's
    ClientDisconnect, a broken or reset connection."""
    return isinstance(exc, (BrokenPipeError, ConnectionResetError)) \
        or type(exc).__name__ in ("ClientDisconnected", "ClientDisconnect")


def _report(exc: BaseException) -> None:
    if os.environ.get("DYCOKE_DEBUG", "") not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)
        return
    text = " ".join(str(exc).split())[:300]
    print(f"dycoke serve: internal error: {type(exc).__name__}: {text} (DYCOKE_DEBUG=1 shows the traceback)",
          file=sys.stderr, flush=True)


async def _send(send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
