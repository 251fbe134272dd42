"""One generation at a time: a worker thread runs jobs in order from a bounded queue.

A job is a generator function run on the worker; what it yields is handed to the request's
asyncio queue as it comes. Between two items the worker checks whether the job was cancelled
(its client left, or a stop string matched) or the server is stopping, and closes the
generator then: a generation stops within one token. A job that fails hands its exception
over instead; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


class Stopping(Exception):
    """The server is stopping: the job did not run, or was cut short."""


@dataclass(frozen=True)
class Ended:
    """The last item of every job: ``error`` (an exception) or ``cut`` (cancelled, stopping)."""

    error: BaseException | None = None
    cut: str | None = None  # "cancelled" or "stopping"


@dataclass
class Job:
    work: Callable[[], Iterator[object]]
    loop: asyncio.AbstractEventLoop
    cleanup: Callable[[], None] = lambda: None
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Runner:
    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running = False
        self.served = self.cancelled = self.failed = self.refused = 0
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dycoke-generation", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFull when ``queue_size`` jobs already wait, Stopping when stopping."""
        with self._lock:
            if self.stopping.is_set():
                raise Stopping()
            if self._waiting + (1 if self.running else 0) > self.queue_size:
                self.refused += 1
                raise QueueFull()
            self._waiting += 1
        self._jobs.put(job)

    def stop(self, wait: bool = False) -> None:
        """Finish the current token, refuse what waits, end the worker (safe from a signal handler)."""
        self.stopping.set()
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            with self._lock:
                self._waiting -= 1
                self.running = True
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running = False
        while True:  # stopping: what still waits is refused
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._finish(job, Ended(Stopping(), "stopping"))

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set() or self.stopping.is_set():
            self._finish(job, Ended(None, "cancelled") if job.cancelled.is_set() else Ended(Stopping(), "stopping"))
            return
        items = job.work()
        try:
            for item in items:
                job.put(item)
                if job.cancelled.is_set() or self.stopping.is_set():
                    items.close()
                    cut = "cancelled" if job.cancelled.is_set() else "stopping"
                    self._finish(job, Ended(None if cut == "cancelled" else Stopping(), cut))
                    return
        except Exception as exc:  # noqa: BLE001 - handed to the request, which answers with it
            self.failed += 1
            self._finish(job, Ended(exc))
            return
        self.served += 1
        self._finish(job, Ended())

    def _finish(self, job: Job, end: Ended) -> None:
        if end.cut == "cancelled":
            self.cancelled += 1
        try:
            job.cleanup()
        finally:
            job.put(end)
