"""The worker's volume jobs on the wire: probe, load, unload and features (torch-free).

Each request and result type with its parser and its encoder. The results of ``probe`` (a
diagnostic report for people) and ``unload`` (one key) stay plain JSON objects, described with
their requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...core.errors import BadRequestError
from ...core.geometry import Geometry
from ...core.options import RunSettings
from .codec import Limits, ResultFields, json_number, run_fields, run_settings, text, volume_id

# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ProbeRequest:
    """``backbone_options``: {backbone: options} for the weights check. Result: versions,
    ``devices`` (name, label, memory_bytes, free_bytes), ``backbones`` (name, available,
    weights_present, message), ``cache`` (max_bytes, used_bytes, entries), ``volumes``, ``limits``."""

    backbone_options: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class LoadRequest:
    """Read a volume file or DICOM folder. Result: :class:`LoadResult`.

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
    ``backbone_options``, ``device``: auto | cpu | cuda | cuda:N). Result: :class:`FeaturesResult`."""

    volume_id: str
    settings: RunSettings


def _parse_probe(fields: dict[str, Any], limits: Limits) -> ProbeRequest:
    options = fields.get("backbone_options") or {}
    if not isinstance(options, dict) or not all(isinstance(value, dict) or value is None for value in options.values()):
        raise BadRequestError("'backbone_options' of probe must map backbone names to their options")
    return ProbeRequest({str(name): dict(value or {}) for name, value in options.items()})


def _parse_load(fields: dict[str, Any], limits: Limits) -> LoadRequest:
    return LoadRequest(text(fields, "path", "the path of a volume file or DICOM folder"))


def _parse_unload(fields: dict[str, Any], limits: Limits) -> UnloadRequest:
    return UnloadRequest(volume_id(fields, "volume_id"))


def _parse_features(fields: dict[str, Any], limits: Limits) -> FeaturesRequest:
    return FeaturesRequest(volume_id(fields, "volume_id"), run_settings(fields, "features"))


def _encode_probe(request: ProbeRequest) -> dict[str, Any]:
    return {"backbone_options": {name: dict(options) for name, options in request.backbone_options.items()}}


def _encode_load(request: LoadRequest) -> dict[str, Any]:
    if request.volume is not None:
        raise ValueError("a load carrying its volume is made by the server from an upload; send the path")
    return {"path": request.path}


def _encode_unload(request: UnloadRequest) -> dict[str, Any]:
    return {"volume_id": request.volume_id}


def _encode_features(request: FeaturesRequest) -> dict[str, Any]:
    return {"volume_id": request.volume_id, **run_fields(request.settings, "features")}


REQUEST_PARSERS = {"probe": _parse_probe, "load": _parse_load, "unload": _parse_unload, "features": _parse_features}
REQUEST_ENCODERS = {ProbeRequest: ("probe", _encode_probe), LoadRequest: ("load", _encode_load),
                    UnloadRequest: ("unload", _encode_unload), FeaturesRequest: ("features", _encode_features)}


# ---------------------------------------------------------------------- results


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


def _encode_load_result(result: LoadResult) -> dict[str, Any]:
    geometry = result.geometry
    return {"volume_id": result.volume_id, "name": result.name,
            "geometry": {"shape_ijk": list(geometry.shape_ijk), "spacing_mm": list(geometry.spacing_mm),
                         "origin_lps_mm": list(geometry.origin_lps_mm), "direction": list(geometry.direction)}}


def _encode_features_result(result: FeaturesResult) -> dict[str, Any]:
    return {"cached": result.cached, "seconds": json_number(result.seconds), "bytes": result.nbytes,
            "levels": [{"name": level.name, "channels": level.channels, "shape_ijk": list(level.shape_ijk)}
                       for level in result.levels]}


def _parse_load_result(fields: ResultFields) -> LoadResult:
    geometry = fields.object("geometry")
    parsed = Geometry.create(geometry.wholes("shape_ijk", 3), geometry.numbers("spacing_mm", 3),
                             geometry.numbers("origin_lps_mm", 3), geometry.numbers("direction", 9))
    return LoadResult(fields.text("volume_id"), fields.text("name"), parsed)


def _parse_features_result(fields: ResultFields) -> FeaturesResult:
    levels = [FeatureLevelSummary(level.text("name"), level.whole("channels"), level.wholes("shape_ijk", 3))
              for level in fields.objects("levels")]
    return FeaturesResult(fields.flag("cached"), fields.number("seconds"), fields.whole("bytes"), levels)


RESULT_PARSERS = {"load": _parse_load_result, "features": _parse_features_result}
RESULT_ENCODERS = {LoadResult: _encode_load_result, FeaturesResult: _encode_features_result}
