"""`dycoke eval` over several processes started by torchrun: each rank evaluates its share of
the clips, and rank 0 gathers the results.

torchrun (or any launcher that sets the same variables) is detected by its environment:
WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR. Without them nothing here runs, and torch is
not imported. Ranks talk through ``torch.distributed``: gloo on the CPU, NCCL on CUDA with one
device per rank (LOCAL_RANK). Every collective waits at most a given time for the other ranks
(`dycoke eval`: DYCOKE_DIST_TIMEOUT seconds, default 1800), so a rank that hangs cannot hang
the others for ever; a rank that fails exits, and torchrun then stops the others.

How a rank ends: the command-line entry point leaves a process that joined a group with
:func:`leave`, which flushes stdout and stderr and ends the process at once (``os._exit``).
gloo's threads (``gloo_tcp_loop`` and two ``pt_gloo_runloop``) outlive
``destroy_process_group`` in a process that ran `dycoke eval`, and a C++ thread still running
when the interpreter tears down its native state aborts the process ("terminate called without
an active exception", SIGABRT) after the report was printed. Nothing runs after the flush, so
nothing can abort.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import DycokeError, UsageError

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")

_joined = False  # this process joined a group that it did not tear down (see leave)


def launched_by_torchrun(environ=os.environ) -> bool:
    return all(environ.get(name) for name in TORCHRUN_VARS)


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` ranks. Clips are dealt round robin in the QA
    file's order: rank r evaluates the clips whose index is r modulo the world size."""

    rank: int
    world_size: int

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    def gather(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
        import torch.distributed as dist

        gathered = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, obj)
        except RuntimeError as exc:  # a timeout, or a rank that went away
            raise DycokeError(f"rank {self.rank}: lost the other ranks while gathering the results "
                              f"({_first_line(exc)})") from None
        return gathered if self.rank == 0 else None


def _rank_numbers(environ) -> tuple[int, int, int]:
    try:
        rank, world, local = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise UsageError("torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (got "
                         f"{environ['RANK']!r}, {environ['WORLD_SIZE']!r}, {environ['LOCAL_RANK']!r})") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise UsageError(f"torchrun's RANK {rank} and LOCAL_RANK {local} do not fit WORLD_SIZE {world}")
    return rank, world, local


@contextmanager
def process_group(device: str, timeout_s: float | None, environ=os.environ, *, teardown: bool = True):
    """Join torchrun's process group for the ``with`` block and yield this rank's Shard, or
    yield None when the process was not started by torchrun. Each collective waits at most
    ``timeout_s`` seconds (torch's default where None). ``device`` is the --device choice:
    CUDA (``cuda``, or ``auto`` where CUDA is available) uses NCCL on device LOCAL_RANK, which
    becomes the current device, so the model loads there; the CPU uses gloo.

    ``teardown=False`` leaves the group standing at the end of the block: the process must then
    end with :func:`leave` (the command line does), never through the interpreter's exit."""
    global _joined
    if not launched_by_torchrun(environ):
        yield None
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from .models.loader import auto_device

    rank, world, local = _rank_numbers(environ)
    device = auto_device(device, environ)
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} needs a CUDA device of that index, but this machine "
                             f"shows {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        kwargs = {"backend": "nccl", "device_id": torch.device("cuda", local)}
    else:
        kwargs = {"backend": "gloo"}
    try:
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        dist.init_process_group(**kwargs)
        # every rank has joined before any goes on: a rank that failed at once could otherwise
        # close its connections while another was still making its own, which then saw a broken
        # join instead of a rank that went away (found by the stress script under load)
        dist.barrier()
    except (RuntimeError, ValueError) as exc:  # the store cannot be reached, or timed out
        raise DycokeError(f"rank {rank}: cannot join torchrun's process group ({_first_line(exc)})") from None
    _joined = not teardown
    try:
        yield Shard(rank, world)
        try:  # every rank past its last collective before any leaves
            dist.barrier()
        except RuntimeError:
            pass  # another rank went away; its error is its own line
    finally:
        if teardown:
            dist.destroy_process_group()


def leave(code: int) -> int:
    """``code`` back, where this process joined no group that is still standing; otherwise
    flush stdout and stderr and end the process now with ``code``, running no destructor (see
    the module's note). Call it last: nothing after it runs."""
    if not _joined:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # a closed or gone reader: nothing more can be written anyway
    os._exit(code)


def _first_line(exc: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without gloo's source location
    ("[.../pair.cc:537] Read error ...: Connection reset by peer. This is typically ...")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    text = (text.splitlines() or [""])[0].split(". ")[0].strip()
    return (text or type(exc).__name__)[:300]
