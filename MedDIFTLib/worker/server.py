"""Background worker: ``python -m MedDIFTLib.worker [--cache-bytes N]``.

JSON lines on stdin (requests) and stdout (events), as defined in :mod:`.protocol`; nothing
else ever reaches stdout (library output is sent to stderr at the file-descriptor level).

A reader thread parses each request (a bad one is answered at once), answers ``cancel`` and
queues the rest; jobs run one at a time, in arrival order, on the main thread, each through its
handler in :mod:`.handlers` (a cancelled running job stops at its next progress report). EOF
on stdin acts as ``shutdown`` after the queued jobs. While no job is queued, the worker fills the
rest of the features that a point search computed only where it read them, one bounded step at a
time (:meth:`.state.WorkerState.fill_behind`), so later jobs find them complete. After a ``match`` it
waits :data:`FILL_PAUSE_S` before filling, so the next point placed or dragged, sent right after the
last result, does not wait for a fill step.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any, BinaryIO, NoReturn

from .. import __version__
from ..core.budget import MAX_POINTS, Budget
from ..core.devices import is_out_of_memory
from ..core.errors import CancelledError, MedDIFTError, OutOfMemoryError
from ..core.progress import ProgressFn
from .cache import DEFAULT_CACHE_BYTES
from .handlers import HANDLERS
from .jobs import Job, JobQueue
from .protocol.requests import (
    DEFAULT_LIMITS,
    MAX_REQUEST_BYTES,
    CancelRequest,
    Limits,
    RejectedRequest,
    Request,
    parse_line,
    parse_request,
)
from .state import WorkerState, device_name
from .stream import (
    EventWriter,
    error_event,
    log_event,
    oversized,
    progress_event,
    read_bounded_line,
    ready_event,
    result_event,
)

PROGRESS_INTERVAL_S = 0.1
IDLE_WAIT_S = 0.5
FILL_PAUSE_S = 0.25  # seconds after a match before filling features behind resumes


def _out_of_memory_advice(job_type: str, device: str) -> str:
    if device.startswith("cuda"):
        return (
            f"{job_type}: out of GPU memory on {device}. Use a smaller model grid or fewer backbone levels, "
            "a smaller search radius or memory budget, free GPU memory used by other programs, or run on 'cpu'."
        )
    return (
        f"{job_type}: out of memory on the CPU. Use a smaller model grid or fewer backbone levels, "
        "a smaller search radius or memory budget, or a smaller feature cache (--cache-bytes)."
    )


def _job_device(job: Job) -> str:
    """The device a job runs on, for messages (``cpu`` when it names none or a bad one)."""
    settings = getattr(job.request, "settings", None)
    try:
        return "cpu" if settings is None else device_name(settings.device)
    except MedDIFTError:
        return "cpu"


class Worker:
    """Composes the protocol (reading, writing), the job queue, the state and the handlers."""

    def __init__(
        self,
        writer: EventWriter,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        fill_behind: bool = True,
        memory_budget: Budget | None = None,
    ) -> None:
        self.writer = writer
        self.limits = limits
        self.jobs = JobQueue()
        self.state = WorkerState(cache_bytes, limits, self.log, memory_budget)
        self.fill_behind = fill_behind
        self._fill_pending = False
        self._fill_from = 0.0  # time.monotonic() from which filling may resume

    # ------------------------------------------------------------------ events

    def emit(self, event: dict[str, Any]) -> None:
        """Write one event; if the client has gone, cancel everything and stop after the current job."""
        if not self.writer.emit(event):
            self.jobs.cancel_all()
            self.jobs.stop()

    def log(self, level: str, message: str) -> None:
        """A ``log`` event for the running job (id null between jobs), copied to stderr."""
        print(f"[meddift worker] {level}: {message}", file=sys.stderr, flush=True)
        job = self.jobs.running
        self.emit(log_event(job.request_id if job else None, level, message))

    # ------------------------------------------------------------------ reading

    def read_requests(self, stream: BinaryIO) -> None:
        """Reader thread: refuse bad requests and answer ``cancel`` now, queue the rest; EOF stops."""
        try:
            while not self.writer.broken:
                line, too_long = read_bounded_line(stream, self.limits.max_request_bytes)
                if line is None:
                    break
                if too_long:
                    rejected = oversized(line, self.limits.max_request_bytes)
                    self.emit(error_event(rejected.request_id, rejected.kind, str(rejected)))
                elif line.strip():
                    self.handle_line(line)
        except Exception as error:
            print(f"[meddift worker] stopped reading requests: {error!r}", file=sys.stderr, flush=True)
        finally:
            self.jobs.stop()

    def handle_line(self, line: bytes) -> None:
        """Parse one request line: answer it at once when bad or a cancel, else queue it."""
        request_id = None
        try:
            request_id, request_type, fields = parse_line(line)
            request = parse_request(request_type, fields, self.limits)
        except RejectedRequest as error:
            self.emit(error_event(error.request_id, error.kind, str(error)))
            return
        except MedDIFTError as error:
            self.emit(error_event(request_id, error.kind, str(error)))
            return
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            message = f"internal error reading a request: {type(error).__name__}: {error} (details in the worker log)"
            self.emit(error_event(request_id, "internal", message))
            return
        self.accept(request_id, request_type, request)

    def accept(self, request_id: str, request_type: str, request: Request) -> None:
        """Take one typed request of ``request_type``: answer a cancel at once, else queue it (a
        request id already pending is refused). ``meddift serve`` hands its requests in here."""
        if isinstance(request, CancelRequest):
            self._cancel(request_id, request.job_id)
        elif not self.jobs.submit(Job(request_id, request_type, request)):
            message = f"request id {request_id!r} is already in use by a pending request"
            self.emit(error_event(request_id, "bad_request", message))

    def _cancel(self, request_id: str, job_id: str | None) -> None:
        target = self.jobs.cancel(job_id)
        self.emit(result_event(request_id, {"cancelled": target.request_id if target else None}))
        if target is not None and target.withdrawn:
            self.emit(error_event(target.request_id, "cancelled", f"{target.type} cancelled before it started"))

    # ------------------------------------------------------------------ serving

    def serve(self) -> int:
        """Run queued jobs until ``shutdown``; returns the exit code."""
        while True:
            wait = max(0.0, self._fill_from - time.monotonic()) if self._fill_pending else IDLE_WAIT_S
            job = self.jobs.next(timeout_s=wait)
            if job is None:
                self._fill_step()
                continue
            if job.type == "shutdown":
                self._shut_down(job)
                return 0
            self.run_job(job)
            self._fill_pending = self.fill_behind
            if job.type == "match":
                self._fill_from = time.monotonic() + FILL_PAUSE_S

    def _fill_step(self) -> None:
        """Idle: one step of filling features computed only in part; a failure ends background filling."""
        if not self._fill_pending:
            return
        try:
            self._fill_pending = self.state.fill_behind()
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            self._fill_pending = self.fill_behind = False
            self.log(
                "warning",
                f"stopped filling features in the background ({type(error).__name__}: {error}); "
                "jobs compute what they need",
            )

    def _shut_down(self, job: Job) -> None:
        if job.request_id is not None:
            self.emit(result_event(job.request_id, {"shutdown": True}))
        for pending in self.jobs.drain(job):
            message = f"{pending.type} cancelled: the worker is shutting down"
            self.emit(error_event(pending.request_id, "cancelled", message))

    def run_job(self, job: Job) -> None:
        """Run one job (unless withdrawn) and write its final event."""
        if not self.jobs.start(job):
            return
        try:
            final = self._execute(job)
        finally:
            self.jobs.finish(job)
        try:
            self.emit(final)
        except (TypeError, ValueError) as error:
            traceback.print_exc(file=sys.stderr)
            message = f"internal error in {job.type}: unserialisable result ({error})"
            self.emit(error_event(job.request_id, "internal", message))

    def _execute(self, job: Job) -> dict[str, Any]:
        """The job's final event: its result, or an error with a kind and a message."""
        try:
            if job.cancel_event.is_set():
                raise CancelledError(f"{job.type} cancelled")
            result = HANDLERS[job.type](self.state, job.request, self._progress_for(job))
        except CancelledError:
            return error_event(job.request_id, "cancelled", f"{job.type} cancelled")
        except MedDIFTError as error:
            return error_event(job.request_id, error.kind, str(error))
        except Exception as error:
            if is_out_of_memory(error):
                self.state.release_device_memory()
                advice = _out_of_memory_advice(job.type, _job_device(job))
                return error_event(job.request_id, OutOfMemoryError.kind, advice)
            traceback.print_exc(file=sys.stderr)
            message = f"internal error in {job.type}: {type(error).__name__}: {error} (details in the worker log)"
            return error_event(job.request_id, "internal", message)
        return result_event(job.request_id, result)

    def _progress_for(self, job: Job) -> ProgressFn:
        """Progress callback of ``job``: raises CancelledError once cancelled, rate-limits events."""
        last = {"stage": None, "time": 0.0}

        def report(stage: str, fraction: float, message: str = "") -> None:
            if job.cancel_event.is_set():
                raise CancelledError(f"{job.type} cancelled")
            now = time.monotonic()
            if stage == last["stage"] and 0.0 < fraction < 1.0 and now - last["time"] < PROGRESS_INTERVAL_S:
                return
            last["stage"], last["time"] = stage, now
            self.emit(progress_event(job.request_id, stage, fraction, message))

        return report


# ---------------------------------------------------------------------- process


def _claim_stdout() -> BinaryIO:
    """Move the real stdout aside for events; anything else written to stdout goes to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "wb")


def _byte_count(text: str) -> int:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number of bytes >= 0, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m MedDIFTLib.worker", description="MedDIFT background worker: JSON lines on stdin/stdout."
    )
    parser.add_argument(
        "--cache-bytes",
        type=_byte_count,
        default=_byte_count(os.environ.get("MEDDIFT_CACHE_BYTES", str(DEFAULT_CACHE_BYTES))),
        help="feature cache bound in bytes, e.g. 4e9 (default: $MEDDIFT_CACHE_BYTES or 4 GiB)",
    )
    parser.add_argument("--max-request-bytes", type=_byte_count, default=MAX_REQUEST_BYTES)
    parser.add_argument("--max-points", type=int, default=MAX_POINTS)
    parser.add_argument(
        "--no-fill-behind",
        dest="fill_behind",
        action="store_false",
        help="do not fill the rest of partly computed features while idle (saves CPU and memory)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    writer = EventWriter(_claim_stdout())
    worker = Worker(writer, args.cache_bytes, Limits(args.max_request_bytes, args.max_points), args.fill_behind)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        worker.log("warning", f"{category.__name__}: {message}")

    def terminate(signum, frame) -> None:
        raise SystemExit(128 + signum)

    warnings.showwarning = show_warning
    signal.signal(signal.SIGTERM, terminate)
    reader = threading.Thread(target=worker.read_requests, args=(sys.stdin.buffer,), name="requests", daemon=True)
    try:
        worker.emit(ready_event(__version__, os.getpid()))
        reader.start()
        return worker.serve()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        return 130


def exit_now(code: int) -> NoReturn:
    """End the process at once: the reader thread may hold stdin's lock, which aborts a normal shutdown."""
    sys.stderr.flush()
    os._exit(code)
