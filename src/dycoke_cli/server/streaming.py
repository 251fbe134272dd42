"""Waiting on a job's items for a request: the first token (or the error that comes instead),
the rest of a plain response, and the server-sent events of a streamed one. A client that
leaves cancels its job.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request

from ..results import Done, Token
from .answers import Reply
from .media import LocalVideo
from .protocol import Completion, error_body
from .runner import Ended, Job
from .service import api_error


class ClientLeft(Exception):
    """The client went away before its answer was complete (its job is cancelled)."""


async def disconnected(request: Request) -> None:
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
    raise ClientLeft


async def until_answering(job: Job, left: asyncio.Future, reply: Reply):
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


async def rest(job: Job, left: asyncio.Future, reply: Reply) -> Ended:
    while True:
        item = await _next(job, left)
        if isinstance(item, Ended):
            return item
        reply.feed(item)
        if reply.stopped:
            job.cancel()


def _data(obj) -> str:
    return f"data: {json.dumps(obj, default=str)}\n\n"


async def sse(job: Job, first, text: str, reply: Reply, completion: Completion, include_usage: bool, model: dict,
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
