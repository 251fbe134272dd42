"""Ctrl-C exits 130 at any moment: no traceback, and no abort.

A KeyboardInterrupt raised inside a Python callback that native code called (torch's import,
pybind11 or PyO3 extensions) can abort the whole process (``pybind11::error_already_set``).
So the command-line entry point installs :func:`exit_now` first: it writes what the running
command registered (a partial answer, say), then ``dycoke: interrupted``, and leaves at once.
Loops that are plain Python and want to finish their output themselves run inside
:func:`raising`, where Ctrl-C raises KeyboardInterrupt as usual and also sets an event that the
loop checks between its steps (library code can swallow the exception). A loop that must stop
only between two of its own steps (the chat's answer: a KeyboardInterrupt raised inside the
session's generator, between a cache write and its bookkeeping, would leave the session
half-updated) runs inside :func:`requested`: Ctrl-C sets an event that the loop reads, and a
second Ctrl-C exits at once. Library users are not affected: nothing is installed unless the
entry point does it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_CODE = 130  # 128 + SIGINT
MESSAGE = b"dycoke: interrupted\n"

_installed = False
_output: Callable[[], str] | None = None  # what to print on stdout when interrupted
_cleanup: Callable[[], None] | None = None  # e.g. stop a live display


def install() -> None:
    """Make Ctrl-C exit at once with code 130 (the command-line entry point calls this)."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, exit_now)
        _installed = True


def on_interrupt(output: Callable[[], str] | None = None, cleanup: Callable[[], None] | None = None) -> None:
    """Register what an interrupt prints on stdout and what it tidies up first."""
    global _output, _cleanup
    _output, _cleanup = output, cleanup


def exit_now(signum=None, frame=None) -> None:
    """Signal handler: tidy up, write the registered output and the message, exit 130."""
    for step in (_cleanup, _write_output):
        try:
            if step is not None:
                step()
        except Exception:  # noqa: BLE001 - leaving is all that matters now
            pass
    try:
        os.write(2, MESSAGE)
    except OSError:
        pass
    os._exit(EXIT_CODE)


def _write_output() -> None:
    text = _output() if _output is not None else ""
    if text and sys.stdout is not None:
        data = text.encode()
        fd = sys.stdout.fileno()
        while data:
            data = data[os.write(fd, data):]


@contextmanager
def raising() -> Iterator[threading.Event]:
    """Inside, Ctrl-C raises KeyboardInterrupt (for plain-Python loops that finish their own
    output) and also sets the yielded event. Library C code that calls back into Python may
    clear any error its callback raised: numpy's check of whether a class comes from ctypes
    does (``np.dtype`` of a class; safetensors' save reaches it), and a KeyboardInterrupt raised
    there is lost. So a loop checks the event between its steps and raises it again."""
    stop = threading.Event()
    if not _installed or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, exit_now)


@contextmanager
def requested() -> Iterator[threading.Event]:
    """Inside, Ctrl-C sets the yielded event (the loop stops at its next check); a second Ctrl-C
    before the loop stopped exits at once, as :func:`exit_now` does. Where no handler can be
    installed (not the main thread), the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame) -> None:
        if stop.is_set():
            exit_now()
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
