"""The requests that steer the worker's job queue on the wire: cancel and shutdown (torch-free).

Each request type with its parser and its encoder; their results stay plain JSON objects of one
key, described with their requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...core.errors import BadRequestError
from .codec import Limits


@dataclass(frozen=True)
class CancelRequest:
    """Cancel ``job_id``, or else the running or the oldest queued job. Result: ``cancelled`` (that
    job's id or null); the cancelled job ends with an ``error`` of kind ``cancelled``."""

    job_id: str | None


@dataclass(frozen=True)
class ShutdownRequest:
    """Result ``{"shutdown": true}`` once the jobs queued before it are done; later ones are
    answered ``cancelled``."""


def _parse_cancel(fields: dict[str, Any], limits: Limits) -> CancelRequest:
    job_id = fields.get("job_id")
    if job_id is not None and not isinstance(job_id, str):
        raise BadRequestError("'job_id' must be the id of a request sent before")
    return CancelRequest(job_id)


def _parse_shutdown(fields: dict[str, Any], limits: Limits) -> ShutdownRequest:
    return ShutdownRequest()


def _encode_cancel(request: CancelRequest) -> dict[str, Any]:
    return {"job_id": request.job_id}


def _encode_shutdown(request: ShutdownRequest) -> dict[str, Any]:
    return {}


REQUEST_PARSERS = {"cancel": _parse_cancel, "shutdown": _parse_shutdown}
REQUEST_ENCODERS = {CancelRequest: ("cancel", _encode_cancel), ShutdownRequest: ("shutdown", _encode_shutdown)}
