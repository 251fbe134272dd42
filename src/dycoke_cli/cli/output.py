"""What the command line writes to stdout: every write goes through :func:`out`, so a stdout
that cannot be written is one line (OutputError), and a reader that leaves ends the run
quietly (ReaderLeft). :class:`Answering` is one answer on its way out."""

from __future__ import annotations

import json
import os
import sys

from ..errors import OutputError


class ReaderLeft(Exception):
    """Stdout's reader closed the pipe (`| head`): no error, the run just ends. (Not an OSError,
    which click would turn into a silent exit 1 of its own.)"""


def out(text: str) -> None:
    """Write to stdout now; a stdout that cannot be written is an OutputError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise ReaderLeft from None
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write the output ({getattr(exc, 'strerror', None) or exc})") from None


def out_rich(renderable) -> None:
    """A Rich renderable on stdout, rendered for stdout's terminal (or plain when piped)."""
    from rich.console import Console

    console = Console()
    with console.capture() as captured:
        console.print(renderable)
    out(captured.get())


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass




class Answering:
    """One answer on its way out: events feed the display, the text streams to stdout unless
    the live panel shows it, and an interrupt prints what came so far."""

    def __init__(self, display, json_out: bool):
        self.display = display
        self.json_out = json_out
        self.stream_stdout = not json_out and display.state.answer is None
        self.text = ""  # the answer so far
        self.answer = None  # results.Answer, at the end

    def show(self, event) -> None:
        from ..results import Done, Token

        self.display.show(event)
        if isinstance(event, Token) and event.reasoning:
            return  # reasoning: the live panel's (stderr), never stdout's
        if isinstance(event, Token):
            self.text += event.text
            if self.stream_stdout:
                out(event.text)
        elif isinstance(event, Done):
            self.answer = event.answer

    def interrupted_output(self) -> str:
        """What stdout gets when the run is interrupted: the partial answer (or JSON of it)."""
        if self.json_out:
            return json.dumps({"answer": self.text.strip(), "interrupted": True}) + "\n"
        if self.text:  # streamed already: end the line; shown only in the panel: print it now
            return "\n" if self.stream_stdout else self.text + "\n"
        return ""

    def final_output(self, model: dict) -> str:
        from ..results import answer_json

        if self.json_out:
            return json.dumps(answer_json(self.answer, model), default=str) + "\n"
        # streamed: end the line; shown in the live panel: now the real stdout
        return "\n" if self.stream_stdout else self.answer.text + "\n"
