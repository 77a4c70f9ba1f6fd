"""Sessions of ``meddift serve``: each client session has its own worker (volumes, feature cache,
job queue) and its own folder under the server's cache folder (the jobs' outputs, and the files a
job reads, the lesion labelmap of a ``track`` or ``track_series`` and the field of ``overlays``,
written there by the server from an upload); another session can neither name nor reach them. Jobs
of all sessions share the device: one computes at a time, and an idle session fills its partly
computed features behind only while no job computes.

Events of a session's worker are routed by request id to the HTTP stream that asked (an
:class:`asyncio.Queue` per request), with file paths taken out of every message.
Idle sessions are closed and their folders deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.budget import Budget
from ...core.errors import BadRequestError
from ...core.geometry import Geometry
from ...core.io import write_volume
from ...field import write_field
from ...grid.displacement_field import DisplacementField
from ...lesions.outputs import output_paths
from ...lesions.series_outputs import series_output_paths
from ..jobs import Job
from ..protocol.requests import Limits, parse_request
from ..server import Worker
from ..stream import json_safe
from .wire import OUTPUT_NAMES

COMPUTE_TYPES = frozenset({"features", "match", "register", "overlays", "track", "track_series"})
RECENT_OUTCOMES = 64
OUTPUT_SUFFIX = re.compile(r"(\.[a-z0-9]{1,5})(\.gz)?$")
INTERNAL_MESSAGE = "internal error on the server (details in the server's log)"
FILL_LOCK_WAIT_S = 0.05  # an idle session's wait for the device lock before one step of filling features
SERVER_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s'\"<>|:;,()/\\]+[/\\]?)+")


def hide_paths(text: str) -> str:
    """``text`` with every absolute file path (POSIX or Windows) replaced by ``<server path>``."""
    return SERVER_PATH.sub("<server path>", text)


class SessionEvents:
    """The event writer of a session's worker: routes each event to its request's stream."""

    broken = False

    def __init__(self) -> None:
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.outcomes: OrderedDict[str, str] = OrderedDict()

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop) -> asyncio.Queue | None:
        """A queue for ``request_id``'s events; None while another stream holds that id."""
        with self._lock:
            if request_id in self._routes:
                return None
            queue: asyncio.Queue = asyncio.Queue()
            self._routes[request_id] = (loop, queue)
            return queue

    def close(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    @property
    def open_count(self) -> int:
        return len(self._routes)

    def emit(self, event: dict[str, Any]) -> bool:
        event = self.scrub(json_safe(event))
        request_id = event.get("id")
        with self._lock:
            if event.get("event") in ("result", "error") and request_id is not None:
                self.outcomes[request_id] = event.get("kind", "result")
                while len(self.outcomes) > RECENT_OUTCOMES:
                    self.outcomes.popitem(last=False)
            route = self._routes.get(request_id) if request_id is not None else None
        if route is not None:
            loop, queue = route
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                pass
        return True

    def scrub(self, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` without file paths in its message, and no detail of internal errors."""
        if event.get("event") == "error" and event.get("kind") == "internal":
            return {**event, "message": INTERNAL_MESSAGE}
        message = event.get("message")
        if isinstance(message, str):
            event = {**event, "message": hide_paths(message)}
        return event


class SessionWorker(Worker):
    """A session's worker; jobs that compute take the server's device lock first."""

    def __init__(self, events: SessionEvents, cache_bytes: int, limits: Limits, device_lock: threading.Lock,
                 memory_budget: Budget | None = None) -> None:
        super().__init__(events, cache_bytes, limits, memory_budget=memory_budget)
        self.device_lock = device_lock

    def run_job(self, job: Job) -> None:
        if job.type not in COMPUTE_TYPES:
            super().run_job(job)
            return
        with self.device_lock:
            super().run_job(job)

    def _fill_step(self) -> None:
        """Fill features behind only while no session computes (a busy lock skips this turn)."""
        if self.device_lock.acquire(timeout=FILL_LOCK_WAIT_S):
            try:
                super()._fill_step()
            finally:
                self.device_lock.release()


@dataclass(eq=False)
class ServerSession:
    """One client's worker, its thread, its output folder and the uploads it holds."""

    session_id: str
    folder: Path
    events: SessionEvents
    worker: SessionWorker
    thread: threading.Thread
    last_used: float = field(default_factory=time.monotonic)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Path]] = field(default_factory=dict)
    uploaded_fields: dict[str, Path] = field(default_factory=dict)
    _job_numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.events.open_count > 0 or self.worker.jobs.running is not None

    def held_bytes(self) -> int:
        """Bytes of the voxels this session's worker holds."""
        return sum(volume.voxels.nbytes for volume in list(self.worker.state.volumes.values()))

    def uploaded(self, content_hash: str) -> dict[str, Any] | None:
        """The load result of a volume uploaded before and still held (None otherwise)."""
        found = self.uploads.get(content_hash)
        if found is None or found["volume_id"] not in self.worker.state.volumes:
            return None
        return found

    def add_field(self, field_hash: str, displacement_lps_mm: Any, geometry: Geometry) -> None:
        """Keep an uploaded displacement field (``[k, j, i, 3]``, LPS mm) as a file of this session's
        folder, named by its hash for the ``transform`` of an ``overlays`` request."""
        path = self.folder / "fields" / f"{field_hash}.nii.gz"
        write_field(DisplacementField(displacement_lps_mm, geometry), path)
        self.uploaded_fields[field_hash] = path

    def overlays_paths(self, request_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` of an overlays request with ``transform`` (on a server: the hash of a field
        uploaded to this session) and its output names turned into files of this session's folder."""
        transform = fields.get("transform")
        if transform is not None:
            path = self.uploaded_fields.get(transform) if isinstance(transform, str) else None
            if path is None:
                raise BadRequestError("'transform' on a server must name a field uploaded to this session "
                                      "(RemoteWorkerClient's overlays uploads it)")
            fields = {**fields, "transform": str(path)}
        return self.output_paths(request_id, "overlays", fields)

    def output_paths(self, request_id: str, request_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` of a register or overlays request with its output names (only their endings
        count) turned into files of this session's folder."""
        folder = self._job_folder()
        paths = {}
        for name in OUTPUT_NAMES[request_type]:
            given = fields.get(f"out_{name}")
            if given is None:
                continue
            ending = OUTPUT_SUFFIX.search(given.lower()) if isinstance(given, str) else None
            if ending is None:
                raise BadRequestError(f"'out_{name}' must be a file name with a format ending, e.g. {name}.nii.gz")
            paths[name] = folder / f"{name}{ending.group(0)}"
        self.outputs[request_id] = paths
        return {**fields, **{f"out_{name}": str(path) for name, path in paths.items()}}

    def track_paths(self, request_id: str, request_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` of a ``track`` or ``track_series`` request with ``lesions`` (on a server: the
        volume id of a labelmap uploaded to this session) written as a file of this session's folder,
        and ``out_dir`` a folder of it whose files of ``meddift track`` (over a pair or a series)
        are the request's outputs."""
        lesions = fields.get("lesions")
        volume = self.worker.state.volumes.get(lesions) if isinstance(lesions, str) else None
        if volume is None:
            raise BadRequestError("'lesions' on a server must be the volume id of a labelmap uploaded to this "
                                  "session (RemoteWorkerClient's track uploads it)")
        series = None if request_type == "track" else parse_request(request_type, fields, self.worker.limits)
        folder = self._job_folder()
        labelmap = folder / "lesions.nii.gz"
        write_volume(volume, labelmap)
        out_dir = folder / "track"
        self.outputs[request_id] = (output_paths(out_dir) if series is None
                                    else series_output_paths(out_dir, len(series.followup_ids)))
        return {**fields, "lesions": str(labelmap), "out_dir": str(out_dir)}

    def _job_folder(self) -> Path:
        """A new folder name for one job's files in this session's folder (made when written)."""
        return self.folder / f"job{next(self._job_numbers)}"

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel its jobs, stop its worker and delete its folder."""
        self.worker.jobs.cancel_all()
        self.worker.jobs.stop()
        self.thread.join(timeout_s)
        self.worker.state.volumes.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class SessionStore:
    """The open sessions: at most ``max_sessions``; idle ones closed after ``idle_timeout_s``; each
    session's jobs within ``memory_budget``."""

    def __init__(self, root: Path, max_sessions: int, idle_timeout_s: float, cache_bytes: int,
                 limits: Limits, memory_budget: Budget | None = None) -> None:
        self.root = root
        self.memory_budget = memory_budget
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.cache_bytes = cache_bytes
        self.limits = limits
        self.device_lock = threading.Lock()
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> ServerSession | None:
        """A new session, or None when ``max_sessions`` are open."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                return None
            session_id = secrets.token_urlsafe(24)
            folder = self.root / f"session-{secrets.token_hex(8)}"
            folder.mkdir(parents=True)
            events = SessionEvents()
            worker = SessionWorker(events, self.cache_bytes, self.limits, self.device_lock, self.memory_budget)
            thread = threading.Thread(target=worker.serve, name="meddift-session", daemon=True)
            session = ServerSession(session_id, folder, events, worker, thread)
            self._sessions[session_id] = session
        thread.start()
        return session

    def get(self, session_id: str) -> ServerSession | None:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.touch()
        return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.close()
        return True

    def close_idle(self) -> int:
        """Close every session idle for longer than ``idle_timeout_s``; returns how many."""
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, s in self._sessions.items()
                    if not s.busy and now - s.last_used > self.idle_timeout_s]
        return sum(self.close(session_id) for session_id in idle)

    def close_all(self) -> None:
        with self._lock:
            names = list(self._sessions)
        for session_id in names:
            self.close(session_id)
