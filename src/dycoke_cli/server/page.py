"""The web page of `dycoke serve` at ``/``, and the clip list it picks from.

The page is plain HTML, CSS and one ES module, served from the package (``server/static``): no
build step, no CDN. It is one more client of the same ``/v1`` routes, behind the same API key
(guard.py), which it keeps in the tab's sessionStorage. Its Content-Security-Policy allows
nothing but this server: no outside script, style, image, font or connection.

``GET /v1/clips`` (under ``/v1``, so the API key guards it) lists the video files directly in
``--allowed-local-media-path``, by name only: no subfolder, no link, no hidden file, no size or
path. The page asks about one as ``file:NAME`` (media.py).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from .protocol import ApiError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}
# what FFmpeg-read video files are usually named; the list is by name, the reader decides later
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".ogv",
                            ".flv", ".wmv", ".3gp"})


def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def list_clips(folder: Path | None) -> list[str]:
    """Names of the regular files with a video suffix directly in ``folder`` (links, folders and
    hidden files left out), sorted; none without a folder."""
    if folder is None:
        return []
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in VIDEO_SUFFIXES:
                continue
            if entry.is_file(follow_symlinks=False):
                names.append(entry.name)
    return sorted(names)


def add_page(app: FastAPI, allowed: Path | None) -> None:
    """Routes: ``GET /`` (the page), ``GET /static/{name}`` (its script and style), ``GET /v1/clips``."""

    @app.get("/")
    async def page():
        return Response(_file("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"not found: GET /static/{name}", "not_found")
        return Response(_file(name), media_type=STATIC[name], headers=HEADERS)

    @app.get("/v1/clips")
    async def clips():
        try:
            names = list_clips(allowed)
        except OSError as exc:
            raise ApiError(500, f"cannot list the allowed media folder ({exc.strerror or exc})", "server_error") \
                from None
        return {"object": "list", "data": [{"object": "clip", "name": n} for n in names]}
