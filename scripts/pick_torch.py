"""Which torch scripts/setup.sh installs, and why: one line of pip arguments on stdout (empty:
install nothing), the reason on stderr, exit 1 when setup must stop.

Run by setup.sh with the venv's Python; only the standard library, so it runs before torch is
there. The choice, in order:
- torch already installed within the tested range (pyproject.toml's bounds): keep it;
- installed but outside that range: stop, and say how to proceed. A CUDA build newer than the
  newest tested is never replaced behind the user's back;
- an NVIDIA GPU (``nvidia-smi`` on PATH) and no DYCOKE_CPU_TORCH: the newest tested release from
  the default index (on Linux, PyPI's torch is a CUDA build);
- otherwise the newest tested CPU build from PyTorch's CPU wheel index
  ($DYCOKE_TORCH_CPU_INDEX, default https://download.pytorch.org/whl/cpu) when that index
  answers within a few seconds; else, the same release from the default index, saying that it
  is a CUDA build of several GB on Linux that runs on the CPU as well.

Usage: pick_torch.py [INSTALLED_VERSION] [RELEASE]
  INSTALLED_VERSION: the venv's torch (empty or absent: none);
  RELEASE: install this release instead of the newest tested (scripts/test_oldest.sh: the oldest).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0


def tested_range(root: Path = ROOT) -> tuple[str, str, str]:
    """(lowest allowed, exclusive cap, newest tested) of torch: pyproject.toml's dependency
    ``torch>=A,<B`` and requirements/torch.txt's ``torch==X``."""
    bounds = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', (root / "pyproject.toml").read_text())
    newest = re.search(r"^torch==([0-9.]+)\s*$", (root / "requirements" / "torch.txt").read_text(), re.M)
    if bounds is None or newest is None:
        raise SystemExit("setup: pyproject.toml lacks torch's bounds, or requirements/torch.txt its torch==X line")
    return bounds.group(1), bounds.group(2), newest.group(1)


def release(version: str) -> tuple[int, ...]:
    """2.15.0+cu132 -> (2, 15, 0); local labels and pre-release tails are ignored."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def reachable(index: str) -> bool:
    """True when the index's page for torch answers (any HTTP status below 400) in time."""
    url = index.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as resp:
            return resp.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def choose(installed: str, environ=os.environ, wanted: str = "") -> tuple[list[str], str, int]:
    """(pip arguments, reason, exit code) for this machine."""
    low, cap, newest = tested_range()
    which = "the release asked for" if wanted else "the newest tested"
    newest = wanted or newest
    if installed:
        if release(low) <= release(installed) < release(cap):
            return [], f"keeping torch {installed} (within the tested range >={low},<{cap})", 0
        where = "newer than the newest tested" if release(installed) >= release(cap) else "older than the oldest supported"
        return [], (f"this venv has torch {installed}, {where} (tested: >={low},<{cap}); setup stops rather than "
                    f"replace it. To use a tested build: .venv/bin/pip install 'torch=={newest}' (add "
                    f"--index-url https://download.pytorch.org/whl/cu130 for CUDA, or {CPU_INDEX} for the "
                    f"CPU build), then run setup again; or set PYTHON and start from a new venv"), 1
    if shutil.which("nvidia-smi", path=environ.get("PATH")) and not environ.get("DYCOKE_CPU_TORCH"):
        return [f"torch=={newest}"], (f"installing torch {newest}, {which}, from the default index: "
                                      f"an NVIDIA GPU is present (nvidia-smi), and PyPI's Linux torch is a CUDA "
                                      f"build (DYCOKE_CPU_TORCH=1 picks the CPU build instead)"), 0
    index = environ.get("DYCOKE_TORCH_CPU_INDEX") or CPU_INDEX
    if reachable(index):
        return [f"torch=={newest}", "--index-url", index], (
            f"installing torch {newest}+cpu, {which} (CPU build), from PyTorch's CPU index ({index}): "
            f"no GPU was found (or DYCOKE_CPU_TORCH is set)"), 0
    return [f"torch=={newest}"], (
        f"PyTorch's CPU index ({index}) cannot be reached; installing torch {newest}, {which}, "
        f"from the default index instead. On Linux that is a CUDA build (several GB with its NVIDIA "
        f"libraries); it runs on the CPU all the same"), 0


def main() -> int:
    installed = sys.argv[1].strip() if len(sys.argv) > 1 else ""
    wanted = sys.argv[2].strip() if len(sys.argv) > 2 else ""
    args, reason, code = choose(installed, wanted=wanted)
    print(f"setup: {reason}", file=sys.stderr)
    print(" ".join(args))
    return code


if __name__ == "__main__":
    sys.exit(main())
