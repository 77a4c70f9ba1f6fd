"""The worker's jobs on a fixed and a moving volume on the wire: match (points), register and
overlays (the dense field) (torch-free).

Each request and result type with its parser and its encoder. Coordinates are LPS mm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core.errors import BadRequestError
from ...core.match_text import describe_match
from ...core.options import FieldLevel, FieldOptions, MatchOptions, RunSettings, parse_options, to_json
from .codec import (
    Limits,
    MalformedResult,
    ResultFields,
    as_float,
    is_number,
    json_number,
    json_number_map,
    json_numbers,
    point_list,
    points,
    run_fields,
    run_settings,
    text,
    volume_id,
)

if TYPE_CHECKING:
    from ...matching.correspondences import Correspondences

# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class MatchRequest:
    """Fixed points (N, 3 LPS mm) matched into the moving volume; ``labels`` pair inputs with
    outputs; ``priors_lps_mm`` (N, 3) centres each search; the ``options`` field (MatchOptions)
    becomes ``settings.match``. Result: :class:`MatchResult`."""

    fixed_id: str
    moving_id: str
    points_lps_mm: np.ndarray
    labels: list[Any]
    priors_lps_mm: np.ndarray | None
    settings: RunSettings


@dataclass(frozen=True)
class RegisterRequest:
    """Dense registration; the ``options`` field (FieldOptions) becomes ``settings.field``; only
    ``out_transform`` is required. Result: :class:`RegisterResult` (outputs written atomically)."""

    fixed_id: str
    moving_id: str
    out_transform: str
    out_inverse: str | None
    out_warped: str | None
    mask_id: str | None
    settings: RunSettings


@dataclass(frozen=True)
class OverlaysRequest:
    """QA overlays on the fixed grid, written atomically as volume files: ``out_confidence`` (match
    confidence in [0, 1] of the engine's lattice, ``lattice`` (FieldLevel) nodes, searched around
    the field when one is given) and, from that field, ``out_jacobian`` (Jacobian determinant; <= 0
    folds) and ``out_magnitude`` (displacement magnitude, mm). The field is ``transform``, the path
    of a displacement field file, or ``transform_id``, the hash of a field uploaded to ``meddift
    serve`` (what its client sends). Result: :class:`OverlaysResult`. On ``meddift serve`` the
    outputs are names (:meth:`..remote.sessions.ServerSession.place_outputs`)."""

    fixed_id: str
    moving_id: str
    transform: str | None
    out_confidence: str
    out_jacobian: str | None
    out_magnitude: str | None
    lattice: FieldLevel
    settings: RunSettings
    transform_id: str | None = None


def _parse_match(fields: dict[str, Any], limits: Limits) -> MatchRequest:
    fixed = points(fields, "points_lps_mm", limits)
    labels = fields.get("labels")
    if labels is None:
        labels = [str(n + 1) for n in range(len(fixed))]
    if not isinstance(labels, list) or len(labels) != len(fixed):
        raise BadRequestError(f"'labels' must be a list of {len(fixed)} labels, one per point")
    priors = points(fields, "priors_lps_mm", limits, count=len(fixed))
    match = parse_options(MatchOptions, fields.get("options"), "match")
    return MatchRequest(
        fixed_id=volume_id(fields, "fixed_id"),
        moving_id=volume_id(fields, "moving_id"),
        points_lps_mm=fixed,
        labels=labels,
        priors_lps_mm=priors,
        settings=run_settings(fields, "match", match=match),
    )


def _parse_register(fields: dict[str, Any], limits: Limits) -> RegisterRequest:
    outputs = {
        name: text(fields, name, "an output file path", optional=name != "out_transform")
        for name in ("out_transform", "out_inverse", "out_warped")
    }
    field = parse_options(FieldOptions, fields.get("options"), "registration")
    return RegisterRequest(
        fixed_id=volume_id(fields, "fixed_id"),
        moving_id=volume_id(fields, "moving_id"),
        mask_id=volume_id(fields, "mask_id", optional=True),
        settings=run_settings(fields, "register", field=field),
        **outputs,
    )


def _parse_overlays(fields: dict[str, Any], limits: Limits) -> OverlaysRequest:
    outputs = {
        name: text(fields, name, "an output file path", optional=name != "out_confidence")
        for name in ("out_confidence", "out_jacobian", "out_magnitude")
    }
    transform = text(fields, "transform", "the path of a displacement field file", optional=True)
    transform_id = text(fields, "transform_id", "the hash of a displacement field uploaded to the server",
                        optional=True)
    if transform is not None and transform_id is not None:
        raise BadRequestError("give the field as 'transform' (a file path) or 'transform_id' (an uploaded field), "
                              "not both")
    if transform is None and transform_id is None and (outputs["out_jacobian"] or outputs["out_magnitude"]):
        raise BadRequestError("'out_jacobian' and 'out_magnitude' need the field: give 'transform'")
    return OverlaysRequest(
        fixed_id=volume_id(fields, "fixed_id"),
        moving_id=volume_id(fields, "moving_id"),
        transform=transform,
        transform_id=transform_id,
        lattice=parse_options(FieldLevel, fields.get("lattice"), "overlays lattice"),
        settings=run_settings(fields, "overlays"),
        **outputs,
    )


def _encode_match(request: MatchRequest) -> dict[str, Any]:
    return {
        "fixed_id": request.fixed_id,
        "moving_id": request.moving_id,
        "points_lps_mm": point_list(request.points_lps_mm),
        "labels": list(request.labels),
        "priors_lps_mm": point_list(request.priors_lps_mm),
        "options": to_json(request.settings.match),
        **run_fields(request.settings, "match", carries="match"),
    }


def _encode_register(request: RegisterRequest) -> dict[str, Any]:
    return {
        "fixed_id": request.fixed_id,
        "moving_id": request.moving_id,
        "mask_id": request.mask_id,
        "out_transform": request.out_transform,
        "out_inverse": request.out_inverse,
        "out_warped": request.out_warped,
        "options": to_json(request.settings.field),
        **run_fields(request.settings, "register", carries="field"),
    }


def _encode_overlays(request: OverlaysRequest) -> dict[str, Any]:
    return {
        "fixed_id": request.fixed_id,
        "moving_id": request.moving_id,
        "transform": request.transform,
        "transform_id": request.transform_id,
        "out_confidence": request.out_confidence,
        "out_jacobian": request.out_jacobian,
        "out_magnitude": request.out_magnitude,
        "lattice": to_json(request.lattice),
        **run_fields(request.settings, "overlays"),
    }


REQUEST_PARSERS = {"match": _parse_match, "register": _parse_register, "overlays": _parse_overlays}
REQUEST_ENCODERS = {MatchRequest: ("match", _encode_match), RegisterRequest: ("register", _encode_register),
                    OverlaysRequest: ("overlays", _encode_overlays)}


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class MatchResult:
    """The matches of the fixed points, one row per fixed ``labels`` entry; a row without a finite
    point is missing. ``points_lps_mm`` (N, 3) LPS mm, ``similarity`` and ``confidence`` in [0, 1],
    ``forward_backward_mm`` mm, ``reliable`` per row (see :mod:`MedDIFTLib.matching.correspondences`),
    ``seconds`` the whole request, ``match_seconds`` the search alone. A missing or null
    ``reliable`` flag on the wire reads back as unreliable (fail closed)."""

    labels: list[str]
    points_lps_mm: np.ndarray
    similarity: np.ndarray
    confidence: np.ndarray
    forward_backward_mm: np.ndarray
    reliable: np.ndarray
    seconds: float = math.nan
    match_seconds: float = math.nan
    features_cached: bool = False

    @classmethod
    def of(cls, labels: list[Any], matches: Correspondences, seconds: float = math.nan,
           match_seconds: float = math.nan, features_cached: bool = False) -> MatchResult:
        """The result of the engine's ``matches`` of the fixed points under ``labels``; ``seconds``
        the whole request, ``match_seconds`` the search alone."""
        return cls(labels=[str(label) for label in labels], points_lps_mm=matches.points_lps_mm,
                   similarity=matches.similarity, confidence=matches.confidence,
                   forward_backward_mm=matches.forward_backward_mm, reliable=matches.reliable, seconds=seconds,
                   match_seconds=match_seconds, features_cached=features_cached)

    def correspondences(self, fixed_points_lps_mm: np.ndarray) -> Correspondences:
        """The engine's :class:`~MedDIFTLib.matching.Correspondences` of ``fixed_points_lps_mm`` (N, 3
        LPS mm, the request's points), as the search returned them: the inverse of :meth:`of`.
        It imports the engine's package (torch): for the CLI, not for Slicer's process."""
        from ...matching.correspondences import Correspondences

        return Correspondences(np.asarray(fixed_points_lps_mm, float), self.points_lps_mm, self.similarity,
                               self.confidence, self.forward_backward_mm, self.reliable)

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


def _encode_match_result(result: MatchResult) -> dict[str, Any]:
    return {
        "labels": list(result.labels),
        "points_lps_mm": [json_numbers(row) for row in np.asarray(result.points_lps_mm, dtype=float).reshape(-1, 3)],
        "similarity": json_numbers(result.similarity),
        "confidence": json_numbers(result.confidence),
        "forward_backward_mm": json_numbers(result.forward_backward_mm),
        "reliable": [bool(flag) for flag in result.reliable],
        "seconds": json_number(result.seconds),
        "match_seconds": json_number(result.match_seconds),
        "features_cached": result.features_cached,
    }


def _encode_register_result(result: RegisterResult) -> dict[str, Any]:
    return {"transform": result.transform, "inverse": result.inverse, "warped": result.warped,
            "jacobian": json_number_map(result.jacobian), "displacement_mm": json_number_map(result.displacement_mm),
            "seconds": json_number_map(result.seconds)}


def _encode_overlays_result(result: OverlaysResult) -> dict[str, Any]:
    return {name: {"path": summary.path, "min": json_number(summary.min), "max": json_number(summary.max),
                   "mean": json_number(summary.mean)} for name, summary in result.overlays.items()}


def _parse_match_result(fields: ResultFields) -> MatchResult:
    labels = [str(label) for label in fields.get("labels", lambda v: isinstance(v, list), "a list of labels")]
    count = len(labels)
    rows = fields.get("points_lps_mm", lambda v: isinstance(v, list), "a list of [l, p, s] points or nulls")
    if len(rows) != count:
        raise MalformedResult(f"the worker returned a malformed {fields.what}: {len(rows)} points for {count} labels")
    matched = np.full((count, 3), math.nan)
    for row, point in enumerate(rows):
        if point is None:
            continue
        if not isinstance(point, list) or len(point) != 3 or not all(map(is_number, point)):
            raise fields.malformed("points_lps_mm", "a list of [l, p, s] points or nulls")
        matched[row] = [as_float(value) for value in point]
    reliable = fields.payload.get("reliable")
    if reliable is None:
        reliable = [False] * count
    if not isinstance(reliable, list) or len(reliable) != count:
        raise fields.malformed("reliable", f"a list of {count} flags")
    return MatchResult(
        labels=labels,
        points_lps_mm=matched,
        similarity=fields.numbers("similarity", count),
        confidence=fields.numbers("confidence", count),
        forward_backward_mm=fields.numbers("forward_backward_mm", count),
        reliable=np.array([flag is True for flag in reliable], dtype=bool),
        seconds=fields.number("seconds"),
        match_seconds=fields.number("match_seconds"),
        features_cached=fields.flag("features_cached"),
    )


def _parse_register_result(fields: ResultFields) -> RegisterResult:
    return RegisterResult(
        transform=fields.text("transform"),
        inverse=fields.text("inverse", optional=True),
        warped=fields.text("warped", optional=True),
        jacobian=fields.number_map("jacobian"),
        displacement_mm=fields.number_map("displacement_mm"),
        seconds=fields.number_map("seconds"),
    )


def _parse_overlays_result(fields: ResultFields) -> OverlaysResult:
    overlays = {}
    for name in fields.payload:
        summary = fields.object(name)
        overlays[str(name)] = OverlaySummary(summary.text("path"), summary.number("min"), summary.number("max"),
                                             summary.number("mean"))
    return OverlaysResult(overlays)


RESULT_PARSERS = {"match": _parse_match_result, "register": _parse_register_result,
                  "overlays": _parse_overlays_result}
RESULT_ENCODERS = {MatchResult: _encode_match_result, RegisterResult: _encode_register_result,
                   OverlaysResult: _encode_overlays_result}
