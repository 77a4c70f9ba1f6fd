"""Client of the background worker (``python -m MedDIFTLib.worker``), for the Slicer module and tests.

Imports neither torch nor Qt: it runs inside Slicer's process. The worker runs in its own
process group (session), so :meth:`WorkerClient.kill` ends it and everything it started.
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
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

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
    parse_event,
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
        self._process: subprocess.Popen | None = None
        self._write_lock = threading.Lock()
        self._route_lock = threading.Lock()
        self._unclaimed: deque[Event] = deque()
        self._waiters: dict[str, queue.Queue] = {}
        self._outstanding: set[str] = set()
        self._stderr_lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._ids = itertools.count(1)
        self._killed = False
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the worker in its own process group and wait up to ``timeout`` s for ``ready``."""
        if self.running:
            raise WorkerError("the worker is already running")
        env = child_environment(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        platform_options: dict[str, Any] = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        )
        self._killed = False
        self._unclaimed.clear()
        self._stderr_lines.clear()
        self._process = subprocess.Popen(
            [self.python_executable, "-m", "MedDIFTLib.worker", *self.worker_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=env,
            **platform_options,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._process,), name="meddift-worker-out", daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._process,), name="meddift-worker-err", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
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
        if self._process is None:
            return None
        if self.running:
            with self._route_lock:
                unanswered = sorted(self._outstanding)
            try:
                for request_id in unanswered:
                    self.cancel(request_id)
                self.send("shutdown")
                self._process.stdin.close()
            except (WorkerError, OSError):
                pass
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._join_threads()
        return self._process.poll()

    def kill(self, grace: float = 2.0) -> None:
        """End the worker and every process in its group: SIGTERM, then SIGKILL after ``grace`` s."""
        process = self._process
        if process is None:
            return
        self._killed = True
        descendants = self._descendants(process.pid)
        if process.poll() is None or descendants:
            self._signal_tree(process, descendants, terminate=True)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            self._signal_tree(process, descendants, terminate=False)
            process.wait()
        self._join_threads()

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
        lines = list(self._stderr_lines)
        return "".join(lines[-max_lines:])

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
            with self._write_lock:
                self._process.stdin.write(data)
                self._process.stdin.flush()
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

    def _read_stdout(self, process: subprocess.Popen) -> None:
        for raw in process.stdout:
            try:
                event = parse_event(json.loads(raw))
            except ValueError as error:
                self._stderr_lines.append(f"[client] not a worker event ({error}): {raw[:200]!r}\n")
                continue
            self._route(event)
        returncode = process.wait()
        with self._route_lock:
            unanswered = sorted(self._outstanding)
        kind = CancelledError.kind if self._killed else WorkerError.kind
        for request_id in unanswered:
            message = "the worker was stopped" if self._killed else f"the worker exited (code {returncode})"
            self._route(Error(request_id, kind, message + self._tail()))
        self._route(Exit(returncode))

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for raw in process.stderr:
            self._stderr_lines.append(raw.decode("utf-8", errors="replace"))

    def _join_threads(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5.0)

    def _tail(self) -> str:
        tail = self.stderr_tail(8).strip()
        return f"\nworker stderr:\n{tail}" if tail else ""

    @staticmethod
    def _descendants(pid: int) -> list[Any]:
        """Child processes (psutil objects) of ``pid``, if psutil is installed, else []."""
        try:
            import psutil

            return psutil.Process(pid).children(recursive=True)
        except Exception:
            return []

    @staticmethod
    def _signal_tree(process: subprocess.Popen, descendants: list[Any], terminate: bool) -> None:
        if os.name == "nt":
            if process.poll() is None:
                subprocess.run(
                    ["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False
                )
        else:
            try:
                os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for child in descendants:
            try:
                if terminate:
                    child.terminate()
                else:
                    child.kill()
            except Exception:
                pass
