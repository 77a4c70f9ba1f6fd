"""Client of the background worker (``python -m MedDIFTLib.worker``), for the Slicer module and tests.

Imports neither torch nor Qt: it runs inside Slicer's process. The worker runs in its own
process group (session) through :class:`~MedDIFTLib.core.child.ChildProcess`, so
:meth:`WorkerClient.kill` ends it and everything it started.
Every line the worker writes is parsed once into a typed event (:mod:`.events`).

Two ways to consume events:
- GUI: :meth:`send` a request, then call :meth:`poll` from a timer (never blocks);
- scripts and tests: :meth:`call` (blocking, returns the result payload or raises) or :meth:`events`.
Events of a request that :meth:`events`/:meth:`call` is waiting for go to that waiter only;
all others (including :class:`~.events.Ready` and events without a request id) go to :meth:`poll`.
If the worker dies, every unanswered request gets an :class:`~.events.Error` (kind
``cancelled`` after :meth:`kill`/:meth:`stop`, ``internal`` otherwise) and :meth:`poll` gets an
:class:`~.events.Exit`.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..core.child import ChildProcess
from ..core.environment import child_environment
from ..core.errors import BadRequestError, CancelledError
from .events import (
    FINAL_EVENTS,
    Error,
    Event,
    Exit,
    Progress,
    Ready,
    Result,
    WorkerError,
    error_from_event,
    parse_event_line,
)

STDERR_TAIL_LINES = 400


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback: NumPy arrays and scalars become lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot send a {type(value).__name__} to the worker")


class WorkerClient:
    """Start, talk to and stop one worker subprocess.

    ``python_executable`` defaults to this interpreter; ``env`` defaults to this process's
    environment. The folder holding ``MedDIFTLib`` is put first on the worker's PYTHONPATH
    (:func:`~MedDIFTLib.core.environment.child_environment`).
    ``worker_args`` are extra command-line options of the worker (e.g. ``["--cache-bytes", "1e9"]``).
    """

    def __init__(
        self,
        python_executable: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        worker_args: list[str] | None = None,
    ) -> None:
        self.python_executable = python_executable or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.worker_args = list(worker_args or [])
        self.version: str | None = None
        self._child: ChildProcess | None = None
        self._route_lock = threading.Lock()
        self._unclaimed: deque[Event] = deque()
        self._waiters: dict[str, queue.Queue] = {}
        self._outstanding: set[str] = set()
        self._ids = itertools.count(1)
        self._killed = False

    # ----------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    @property
    def returncode(self) -> int | None:
        return None if self._child is None else self._child.returncode

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the worker in its own process group and wait up to ``timeout`` s for ``ready``."""
        if self.running:
            raise WorkerError("the worker is already running")
        env = child_environment(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._killed = False
        self._unclaimed.clear()
        self._child = child = ChildProcess(
            [self.python_executable, "-m", "MedDIFTLib.worker", *self.worker_args],
            lambda line: self._read_event_line(child, line),
            self._worker_ended,
            env=env,
            cwd=self.cwd,
            stdin=True,
            tail_lines=STDERR_TAIL_LINES,
            name="meddift-worker",
        )
        self._child.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self._take_unclaimed(lambda event: isinstance(event, (Ready, Exit)))
            if isinstance(ready, Ready):
                self.version = ready.version
                return
            if isinstance(ready, Exit):
                raise WorkerError(f"the worker exited while starting (code {ready.returncode}){self._tail()}")
            time.sleep(0.02)
        self.kill()
        raise WorkerError(f"the worker did not start within {timeout:g} s{self._tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Cancel every unanswered request, ask the worker to shut down, wait ``timeout`` s, then kill it."""
        child = self._child
        if child is None:
            return None
        if self.running:
            with self._route_lock:
                unanswered = sorted(self._outstanding)
            try:
                for request_id in unanswered:
                    self.cancel(request_id)
                self.send("shutdown")
                child.close_input()
            except (WorkerError, OSError):
                pass
            if child.wait(timeout) is None:
                self.kill()
        child.join()
        return child.returncode

    def kill(self, grace: float = 2.0) -> None:
        """End the worker and every process it started: SIGTERM to its process group and descendants,
        then SIGKILL after ``grace`` s (:meth:`~MedDIFTLib.core.child.ChildProcess.cancel`)."""
        if self._child is None:
            return
        self._killed = True
        self._child.cancel(grace)

    def __enter__(self) -> WorkerClient:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- requests

    def send(self, type: str, **params: Any) -> str:
        """Send one request; returns its id. Parameters must be JSON-serialisable (NumPy is converted)."""
        request_id = f"r{next(self._ids)}"
        self._send_request(request_id, type, params)
        return request_id

    def send_line(self, line: bytes | str) -> None:
        """Write one raw line to the worker (for protocol tests); a newline is added when missing."""
        data = line.encode() if isinstance(line, str) else bytes(line)
        self._write(data if data.endswith(b"\n") else data + b"\n")

    def cancel(self, job_id: str | None = None) -> str:
        """Ask the worker to cancel ``job_id`` (default: the running job); returns the cancel request's id."""
        return self.send("cancel") if job_id is None else self.send("cancel", job_id=job_id)

    def poll(self) -> list[Event]:
        """Every event nobody is waiting for, oldest first; never blocks."""
        with self._route_lock:
            events = list(self._unclaimed)
            self._unclaimed.clear()
        return events

    def events(self, request_id: str, timeout: float | None = None) -> Iterator[Event]:
        """Yield the events of ``request_id`` until its :class:`Result` or :class:`Error` (inclusive).

        ``timeout`` bounds the wait for each next event; on expiry :class:`TimeoutError` is raised.
        """
        waiter = self._claim(request_id)
        try:
            while True:
                try:
                    event = waiter.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no event for request {request_id} within {timeout:g} s") from None
                yield event
                if isinstance(event, FINAL_EVENTS):
                    return
        finally:
            with self._route_lock:
                self._waiters.pop(request_id, None)

    def call(
        self,
        type: str,
        progress: Callable[[str, float, str], None] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Send a request and wait for it; returns the result payload or raises the error's exception.

        ``progress(stage, fraction, message)`` receives its progress events; ``timeout`` bounds
        the wait between two events (seconds).
        """
        request_id = f"r{next(self._ids)}"
        self._claim(request_id)
        try:
            self._send_request(request_id, type, params)
        except BaseException:
            with self._route_lock:
                self._waiters.pop(request_id, None)
            raise
        for event in self.events(request_id, timeout):
            if isinstance(event, Progress) and progress is not None:
                progress(event.stage, event.fraction, event.message)
            elif isinstance(event, Result):
                return event.payload
            elif isinstance(event, Error):
                raise error_from_event(event)
        raise WorkerError(f"request {request_id} ended without a result")

    def stderr_tail(self, max_lines: int = 50) -> str:
        """The worker's last ``max_lines`` lines of stderr (logs, tracebacks)."""
        lines = [] if self._child is None else self._child.tail(max_lines)
        return "".join(line + "\n" for line in lines)

    # ----------------------------------------------------------------- internals

    def _send_request(self, request_id: str, type: str, params: dict[str, Any]) -> None:
        if "id" in params or "type" in params:
            raise BadRequestError("request parameters may not be named 'id' or 'type'")
        line = json.dumps({"id": request_id, "type": type, **params}, default=_to_json, allow_nan=False)
        with self._route_lock:
            self._outstanding.add(request_id)
        try:
            self._write(line.encode() + b"\n")
        except WorkerError:
            with self._route_lock:
                self._outstanding.discard(request_id)
            raise

    def _write(self, data: bytes) -> None:
        if not self.running:
            raise WorkerError(f"the worker is not running{self._tail()}")
        try:
            self._child.write(data)
        except (BrokenPipeError, ValueError, OSError) as error:
            raise WorkerError(f"cannot write to the worker ({error}){self._tail()}") from None

    def _claim(self, request_id: str) -> queue.Queue:
        """Route ``request_id``'s events to a private queue, moving any already received into it."""
        with self._route_lock:
            waiter = self._waiters.get(request_id)
            if waiter is None:
                waiter = self._waiters[request_id] = queue.Queue()
                kept = deque()
                for event in self._unclaimed:
                    if event.request_id == request_id:
                        waiter.put(event)
                    else:
                        kept.append(event)
                self._unclaimed = kept
        return waiter

    def _take_unclaimed(self, wanted: Callable[[Event], bool]) -> Event | None:
        with self._route_lock:
            for event in self._unclaimed:
                if wanted(event):
                    self._unclaimed.remove(event)
                    return event
        return None

    def _route(self, event: Event) -> None:
        with self._route_lock:
            request_id = event.request_id
            if isinstance(event, FINAL_EVENTS):
                self._outstanding.discard(request_id)
            waiter = self._waiters.get(request_id) if request_id is not None else None
            if waiter is not None:
                waiter.put(event)
            else:
                self._unclaimed.append(event)

    def _read_event_line(self, child: ChildProcess, line: str) -> bool:
        """One line of the worker's stdout (reader thread): its event is routed; anything else is
        noted in the worker's stderr tail."""
        try:
            event = parse_event_line(line)
        except ValueError as error:
            child.note(f"[client] not a worker event ({error}): {line[:200]!r}")
            return True
        self._route(event)
        return True

    def _worker_ended(self, returncode: int) -> None:
        """The worker's output ended and it exited (reader thread): every unanswered request gets
        an error, then :meth:`poll` gets :class:`~.events.Exit`."""
        with self._route_lock:
            unanswered = sorted(self._outstanding)
        kind = CancelledError.kind if self._killed else WorkerError.kind
        for request_id in unanswered:
            message = "the worker was stopped" if self._killed else f"the worker exited (code {returncode})"
            self._route(Error(request_id, kind, message + self._tail()))
        self._route(Exit(returncode))

    def _tail(self) -> str:
        tail = self.stderr_tail(8).strip()
        return f"\nworker stderr:\n{tail}" if tail else ""
