"""Events of the worker protocol as typed values, parsed once from the wire.

The worker writes one JSON object per line (``{"id": ..., "event": "progress" | "log" |
"result" | "error" | "ready", ...}``); :func:`parse_event` turns each into one of the classes
below (:func:`parse_event_line` from the line's text), and nothing else reads the raw dicts.
:class:`Exit` is made by the client when the worker process ends. Imports neither torch nor numpy
(it runs inside Slicer's process).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import USER_ERRORS, MedDIFTError


class WorkerError(MedDIFTError):
    """The worker failed unexpectedly or is not running; the message holds its last stderr lines."""

    kind = "internal"


ERROR_CLASSES: dict[str, type[MedDIFTError]] = {error.kind: error for error in (*USER_ERRORS, WorkerError)}


@dataclass(frozen=True)
class Ready:
    """The worker started and reads requests."""

    version: str | None
    pid: int | None
    request_id: None = None


@dataclass(frozen=True)
class Progress:
    """How far request ``request_id`` is in ``stage``: ``fraction`` in [0, 1]."""

    request_id: str | None
    stage: str
    fraction: float
    message: str = ""


@dataclass(frozen=True)
class Log:
    """A log line of the running request (``request_id`` None between requests)."""

    request_id: str | None
    level: str
    message: str


@dataclass(frozen=True)
class Result:
    """Request ``request_id`` succeeded with ``payload`` (its result object)."""

    request_id: str | None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error:
    """Request ``request_id`` failed (``request_id`` None: a line the worker could not read as a request).

    ``kind`` is one of the keys of :data:`ERROR_CLASSES`; an unknown kind counts as ``internal``.
    """

    request_id: str | None
    kind: str
    message: str


@dataclass(frozen=True)
class Exit:
    """The worker process ended with ``returncode`` (made by the client, never sent by the worker)."""

    returncode: int | None
    request_id: None = None


Event = Ready | Progress | Log | Result | Error | Exit
FINAL_EVENTS = (Result, Error)


def error_from_event(event: Error) -> MedDIFTError:
    """The MedDIFTLib exception of an error event's kind (an unknown kind -> :class:`WorkerError`)."""
    return ERROR_CLASSES.get(event.kind, WorkerError)(event.message)


def _text(wire: Mapping[str, Any], key: str, default: str = "") -> str:
    value = wire.get(key)
    return default if value is None else str(value)


def _request_id(wire: Mapping[str, Any]) -> str | None:
    value = wire.get("id")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"event id {value!r} is not text")
    return value


def parse_event(wire: Any) -> Event:
    """The typed event of one decoded wire line.

    A ``result`` or ``error`` that is malformed becomes an ``internal`` :class:`Error` of its
    request, so a waiter always gets its final event. Raises ValueError for anything else that
    is not a worker event.
    """
    if not isinstance(wire, Mapping):
        raise ValueError(f"a worker event must be a JSON object, got {type(wire).__name__}")
    kind = wire.get("event")
    request_id = _request_id(wire)
    if kind == "result":
        payload = wire.get("result")
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            return Error(request_id, WorkerError.kind, f"the worker sent a malformed result: {payload!r:.200}")
        return Result(request_id, payload)
    if kind == "error":
        return Error(request_id, _text(wire, "kind", WorkerError.kind), _text(wire, "message", "worker error"))
    if kind == "progress":
        try:
            fraction = float(wire.get("fraction") or 0.0)
        except (TypeError, ValueError):
            raise ValueError(f"progress fraction {wire.get('fraction')!r} is not a number") from None
        return Progress(request_id, _text(wire, "stage"), min(max(fraction, 0.0), 1.0), _text(wire, "message"))
    if kind == "log":
        return Log(request_id, _text(wire, "level", "info"), _text(wire, "message"))
    if kind == "ready":
        pid, version = wire.get("pid"), wire.get("version")
        return Ready(None if version is None else str(version), pid if isinstance(pid, int) else None)
    raise ValueError(f"unknown worker event {kind!r}")


def parse_event_line(line: str | bytes) -> Event:
    """The typed event of one wire line (a JSON object); raises ValueError for anything else.

    Every reader of event lines goes through it: the worker client, and the Slicer module's
    weights transfers (``meddift weights ... --progress json`` writes the same progress events).
    """
    return parse_event(json.loads(line))


__all__ = [
    "ERROR_CLASSES",
    "FINAL_EVENTS",
    "Error",
    "Event",
    "Exit",
    "Log",
    "Progress",
    "Ready",
    "Result",
    "WorkerError",
    "error_from_event",
    "parse_event",
    "parse_event_line",
]
