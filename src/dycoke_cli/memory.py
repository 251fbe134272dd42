"""Peak memory of one run, above what was in use when it started.

On CUDA the allocator's own peak counter; on CPU the resident set size sampled by a
background thread every few milliseconds (``ru_maxrss`` only ever grows over a process's life,
so it cannot tell one method's peak from another's).
"""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_above_start`` (bytes, or None)."""

    def __init__(self, device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_above_start: int | None = None
        self._start = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if getattr(self.device, "type", "") == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        start = rss_bytes()
        if start is None:
            return self
        self._start = self._peak = start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_bytes() or 0
            if now > self._peak:
                self._peak = now

    def __exit__(self, *exc) -> None:
        if getattr(self.device, "type", "") == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_above_start = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes() or 0)
        self.peak_above_start = self._peak - self._start


def process_peak(device) -> int | None:
    """The process's peak bytes so far: the allocator's peak on CUDA, the resident high-water
    mark on CPU (VmHWM; ru_maxrss would also count the parent's size at spawn on Linux)."""
    if getattr(device, "type", "") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None
