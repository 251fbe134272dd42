"""The README's quick start, run as written (through the CLI, with the shipped demo model)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[list[str]]:
    """The `dycoke ...` commands of the README's Quick start section, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        match = re.search(r"\.venv/bin/dycoke (.+)$", line)
        if match:
            commands.append(shlex.split(match.group(1)))
    return commands


def test_the_quick_start_answers_as_the_readme_says():
    commands = quick_start_commands()
    assert commands == [["ask", "sample_videos/red_cup.mp4", "what color is the cup?", "--model", "demo"]]
    proc = subprocess.run([sys.executable, "-m", "dycoke_cli", *commands[0]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, "red\n"), proc.stderr
    assert proc.stderr.splitlines()[0] == "[dycoke] loading model..."
