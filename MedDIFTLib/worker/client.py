"""Client of the MedDIFT worker, for the Slicer module, the CLI and tests: one client over a
:class:`~.transports.Transport`, the local worker process (:class:`~.transports.ProcessTransport`,
the default) or ``meddift serve`` (:class:`~.http_transport.HttpTransport`, see
:class:`~.remote_client.RemoteWorkerClient`).

Imports neither torch nor Qt: it runs inside Slicer's process. Every line the worker writes is
parsed once into a typed event (:mod:`.events`); the client routes them.

Two ways to consume events:
- GUI: :meth:`submit` a request, then call :meth:`poll` from a timer (never blocks);
- scripts and tests: :meth:`run` (blocking: a typed request of :mod:`.protocol.requests` in, its
  typed result of :mod:`.protocol.results` out, or raises), :meth:`call` (the same with the wire's
  type, fields and result payload) or :meth:`events`.
Clients send typed requests (:meth:`submit`, :meth:`run`); :meth:`send` and :meth:`call` take the
wire's type and fields, for protocol tests and benchmarks.
Events of a request that :meth:`events`/:meth:`call` is waiting for go to that waiter only;
all others (including :class:`~.events.Ready` and events without a request id) go to :meth:`poll`.
If the worker dies, every unanswered request gets an :class:`~.events.Error` (kind
``cancelled`` after :meth:`kill`/:meth:`stop`, ``internal`` otherwise) and :meth:`poll` gets an
:class:`~.events.Exit`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..core.errors import BadRequestError, CancelledError, MedDIFTError
from .events import (
    FINAL_EVENTS,
    Error,
    Event,
    Exit,
    Progress,
    Result,
    WorkerError,
    error_from_event,
)
from .transports import ProcessTransport, Transport

if TYPE_CHECKING:
    from .protocol.requests import Request
    from .protocol.results import WorkerResult


class WorkerClient:
    """Start, talk to and stop one worker through ``transport``.

    Without a transport, the worker is a local subprocess (:class:`~.transports.ProcessTransport`
    of ``python_executable``, ``env``, ``cwd`` and ``worker_args``; see there).
    """

    def __init__(
        self,
        python_executable: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        worker_args: list[str] | None = None,
        *,
        transport: Transport | None = None,
    ) -> None:
        if transport is None:
            transport = ProcessTransport(python_executable, env, cwd, worker_args)
        elif python_executable is not None or env is not None or cwd is not None or worker_args:
            raise ValueError("give either a transport or the options of a local worker process, not both")
        self.transport = transport
        self.version: str | None = None
        self._route_lock = threading.Lock()
        self._unclaimed: deque[Event] = deque()
        self._waiters: dict[str, queue.Queue] = {}
        self._outstanding: set[str] = set()
        self._ids = itertools.count(1)

    # ----------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.transport.running

    def start(self, timeout: float = 60.0) -> None:
        """Start the worker (open the session) and wait up to ``timeout`` s until it is ready."""
        with self._route_lock:
            self._unclaimed.clear()
        self.version = self.transport.open(self._deliver, timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Cancel every unanswered request, then close the transport (the local worker shuts down within
        ``timeout`` s or is killed; a server session is closed and its data deleted); the exit code
        of a local worker."""
        if self.running:
            with self._route_lock:
                unanswered = sorted(self._outstanding)
            try:
                for request_id in unanswered:
                    self.cancel(request_id)
            except (MedDIFTError, OSError):
                pass
        return self.transport.close(timeout, self._new_id())

    def kill(self, grace: float = 2.0) -> None:
        """End the worker at once, then close: a local worker's whole process tree gets SIGTERM, then
        SIGKILL after ``grace`` s; a server's connections are dropped (it cancels their jobs) and
        the session closed."""
        self.transport.kill(grace)
        self.stop(timeout=grace)

    def __enter__(self) -> WorkerClient:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- requests

    def submit(self, request: Request) -> str:
        """Send a typed request (:mod:`.protocol.requests`, as ``encode_request`` writes it) without
        waiting; returns its id. Its :class:`~.events.Result` payload reads back with
        ``parse_result(type_of(request), payload)``. The protocol is imported here, as in :meth:`run`."""
        from .protocol.requests import encode_request

        request_type, fields = encode_request(request)
        return self.send(request_type, **fields)

    def send(self, type: str, **params: Any) -> str:
        """Send one request of the wire's ``type`` and fields (protocol tests and benchmarks; clients
        :meth:`submit` typed requests); returns its id. Parameters must be JSON-serialisable (NumPy
        is converted)."""
        request_id = self._new_id()
        self._send_request(request_id, type, params)
        return request_id

    def send_line(self, line: bytes | str) -> None:
        """Send one raw line (for protocol tests); its events go to :meth:`poll`."""
        self.transport.send_line(line.encode() if isinstance(line, str) else bytes(line))

    def cancel(self, job_id: str | None = None) -> str:
        """Ask the worker to cancel ``job_id`` (default: the running job) with a typed
        :class:`~.protocol.requests.CancelRequest`; returns the cancel request's id."""
        from .protocol.requests import CancelRequest

        return self.submit(CancelRequest(job_id))

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
        request_id = self._new_id()
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

    def run(self, request: Request, progress: Callable[[str, float, str], None] | None = None,
            timeout: float | None = None) -> WorkerResult:
        """:meth:`call` of a typed request (:mod:`.protocol.requests`, sent as ``encode_request`` writes
        it); returns its typed result (:func:`~.protocol.results.parse_result`). The protocol is imported
        here: it needs NumPy, which the client's other uses do not."""
        from .protocol.requests import encode_request
        from .protocol.results import parse_result

        request_type, fields = encode_request(request)
        return parse_result(request_type, self.call(request_type, progress, timeout, **fields))

    def stderr_tail(self, max_lines: int = 50) -> str:
        """The worker's last ``max_lines`` lines of stderr (logs, tracebacks); '' where the transport
        cannot see them (a server's)."""
        return self.transport.stderr_tail(max_lines)

    # ----------------------------------------------------------------- internals

    def _new_id(self) -> str:
        return f"r{next(self._ids)}"

    def _send_request(self, request_id: str, type: str, params: dict[str, Any]) -> None:
        if "id" in params or "type" in params:
            raise BadRequestError("request parameters may not be named 'id' or 'type'")
        with self._route_lock:
            self._outstanding.add(request_id)
        try:
            self.transport.send(request_id, type, params)
        except BaseException:
            with self._route_lock:
                self._outstanding.discard(request_id)
            raise

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

    def _deliver(self, event: Event) -> None:
        """An event from the transport (its reader or request threads). :class:`~.events.Exit` first
        answers every unanswered request with an error, then goes to :meth:`poll`."""
        if isinstance(event, Exit):
            self._answer_unanswered(event.returncode)
        self._route(event)

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

    def _answer_unanswered(self, returncode: int | None) -> None:
        """The worker has ended: each unanswered request gets an error (kind ``cancelled`` after :meth:`kill`)."""
        with self._route_lock:
            unanswered = sorted(self._outstanding)
        killed = self.transport.killed
        kind = CancelledError.kind if killed else WorkerError.kind
        for request_id in unanswered:
            message = "the worker was stopped" if killed else f"the worker exited (code {returncode})"
            self._route(Error(request_id, kind, message + self._tail()))

    def _tail(self) -> str:
        tail = self.stderr_tail(8).strip()
        return f"\nworker stderr:\n{tail}" if tail else ""
