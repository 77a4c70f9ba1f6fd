"""The worker's streams: request lines read with a bound, event lines written back (torch-free).

Events: ``ready`` (once, id null), ``progress`` (stage, fraction in [0, 1], message), ``log``
(level, message), ``result`` (result) and ``error`` (kind, message; kinds in
:data:`MedDIFTLib.core.errors.ERROR_KINDS`). Every event carries its request id; a ``result`` or
``error`` ends the request. NaN and infinity in events become ``null``. The requests themselves are
defined in :mod:`.protocol`.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from typing import Any, BinaryIO

import numpy as np

from .protocol.requests import RejectedRequest

_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.){0,256}")')


# ---------------------------------------------------------------------- lines in


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


def oversized(head: bytes, limit: int) -> RejectedRequest:
    """The refusal of a line over ``limit`` bytes, with its id when the line starts ``{"id": "..."``."""
    request_id = None
    found = _LEADING_ID.match(head)
    if found is not None:
        try:
            request_id = json.loads(found.group(1))
        except ValueError:
            request_id = None
    message = f"request longer than {limit} bytes rejected; send fewer points per request"
    return RejectedRequest(message, request_id)


# ---------------------------------------------------------------------- events out


def ready_event(version: str, pid: int) -> dict[str, Any]:
    return {"id": None, "event": "ready", "version": version, "pid": pid}


def progress_event(request_id: str | None, stage: str, fraction: float, message: str = "") -> dict[str, Any]:
    """Progress of a request; ``fraction`` is clipped to [0, 1]."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    return {"id": request_id, "event": "progress", "stage": stage, "fraction": fraction, "message": message}


def log_event(request_id: str | None, level: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "event": "log", "level": level, "message": message}


def result_event(request_id: str | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "event": "result", "result": result}


def error_event(request_id: str | None, kind: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "event": "error", "kind": kind, "message": message}


def json_safe(value: Any) -> Any:
    """``value`` with NumPy turned into Python, tuples into lists and non-finite floats into None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class EventWriter:
    """Writes events as JSON lines to the protocol stream, one writer at a time."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def emit(self, event: dict[str, Any]) -> bool:
        """Write one event; False once the reader has gone away. Raises TypeError if not serialisable."""
        line = json.dumps(json_safe(event), allow_nan=False).encode() + b"\n"
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
