"""A request's video URL made into a local file the reader can open, within the server's limits.

- ``file://`` URLs only under ``--allowed-local-media-path``: a path with a ``..`` segment is
  refused outright, and the resolved real path (symlinks followed) must lie inside the folder.
  The file is opened here without following a final symlink and without blocking, checked to be
  a regular file, hashed through the descriptor, and the reader then opens that same open file
  (``/proc/self/fd/N``), so a path swapped after the check is never read: when the no-follow
  open fails, the request is refused, never retried by name. A FIFO, a device or a folder
  inside the allowed folder gets the reader's own words; a NUL byte in the path is a 400.
- ``data:video/...;base64,`` URLs are decoded, at most ``max_upload_bytes``, into a private
  temporary file (mode 0600) that :meth:`LocalVideo.close` removes.
- ``file:NAME`` (no slash) names a file directly in the allowed folder, as ``GET /v1/clips``
  lists them for the page; it is opened as ``file://`` URLs are, and named as sent.
- ``http(s)://`` URLs are refused: this server fetches nothing.

Messages name a file by what the client sent (its ``file://`` path, or ``the data: URL``),
never by a path of the server's own (the temporary file, the descriptor).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..video.container import file_problem as _file_problem
from .protocol import ApiError, valid_unicode

DATA_URL = re.compile(r"data:(video/[A-Za-z0-9.+-]+)((?:;[A-Za-z0-9=._+-]+)*);base64,", re.ASCII)
_SUFFIX = {"video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm", "video/x-matroska": ".mkv",
           "video/x-msvideo": ".avi", "video/mpeg": ".mpg", "video/mp2t": ".ts", "video/ogg": ".ogv"}
FETCHES_NOTHING = ("http(s) URLs are refused: this server fetches nothing; send a file:// URL under "
                   "--allowed-local-media-path or a data:video/...;base64, URL")


@dataclass
class LocalVideo:
    """A video ready for the reader: ``path`` to open, ``label`` to show, ``digest`` (SHA-256)."""

    path: str
    label: str
    digest: str
    _fd: int | None = None
    _temp: str | None = None

    def close(self) -> None:
        """Close the descriptor and remove the temporary file, if any (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except FileNotFoundError:
                pass
            self._temp = None

    def shown(self, message: str) -> str:
        """``message`` with the server's own path of the video replaced by its label."""
        message = message.replace(self.path, self.label)
        return message.replace(self._temp, self.label) if self._temp else message


def _clip_name(url: str) -> str | None:
    """The name in a ``file:NAME`` URL (no slash: a file directly in the allowed folder), else None."""
    if url[:5].lower() != "file:" or url[5:].startswith("/"):
        return None
    name = unquote(url[5:])
    return None if not name or "/" in name or name in (".", "..") or "\x00" in name else name


def _digest_fd(fd: int) -> str:
    """SHA-256 of the open file's bytes, read through the descriptor (its offset left at 0)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


class MediaPolicy:
    def __init__(self, allowed: Path | None, max_upload_bytes: int):
        self.allowed = Path(os.path.realpath(allowed)) if allowed is not None else None
        self.max_upload_bytes = max_upload_bytes

    def check_url(self, url: str) -> None:
        """Refuse a URL by its form alone (no file is touched): 400."""
        if not valid_unicode(url):
            raise ApiError(400, "malformed video URL: not valid Unicode (a lone UTF-16 surrogate)", "invalid_url")
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme in ("http", "https"):
            raise ApiError(400, FETCHES_NOTHING, "unsupported_url")
        if scheme == "data":
            if not DATA_URL.match(url):
                raise ApiError(400, "malformed data: URL: expected data:video/<type>;base64,<data>", "invalid_url")
            return
        if scheme != "file":
            raise ApiError(400, "malformed video URL: expected file://, data:video/...;base64, "
                                "(http and https are refused)", "invalid_url")
        if self.allowed is None:
            raise ApiError(400, "file:// URLs are refused: the server was started without "
                                "--allowed-local-media-path", "file_url_refused")
        parts = urlsplit(url)
        if _clip_name(url) is None and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
            raise ApiError(400, "malformed file:// URL: expected file:///absolute/path (or file:NAME, a clip "
                                "directly in the allowed folder)", "invalid_url")
        if ".." in unquote(parts.path).split("/"):
            raise ApiError(400, "file:// URLs with '..' are refused", "file_url_refused")

    def open(self, url: str) -> LocalVideo:
        """The video behind ``url`` (checked by :meth:`check_url`), ready to read."""
        self.check_url(url)
        if url[:5].lower() == "data:":
            return self._from_data(url)
        name = _clip_name(url)
        if name is not None:  # as the page names a clip of GET /v1/clips; shown as the client sent it
            return self._from_file(os.path.join(self.allowed, name), shown=url)
        return self._from_file(unquote(urlsplit(url).path))

    def _from_file(self, path: str, shown: str | None = None) -> LocalVideo:
        """The file opened once, without following a final link; everything after reads that open
        file. Nothing here reopens a path by name: a name swapped after a check is never read.
        ``shown``: how messages name the file (default: ``path``, what the client sent)."""
        if shown is not None:
            try:
                video = self._from_file(path)
            except ApiError as error:
                raise ApiError(error.status, error.message.replace(path, shown), error.code) from None
            video.label = shown
            return video
        if "\x00" in path:
            raise ApiError(400, "malformed file:// URL: the path holds a NUL byte", "invalid_url")
        try:
            real = os.path.realpath(path)
        except OSError as exc:  # a link swapped between realpath's lstat and readlink (EINVAL)
            raise ApiError(400, f"{path}: cannot open ({exc.strerror or exc}); the file changed while it was "
                                "being opened", "invalid_video") from None
        if not self._inside(real) or real == str(self.allowed):
            raise ApiError(400, "the file:// URL points outside the allowed media folder", "file_url_refused")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(400, f"{path}: no such file", "invalid_video") from None
        except PermissionError:
            raise ApiError(400, f"{path}: permission denied", "invalid_video") from None
        except OSError as exc:  # ELOOP: a symlink swapped in after realpath; the name is not read
            raise ApiError(400, f"{path}: cannot open ({exc.strerror or exc}); the file changed while it was "
                                "being opened", "invalid_video") from None
        try:
            return self._checked(fd, path)
        except BaseException:
            os.close(fd)
            raise

    def _checked(self, fd: int, path: str) -> LocalVideo:
        proc = f"/proc/self/fd/{fd}"
        linux = os.path.exists(proc)
        # where the open file lives, as the kernel names it (one readlink: realpath would go on to
        # resolve that name, which may be a link again by now)
        if linux and not self._inside(os.readlink(proc)):  # a parent folder swapped meanwhile
            raise ApiError(400, "the file:// URL points outside the allowed media folder", "file_url_refused")
        problem = _file_problem(os.fstat(fd))  # a FIFO is never read: it would block
        if problem:
            raise ApiError(400, f"{path}: {problem}", "invalid_video")
        if not linux:  # no way to name the open file: refuse rather than reopen by name
            raise ApiError(400, "file:// URLs are served on Linux only", "file_url_refused")
        os.set_blocking(fd, True)
        digest = _digest_fd(fd)
        return LocalVideo(proc, path, digest, _fd=fd)

    def _inside(self, real: str) -> bool:
        return os.path.commonpath([real, str(self.allowed)]) == str(self.allowed)

    def _from_data(self, url: str) -> LocalVideo:
        head = DATA_URL.match(url)
        payload = url[head.end():]
        limit = self.max_upload_bytes
        if len(payload) > 4 * (-(-limit // 3)) + 4:
            raise ApiError(413, f"the data: URL's video is larger than the server's limit "
                                f"(--max-upload-mb {limit / 2**20:g})", "upload_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "malformed data: URL: the data is not valid base64", "invalid_url") from None
        if len(data) > limit:
            raise ApiError(413, f"the data: URL's video is larger than the server's limit "
                                f"(--max-upload-mb {limit / 2**20:g})", "upload_too_large")
        fd, temp = tempfile.mkstemp(prefix="dycoke-upload-", suffix=_SUFFIX.get(head.group(1).lower(), ".video"))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError:
            os.unlink(temp)
            raise
        return LocalVideo(temp, "the data: URL", hashlib.sha256(data).hexdigest(), _temp=temp)
