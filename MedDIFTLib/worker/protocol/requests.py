"""The requests of the worker protocol, typed once: one dataclass per request type (torch-free).

Fields a request type does not use are ignored. :func:`parse_request` builds each dataclass from its
fields and checks every field once (types, shapes, limits; option ranges through
:func:`MedDIFTLib.core.options.parse_options`). What needs the worker's state (does a volume id
exist, does a device exist) is checked when the job runs. Clients build their requests as these
dataclasses too and send what :func:`encode_request`, the inverse of :func:`parse_request`, makes of
them: no client writes a request's fields by hand. Coordinates are LPS mm.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.budget import MAX_POINTS
from ...core.errors import BadRequestError
from ...core.options import (
    FieldLevel,
    FieldOptions,
    LesionOptions,
    MatchOptions,
    RunSettings,
    SeriesOptions,
    parse_options,
    to_json,
)

MAX_REQUEST_BYTES = 16 * 2**20
# The ``kind`` of an error event: the ``kind`` of a MedDIFTLib.core.errors class.


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: bytes of its line and number of points it carries."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    max_points: int = MAX_POINTS


DEFAULT_LIMITS = Limits()


class RejectedRequest(BadRequestError):
    """A request line refused before it becomes a job; ``request_id`` is None when it is unknown."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ProbeRequest:
    """``backbone_options``: {backbone: options} for the weights check. Result: versions,
    ``devices`` (name, label, memory_bytes, free_bytes), ``backbones`` (name, available,
    weights_present, message), ``cache`` (max_bytes, used_bytes, entries), ``volumes``, ``limits``."""

    backbone_options: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class LoadRequest:
    """Read a volume file or DICOM folder. Result: :class:`~.results.LoadResult`.

    ``volume`` (a :class:`MedDIFTLib.core.io.Volume`) is set only by the HTTP server, from an
    upload; ``path`` then holds the volume's name. No wire line can set it."""

    path: str
    volume: Any = None


@dataclass(frozen=True)
class UnloadRequest:
    """Forget a volume. Result: ``unloaded`` (false if the id was unknown)."""

    volume_id: str


@dataclass(frozen=True)
class FeaturesRequest:
    """Features of one volume with ``settings`` (fields ``backbone`` (default mind),
    ``backbone_options``, ``device``: auto | cpu | cuda | cuda:N). Result: :class:`~.results.FeaturesResult`."""

    volume_id: str
    settings: RunSettings


@dataclass(frozen=True)
class MatchRequest:
    """Fixed points (N, 3 LPS mm) matched into the moving volume; ``labels`` pair inputs with
    outputs; ``priors_lps_mm`` (N, 3) centres each search; the ``options`` field (MatchOptions)
    becomes ``settings.match``. Result: :class:`~.results.MatchResult`."""

    fixed_id: str
    moving_id: str
    points_lps_mm: np.ndarray
    labels: list[Any]
    priors_lps_mm: np.ndarray | None
    settings: RunSettings


@dataclass(frozen=True)
class RegisterRequest:
    """Dense registration; the ``options`` field (FieldOptions) becomes ``settings.field``; only
    ``out_transform`` is required. Result: :class:`~.results.RegisterResult` (outputs written atomically)."""

    fixed_id: str
    moving_id: str
    out_transform: str
    out_inverse: str | None
    out_warped: str | None
    mask_id: str | None
    settings: RunSettings


@dataclass(frozen=True)
class TrackRequest:
    """Lesion tracking (:func:`MedDIFTLib.lesions.track.track_lesions`) from the ``baseline_id``
    volume into the ``followup_id`` volume. The lesions are either ``lesions``, the path of a labelmap
    on the baseline grid or a point file, as ``meddift track --lesions`` takes, or ``lesions_id``, the
    volume id of a loaded labelmap (what a client of ``meddift serve`` sends: it uploads the labelmap);
    ``out_dir`` gets the files of ``meddift track`` (:mod:`MedDIFTLib.lesions.outputs`, each written
    atomically). The ``options`` field (LesionOptions) is ``lesion_options``; ``field_options``
    (FieldOptions) becomes ``settings.field``. Result: :class:`~.results.TrackResult`. On ``meddift
    serve`` ``out_dir`` is a name (:mod:`.remote.app`)."""

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
    follow-ups. Result: :class:`~.results.TrackSeriesResult`. On ``meddift serve`` as :class:`TrackRequest`."""

    baseline_id: str
    followup_ids: tuple[str, ...]
    lesions: str | None
    out_dir: str
    lesion_options: LesionOptions
    series_options: SeriesOptions
    settings: RunSettings
    lesions_id: str | None = None


@dataclass(frozen=True)
class CancelRequest:
    """Cancel ``job_id``, or else the running or the oldest queued job. Result: ``cancelled`` (that
    job's id or null); the cancelled job ends with an ``error`` of kind ``cancelled``."""

    job_id: str | None


@dataclass(frozen=True)
class OverlaysRequest:
    """QA overlays on the fixed grid, written atomically as volume files: ``out_confidence`` (match
    confidence in [0, 1] of the engine's lattice, ``lattice`` (FieldLevel) nodes, searched around
    the field when one is given) and, from that field, ``out_jacobian`` (Jacobian determinant; <= 0
    folds) and ``out_magnitude`` (displacement magnitude, mm). The field is ``transform``, the path
    of a displacement field file, or ``transform_id``, the hash of a field uploaded to ``meddift
    serve`` (what its client sends). Result: :class:`~.results.OverlaysResult`. On ``meddift serve``
    the outputs are names (:mod:`.remote.app`)."""

    fixed_id: str
    moving_id: str
    transform: str | None
    out_confidence: str
    out_jacobian: str | None
    out_magnitude: str | None
    lattice: FieldLevel
    settings: RunSettings
    transform_id: str | None = None


@dataclass(frozen=True)
class ShutdownRequest:
    """Result ``{"shutdown": true}`` once the jobs queued before it are done; later ones are
    answered ``cancelled``."""


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


def _text(fields: dict[str, Any], name: str, meaning: str, optional: bool = False) -> str | None:
    value = fields.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"'{name}' must be {meaning}")
    return value


def _volume_id(fields: dict[str, Any], name: str, optional: bool = False) -> str | None:
    return _text(fields, name, "the volume id returned by a 'load' request", optional)


def _points(fields: dict[str, Any], name: str, limits: Limits, count: int | None = None) -> np.ndarray | None:
    """``fields[name]`` as an (N, 3) float array of LPS mm (None when absent and ``count`` is given)."""
    raw = fields.get(name)
    if raw is None and count is not None:
        return None
    if not isinstance(raw, list):
        raise BadRequestError(f"'{name}' must be a list of [l, p, s] points in mm")
    if len(raw) > limits.max_points:
        raise BadRequestError(f"'{name}': {len(raw)} points exceed the limit of {limits.max_points} per request")
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


def _settings(fields: dict[str, Any], what: str, **options: Any) -> RunSettings:
    """Backbone, backbone options (null: none) and device of a job, with its match or field options."""
    run = {name: fields[name] for name in ("backbone", "device") if name in fields}
    if fields.get("backbone_options") is not None:
        run["backbone_options"] = fields["backbone_options"]
    return dataclasses.replace(parse_options(RunSettings, run, f"{what} request"), **options)


def _parse_probe(fields: dict[str, Any], limits: Limits) -> ProbeRequest:
    options = fields.get("backbone_options") or {}
    if not isinstance(options, dict) or not all(isinstance(value, dict) or value is None for value in options.values()):
        raise BadRequestError("'backbone_options' of probe must map backbone names to their options")
    return ProbeRequest({str(name): dict(value or {}) for name, value in options.items()})


def _parse_load(fields: dict[str, Any], limits: Limits) -> LoadRequest:
    return LoadRequest(_text(fields, "path", "the path of a volume file or DICOM folder"))


def _parse_unload(fields: dict[str, Any], limits: Limits) -> UnloadRequest:
    return UnloadRequest(_volume_id(fields, "volume_id"))


def _parse_features(fields: dict[str, Any], limits: Limits) -> FeaturesRequest:
    return FeaturesRequest(_volume_id(fields, "volume_id"), _settings(fields, "features"))


def _parse_match(fields: dict[str, Any], limits: Limits) -> MatchRequest:
    points = _points(fields, "points_lps_mm", limits)
    labels = fields.get("labels")
    if labels is None:
        labels = [str(n + 1) for n in range(len(points))]
    if not isinstance(labels, list) or len(labels) != len(points):
        raise BadRequestError(f"'labels' must be a list of {len(points)} labels, one per point")
    priors = _points(fields, "priors_lps_mm", limits, count=len(points))
    match = parse_options(MatchOptions, fields.get("options"), "match")
    return MatchRequest(
        fixed_id=_volume_id(fields, "fixed_id"),
        moving_id=_volume_id(fields, "moving_id"),
        points_lps_mm=points,
        labels=labels,
        priors_lps_mm=priors,
        settings=_settings(fields, "match", match=match),
    )


def _parse_register(fields: dict[str, Any], limits: Limits) -> RegisterRequest:
    outputs = {
        name: _text(fields, name, "an output file path", optional=name != "out_transform")
        for name in ("out_transform", "out_inverse", "out_warped")
    }
    field = parse_options(FieldOptions, fields.get("options"), "registration")
    return RegisterRequest(
        fixed_id=_volume_id(fields, "fixed_id"),
        moving_id=_volume_id(fields, "moving_id"),
        mask_id=_volume_id(fields, "mask_id", optional=True),
        settings=_settings(fields, "register", field=field),
        **outputs,
    )


def _parse_overlays(fields: dict[str, Any], limits: Limits) -> OverlaysRequest:
    outputs = {
        name: _text(fields, name, "an output file path", optional=name != "out_confidence")
        for name in ("out_confidence", "out_jacobian", "out_magnitude")
    }
    transform = _text(fields, "transform", "the path of a displacement field file", optional=True)
    transform_id = _text(fields, "transform_id", "the hash of a displacement field uploaded to the server",
                         optional=True)
    if transform is not None and transform_id is not None:
        raise BadRequestError("give the field as 'transform' (a file path) or 'transform_id' (an uploaded field), "
                              "not both")
    if transform is None and transform_id is None and (outputs["out_jacobian"] or outputs["out_magnitude"]):
        raise BadRequestError("'out_jacobian' and 'out_magnitude' need the field: give 'transform'")
    return OverlaysRequest(
        fixed_id=_volume_id(fields, "fixed_id"),
        moving_id=_volume_id(fields, "moving_id"),
        transform=transform,
        transform_id=transform_id,
        lattice=parse_options(FieldLevel, fields.get("lattice"), "overlays lattice"),
        settings=_settings(fields, "overlays"),
        **outputs,
    )


def _parse_track(fields: dict[str, Any], limits: Limits) -> TrackRequest:
    field = parse_options(FieldOptions, fields.get("field_options"), "track field")
    lesions_id = _volume_id(fields, "lesions_id", optional=True)
    lesions = _text(fields, "lesions", "the path of a baseline lesion labelmap or point file",
                    optional=lesions_id is not None)
    if lesions is not None and lesions_id is not None:
        raise BadRequestError("give the lesions as 'lesions' (a file path) or 'lesions_id' (a loaded labelmap), "
                              "not both")
    return TrackRequest(
        baseline_id=_volume_id(fields, "baseline_id"),
        followup_id=_volume_id(fields, "followup_id"),
        lesions=lesions,
        out_dir=_text(fields, "out_dir", "an output folder path"),
        lesion_options=parse_options(LesionOptions, fields.get("options"), "track"),
        settings=_settings(fields, "track", field=field),
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


def _parse_cancel(fields: dict[str, Any], limits: Limits) -> CancelRequest:
    job_id = fields.get("job_id")
    if job_id is not None and not isinstance(job_id, str):
        raise BadRequestError("'job_id' must be the id of a request sent before")
    return CancelRequest(job_id)


def _parse_shutdown(fields: dict[str, Any], limits: Limits) -> ShutdownRequest:
    return ShutdownRequest()


_PARSERS = {
    "probe": _parse_probe,
    "load": _parse_load,
    "unload": _parse_unload,
    "features": _parse_features,
    "match": _parse_match,
    "register": _parse_register,
    "overlays": _parse_overlays,
    "track": _parse_track,
    "track_series": _parse_track_series,
    "cancel": _parse_cancel,
    "shutdown": _parse_shutdown,
}
REQUEST_TYPES = tuple(_PARSERS)


# ---------------------------------------------------------------------- encoding


def encode_request(request: Request) -> tuple[str, dict[str, Any]]:
    """``(type, fields)`` of ``request``, JSON-ready: the inverse of :func:`parse_request`, so
    ``parse_request(*encode_request(request)) == request``; the line is ``{"id", "type", **fields}``.

    An optional field that is None is left out (every reader takes absent for null). Options travel
    whole (:func:`~MedDIFTLib.core.options.to_json`). ``settings`` travel as ``backbone``,
    ``backbone_options`` and ``device``, plus the one part of them a type carries: ``settings.match``
    (match, as ``options``) or ``settings.field`` (register, as ``options``; track, as
    ``field_options``). A part a type does not carry must be left at its default, since the worker
    would not see it; so must a load's ``volume``, set only by the server. Either raises ValueError."""
    encode = _ENCODERS.get(type(request))
    if encode is None:
        raise TypeError(f"{type(request).__name__} is not a request of the worker protocol")
    request_type, fields = encode(request)
    return request_type, {name: value for name, value in fields.items() if value is not None}


def _run_fields(settings: RunSettings, request_type: str, carries: str | None = None) -> dict[str, Any]:
    """Backbone, backbone options and device of ``settings``; its match and field options other than
    ``carries`` must be the defaults the worker will use."""
    defaults = RunSettings()
    for part in ("match", "field"):
        if part != carries and getattr(settings, part) != getattr(defaults, part):
            raise ValueError(f"a {request_type} request does not carry settings.{part}: leave it at its default")
    return {"backbone": settings.backbone, "backbone_options": dict(settings.backbone_options),
            "device": settings.device}


def _point_list(points: np.ndarray | None) -> list[list[float]] | None:
    return None if points is None else np.asarray(points, dtype=float).tolist()


def _encode_probe(request: ProbeRequest) -> tuple[str, dict[str, Any]]:
    return "probe", {"backbone_options": {name: dict(options) for name, options in request.backbone_options.items()}}


def _encode_load(request: LoadRequest) -> tuple[str, dict[str, Any]]:
    if request.volume is not None:
        raise ValueError("a load carrying its volume is made by the server from an upload; send the path")
    return "load", {"path": request.path}


def _encode_unload(request: UnloadRequest) -> tuple[str, dict[str, Any]]:
    return "unload", {"volume_id": request.volume_id}


def _encode_features(request: FeaturesRequest) -> tuple[str, dict[str, Any]]:
    return "features", {"volume_id": request.volume_id, **_run_fields(request.settings, "features")}


def _encode_match(request: MatchRequest) -> tuple[str, dict[str, Any]]:
    return "match", {
        "fixed_id": request.fixed_id,
        "moving_id": request.moving_id,
        "points_lps_mm": _point_list(request.points_lps_mm),
        "labels": list(request.labels),
        "priors_lps_mm": _point_list(request.priors_lps_mm),
        "options": to_json(request.settings.match),
        **_run_fields(request.settings, "match", carries="match"),
    }


def _encode_register(request: RegisterRequest) -> tuple[str, dict[str, Any]]:
    return "register", {
        "fixed_id": request.fixed_id,
        "moving_id": request.moving_id,
        "mask_id": request.mask_id,
        "out_transform": request.out_transform,
        "out_inverse": request.out_inverse,
        "out_warped": request.out_warped,
        "options": to_json(request.settings.field),
        **_run_fields(request.settings, "register", carries="field"),
    }


def _encode_overlays(request: OverlaysRequest) -> tuple[str, dict[str, Any]]:
    return "overlays", {
        "fixed_id": request.fixed_id,
        "moving_id": request.moving_id,
        "transform": request.transform,
        "transform_id": request.transform_id,
        "out_confidence": request.out_confidence,
        "out_jacobian": request.out_jacobian,
        "out_magnitude": request.out_magnitude,
        "lattice": to_json(request.lattice),
        **_run_fields(request.settings, "overlays"),
    }


def _encode_track(request: TrackRequest) -> tuple[str, dict[str, Any]]:
    return "track", {
        "baseline_id": request.baseline_id,
        "followup_id": request.followup_id,
        "lesions": request.lesions,
        "lesions_id": request.lesions_id,
        "out_dir": request.out_dir,
        "options": to_json(request.lesion_options),
        "field_options": to_json(request.settings.field),
        **_run_fields(request.settings, "track", carries="field"),
    }


def _encode_track_series(request: TrackSeriesRequest) -> tuple[str, dict[str, Any]]:
    return "track_series", {
        "baseline_id": request.baseline_id,
        "followup_ids": list(request.followup_ids),
        "lesions": request.lesions,
        "lesions_id": request.lesions_id,
        "out_dir": request.out_dir,
        "options": to_json(request.lesion_options),
        "series_options": to_json(request.series_options),
        "field_options": to_json(request.settings.field),
        **_run_fields(request.settings, "track_series", carries="field"),
    }


def _encode_cancel(request: CancelRequest) -> tuple[str, dict[str, Any]]:
    return "cancel", {"job_id": request.job_id}


def _encode_shutdown(request: ShutdownRequest) -> tuple[str, dict[str, Any]]:
    return "shutdown", {}


_ENCODERS = {
    ProbeRequest: _encode_probe,
    LoadRequest: _encode_load,
    UnloadRequest: _encode_unload,
    FeaturesRequest: _encode_features,
    MatchRequest: _encode_match,
    RegisterRequest: _encode_register,
    OverlaysRequest: _encode_overlays,
    TrackRequest: _encode_track,
    TrackSeriesRequest: _encode_track_series,
    CancelRequest: _encode_cancel,
    ShutdownRequest: _encode_shutdown,
}
