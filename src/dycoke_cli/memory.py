"""Peak memory of one run, above what was in use when it started: the one helper used by the
pipeline (each answer's ``peak_memory_bytes``) and by the benchmark (benchmarks/).

- CUDA: the allocator's own peak counter, reset at the start.
- CPU, Linux: the kernel's resident-set high-water mark (VmHWM), reset at the start by writing
  ``5`` to ``/proc/self/clear_refs``: exact, kernel-tracked, no sampling gap. (``ru_maxrss``
  only ever grows over a process's life, so it cannot tell one run's peak from another's.)
- CPU where that file is not writable: the resident set size sampled by a background thread.

``with PeakMemory(device) as m: ...`` then ``m.peak_above_start``; or ``m.start()`` ...
``m.stop()``, which returns the same number (bytes, or None where nothing can be measured).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLEAR_REFS = "/proc/self/clear_refs"
# The highest VmHWM seen before a PeakMemory reset it, so process_peak stays the process's peak.
_hwm_before_resets = 0


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _status_bytes(field: str) -> int | None:
    return _proc_kib("/proc/self/status", field)


def _proc_kib(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a /proc file, in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not let us."""
    global _hwm_before_resets
    before = _status_bytes("VmHWM")
    if before is None:
        return False
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    _hwm_before_resets = max(_hwm_before_resets, before)
    return True


def malloc_trim() -> None:
    """Give the allocator's free pages back to the OS (glibc), so they do not hide a peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak bytes above the level at the start. ``settle=True`` (the benchmark) first collects
    garbage and returns freed memory (gc, malloc_trim, CUDA cache) so runs do not inherit each
    other's leftovers; the pipeline leaves it off (it would cost time inside the answer)."""

    def __init__(self, device, interval_s: float = 0.005, settle: bool = False):
        self.device = device
        self.cuda = getattr(device, "type", "") == "cuda"
        self.interval_s = interval_s
        self.settle = settle
        self.method = "cuda-allocator" if self.cuda else self._cpu_method()
        self.peak_above_start: int | None = None
        self._start = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _cpu_method(self) -> str:
        if _reset_high_water_mark():
            return "rss-high-water-mark"
        if rss_bytes() is not None:
            return f"rss-sampling-{self.interval_s * 1000:g}ms"
        return "unavailable"

    def start(self) -> None:
        self.peak_above_start = None
        if self.settle:
            gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            if self.settle:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        if self.settle:
            malloc_trim()
        if self.method == "rss-high-water-mark" and _reset_high_water_mark():
            self._start = rss_bytes() or 0
        elif self.method.startswith("rss-sampling"):
            self._start = self._peak = rss_bytes() or 0
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_bytes() or 0
            if now > self._peak:
                self._peak = now

    def stop(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_above_start = int(torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self.method == "rss-high-water-mark":
            hwm = _status_bytes("VmHWM")
            self.peak_above_start = None if hwm is None else max(0, hwm - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak_above_start = max(0, max(self._peak, rss_bytes() or 0) - self._start)
        return self.peak_above_start

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_bytes(device) -> int | None:
    """Memory free for new tensors on ``device``: on CUDA the device's free memory plus what
    torch's caching allocator holds unused (an earlier answer's activations stay reserved, and
    are free to the next one), else the host's MemAvailable (what can be allocated without
    swapping); None where neither can be read."""
    if getattr(device, "type", str(device)) == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
    return _meminfo_bytes("MemAvailable")


def _meminfo_bytes(field: str) -> int | None:
    return _proc_kib("/proc/meminfo", field)


def process_peak(device) -> int | None:
    """The process's peak bytes so far: the allocator's peak on CUDA, the resident high-water
    mark on CPU (VmHWM, including what it was before any PeakMemory reset it; ru_maxrss would
    also count the parent's size at spawn on Linux)."""
    if getattr(device, "type", "") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return max(hwm, _hwm_before_resets)
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None
