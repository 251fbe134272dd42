"""The ``dycoke`` command's entry point: Ctrl-C handling first, then the CLI.

Kept free of imports beyond the standard library so that an interrupt while the CLI (and later
torch) is still importing exits 130 like any other (see interrupts.py).
"""

from __future__ import annotations


def main() -> None:
    from . import interrupts

    interrupts.install()
    from .app import main as cli_main

    cli_main()
