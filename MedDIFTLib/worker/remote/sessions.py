"""Sessions of ``meddift serve``: each client session has its own worker (volumes, uploaded fields,
feature cache, job queue) and its own folder under the server's cache folder, which holds only the
outputs of its jobs until the client has downloaded them (:class:`SessionOutputs`); what a job
reads (volumes, the lesion labelmap of a ``track``, the field of ``overlays``) is uploaded and held
in memory, never written here. Another session can neither name nor reach them. Jobs of all
sessions share the device: one computes at a time, and an idle session fills its partly computed
features behind only while no job computes.

Events of a session's worker are routed by request id to the HTTP stream that asked (an
:class:`asyncio.Queue` per request), with file paths taken out of every message.
Idle sessions are closed and their folders deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ...core.budget import Budget
from ...core.errors import BadRequestError
from ...grid.displacement_field import DisplacementField
from ...lesions.outputs import output_paths
from ...lesions.series_outputs import series_output_paths
from ..jobs import Job
from ..protocol.requests import (
    Limits,
    OverlaysRequest,
    RegisterRequest,
    Request,
    TrackRequest,
    TrackSeriesRequest,
)
from ..server import Worker
from ..stream import json_safe
from .wire import OUTPUT_NAMES

COMPUTE_TYPES = frozenset({"features", "match", "register", "overlays", "track", "track_series"})
RECENT_OUTCOMES = 64
OUTPUT_SUFFIX = re.compile(r"(\.[a-z0-9]{1,5})(\.gz)?$")
INTERNAL_MESSAGE = "internal error on the server (details in the server's log)"
FILL_LOCK_WAIT_S = 0.05  # an idle session's wait for the device lock before one step of filling features
SERVER_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s'\"<>|:;,()/\\]+[/\\]?)+")
_WritesFiles = TypeVar("_WritesFiles", RegisterRequest, OverlaysRequest)
_Tracks = TypeVar("_Tracks", TrackRequest, TrackSeriesRequest)


def hide_paths(text: str) -> str:
    """``text`` with every absolute file path (POSIX or Windows) replaced by ``<server path>``."""
    return SERVER_PATH.sub("<server path>", text)


class SessionOutputs:
    """The output files of a session's requests, each request's in a folder of its own under the
    session's ``folder`` (made when written), kept until the client has downloaded them: deleted on
    its word (:meth:`drop`), when the request fails, or when nobody is left to download them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._numbers = itertools.count(1)
        self._files: dict[str, dict[str, Path]] = {}
        self._folders: dict[str, Path] = {}
        self._lock = threading.Lock()

    def new_folder(self, request_id: str) -> Path:
        """The folder of ``request_id``'s outputs (a new name; made when written)."""
        with self._lock:
            folder = self._folders[request_id] = self.folder / f"job{next(self._numbers)}"
        return folder

    def add(self, request_id: str, files: dict[str, Path]) -> None:
        """The files (output name -> path in its folder) that ``request_id`` writes."""
        with self._lock:
            self._files[request_id] = dict(files)

    def file(self, request_id: str, name: str) -> Path | None:
        """The written output ``name`` of ``request_id`` (None when unknown or not written)."""
        with self._lock:
            path = self._files.get(request_id, {}).get(name)
        return path if path is not None and path.is_file() else None

    def drop(self, request_id: str) -> None:
        """Delete ``request_id``'s outputs and forget them (nothing happens for an unknown request)."""
        with self._lock:
            self._files.pop(request_id, None)
            folder = self._folders.pop(request_id, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class SessionEvents:
    """The event writer of a session's worker: routes each event to its request's stream; a request
    that ends in an error, or with no stream left to hear it, has its outputs discarded (``discard``)."""

    broken = False

    def __init__(self, discard: Callable[[str], None] = lambda request_id: None) -> None:
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._discard = discard
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
        final = event.get("event") in ("result", "error") and request_id is not None
        with self._lock:
            if final:
                self.outcomes[request_id] = event.get("kind", "result")
                while len(self.outcomes) > RECENT_OUTCOMES:
                    self.outcomes.popitem(last=False)
            route = self._routes.get(request_id) if request_id is not None else None
        if final and (route is None or event["event"] == "error"):
            self._discard(request_id)
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
    """One client's worker, its thread, its jobs' outputs and the uploads it holds."""

    session_id: str
    folder: Path
    events: SessionEvents
    worker: SessionWorker
    thread: threading.Thread
    outputs: SessionOutputs
    last_used: float = field(default_factory=time.monotonic)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.events.open_count > 0 or self.worker.jobs.running is not None

    def held_bytes(self) -> int:
        """Bytes of the voxels (volumes and fields) this session's worker holds."""
        volumes = sum(volume.voxels.nbytes for volume in list(self.worker.state.volumes.values()))
        return volumes + self.worker.state.held_field_bytes()

    def uploaded(self, content_hash: str) -> dict[str, Any] | None:
        """The load result of a volume uploaded before and still held (None otherwise)."""
        found = self.uploads.get(content_hash)
        if found is None or found["volume_id"] not in self.worker.state.volumes:
            return None
        return found

    def add_field(self, field_hash: str, field: DisplacementField) -> None:
        """Hold an uploaded displacement field for the ``transform_id`` of an ``overlays`` request."""
        self.worker.state.add_field(field_hash, field)

    def place_outputs(self, request_id: str, request_type: str, request: Request) -> Request:
        """``request`` with its outputs in this session's folder (:meth:`output_paths` of a register
        or overlays, :meth:`track_paths` of a track or track_series); any other request as it is."""
        if request_type in OUTPUT_NAMES:
            return self.output_paths(request_id, request_type, request)
        if request_type in ("track", "track_series"):
            return self.track_paths(request_id, request)
        return request

    def output_paths(self, request_id: str, request_type: str, request: _WritesFiles) -> _WritesFiles:
        """``request`` of ``request_type`` (register or overlays) with its output names (only their
        endings count) turned into files of the request's output folder; an overlays request must
        name its field by ``transform_id``."""
        if isinstance(request, OverlaysRequest) and request.transform is not None:
            raise BadRequestError("'transform' on a server must be a field uploaded to this session, named by "
                                  "'transform_id' (RemoteWorkerClient's overlays uploads it)")
        names = {}
        for name in OUTPUT_NAMES[request_type]:
            given = getattr(request, f"out_{name}")
            if given is None:
                continue
            ending = OUTPUT_SUFFIX.search(given.lower())
            if ending is None:
                raise BadRequestError(f"'out_{name}' must be a file name with a format ending, e.g. {name}.nii.gz")
            names[name] = f"{name}{ending.group(0)}"
        folder = self.outputs.new_folder(request_id)
        paths = {name: folder / file_name for name, file_name in names.items()}
        self.outputs.add(request_id, paths)
        return dataclasses.replace(request, **{f"out_{name}": str(path) for name, path in paths.items()})

    def track_paths(self, request_id: str, request: _Tracks) -> _Tracks:
        """``request`` (track or track_series; its lesions: ``lesions_id``, a labelmap uploaded to this
        session) with ``out_dir`` the request's output folder, whose files of ``meddift track`` (over a
        pair or a series) are its outputs."""
        if request.lesions is not None:
            raise BadRequestError("'lesions' on a server must be the volume id of a labelmap uploaded to this "
                                  "session, as 'lesions_id' (RemoteWorkerClient's track uploads it)")
        out_dir = self.outputs.new_folder(request_id)
        self.outputs.add(request_id, output_paths(out_dir) if isinstance(request, TrackRequest)
                         else series_output_paths(out_dir, len(request.followup_ids)))
        return dataclasses.replace(request, out_dir=str(out_dir))

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
            outputs = SessionOutputs(folder)
            events = SessionEvents(outputs.drop)
            worker = SessionWorker(events, self.cache_bytes, self.limits, self.device_lock, self.memory_budget)
            thread = threading.Thread(target=worker.serve, name="meddift-session", daemon=True)
            session = ServerSession(session_id, folder, events, worker, thread, outputs)
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
