"""How a :class:`~.client.WorkerClient` reaches its worker: the :class:`Transport` interface and
its local implementation, :class:`ProcessTransport` (``python -m MedDIFTLib.worker`` as a child
process). The other one, :class:`~.http_transport.HttpTransport`, reaches ``meddift serve``.

A transport carries request lines out and hands every event that comes back to the ``deliver``
callback it was opened with; the client owns everything else (request ids, which requests are
unanswered, who waits for which event, cancel). The one event a transport makes itself is
:class:`~.events.Exit`, when its worker has ended: the client then answers every unanswered
request with an error.

Imports neither torch nor Qt: it runs inside Slicer's process.
"""

from __future__ import annotations

import abc
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..core.child import ChildProcess
from ..core.environment import child_environment
from .events import Event, Exit, Ready, WorkerError, parse_event_line

STDERR_TAIL_LINES = 400

Deliver = Callable[[Event], None]


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback: NumPy arrays and scalars become lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot send a {type(value).__name__} to the worker")


def request_line(request_id: str, type: str, params: dict[str, Any]) -> bytes:
    """The wire line ``{"id", "type", **params}`` of a request, without its line ending (NumPy and
    paths are converted; TypeError for anything else JSON cannot hold, ValueError for NaN)."""
    return json.dumps({"id": request_id, "type": type, **params}, default=_to_json, allow_nan=False).encode()


class Transport(abc.ABC):
    """One way to reach a worker. :meth:`open` connects it and returns its version; from then on,
    :meth:`send` carries requests and every event of the worker goes to ``deliver``."""

    @property
    @abc.abstractmethod
    def running(self) -> bool:
        """True while requests can be sent."""

    @property
    @abc.abstractmethod
    def killed(self) -> bool:
        """True once :meth:`kill` was called (until the next :meth:`open`): requests it ended were cancelled."""

    @abc.abstractmethod
    def open(self, deliver: Deliver, timeout: float) -> str | None:
        """Connect within ``timeout`` s (WorkerError if not); the worker's version. Its events go to ``deliver``."""

    @abc.abstractmethod
    def send(self, request_id: str, type: str, params: dict[str, Any]) -> None:
        """Send one request; its events go to ``deliver``. WorkerError when the worker cannot be reached."""

    @abc.abstractmethod
    def send_line(self, data: bytes) -> None:
        """Send one raw request line (protocol tests)."""

    @abc.abstractmethod
    def close(self, timeout: float, shutdown_id: str) -> int | None:
        """End the worker politely within ``timeout`` s (``shutdown_id``: the id of the shutdown request,
        for a worker that takes one); its exit code where it has one."""

    @abc.abstractmethod
    def kill(self, grace: float) -> None:
        """End what runs at once (the client closes the transport afterwards)."""

    @abc.abstractmethod
    def stderr_tail(self, max_lines: int) -> str:
        """The worker's last ``max_lines`` lines of stderr where this transport can see them, else ''."""


class ProcessTransport(Transport):
    """The worker as a child process of this one, in its own process group
    (:class:`~MedDIFTLib.core.child.ChildProcess`), speaking JSON lines on stdin and stdout.

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
        self._child: ChildProcess | None = None
        self._deliver: Deliver | None = None
        self._killed = False
        self._state_lock = threading.Lock()
        self._starting = False
        self._started = threading.Event()
        self._ready: Ready | None = None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    @property
    def killed(self) -> bool:
        return self._killed

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    @property
    def returncode(self) -> int | None:
        return None if self._child is None else self._child.returncode

    def open(self, deliver: Deliver, timeout: float) -> str | None:
        """Spawn the worker in its own process group and wait up to ``timeout`` s for its ``ready``
        (taken here: it does not reach ``deliver``)."""
        if self.running:
            raise WorkerError("the worker is already running")
        env = child_environment(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self._deliver = deliver
        self._killed = False
        self._ready = None
        self._started.clear()
        self._starting = True
        self._child = child = ChildProcess(
            [self.python_executable, "-m", "MedDIFTLib.worker", *self.worker_args],
            lambda line: self._read_line(child, line),
            self._ended,
            env=env,
            cwd=self.cwd,
            stdin=True,
            tail_lines=STDERR_TAIL_LINES,
            name="meddift-worker",
        )
        child.start()
        self._started.wait(timeout)
        with self._state_lock:
            self._starting = False
            ready = self._ready
        if ready is not None:
            return ready.version
        if self._started.is_set():
            raise WorkerError(f"the worker exited while starting (code {child.returncode}){self._tail()}")
        self.kill()
        raise WorkerError(f"the worker did not start within {timeout:g} s{self._tail()}")

    def send(self, request_id: str, type: str, params: dict[str, Any]) -> None:
        line = request_line(request_id, type, params)
        self._write(line + b"\n")

    def send_line(self, data: bytes) -> None:
        """Write one raw line; a newline is added when missing."""
        self._write(data if data.endswith(b"\n") else data + b"\n")

    def close(self, timeout: float, shutdown_id: str) -> int | None:
        """Send ``shutdown`` and end the worker's input, wait ``timeout`` s, then kill it; its exit code.
        The protocol is imported here, as in :meth:`~.client.WorkerClient.run`."""
        from .protocol.requests import ShutdownRequest, encode_request

        child = self._child
        if child is None:
            return None
        if self.running:
            try:
                self.send(shutdown_id, *encode_request(ShutdownRequest()))
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

    def stderr_tail(self, max_lines: int = 50) -> str:
        """The worker's last ``max_lines`` lines of stderr (logs, tracebacks)."""
        lines = [] if self._child is None else self._child.tail(max_lines)
        return "".join(line + "\n" for line in lines)

    def _write(self, data: bytes) -> None:
        if not self.running:
            raise WorkerError(f"the worker is not running{self._tail()}")
        try:
            self._child.write(data)
        except (BrokenPipeError, ValueError, OSError) as error:
            raise WorkerError(f"cannot write to the worker ({error}){self._tail()}") from None

    def _read_line(self, child: ChildProcess, line: str) -> bool:
        """One line of the worker's stdout (reader thread): the first ``ready`` while opening is taken
        here, every other event delivered; anything else is noted in the worker's stderr tail."""
        try:
            event = parse_event_line(line)
        except ValueError as error:
            child.note(f"[client] not a worker event ({error}): {line[:200]!r}")
            return True
        if isinstance(event, Ready):
            with self._state_lock:
                taken = self._starting and self._ready is None
                if taken:
                    self._ready = event
                    self._started.set()
            if taken:
                return True
        self._deliver(event)
        return True

    def _ended(self, returncode: int) -> None:
        """The worker's output ended and it exited (reader thread): :class:`~.events.Exit` is delivered,
        unless :meth:`open` is still waiting for ``ready`` (it then raises)."""
        with self._state_lock:
            starting = self._starting and self._ready is None
            self._started.set()
        if not starting:
            self._deliver(Exit(returncode))

    def _tail(self) -> str:
        tail = self.stderr_tail(8).strip()
        return f"\nworker stderr:\n{tail}" if tail else ""
