"""The results of the worker protocol, typed once: one dataclass per result type (torch-free).

A handler builds its request's result as one of these dataclasses and sends what
:func:`encode_result` makes of it (a JSON-ready object); every client reads the payload back with
:func:`parse_result`, its inverse: ``parse_result(type, encode_result(result))`` equals ``result``
(arrays element-wise). A number that is not finite travels as ``null`` and reads back as NaN; a
match's missing or null ``reliable`` flag reads back as unreliable (fail closed). A payload without
the shape of its type raises :class:`MalformedResult`, naming the type and the field.

The results of ``probe`` (a diagnostic report for people), ``unload``, ``cancel`` and ``shutdown``
(one key each) stay plain JSON objects, described with their requests (:mod:`.requests`).
Coordinates are LPS mm, times seconds, volumes mL.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ...core.geometry import Geometry
from ...core.match_text import describe_match
from ..events import WorkerError


class MalformedResult(WorkerError):
    """A result payload that does not have the shape of its type (the worker misbehaved)."""


# ---------------------------------------------------------------------- result types


@dataclass(frozen=True)
class LoadResult:
    """A loaded volume: its ``volume_id`` (the same content keeps its id), ``name`` and ``geometry``."""

    volume_id: str
    name: str
    geometry: Geometry


@dataclass(frozen=True)
class FeatureLevelSummary:
    """One level of a feature pyramid: ``channels`` on a grid of ``shape_ijk`` voxels."""

    name: str
    channels: int
    shape_ijk: tuple[int, int, int]


@dataclass(frozen=True)
class FeaturesResult:
    """A volume's features: found in the cache or not, ``seconds`` taken, ``nbytes`` held, their levels."""

    cached: bool
    seconds: float
    nbytes: int
    levels: list[FeatureLevelSummary]


@dataclass(frozen=True)
class MatchResult:
    """The matches of the fixed points, one row per fixed ``labels`` entry; a row without a finite
    point is missing. ``points_lps_mm`` (N, 3) LPS mm, ``similarity`` and ``confidence`` in [0, 1],
    ``forward_backward_mm`` mm, ``reliable`` per row (see :mod:`MedDIFTLib.matching.correspondences`),
    ``seconds`` the whole request, ``match_seconds`` the search alone."""

    labels: list[str]
    points_lps_mm: np.ndarray
    similarity: np.ndarray
    confidence: np.ndarray
    forward_backward_mm: np.ndarray
    reliable: np.ndarray
    seconds: float = math.nan
    match_seconds: float = math.nan
    features_cached: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def found(self, row: int) -> bool:
        return bool(np.isfinite(self.points_lps_mm[row]).all())

    def usable(self, row: int) -> bool:
        """Found and reliable."""
        return self.found(row) and bool(self.reliable[row])

    def description(self, row: int) -> str:
        """Text for the row: the library's one match description, or that there is no match."""
        if not self.found(row):
            return "MedDIFT: no match"
        return describe_match(float(self.confidence[row]), float(self.forward_backward_mm[row]), self.usable(row))


@dataclass(frozen=True)
class RegisterResult:
    """A registration's output files (``transform``; ``inverse`` and ``warped`` None when not asked)
    and the summary of :func:`MedDIFTLib.field.register_and_write`: Jacobian determinant statistics
    (``min``, ``max``, ``mean``, ``std``, ``fraction_folding``, ``folding_voxels``), displacement
    magnitude ``mean`` and ``max`` in mm, seconds per step."""

    transform: str
    inverse: str | None
    warped: str | None
    jacobian: dict[str, float]
    displacement_mm: dict[str, float]
    seconds: dict[str, float]

    @property
    def output_files(self) -> dict[str, str]:
        """The written files by output name (``transform``, ``inverse``, ``warped``)."""
        return {name: path for name in ("transform", "inverse", "warped") if (path := getattr(self, name))}

    def moved(self, paths: Mapping[str, str]) -> RegisterResult:
        """This result with the output files named in ``paths`` (output name -> path) there."""
        return dataclasses.replace(self, **paths)


@dataclass(frozen=True)
class OverlaySummary:
    """One QA overlay volume written to ``path``: its ``min``, ``max`` and ``mean`` voxel."""

    path: str
    min: float
    max: float
    mean: float


@dataclass(frozen=True)
class OverlaysResult:
    """The QA overlays written, by name (``confidence``, ``jacobian``, ``magnitude``)."""

    overlays: dict[str, OverlaySummary]

    @property
    def output_files(self) -> dict[str, str]:
        return {name: summary.path for name, summary in self.overlays.items()}

    def moved(self, paths: Mapping[str, str]) -> OverlaysResult:
        """This result with the overlays named in ``paths`` (name -> path) there."""
        return OverlaysResult({name: dataclasses.replace(summary, path=paths.get(name, summary.path))
                               for name, summary in self.overlays.items()})


@dataclass(frozen=True)
class TrackedLesion:
    """One lesion of a ``track`` result, as a row of ``lesions.csv`` (:mod:`MedDIFTLib.lesions.outputs`)
    with its name and flags: volumes in mL, longest axial diameters in mm, changes in percent,
    ``confidence`` of the centre match in [0, 1], ``centre_lps_mm`` its follow-up centre (LPS mm)."""

    label: int
    name: str
    status: str
    flags: list[str]
    confidence: float
    volume_baseline_ml: float
    volume_followup_ml: float
    volume_change_pct: float
    diameter_baseline_mm: float
    diameter_followup_mm: float
    centre_lps_mm: tuple[float, float, float]


_WithFiles = TypeVar("_WithFiles", bound="_FilesByKey")


class _FilesByKey:
    """The output files of a result dataclass whose ``files`` field maps output keys to paths."""

    files: dict[str, str]

    @property
    def output_files(self) -> dict[str, str]:
        return dict(self.files)

    def moved(self: _WithFiles, paths: Mapping[str, str]) -> _WithFiles:
        """This result with the files named in ``paths`` (key -> path) there."""
        return dataclasses.replace(self, files={**self.files, **paths})


@dataclass(frozen=True)
class TrackResult(_FilesByKey):
    """The files of ``meddift track`` by key (labelmap, csv, report, sheet), the lesions, seconds
    per step and whether both volumes' features came from the cache."""

    files: dict[str, str]
    lesions: list[TrackedLesion] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    features_cached: bool = False


@dataclass(frozen=True)
class SeriesVisit:
    """One lesion at one time point of a ``track_series`` result, as a row of its ``lesions.csv``
    (:mod:`MedDIFTLib.lesions.series_outputs`): ``time_point`` 0 = baseline, ``scan`` its name,
    ``centre_lps_mm`` (at baseline the centre of mass, at a follow-up the engine's match), the match's
    ``confidence`` in [0, 1] and ``forward_backward_mm`` (NaN at baseline), ``volume_ml``, its change
    from baseline in percent, the longest axial diameter and its perpendicular (mm; NaN for a lesion
    gone), ``mean_hu``, whether it is a RECIST ``target``, its flags, the ``route`` kept (``""`` at
    baseline) and how far apart the two routes of ``auto`` put its centre (mm; NaN otherwise)."""

    label: int
    name: str
    time_point: int
    scan: str
    status: str
    flags: list[str]
    target: bool
    route: str
    centre_lps_mm: tuple[float, float, float]
    confidence: float
    forward_backward_mm: float
    volume_ml: float
    volume_change_pct: float
    diameter_long_mm: float
    diameter_short_mm: float
    mean_hu: float
    routes_apart_mm: float


@dataclass(frozen=True)
class TimePointResponse:
    """The RECIST 1.1 response at one time point, as a row of ``response.csv``: the sum of the target
    lesions' longest diameters (``sld_mm``), the nadir (mm) and the changes from baseline and nadir
    (%; NaN where the reference is 0); ``category`` CR, PR, SD, PD or NE, None at baseline."""

    time_point: int
    scan: str
    sld_mm: float
    change_from_baseline_pct: float
    nadir_mm: float
    change_from_nadir_pct: float
    category: str | None


@dataclass(frozen=True)
class TrackSeriesResult(_FilesByKey):
    """The files of ``meddift track`` over a series by key (``labelmap_<k>`` for follow-up k, csv,
    response, report, growth, sheet), the scans' names (baseline first), one visit per lesion and time
    point (lesion by lesion, each through time), the response per time point, the ``route`` option,
    seconds per step and whether every scan's features came from the cache."""

    files: dict[str, str]
    scans: list[str] = field(default_factory=list)
    visits: list[SeriesVisit] = field(default_factory=list)
    responses: list[TimePointResponse] = field(default_factory=list)
    route: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    features_cached: bool = False


WorkerResult = (LoadResult | FeaturesResult | MatchResult | RegisterResult | OverlaysResult | TrackResult
                | TrackSeriesResult)


# ---------------------------------------------------------------------- encoding


def encode_result(result: WorkerResult) -> dict[str, Any]:
    """The JSON-ready payload of ``result`` (non-finite numbers as None): the inverse of :func:`parse_result`."""
    encode = _ENCODERS.get(type(result))
    if encode is None:
        raise TypeError(f"{type(result).__name__} is not a result of the worker protocol")
    return encode(result)


def json_number(value: float) -> float | None:
    """``value`` as JSON holds it: a float, or None when it is not finite."""
    return float(value) if math.isfinite(value) else None


def _numbers(values: Sequence[float] | np.ndarray) -> list[float | None]:
    return [json_number(value) for value in np.asarray(values, dtype=float).ravel()]


def _number_map(values: Mapping[str, float]) -> dict[str, float | None]:
    return {str(name): value if isinstance(value, int) else json_number(value) for name, value in values.items()}


def _encode_load(result: LoadResult) -> dict[str, Any]:
    geometry = result.geometry
    return {"volume_id": result.volume_id, "name": result.name,
            "geometry": {"shape_ijk": list(geometry.shape_ijk), "spacing_mm": list(geometry.spacing_mm),
                         "origin_lps_mm": list(geometry.origin_lps_mm), "direction": list(geometry.direction)}}


def _encode_features(result: FeaturesResult) -> dict[str, Any]:
    return {"cached": result.cached, "seconds": json_number(result.seconds), "bytes": result.nbytes,
            "levels": [{"name": level.name, "channels": level.channels, "shape_ijk": list(level.shape_ijk)}
                       for level in result.levels]}


def _encode_match(result: MatchResult) -> dict[str, Any]:
    return {
        "labels": list(result.labels),
        "points_lps_mm": [_numbers(row) for row in np.asarray(result.points_lps_mm, dtype=float).reshape(-1, 3)],
        "similarity": _numbers(result.similarity),
        "confidence": _numbers(result.confidence),
        "forward_backward_mm": _numbers(result.forward_backward_mm),
        "reliable": [bool(flag) for flag in result.reliable],
        "seconds": json_number(result.seconds),
        "match_seconds": json_number(result.match_seconds),
        "features_cached": result.features_cached,
    }


def _encode_register(result: RegisterResult) -> dict[str, Any]:
    return {"transform": result.transform, "inverse": result.inverse, "warped": result.warped,
            "jacobian": _number_map(result.jacobian), "displacement_mm": _number_map(result.displacement_mm),
            "seconds": _number_map(result.seconds)}


def _encode_overlays(result: OverlaysResult) -> dict[str, Any]:
    return {name: {"path": summary.path, "min": json_number(summary.min), "max": json_number(summary.max),
                   "mean": json_number(summary.mean)} for name, summary in result.overlays.items()}


def _encode_track(result: TrackResult) -> dict[str, Any]:
    return {
        "files": dict(result.files),
        "lesions": [
            {"label": lesion.label, "name": lesion.name, "status": lesion.status, "flags": list(lesion.flags),
             **{name: json_number(getattr(lesion, name)) for name in _LESION_NUMBERS},
             "centre_lps_mm": _numbers(lesion.centre_lps_mm)}
            for lesion in result.lesions
        ],
        "seconds": _number_map(result.seconds),
        "features_cached": result.features_cached,
    }


def _encode_track_series(result: TrackSeriesResult) -> dict[str, Any]:
    return {
        "files": dict(result.files),
        "scans": list(result.scans),
        "visits": [
            {"label": visit.label, "name": visit.name, "time_point": visit.time_point, "scan": visit.scan,
             "status": visit.status, "flags": list(visit.flags), "target": visit.target, "route": visit.route,
             "centre_lps_mm": _numbers(visit.centre_lps_mm),
             **{name: json_number(getattr(visit, name)) for name in _VISIT_NUMBERS}}
            for visit in result.visits
        ],
        "responses": [
            {"time_point": response.time_point, "scan": response.scan, "category": response.category,
             **{name: json_number(getattr(response, name)) for name in _RESPONSE_NUMBERS}}
            for response in result.responses
        ],
        "route": result.route,
        "seconds": _number_map(result.seconds),
        "features_cached": result.features_cached,
    }


_LESION_NUMBERS = ("confidence", "volume_baseline_ml", "volume_followup_ml", "volume_change_pct",
                   "diameter_baseline_mm", "diameter_followup_mm")
_VISIT_NUMBERS = ("confidence", "forward_backward_mm", "volume_ml", "volume_change_pct", "diameter_long_mm",
                  "diameter_short_mm", "mean_hu", "routes_apart_mm")
_RESPONSE_NUMBERS = ("sld_mm", "change_from_baseline_pct", "nadir_mm", "change_from_nadir_pct")


# ---------------------------------------------------------------------- parsing


def parse_result(request_type: str, payload: Any) -> WorkerResult:
    """The typed result of a ``request_type`` request from its payload; raises :class:`MalformedResult`.
    Only the request types with a typed result (:data:`RESULT_TYPES`) have one."""
    parse = _PARSERS.get(request_type)
    if parse is None:
        raise ValueError(f"a {request_type!r} request has no typed result; use one of {', '.join(_PARSERS)}")
    return parse(_Fields(payload, f"{request_type} result"))


class _Fields:
    """The fields of one result object; each reader raises :class:`MalformedResult` naming the field."""

    def __init__(self, payload: Any, what: str) -> None:
        if not isinstance(payload, Mapping):
            raise MalformedResult(f"the worker returned a malformed {what}: not a JSON object")
        self.payload = payload
        self.what = what

    def malformed(self, name: str, meaning: str) -> MalformedResult:
        return MalformedResult(f"the worker returned a malformed {self.what}: '{name}' must be {meaning}")

    def get(self, name: str, check: Callable[[Any], bool], meaning: str) -> Any:
        value = self.payload.get(name)
        if not check(value):
            raise self.malformed(name, meaning)
        return value

    def text(self, name: str, optional: bool = False) -> str | None:
        return self.get(name, lambda v: isinstance(v, str) or (optional and v is None),
                        "a string" + (" or null" if optional else ""))

    def texts(self, name: str) -> list[str]:
        """A list of strings."""
        return list(self.get(name, lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
                             "a list of strings"))

    def flag(self, name: str) -> bool:
        return self.get(name, lambda v: isinstance(v, bool), "true or false")

    def whole(self, name: str) -> int:
        return self.get(name, _is_whole, "a whole number")

    def number(self, name: str) -> float:
        """A number; null reads as NaN."""
        return _float(self.get(name, _is_number, "a number or null"))

    def numbers(self, name: str, count: int | None = None) -> np.ndarray:
        """A list of numbers or nulls (NaN), ``count`` of them when given."""
        values = self.get(name, lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers")
        if count is not None and len(values) != count:
            raise MalformedResult(f"the worker returned a malformed {self.what}: '{name}' has {len(values)} "
                                  f"values, not {count}")
        return np.array([_float(value) for value in values], dtype=float)

    def number_map(self, name: str) -> dict[str, float]:
        """An object of numbers (whole numbers stay whole; null reads as NaN)."""
        values = self.get(name, lambda v: isinstance(v, Mapping) and all(map(_is_number, v.values())),
                          "an object of numbers")
        return {str(key): value if _is_whole(value) else _float(value) for key, value in values.items()}

    def wholes(self, name: str, count: int) -> tuple[int, ...]:
        """A list of ``count`` whole numbers."""
        return tuple(self.get(name, lambda v: isinstance(v, list) and len(v) == count and all(map(_is_whole, v)),
                              f"a list of {count} whole numbers"))

    def object(self, name: str) -> _Fields:
        """An object, read as its own fields."""
        return _Fields(self.payload.get(name), f"{self.what} ({name})")

    def objects(self, name: str) -> list[_Fields]:
        """A list of objects, each read as its own fields."""
        items = self.get(name, lambda v: isinstance(v, list), "a list of objects")
        return [_Fields(item, f"{self.what} ({name}[{index}])") for index, item in enumerate(items)]


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _parse_load(fields: _Fields) -> LoadResult:
    geometry = fields.object("geometry")
    parsed = Geometry.create(geometry.wholes("shape_ijk", 3), geometry.numbers("spacing_mm", 3),
                             geometry.numbers("origin_lps_mm", 3), geometry.numbers("direction", 9))
    return LoadResult(fields.text("volume_id"), fields.text("name"), parsed)


def _parse_features(fields: _Fields) -> FeaturesResult:
    levels = [FeatureLevelSummary(level.text("name"), level.whole("channels"), level.wholes("shape_ijk", 3))
              for level in fields.objects("levels")]
    return FeaturesResult(fields.flag("cached"), fields.number("seconds"), fields.whole("bytes"), levels)


def _parse_match(fields: _Fields) -> MatchResult:
    labels = [str(label) for label in fields.get("labels", lambda v: isinstance(v, list), "a list of labels")]
    count = len(labels)
    rows = fields.get("points_lps_mm", lambda v: isinstance(v, list), "a list of [l, p, s] points or nulls")
    if len(rows) != count:
        raise MalformedResult(f"the worker returned a malformed {fields.what}: {len(rows)} points for {count} labels")
    points = np.full((count, 3), math.nan)
    for row, point in enumerate(rows):
        if point is None:
            continue
        if not isinstance(point, list) or len(point) != 3 or not all(map(_is_number, point)):
            raise fields.malformed("points_lps_mm", "a list of [l, p, s] points or nulls")
        points[row] = [_float(value) for value in point]
    reliable = fields.payload.get("reliable")
    if reliable is None:
        reliable = [False] * count
    if not isinstance(reliable, list) or len(reliable) != count:
        raise fields.malformed("reliable", f"a list of {count} flags")
    return MatchResult(
        labels=labels,
        points_lps_mm=points,
        similarity=fields.numbers("similarity", count),
        confidence=fields.numbers("confidence", count),
        forward_backward_mm=fields.numbers("forward_backward_mm", count),
        reliable=np.array([flag is True for flag in reliable], dtype=bool),
        seconds=fields.number("seconds"),
        match_seconds=fields.number("match_seconds"),
        features_cached=fields.flag("features_cached"),
    )


def _parse_register(fields: _Fields) -> RegisterResult:
    return RegisterResult(
        transform=fields.text("transform"),
        inverse=fields.text("inverse", optional=True),
        warped=fields.text("warped", optional=True),
        jacobian=fields.number_map("jacobian"),
        displacement_mm=fields.number_map("displacement_mm"),
        seconds=fields.number_map("seconds"),
    )


def _parse_overlays(fields: _Fields) -> OverlaysResult:
    overlays = {}
    for name in fields.payload:
        summary = fields.object(name)
        overlays[str(name)] = OverlaySummary(summary.text("path"), summary.number("min"), summary.number("max"),
                                             summary.number("mean"))
    return OverlaysResult(overlays)


def _files(fields: _Fields) -> dict[str, str]:
    """The ``files`` of a track result: output key -> path."""
    files = fields.get("files", lambda v: isinstance(v, Mapping) and all(isinstance(p, str) for p in v.values()),
                       "an object of file paths")
    return {str(key): path for key, path in files.items()}


def _parse_track(fields: _Fields) -> TrackResult:
    files = _files(fields)
    lesions = [
        TrackedLesion(
            label=lesion.whole("label"),
            name=lesion.text("name"),
            status=lesion.text("status"),
            flags=[str(flag) for flag in lesion.get("flags", lambda v: isinstance(v, list), "a list of flags")],
            **{name: lesion.number(name) for name in _LESION_NUMBERS},
            centre_lps_mm=tuple(float(value) for value in lesion.numbers("centre_lps_mm", 3)),
        )
        for lesion in fields.objects("lesions")
    ]
    return TrackResult(files, lesions, fields.number_map("seconds"), fields.flag("features_cached"))


def _parse_track_series(fields: _Fields) -> TrackSeriesResult:
    visits = [
        SeriesVisit(
            label=visit.whole("label"),
            name=visit.text("name"),
            time_point=visit.whole("time_point"),
            scan=visit.text("scan"),
            status=visit.text("status"),
            flags=visit.texts("flags"),
            target=visit.flag("target"),
            route=visit.text("route"),
            centre_lps_mm=tuple(float(value) for value in visit.numbers("centre_lps_mm", 3)),
            **{name: visit.number(name) for name in _VISIT_NUMBERS},
        )
        for visit in fields.objects("visits")
    ]
    responses = [
        TimePointResponse(
            time_point=response.whole("time_point"),
            scan=response.text("scan"),
            category=response.text("category", optional=True),
            **{name: response.number(name) for name in _RESPONSE_NUMBERS},
        )
        for response in fields.objects("responses")
    ]
    return TrackSeriesResult(_files(fields), fields.texts("scans"), visits, responses, fields.text("route"),
                             fields.number_map("seconds"), fields.flag("features_cached"))


_ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {
    LoadResult: _encode_load,
    FeaturesResult: _encode_features,
    MatchResult: _encode_match,
    RegisterResult: _encode_register,
    OverlaysResult: _encode_overlays,
    TrackResult: _encode_track,
    TrackSeriesResult: _encode_track_series,
}
_PARSERS: dict[str, Callable[[_Fields], WorkerResult]] = {
    "load": _parse_load,
    "features": _parse_features,
    "match": _parse_match,
    "register": _parse_register,
    "overlays": _parse_overlays,
    "track": _parse_track,
    "track_series": _parse_track_series,
}
RESULT_TYPES = tuple(_PARSERS)
"""The request types whose results are typed here."""
