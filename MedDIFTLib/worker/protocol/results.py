"""The results of the worker protocol: every typed result, and the one parser and encoder of them
all (torch-free).

Each job family defines its result dataclasses with their parsers and encoders
(:mod:`.volume_jobs`, :mod:`.pair_jobs`, :mod:`.lesion_jobs`); this module dispatches by type and
names every result type for its callers. A handler builds its request's result as one of these
dataclasses and sends what :func:`encode_result` makes of it (a JSON-ready object); every client
reads the payload back with :func:`parse_result`, its inverse: ``parse_result(type,
encode_result(result))`` equals ``result`` (arrays element-wise). A number that is not finite
travels as ``null`` and reads back as NaN. A payload without the shape of its type raises
:class:`MalformedResult`, naming the type and the field.

The results of ``probe``, ``unload``, ``cancel`` and ``shutdown`` stay plain JSON objects,
described with their requests (:mod:`.requests`). Coordinates are LPS mm, times seconds, volumes mL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import lesion_jobs, pair_jobs, volume_jobs
from .codec import MalformedResult, ResultFields, json_number
from .lesion_jobs import SeriesVisit, TimePointResponse, TrackedLesion, TrackResult, TrackSeriesResult
from .pair_jobs import MatchResult, OverlaysResult, OverlaySummary, RegisterResult
from .volume_jobs import FeatureLevelSummary, FeaturesResult, LoadResult

__all__ = [
    "RESULT_TYPES", "FeatureLevelSummary", "FeaturesResult", "LoadResult", "MalformedResult", "MatchResult",
    "OverlaySummary", "OverlaysResult", "RegisterResult", "SeriesVisit", "TimePointResponse", "TrackResult",
    "TrackSeriesResult", "TrackedLesion", "WorkerResult", "encode_result", "json_number", "parse_result",
]

WorkerResult = (LoadResult | FeaturesResult | MatchResult | RegisterResult | OverlaysResult | TrackResult
                | TrackSeriesResult)

_FAMILIES = (volume_jobs, pair_jobs, lesion_jobs)
_PARSERS: dict[str, Callable[[ResultFields], WorkerResult]] = {
    request_type: parse for family in _FAMILIES for request_type, parse in family.RESULT_PARSERS.items()
}
_ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {
    result_class: encode for family in _FAMILIES for result_class, encode in family.RESULT_ENCODERS.items()
}
RESULT_TYPES = tuple(_PARSERS)
"""The request types whose results are typed here."""


def encode_result(result: WorkerResult) -> dict[str, Any]:
    """The JSON-ready payload of ``result`` (non-finite numbers as None): the inverse of :func:`parse_result`."""
    encode = _ENCODERS.get(type(result))
    if encode is None:
        raise TypeError(f"{type(result).__name__} is not a result of the worker protocol")
    return encode(result)


def parse_result(request_type: str, payload: Any) -> WorkerResult:
    """The typed result of a ``request_type`` request from its payload; raises :class:`MalformedResult`.
    Only the request types with a typed result (:data:`RESULT_TYPES`) have one."""
    parse = _PARSERS.get(request_type)
    if parse is None:
        raise ValueError(f"a {request_type!r} request has no typed result; use one of {', '.join(_PARSERS)}")
    return parse(ResultFields(payload, f"{request_type} result"))
