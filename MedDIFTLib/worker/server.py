"""Background worker: ``python -m MedDIFTLib.worker [--cache-bytes N]``.

JSON lines: one request per line on stdin, one event per line on stdout; nothing else ever
reaches stdout (library output is sent to stderr at the file-descriptor level).

Request: ``{"id": str, "type": "probe|load|unload|features|match|register|cancel|shutdown", ...}``.
Events: ``ready`` (once, id null), ``progress`` (stage, fraction in [0, 1], message), ``log``
(level, message), ``result`` (result) and ``error`` (kind: bad_request, bad_input,
missing_weights, out_of_memory, cancelled, internal; message). Every event carries its request
id; a ``result`` or ``error`` ends the request. NaN and infinity in results become ``null``.

Requests (parameters -> result):
- ``probe`` (``backbone_options``: {backbone: options} for the weights check) -> versions,
  ``devices`` (name, label, memory_bytes, free_bytes), ``backbones`` (name, available,
  weights_present, message), ``cache`` (max_bytes, used_bytes, entries), ``volumes``, ``limits``;
- ``load`` (``path``) -> ``volume_id``, ``name``, ``geometry``; the same content keeps its id;
- ``unload`` (``volume_id``) -> ``unloaded``;
- ``features`` (``volume_id``, ``backbone``, ``backbone_options``, ``device``) -> ``cached``,
  ``seconds``, ``bytes``, ``levels`` (name, channels, shape_ijk);
- ``match`` (``fixed_id``, ``moving_id``, backbone fields, ``points_lps_mm``, ``labels``,
  ``priors_lps_mm``, ``options``: MatchOptions fields) -> ``labels``, ``points_lps_mm``,
  ``similarity``, ``confidence``, ``forward_backward_mm``, ``reliable``, ``seconds``,
  ``match_seconds``, ``features_cached``;
- ``register`` (``fixed_id``, ``moving_id``, backbone fields, ``out_transform``, ``out_inverse``,
  ``out_warped``, ``mask_id``, ``options``: FieldOptions fields) -> the summary of
  :func:`MedDIFTLib.field.register_and_write` (outputs are written atomically);
- ``cancel`` (``job_id``, default: the running or else the oldest queued job) -> ``cancelled``
  (that job's id or null); the cancelled job ends with an ``error`` of kind ``cancelled``;
- ``shutdown`` -> ``{"shutdown": true}`` once the jobs queued before it are done, then exit 0
  (requests that arrive later are answered ``cancelled``).
``device`` is ``auto | cpu | cuda | cuda:N``; ``backbone`` defaults to ``mind``.

Jobs run one at a time, in arrival order, on the main thread; a reader thread answers
``cancel`` at once (a running job stops at its next progress report) and queues everything
else. EOF on stdin acts as ``shutdown`` after the queued jobs. Coordinates are LPS mm; geometry
is reported in SimpleITK order (``shape_ijk``, ``spacing_mm``, ``origin_lps_mm``, row-major
``direction``). Feature pyramids are cached on the CPU (see :mod:`MedDIFTLib.worker.cache`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import queue
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO, NoReturn

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..core import devices
from ..core.errors import BadInputError, BadRequestError, CancelledError, MedDIFTError, OutOfMemoryError
from ..core.io import Volume, read_volume
from ..core.options import FieldOptions, MatchOptions, parse_options
from ..core.progress import ProgressFn
from ..features import BACKBONES, FeaturePyramid, available_backbones, create_featurizer
from ..field import register_and_write
from ..matching import match_points
from .cache import DEFAULT_CACHE_BYTES, CacheKey, FeatureCache

MAX_REQUEST_BYTES = 16 * 2**20
MAX_POINTS = 100_000
REQUEST_TYPES = ("probe", "load", "unload", "features", "match", "register", "cancel", "shutdown")
PROGRESS_INTERVAL_S = 0.1
DEVICE_COPIES = 2
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.){0,256}")')


def _json_safe(value: Any) -> Any:
    """``value`` with NumPy turned into Python, tuples into lists and non-finite floats into None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def read_bounded_line(stream: BinaryIO, limit: int) -> tuple[bytes | None, bool]:
    """Next line of ``stream`` (None at EOF) and whether it exceeded ``limit`` bytes.

    An oversized line is read to its end and dropped; only its first KiB is returned.
    """
    line = stream.readline(limit + 1)
    if not line:
        return None, False
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    head = line[:1024]
    while True:
        chunk = stream.readline(2**20)
        if not chunk or chunk.endswith(b"\n"):
            return head, True


def _leading_id(head: bytes) -> str | None:
    """The request id when the line starts with ``{"id": "..."`` (lets an oversized request be answered)."""
    found = _LEADING_ID.match(head)
    if found is None:
        return None
    try:
        return json.loads(found.group(1))
    except ValueError:
        return None


def resolve_device(name: Any) -> str:
    """``auto | cpu | cuda | cuda:N`` -> ``cpu`` or ``cuda:N`` (checked to exist; auto prefers CUDA)."""
    if not isinstance(name, str):
        raise BadRequestError(f"device must be a string ('auto', 'cpu' or 'cuda:N'), got {name!r}")
    device = devices.resolve_device(name)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return "cpu"


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


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


def _system_memory() -> tuple[int | None, int | None]:
    """Total and available RAM in bytes (None where it cannot be read)."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except ImportError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None, None


@dataclasses.dataclass
class Job:
    request_id: str | None
    type: str
    params: dict[str, Any]
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    withdrawn: bool = False  # cancelled while queued: already answered, never run


class EventWriter:
    """Writes events as JSON lines to the protocol stream, one writer at a time."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def emit(self, event: dict[str, Any]) -> bool:
        """Write one event; False once the reader has gone away. Raises TypeError if not serialisable."""
        line = json.dumps(_json_safe(event), allow_nan=False).encode() + b"\n"
        with self._lock:
            if self.broken:
                return False
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.broken = True
                return False
        return True


class Worker:
    """Request dispatch, the job queue, loaded volumes and the feature cache."""

    def __init__(
        self,
        writer: EventWriter,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_points: int = MAX_POINTS,
    ) -> None:
        self.writer = writer
        self.cache = FeatureCache(cache_bytes)
        self.max_request_bytes = max_request_bytes
        self.max_points = max_points
        self.volumes: dict[str, Volume] = {}
        self._volume_count = 0
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._pending: list[Job] = []
        self._pending_lock = threading.Lock()
        self._running: Job | None = None
        self._featurizer_key: tuple | None = None
        self._featurizer: Any = None
        self._device_copies: OrderedDict[tuple[CacheKey, str], FeaturePyramid] = OrderedDict()
        self._handlers: dict[str, Callable[[dict[str, Any], ProgressFn], dict[str, Any]]] = {
            "probe": self._probe,
            "load": self._load,
            "unload": self._unload,
            "features": self._features,
            "match": self._match,
            "register": self._register,
        }

    # ------------------------------------------------------------------ events

    def emit(self, event: dict[str, Any]) -> None:
        if not self.writer.emit(event):
            self._abandon()

    @staticmethod
    def _error_event(request_id: str | None, kind: str, message: str) -> dict[str, Any]:
        return {"id": request_id, "event": "error", "kind": kind, "message": message}

    def error(self, request_id: str | None, kind: str, message: str) -> None:
        self.emit(self._error_event(request_id, kind, message))

    def log(self, level: str, message: str) -> None:
        """A ``log`` event for the running job (id null between jobs), copied to stderr."""
        print(f"[meddift worker] {level}: {message}", file=sys.stderr, flush=True)
        job = self._running
        self.emit({"id": job.request_id if job else None, "event": "log", "level": level, "message": message})

    def _abandon(self) -> None:
        """The client is gone: cancel everything and stop after the current job."""
        with self._pending_lock:
            for job in self._pending:
                job.cancel_event.set()
        self._jobs.put(Job(None, "shutdown", {}))

    # ------------------------------------------------------------------ reading

    def read_requests(self, stream: BinaryIO) -> None:
        """Reader thread: answer ``cancel`` now, queue the rest; EOF queues a shutdown."""
        try:
            while not self.writer.broken:
                line, too_long = read_bounded_line(stream, self.max_request_bytes)
                if line is None:
                    break
                if too_long:
                    self.error(
                        _leading_id(line),
                        "bad_request",
                        f"request longer than {self.max_request_bytes} bytes rejected; send fewer points per request",
                    )
                elif line.strip():
                    self.handle_line(line)
        except Exception as error:
            print(f"[meddift worker] stopped reading requests: {error!r}", file=sys.stderr, flush=True)
        finally:
            self._jobs.put(Job(None, "shutdown", {}))

    def handle_line(self, line: bytes) -> None:
        try:
            request = json.loads(line, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as error:
            self.error(None, "bad_request", f"malformed JSON request: {error}")
            return
        if not isinstance(request, dict):
            self.error(None, "bad_request", "a request must be a JSON object")
            return
        request_id = request.get("id")
        if not isinstance(request_id, str) or not request_id:
            self.error(None, "bad_request", "every request needs a non-empty string 'id'")
            return
        request_type = request.get("type")
        if request_type not in REQUEST_TYPES:
            known = ", ".join(REQUEST_TYPES)
            self.error(request_id, "bad_request", f"unknown request type {request_type!r}; use one of {known}")
            return
        params = {key: value for key, value in request.items() if key not in ("id", "type")}
        if request_type == "cancel":
            self._cancel(request_id, params.get("job_id"))
            return
        job = Job(request_id, request_type, params)
        with self._pending_lock:
            if any(pending.request_id == request_id for pending in self._pending):
                duplicate = True
            else:
                duplicate = False
                self._pending.append(job)
        if duplicate:
            self.error(request_id, "bad_request", f"request id {request_id!r} is already in use by a pending request")
            return
        self._jobs.put(job)

    def _cancel(self, request_id: str, job_id: Any) -> None:
        """Cancel ``job_id``, or else the oldest pending job (the running one if any).

        A running job stops at its next progress report; a queued one is answered at once.
        """
        with self._pending_lock:
            candidates = [job for job in self._pending if job.type != "shutdown"]
            if job_id is not None:
                candidates = [job for job in candidates if job.request_id == job_id]
            target = candidates[0] if candidates else None
            if target is not None:
                target.cancel_event.set()
                if target is not self._running:
                    target.withdrawn = True
                    self._pending.remove(target)
        self.emit({"id": request_id, "event": "result", "result": {"cancelled": target.request_id if target else None}})
        if target is not None and target.withdrawn:
            self.error(target.request_id, "cancelled", f"{target.type} cancelled before it started")

    # ------------------------------------------------------------------ serving

    def serve(self) -> int:
        """Run queued jobs until ``shutdown``; returns the exit code."""
        while True:
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            if job.type == "shutdown":
                self._shut_down(job)
                return 0
            self.run_job(job)

    def _shut_down(self, job: Job) -> None:
        if job.request_id is not None:
            self.emit({"id": job.request_id, "event": "result", "result": {"shutdown": True}})
        with self._pending_lock:
            left = [pending for pending in self._pending if pending is not job and pending.request_id is not None]
            self._pending.clear()
        for pending in left:
            self.error(pending.request_id, "cancelled", f"{pending.type} cancelled: the worker is shutting down")

    def run_job(self, job: Job) -> None:
        """Run one job; it leaves the pending list before its final event, so a later cancel misses it."""
        with self._pending_lock:
            if job.withdrawn:
                return
            self._running = job
        try:
            final = self._execute(job)
        finally:
            with self._pending_lock:
                if job in self._pending:
                    self._pending.remove(job)
                self._running = None
        try:
            self.emit(final)
        except (TypeError, ValueError) as error:
            traceback.print_exc(file=sys.stderr)
            self.error(job.request_id, "internal", f"internal error in {job.type}: unserialisable result ({error})")

    def _execute(self, job: Job) -> dict[str, Any]:
        """The job's final event: its result, or an error with a kind and a message."""
        device = "cpu"
        try:
            if job.cancel_event.is_set():
                raise CancelledError(f"{job.type} cancelled")
            if "device" in job.params:
                device = resolve_device(job.params["device"])
            result = self._handlers[job.type](job.params, self._progress_for(job))
        except CancelledError:
            return self._error_event(job.request_id, "cancelled", f"{job.type} cancelled")
        except MedDIFTError as error:
            return self._error_event(job.request_id, error.kind, str(error))
        except Exception as error:
            if _is_out_of_memory(error):
                self._release_device_memory()
                return self._error_event(job.request_id, OutOfMemoryError.kind, _out_of_memory_advice(job.type, device))
            traceback.print_exc(file=sys.stderr)
            message = f"internal error in {job.type}: {type(error).__name__}: {error} (details in the worker log)"
            return self._error_event(job.request_id, "internal", message)
        return {"id": job.request_id, "event": "result", "result": result}

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
            self.emit(
                {
                    "id": job.request_id,
                    "event": "progress",
                    "stage": stage,
                    "fraction": min(max(float(fraction), 0.0), 1.0),
                    "message": message,
                }
            )

        return report

    def _release_device_memory(self) -> None:
        self._device_copies.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ helpers

    def _volume(self, params: dict[str, Any], name: str) -> Volume:
        volume_id = params.get(name)
        if not isinstance(volume_id, str):
            raise BadRequestError(f"'{name}' must be the volume id returned by a 'load' request")
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise BadRequestError(f"{name}: unknown volume id {volume_id!r}; load the volume first")
        return volume

    def _points(self, params: dict[str, Any], name: str, count: int | None = None) -> np.ndarray | None:
        """``params[name]`` as an (N, 3) float array of LPS mm (None when absent and ``count`` is given)."""
        raw = params.get(name)
        if raw is None and count is not None:
            return None
        if not isinstance(raw, list):
            raise BadRequestError(f"'{name}' must be a list of [l, p, s] points in mm")
        if len(raw) > self.max_points:
            raise BadRequestError(f"'{name}': {len(raw)} points exceed the limit of {self.max_points} per request")
        try:
            points = np.asarray(raw, dtype=float)
        except (TypeError, ValueError):
            raise BadRequestError(f"'{name}' must be a list of [l, p, s] number triples") from None
        if len(raw) == 0:
            points = points.reshape(0, 3)
        if points.ndim != 2 or points.shape[1] != 3:
            raise BadRequestError(f"'{name}' must be a list of [l, p, s] number triples")
        if count is not None and len(points) != count:
            raise BadRequestError(f"'{name}' has {len(points)} points for {count} fixed points")
        return points

    def _featurizer_for(self, params: dict[str, Any], device: str) -> Any:
        """The featurizer of the request's backbone and options (the last one is kept for reuse)."""
        backbone = params.get("backbone", "mind")
        options = params.get("backbone_options") or {}
        if not isinstance(backbone, str):
            raise BadRequestError("'backbone' must be a backbone name")
        if not isinstance(options, dict):
            raise BadRequestError("'backbone_options' must be a JSON object")
        if "device" in options:
            raise BadRequestError("give the device in the request's 'device' field, not in 'backbone_options'")
        key = (backbone, json.dumps(options, sort_keys=True), device)
        if key == self._featurizer_key:
            return self._featurizer
        self._featurizer_key = self._featurizer = None
        try:
            featurizer = create_featurizer(backbone, device=device, **options)
        except ImportError as error:
            raise BadRequestError(f"backbone {backbone!r} is not available in this installation ({error})") from None
        except TypeError as error:
            raise BadRequestError(f"backbone {backbone!r}: unsupported options ({error})") from None
        except ValueError as error:
            raise BadInputError(f"backbone {backbone!r}: {error}") from None
        self._featurizer_key, self._featurizer = key, featurizer
        return featurizer

    def _pyramid(
        self, params: dict[str, Any], volume: Volume, device: str, progress: ProgressFn, role: str = ""
    ) -> tuple[FeaturePyramid, bool, CacheKey, float]:
        """Features of ``volume`` (CPU), from the cache when possible: (pyramid, cached, key, seconds)."""
        featurizer = self._featurizer_for(params, device)
        key = CacheKey.create(volume.content_hash(), featurizer.name, featurizer.config, device)
        pyramid = self.cache.get(key)
        if pyramid is not None:
            return pyramid, True, key, 0.0
        prefix = f"{role}: " if role else ""
        progress("features", 0.0, f"{prefix}{featurizer.name} features of {volume.name or 'volume'}")
        started = time.perf_counter()

        def report(stage: str, fraction: float, message: str = "") -> None:
            progress(stage, fraction, prefix + message)

        pyramid = featurizer.extract(volume, report).to("cpu")
        seconds = time.perf_counter() - started
        if not self.cache.put(key, pyramid, volume.name):
            self.log(
                "warning",
                f"features of {volume.name or 'volume'} ({pyramid.nbytes / 2**20:.0f} MiB) exceed the feature cache "
                f"({self.cache.max_bytes / 2**20:.0f} MiB) and were not cached",
            )
        return pyramid, False, key, seconds

    def _on_device(self, key: CacheKey, pyramid: FeaturePyramid, device: str) -> FeaturePyramid:
        """``pyramid`` on ``device``; copies on a GPU are kept for the last pair of volumes."""
        if device == "cpu":
            return pyramid
        copy = self._device_copies.get((key, device))
        if copy is None:
            while len(self._device_copies) >= DEVICE_COPIES:
                self._device_copies.popitem(last=False)
            copy = self._device_copies[(key, device)] = pyramid.to(device)
        else:
            self._device_copies.move_to_end((key, device))
        return copy

    def _pair(
        self, params: dict[str, Any], device: str, progress: ProgressFn
    ) -> tuple[Volume, Volume, tuple[FeaturePyramid, FeaturePyramid], bool]:
        """Fixed and moving volumes, their pyramids on ``device``, and whether both came from the cache."""
        fixed = self._volume(params, "fixed_id")
        moving = self._volume(params, "moving_id")
        fixed_pyramid, fixed_cached, fixed_key, _ = self._pyramid(params, fixed, device, progress, "fixed")
        moving_pyramid, moving_cached, moving_key, _ = self._pyramid(params, moving, device, progress, "moving")
        pyramids = (
            self._on_device(fixed_key, fixed_pyramid, device),
            self._on_device(moving_key, moving_pyramid, device),
        )
        return fixed, moving, pyramids, fixed_cached and moving_cached

    # ------------------------------------------------------------------ requests

    def _probe(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Versions, devices with memory, backbones with their weights, cache and volumes."""
        import monai

        total, available = _system_memory()
        devices = [
            {
                "name": "cpu",
                "label": platform.processor() or platform.machine(),
                "memory_bytes": total,
                "free_bytes": available,
                "threads": torch.get_num_threads(),
            }
        ]
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total_gpu = torch.cuda.mem_get_info(index)
                devices.append(
                    {
                        "name": f"cuda:{index}",
                        "label": torch.cuda.get_device_name(index),
                        "memory_bytes": int(total_gpu),
                        "free_bytes": int(free),
                    }
                )
        backbone_options = params.get("backbone_options") or {}
        if not isinstance(backbone_options, dict):
            raise BadRequestError("'backbone_options' of probe must map backbone names to their options")
        return {
            "version": __version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "simpleitk": sitk.Version.VersionString(),
            "numpy": np.__version__,
            "pid": os.getpid(),
            "cuda_available": torch.cuda.is_available(),
            "default_device": resolve_device("auto"),
            "devices": devices,
            "backbones": [_backbone_status(name, backbone_options.get(name) or {}) for name in available_backbones()],
            "cache": self.cache.describe(),
            "volumes": [
                {"volume_id": volume_id, "name": volume.name, "shape_ijk": list(volume.geometry.shape_ijk)}
                for volume_id, volume in self.volumes.items()
            ],
            "limits": {"max_request_bytes": self.max_request_bytes, "max_points": self.max_points},
        }

    def _load(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Read a volume file or DICOM folder; the same content loaded twice keeps its id."""
        path = params.get("path")
        if not isinstance(path, str) or not path:
            raise BadRequestError("'path' must be the path of a volume file or DICOM folder")
        progress("load", 0.0, f"reading {path}")
        volume = read_volume(path)
        digest = volume.content_hash()
        volume_id = next((vid for vid, known in self.volumes.items() if known.content_hash() == digest), None)
        if volume_id is None:
            self._volume_count += 1
            volume_id = f"v{self._volume_count}"
        self.volumes[volume_id] = volume
        progress("load", 1.0, f"loaded {volume.name}")
        geometry = volume.geometry
        return {
            "volume_id": volume_id,
            "name": volume.name,
            "geometry": {
                "shape_ijk": list(geometry.shape_ijk),
                "spacing_mm": list(geometry.spacing_mm),
                "origin_lps_mm": list(geometry.origin_lps_mm),
                "direction": list(geometry.direction),
            },
        }

    def _unload(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Forget a loaded volume (its cached features stay until evicted)."""
        volume_id = params.get("volume_id")
        if not isinstance(volume_id, str):
            raise BadRequestError("'volume_id' must be the volume id returned by a 'load' request")
        return {"unloaded": self.volumes.pop(volume_id, None) is not None}

    def _features(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        volume = self._volume(params, "volume_id")
        device = resolve_device(params.get("device", "auto"))
        pyramid, cached, _, seconds = self._pyramid(params, volume, device, progress)
        return {
            "cached": cached,
            "seconds": seconds,
            "bytes": pyramid.nbytes,
            "levels": [
                {"name": level.name, "channels": level.channels, "shape_ijk": list(level.geometry.shape_ijk)}
                for level in pyramid.levels
            ],
        }

    def _match(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Match fixed points (LPS mm) into the moving volume; labels pair inputs with outputs."""
        started = time.perf_counter()
        points = self._points(params, "points_lps_mm")
        labels = params.get("labels")
        if labels is None:
            labels = [str(n + 1) for n in range(len(points))]
        if not isinstance(labels, list) or len(labels) != len(points):
            raise BadRequestError(f"'labels' must be a list of {len(points)} labels, one per point")
        priors = self._points(params, "priors_lps_mm", count=len(points))
        options = parse_options(MatchOptions, params.get("options"), "match")
        device = resolve_device(params.get("device", "auto"))
        _, _, (fixed_pyramid, moving_pyramid), cached = self._pair(params, device, progress)
        progress("match", 0.0, f"matching {len(points)} points")
        match_started = time.perf_counter()
        result = match_points(fixed_pyramid, moving_pyramid, points, priors, options, progress)
        match_seconds = time.perf_counter() - match_started
        return {
            "labels": labels,
            "points_lps_mm": result.points_lps_mm,
            "similarity": result.similarity,
            "confidence": result.confidence,
            "forward_backward_mm": result.forward_backward_mm,
            "reliable": [bool(flag) for flag in result.reliable],
            "seconds": time.perf_counter() - started,
            "match_seconds": match_seconds,
            "features_cached": cached,
        }

    def _register(self, params: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        """Dense registration written to files (see :func:`MedDIFTLib.field.register_and_write`)."""
        outputs = {}
        for name in ("out_transform", "out_inverse", "out_warped"):
            value = params.get(name)
            if (value is None and name != "out_transform") or (isinstance(value, str) and value):
                outputs[name] = value
            else:
                raise BadRequestError(f"'{name}' must be an output file path")
        options = parse_options(FieldOptions, params.get("options"), "registration")
        mask = self._volume(params, "mask_id") if params.get("mask_id") is not None else None
        device = resolve_device(params.get("device", "auto"))
        fixed, moving, (fixed_pyramid, moving_pyramid), _ = self._pair(params, device, progress)
        progress("register", 0.0, "registering")
        return register_and_write(
            fixed, moving, fixed_pyramid, moving_pyramid, options=options, progress=progress, mask=mask, **outputs
        )


def _backbone_status(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Whether backbone ``name`` can be loaded and whether its weights are on this machine.

    A featurizer class that ``requires_weights`` defines ``weights_status(**options) -> (present,
    message)``.
    """
    spec = BACKBONES[name]
    try:
        spec.featurizer_class()
    except (ImportError, AttributeError) as error:
        return {"name": name, "available": False, "weights_present": False, "message": f"cannot be loaded: {error}"}
    try:
        present, message = spec.weights_status(**options)
    except Exception as error:
        present, message = False, str(error)
    return {"name": name, "available": True, "weights_present": bool(present), "message": str(message)}


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    writer = EventWriter(_claim_stdout())
    worker = Worker(writer, args.cache_bytes, args.max_request_bytes, args.max_points)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        worker.log("warning", f"{category.__name__}: {message}")

    def terminate(signum, frame) -> None:
        raise SystemExit(128 + signum)

    warnings.showwarning = show_warning
    signal.signal(signal.SIGTERM, terminate)
    reader = threading.Thread(target=worker.read_requests, args=(sys.stdin.buffer,), name="requests", daemon=True)
    worker.emit({"id": None, "event": "ready", "version": __version__, "pid": os.getpid()})
    reader.start()
    try:
        return worker.serve()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        return 130


def exit_now(code: int) -> NoReturn:
    """End the process at once: the reader thread may hold stdin's lock, which aborts a normal shutdown."""
    sys.stderr.flush()
    os._exit(code)

