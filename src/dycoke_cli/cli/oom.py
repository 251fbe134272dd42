"""Out of memory, host or GPU: one line that names settings needing less."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ..errors import DycokeError
from ..options import Method


class RunSettings:
    """What a run uses, filled in as it becomes known, for out-of-memory advice."""

    def __init__(self, frames=None, ttm_k=None, method=None, dtype=None):
        self.frames, self.ttm_k, self.method, self.dtype = frames, ttm_k, method, dtype

    def update_from(self, lm, frames: int, compression) -> None:
        self.frames, self.ttm_k = frames, compression.ttm_k
        self.method, self.dtype = Method(compression.method).value, str(lm.dtype)


@contextmanager
def oom_guard(settings: RunSettings):
    """Turn an out-of-memory failure (host or GPU) into one line with settings that need less."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - everything else propagates unchanged
        if is_oom(exc):
            raise DycokeError(oom_advice(settings)) from None
        raise


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_advice(s: RunSettings) -> str:
    tips = []
    if s.frames is None:
        tips.append("fewer --frames")
    elif s.frames > 1:
        tips.append(f"--frames {s.frames // 2}")
    if s.method in (None, "dycoke") and (s.ttm_k is None or s.ttm_k < 0.9):
        tips.append(f"--ttm-k {min(0.9, round((s.ttm_k if s.ttm_k is not None else 0.7) + 0.15, 2))}")
    elif s.method in ("none", "random", "frames", "fastv"):
        tips.append("--method dycoke")
    if s.dtype in (None, "torch.float32"):
        tips.append("--dtype bfloat16")
    if not tips:
        return "out of memory even at the smallest settings; try a machine with more memory"
    listed = tips[0] if len(tips) == 1 else ", ".join(tips[:-1]) + f"{',' if len(tips) > 2 else ''} or {tips[-1]}"
    return f"out of memory; settings that need less: {listed}"
