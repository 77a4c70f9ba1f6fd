"""The requests of the worker protocol: every request type, and the one parser and encoder of them
all (torch-free).

Each job family defines its request dataclasses with their parsers and encoders
(:mod:`.volume_jobs`, :mod:`.pair_jobs`, :mod:`.lesion_jobs`, :mod:`.control`); this module reads a
line (:func:`parse_line`), dispatches by type (:func:`parse_request`, :func:`encode_request`) and
names every request type for its callers. Fields a request type does not use are ignored.
:func:`parse_request` builds each dataclass from its fields and checks every field once (types,
shapes, limits; option ranges through :func:`MedDIFTLib.core.options.parse_options`). What needs
the worker's state (does a volume id exist, does a device exist) is checked when the job runs.
Clients build their requests as these dataclasses too and send what :func:`encode_request`, the
inverse of :func:`parse_request`, makes of them: no client writes a request's fields by hand.
Coordinates are LPS mm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ...core.errors import BadRequestError
from . import control, lesion_jobs, pair_jobs, volume_jobs
from .codec import DEFAULT_LIMITS, MAX_REQUEST_BYTES, Limits
from .control import CancelRequest, ShutdownRequest
from .lesion_jobs import TrackRequest, TrackSeriesRequest
from .pair_jobs import MatchRequest, OverlaysRequest, RegisterRequest
from .volume_jobs import FeaturesRequest, LoadRequest, ProbeRequest, UnloadRequest

__all__ = [
    "DEFAULT_LIMITS", "MAX_REQUEST_BYTES", "REQUEST_TYPES", "CancelRequest", "FeaturesRequest", "Limits",
    "LoadRequest", "MatchRequest", "OverlaysRequest", "ProbeRequest", "RegisterRequest", "RejectedRequest", "Request",
    "ShutdownRequest", "TrackRequest", "TrackSeriesRequest", "UnloadRequest", "encode_request", "parse_line",
    "parse_request", "type_of",
]

Request = (
    ProbeRequest
    | LoadRequest
    | UnloadRequest
    | FeaturesRequest
    | MatchRequest
    | RegisterRequest
    | OverlaysRequest
    | TrackRequest
    | TrackSeriesRequest
    | CancelRequest
    | ShutdownRequest
)

_FAMILIES = (volume_jobs, pair_jobs, lesion_jobs, control)
_PARSERS: dict[str, Callable[[dict[str, Any], Limits], Request]] = {
    request_type: parse for family in _FAMILIES for request_type, parse in family.REQUEST_PARSERS.items()
}
_ENCODERS: dict[type, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    request_class: typed_encoder for family in _FAMILIES
    for request_class, typed_encoder in family.REQUEST_ENCODERS.items()
}
REQUEST_TYPES = tuple(_PARSERS)


class RejectedRequest(BadRequestError):
    """A request line refused before it becomes a job; ``request_id`` is None when it is unknown."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes) -> tuple[str, str, dict[str, Any]]:
    """``(id, type, fields)`` of one request line; raises :class:`RejectedRequest`."""
    try:
        request = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise RejectedRequest(f"malformed JSON request: {error}") from None
    if not isinstance(request, dict):
        raise RejectedRequest("a request must be a JSON object")
    request_id = request.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise RejectedRequest("every request needs a non-empty string 'id'")
    request_type = request.get("type")
    if request_type not in REQUEST_TYPES:
        raise RejectedRequest(_unknown_type(request_type), request_id)
    fields = {key: value for key, value in request.items() if key not in ("id", "type")}
    return request_id, request_type, fields


def parse_request(request_type: str, fields: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Request:
    """The typed request of ``request_type``; bad fields raise :class:`BadRequestError` (type or
    shape) or :class:`BadInputError` (an option out of range), naming the field."""
    if request_type not in REQUEST_TYPES:
        raise BadRequestError(_unknown_type(request_type))
    return _PARSERS[request_type](fields, limits)


def _unknown_type(request_type: Any) -> str:
    return f"unknown request type {request_type!r}; use one of {', '.join(REQUEST_TYPES)}"


def encode_request(request: Request) -> tuple[str, dict[str, Any]]:
    """``(type, fields)`` of ``request``, JSON-ready: the inverse of :func:`parse_request`, so
    ``parse_request(*encode_request(request)) == request``; the line is ``{"id", "type", **fields}``.

    An optional field that is None is left out (every reader takes absent for null). Options travel
    whole (:func:`~MedDIFTLib.core.options.to_json`). ``settings`` travel as ``backbone``,
    ``backbone_options`` and ``device``, plus the one part of them a type carries: ``settings.match``
    (match, as ``options``) or ``settings.field`` (register, as ``options``; track, as
    ``field_options``). A part a type does not carry must be left at its default, since the worker
    would not see it; so must a load's ``volume``, set only by the server. Either raises ValueError."""
    request_type, encode = _typed_encoder(request)
    return request_type, {name: value for name, value in encode(request).items() if value is not None}


def type_of(request: Request) -> str:
    """The wire's type of ``request`` (``"match"`` for a :class:`MatchRequest`): what
    :func:`~.results.parse_result` reads its result as."""
    return _typed_encoder(request)[0]


def _typed_encoder(request: Request) -> tuple[str, Callable[[Any], dict[str, Any]]]:
    typed_encoder = _ENCODERS.get(type(request))
    if typed_encoder is None:
        raise TypeError(f"{type(request).__name__} is not a request of the worker protocol")
    return typed_encoder
