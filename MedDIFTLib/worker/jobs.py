"""The worker's job queue: jobs run one at a time in arrival order; any can be cancelled.

The reader thread submits and cancels; the job thread takes the next job, starts and finishes
it. A queued job that is cancelled is withdrawn (answered by the canceller, never run); a
running one has its cancel event set and stops at its next progress report.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from .protocol.requests import Request, ShutdownRequest


@dataclass(eq=False)
class Job:
    """One request waiting or running; ``request_id`` is None for the worker's own shutdown."""

    request_id: str | None
    type: str
    request: Request
    cancel_event: threading.Event = field(default_factory=threading.Event)
    withdrawn: bool = False


class JobQueue:
    """Pending jobs (queued or running) in arrival order, thread-safe."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._running: Job | None = None

    @property
    def running(self) -> Job | None:
        return self._running

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (and not queued) when a pending job already has its id."""
        with self._lock:
            if any(pending.request_id == job.request_id for pending in self._pending):
                return False
            self._pending.append(job)
        self._queue.put(job)
        return True

    def stop(self) -> None:
        """Queue the worker's own shutdown (end of input, client gone): it runs after the queued jobs."""
        self._queue.put(Job(None, "shutdown", ShutdownRequest()))

    def cancel_all(self) -> None:
        """Set the cancel event of every pending job (they end as cancelled when they run)."""
        with self._lock:
            for job in self._pending:
                job.cancel_event.set()

    def cancel(self, job_id: str | None) -> Job | None:
        """Cancel ``job_id``, or else the oldest pending job (the running one if any); None if none.

        A queued job is withdrawn (the caller answers it); a running one is only signalled.
        """
        with self._lock:
            candidates = [job for job in self._pending if job.type != "shutdown"]
            if job_id is not None:
                candidates = [job for job in candidates if job.request_id == job_id]
            if not candidates:
                return None
            target = candidates[0]
            target.cancel_event.set()
            if target is not self._running:
                target.withdrawn = True
                self._pending.remove(target)
            return target

    def next(self, timeout_s: float) -> Job | None:
        """The next queued job (withdrawn ones included: :meth:`start` refuses them), or None."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def start(self, job: Job) -> bool:
        """Mark ``job`` running; False when it was withdrawn."""
        with self._lock:
            if job.withdrawn:
                return False
            self._running = job
            return True

    def finish(self, job: Job) -> None:
        """``job`` leaves the pending list (before its final event, so a later cancel misses it)."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
            self._running = None

    def drain(self, shutdown: Job) -> list[Job]:
        """Empty the pending list at ``shutdown``; returns the other jobs that await an answer."""
        with self._lock:
            left = [job for job in self._pending if job is not shutdown and job.request_id is not None]
            self._pending.clear()
        return left
