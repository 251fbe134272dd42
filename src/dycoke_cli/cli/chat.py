"""`dycoke chat`: many questions about one clip in one session (the model loaded and the clip
encoded once; see session.py).

Input comes from a terminal (a prompt with line editing and history; a line of three double
quotes starts and ends a question over several lines) or, when stdin is piped, one question
per line. Lines that start with ``/`` are commands (``HELP``). Ctrl-C stops the current
answer and keeps the session; Ctrl-D (or end of input) ends it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TextIO

from ..errors import DycokeError
from ..options import Method, SamplingOptions
from .flags import flag_words

HELP = """commands:
  /caption           describe the clip (the model's caption prompt)
  /compare [Q]       none vs dycoke on this clip, side by side (captions without Q)
  /method NAME       answer with another method: dycoke, fastv, random, frames, none
  /frames N          sample N frames (the clip is encoded again)
  /stats             figures of the last answer
  /help              this list
  /quit              end the session (Ctrl-D does too)
Ctrl-C stops the current answer; the session goes on."""

MULTILINE = '"""'


def read_questions(stream: TextIO, interactive: bool, prompt: str = ">>> ") -> Iterator[str]:
    """Questions as typed: one per line; on a terminal, a block between two lines of three double
    quotes is one question. Ctrl-C at the prompt drops the line being typed."""
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - platforms without readline
            pass
    while True:
        try:
            line = _read(stream, interactive, prompt)
        except KeyboardInterrupt:
            if not interactive:
                raise  # nobody types into a pipe: Ctrl-C ends the chat
            print(file=sys.stderr)  # a fresh prompt line, as shells do
            continue
        if line is None:
            return
        if line:
            yield line


def _read(stream: TextIO, interactive: bool, prompt: str) -> str | None:
    """One question as typed (None at the end of input)."""
    if not interactive:
        line = stream.readline()
        return None if line == "" else line.strip()
    try:
        line = input(prompt).strip()
    except EOFError:
        return None
    if not line.startswith(MULTILINE):
        return line
    first = line[len(MULTILINE):]
    if first.rstrip().endswith(MULTILINE):  # opened and closed on one line
        return first.rstrip()[: -len(MULTILINE)].strip()
    return _multiline(first)


def _multiline(first: str) -> str:
    lines = [first]
    while True:
        try:
            line = input("... ")
        except EOFError:
            break
        if line.rstrip().endswith(MULTILINE):
            lines.append(line.rstrip()[: -len(MULTILINE)])
            break
        lines.append(line)
    return "\n".join(lines).strip()


@dataclass
class ChatActions:
    """What the chat loop asks of its surroundings (the CLI): answer a question in the session
    (streaming it), compare methods, print a line to stdout or a note to stderr."""

    answer: Callable[[str], None]
    compare: Callable[[str | None], None]
    out: Callable[[str], None]
    note: Callable[[str], None]


class Chat:
    """The command interpreter over one session: ``handle(line)`` is False once the chat ends."""

    def __init__(self, session, sampling: SamplingOptions, actions: ChatActions):
        self.session, self.sampling, self.actions = session, sampling, actions

    def handle(self, line: str) -> bool:
        if not line.startswith("/"):
            self._answer(line)
            return True
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        handler = {"help": self._help, "caption": self._caption, "compare": self._compare, "method": self._method,
                   "frames": self._frames, "stats": self._stats}.get(name)
        if handler is None:
            self.actions.note(f"unknown command /{name} (/help lists them)")
        else:
            handler(arg)
        return True

    def _answer(self, question: str) -> None:
        self._guarded(self.actions.answer, question, "answer interrupted")

    def _guarded(self, action: Callable, arg, interrupted: str) -> None:
        """Run one action; Ctrl-C or an error of ours ends that action, not the chat."""
        try:
            action(arg)
        except KeyboardInterrupt:
            self.actions.note(interrupted)
        except DycokeError as exc:
            self.actions.note(f"error: {flag_words(exc)}")

    def _help(self, arg: str) -> None:
        self.actions.out(HELP + "\n")

    def _caption(self, arg: str) -> None:
        self._answer(self.session.lm.defaults.caption_prompt)

    def _compare(self, arg: str) -> None:
        self._guarded(self.actions.compare, arg or None, "comparison interrupted")

    def _method(self, arg: str) -> None:
        try:
            method = Method(arg)
        except ValueError:
            self.actions.note(f"/method needs one of {', '.join(m.value for m in Method)} (got {arg!r})")
            return
        self._guarded(lambda m: self.session.set_compression(replace(self.session.compression, method=m)), method,
                      "interrupted")
        self.actions.note(f"method: {self.session.compression.method.value}")

    def _frames(self, arg: str) -> None:
        count = int(arg) if arg.isascii() and arg.isdigit() and len(arg) < 10 else 0
        if count < 1:
            self.actions.note(f"/frames needs a whole number of frames, at least 1 (got {arg!r})")
            return
        self.session.set_frames(count)
        self.actions.note(f"frames: {count} (the clip is encoded again at the next question)")

    def _stats(self, arg: str) -> None:
        from .display import summary_line

        if not self.session.answers:
            self.actions.note("no answer yet")
            return
        last = self.session.answers[-1]
        self.actions.out(summary_line({**last.stats.to_dict(), "video": last.video.to_dict()}) + "\n")
