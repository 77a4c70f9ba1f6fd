"""The worker's lesion jobs on the wire: track (a baseline and one follow-up) and track_series (a
baseline and several follow-ups) (torch-free).

Each request and result type with its parser and its encoder. Coordinates are LPS mm, volumes mL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...core.errors import BadRequestError
from ...core.options import FieldOptions, LesionOptions, RunSettings, SeriesOptions, parse_options, to_json
from .codec import (
    Limits,
    ResultFields,
    json_number,
    json_number_map,
    json_numbers,
    run_fields,
    run_settings,
    text,
    volume_id,
)

# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class TrackRequest:
    """Lesion tracking (:func:`MedDIFTLib.lesions.track.track_lesions`) from the ``baseline_id``
    volume into the ``followup_id`` volume. The lesions are either ``lesions``, the path of a labelmap
    on the baseline grid or a point file, as ``meddift track --lesions`` takes, or ``lesions_id``, the
    volume id of a loaded labelmap (what a client of ``meddift serve`` sends: it uploads the labelmap);
    ``out_dir`` gets the files of ``meddift track`` (:mod:`MedDIFTLib.lesions.outputs`, each written
    atomically). The ``options`` field (LesionOptions) is ``lesion_options``; ``field_options``
    (FieldOptions) becomes ``settings.field``. Result: :class:`TrackResult`. On ``meddift serve``
    ``out_dir`` is a name (:meth:`..remote.sessions.ServerSession.place_outputs`)."""

    baseline_id: str
    followup_id: str
    lesions: str | None
    out_dir: str
    lesion_options: LesionOptions
    settings: RunSettings
    lesions_id: str | None = None


@dataclass(frozen=True)
class TrackSeriesRequest:
    """Lesions followed from the ``baseline_id`` volume through the ``followup_ids`` volumes (one or
    more, in time order; :func:`MedDIFTLib.lesions.series.track_series`), each scan's features from
    the worker's cache. ``lesions`` or ``lesions_id``, ``lesion_options`` (the ``options`` field) and
    ``settings`` (with ``field_options``) as in :class:`TrackRequest`; ``series_options`` (SeriesOptions: route, RECIST
    targets) is the ``series_options`` field. ``out_dir`` gets the files of ``meddift track`` over a
    series (:mod:`MedDIFTLib.lesions.series_outputs`, each written atomically), whatever the number of
    follow-ups. Result: :class:`TrackSeriesResult`. On ``meddift serve`` as :class:`TrackRequest`."""

    baseline_id: str
    followup_ids: tuple[str, ...]
    lesions: str | None
    out_dir: str
    lesion_options: LesionOptions
    series_options: SeriesOptions
    settings: RunSettings
    lesions_id: str | None = None


def _parse_track(fields: dict[str, Any], limits: Limits) -> TrackRequest:
    field_options = parse_options(FieldOptions, fields.get("field_options"), "track field")
    lesions_id = volume_id(fields, "lesions_id", optional=True)
    lesions = text(fields, "lesions", "the path of a baseline lesion labelmap or point file",
                   optional=lesions_id is not None)
    if lesions is not None and lesions_id is not None:
        raise BadRequestError("give the lesions as 'lesions' (a file path) or 'lesions_id' (a loaded labelmap), "
                              "not both")
    return TrackRequest(
        baseline_id=volume_id(fields, "baseline_id"),
        followup_id=volume_id(fields, "followup_id"),
        lesions=lesions,
        out_dir=text(fields, "out_dir", "an output folder path"),
        lesion_options=parse_options(LesionOptions, fields.get("options"), "track"),
        settings=run_settings(fields, "track", field=field_options),
        lesions_id=lesions_id,
    )


def _parse_track_series(fields: dict[str, Any], limits: Limits) -> TrackSeriesRequest:
    """A track request's fields (:func:`_parse_track`), ``followup_ids`` for its ``followup_id``, and
    the series options."""
    followups = fields.get("followup_ids")
    if not isinstance(followups, list) or not followups or not all(isinstance(v, str) and v for v in followups):
        raise BadRequestError("'followup_ids' must be a list of one or more volume ids returned by 'load' requests "
                              "(the follow-ups in time order)")
    track = _parse_track({**fields, "followup_id": followups[0]}, limits)
    return TrackSeriesRequest(
        baseline_id=track.baseline_id,
        followup_ids=tuple(followups),
        lesions=track.lesions,
        out_dir=track.out_dir,
        lesion_options=track.lesion_options,
        series_options=parse_options(SeriesOptions, fields.get("series_options"), "track_series"),
        settings=track.settings,
        lesions_id=track.lesions_id,
    )


def _encode_track(request: TrackRequest) -> dict[str, Any]:
    return {
        "baseline_id": request.baseline_id,
        "followup_id": request.followup_id,
        "lesions": request.lesions,
        "lesions_id": request.lesions_id,
        "out_dir": request.out_dir,
        "options": to_json(request.lesion_options),
        "field_options": to_json(request.settings.field),
        **run_fields(request.settings, "track", carries="field"),
    }


def _encode_track_series(request: TrackSeriesRequest) -> dict[str, Any]:
    return {
        "baseline_id": request.baseline_id,
        "followup_ids": list(request.followup_ids),
        "lesions": request.lesions,
        "lesions_id": request.lesions_id,
        "out_dir": request.out_dir,
        "options": to_json(request.lesion_options),
        "series_options": to_json(request.series_options),
        "field_options": to_json(request.settings.field),
        **run_fields(request.settings, "track_series", carries="field"),
    }


REQUEST_PARSERS = {"track": _parse_track, "track_series": _parse_track_series}
REQUEST_ENCODERS = {TrackRequest: ("track", _encode_track),
                    TrackSeriesRequest: ("track_series", _encode_track_series)}


# ---------------------------------------------------------------------- results


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


_LESION_NUMBERS = ("confidence", "volume_baseline_ml", "volume_followup_ml", "volume_change_pct",
                   "diameter_baseline_mm", "diameter_followup_mm")
_VISIT_NUMBERS = ("confidence", "forward_backward_mm", "volume_ml", "volume_change_pct", "diameter_long_mm",
                  "diameter_short_mm", "mean_hu", "routes_apart_mm")
_RESPONSE_NUMBERS = ("sld_mm", "change_from_baseline_pct", "nadir_mm", "change_from_nadir_pct")


def _encode_track_result(result: TrackResult) -> dict[str, Any]:
    return {
        "files": dict(result.files),
        "lesions": [
            {"label": lesion.label, "name": lesion.name, "status": lesion.status, "flags": list(lesion.flags),
             **{name: json_number(getattr(lesion, name)) for name in _LESION_NUMBERS},
             "centre_lps_mm": json_numbers(lesion.centre_lps_mm)}
            for lesion in result.lesions
        ],
        "seconds": json_number_map(result.seconds),
        "features_cached": result.features_cached,
    }


def _encode_track_series_result(result: TrackSeriesResult) -> dict[str, Any]:
    return {
        "files": dict(result.files),
        "scans": list(result.scans),
        "visits": [
            {"label": visit.label, "name": visit.name, "time_point": visit.time_point, "scan": visit.scan,
             "status": visit.status, "flags": list(visit.flags), "target": visit.target, "route": visit.route,
             "centre_lps_mm": json_numbers(visit.centre_lps_mm),
             **{name: json_number(getattr(visit, name)) for name in _VISIT_NUMBERS}}
            for visit in result.visits
        ],
        "responses": [
            {"time_point": response.time_point, "scan": response.scan, "category": response.category,
             **{name: json_number(getattr(response, name)) for name in _RESPONSE_NUMBERS}}
            for response in result.responses
        ],
        "route": result.route,
        "seconds": json_number_map(result.seconds),
        "features_cached": result.features_cached,
    }


def _files(fields: ResultFields) -> dict[str, str]:
    """The ``files`` of a track result: output key -> path."""
    files = fields.get("files", lambda v: isinstance(v, Mapping) and all(isinstance(p, str) for p in v.values()),
                       "an object of file paths")
    return {str(key): path for key, path in files.items()}


def _parse_track_result(fields: ResultFields) -> TrackResult:
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


def _parse_track_series_result(fields: ResultFields) -> TrackSeriesResult:
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


RESULT_PARSERS = {"track": _parse_track_result, "track_series": _parse_track_series_result}
RESULT_ENCODERS = {TrackResult: _encode_track_result, TrackSeriesResult: _encode_track_series_result}
