"""Error types. Every failure a user can cause maps to one of these; the CLI prints its
message as one line and exits with ``exit_code``."""

from __future__ import annotations

import re


class DycokeError(Exception):
    """Base class: a problem we can explain in one line."""

    exit_code = 1


class UsageError(DycokeError):
    """A flag or argument is out of range or malformed (exit code 2)."""

    exit_code = 2


_SETTING = re.compile(r"\{([a-z][a-z_]*)\}")


class SettingError(UsageError):
    """A usage error that names settings as ``{frames}`` in its ``template``. The library names
    the setting; each face words it from one table of its own (the CLI: its flags; the server:
    the request's fields) with :meth:`worded`. ``str()`` gives the settings' own names."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.worded({}))

    def worded(self, words: dict[str, str]) -> str:
        return _SETTING.sub(lambda m: words.get(m[1], m[1]), self.template)


class VideoError(DycokeError):
    """The video cannot be opened or decoded."""


class ModelError(DycokeError):
    """The model cannot be found, loaded, or is not a supported video LLM."""


class OutputError(DycokeError):
    """Standard output cannot be written (a full disk, a closed descriptor)."""


# C0 and C1 control characters and the Unicode line and paragraph separators: any of them in a
# file name would break a message's one line (or drive the terminal).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped as Python writes them (``\\n``, ``\\x1b``), so
    a message that quotes a user's file name stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
