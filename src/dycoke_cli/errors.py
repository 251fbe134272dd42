"""Error types. Every failure a user can cause maps to one of these; the CLI prints its
message as one line and exits with ``exit_code``."""

from __future__ import annotations


class DycokeError(Exception):
    """Base class: a problem we can explain in one line."""

    exit_code = 1


class UsageError(DycokeError):
    """A flag or argument is out of range or malformed (exit code 2)."""

    exit_code = 2


class VideoError(DycokeError):
    """The video cannot be opened or decoded."""


class ModelError(DycokeError):
    """The model cannot be found, loaded, or is not a supported video LLM."""


class OutputError(DycokeError):
    """Standard output cannot be written (a full disk, a closed descriptor)."""
