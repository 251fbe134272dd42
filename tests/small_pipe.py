"""A child's stdout as a small pipe, so a test can hold the child mid-answer however loaded the
machine: a child that streams more than the pipe holds cannot finish while nobody reads it."""

from __future__ import annotations

import fcntl
import struct
import termios


def shrink(stream) -> int:
    """Make the pipe behind ``stream`` (our reading end) as small as Linux allows (one page);
    returns what it holds now, in bytes."""
    try:
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    except OSError:  # refused: the default size stays
        pass
    return fcntl.fcntl(stream.fileno(), fcntl.F_GETPIPE_SZ)


def unread(stream) -> int:
    """Bytes written into the pipe and not read yet."""
    return struct.unpack("i", fcntl.ioctl(stream.fileno(), termios.FIONREAD, b"\0" * 4))[0]
