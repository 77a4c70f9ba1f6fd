"""The methods ``meddift eval`` compares, named by a spec ``NAME[:KEY=VALUE[,KEY=VALUE...]]``.

- ``identity``: no registration (the initial error).
- ``BACKBONE`` (any registered backbone, e.g. ``mind``): MedDIFT point matching
  (:func:`MedDIFTLib.matching.match_points`) with that backbone; options: the
  :class:`~MedDIFTLib.core.options.MatchOptions` fields and the backbone's own options.
- ``BACKBONE-field``: MedDIFT's dense field (:func:`MedDIFTLib.field.register`); options: the
  :class:`~MedDIFTLib.core.options.FieldOptions` fields and the backbone's options.
- ``bspline``, ``convexadam``: the baselines of :mod:`.baselines`, with their option classes.

VALUEs are JSON (else text), e.g. ``mind:search_radius_mm=15``, ``mind:level_weights=[1,0.5,0.25]`` or
``bspline:control_spacing_mm=12``. An option that the backbone takes goes to the backbone. Every
option is checked (name, type, range) by the parser of :mod:`MedDIFTLib.core.options` when the spec
is read, before any work.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import BadInputError
from ..core.options import FieldOptions, MatchOptions, parse_assignments, parse_options
from ..core.progress import ProgressFn, no_progress, scaled
from .baselines import BASELINE_OPTIONS, MethodOutput, bspline, convexadam, unavailable_reason

IDENTITY = "identity"
FIELD_SUFFIX = "-field"


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method: its name, the text it was given as (its label in tables), its typed options
    (None for identity), and for MedDIFT methods the backbone and the backbone's options."""

    name: str
    label: str
    options: Any = None
    backbone: str | None = None
    backbone_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The label as a file-name-safe string."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label.replace("=", "-")).strip("_")

    @property
    def needs_images(self) -> bool:
        return self.name != IDENTITY


def method_names() -> list[str]:
    """Every method name: identity, each registered backbone alone and with ``-field``, the baselines."""
    from ..features import available_backbones

    backbones = available_backbones()
    return [IDENTITY, *backbones, *(name + FIELD_SUFFIX for name in backbones), *BASELINE_OPTIONS]


def _split_items(text: str) -> list[str]:
    """``a=1,b=[1,2]`` -> ``["a=1", "b=[1,2]"]``: commas inside brackets or braces stay with their value."""
    items, depth, current = [], 0, ""
    for character in text:
        depth += character in "[{"
        depth -= character in "]}"
        if character == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += character
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _refuse_unknown(name: str, given: dict, accepted: list[str]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise BadInputError(f"method {name!r} does not take option(s) {', '.join(unknown)}; "
                            f"it takes: {', '.join(sorted(accepted)) or 'none'}")


def parse_method(text: str) -> MethodSpec:
    """``NAME[:KEY=VALUE,...]`` -> :class:`MethodSpec` with typed options; a bad name, key, type or
    range is a :class:`BadInputError` naming it."""
    from ..features import backbone_spec
    from ..features.registry import RUN_OPTIONS

    label = text.strip()
    head, _, rest = label.partition(":")
    name = head.strip().lower()
    given = parse_assignments(_split_items(rest), f"method option in {label!r}:")
    if name == IDENTITY:
        _refuse_unknown(name, given, [])
        return MethodSpec(name, label)
    if name in BASELINE_OPTIONS:
        owner = BASELINE_OPTIONS[name]
        _refuse_unknown(name, given, [f.name for f in dataclasses.fields(owner)])
        return MethodSpec(name, label, parse_options(owner, given, name))
    backbone = name.removesuffix(FIELD_SUFFIX)
    try:
        spec = backbone_spec(backbone)
    except BadInputError:
        raise BadInputError(f"unknown method {name!r}; choose from: {', '.join(method_names())}") from None
    owner = FieldOptions if name.endswith(FIELD_SUFFIX) else MatchOptions
    backbone_keys = [key for key in spec.option_names() if key not in RUN_OPTIONS]
    _refuse_unknown(name, given, [*backbone_keys, *(f.name for f in dataclasses.fields(owner))])
    backbone_options = {key: value for key, value in given.items() if key in backbone_keys}
    options = parse_options(owner, {k: v for k, v in given.items() if k not in backbone_keys}, name)
    return MethodSpec(name, label, options, backbone, backbone_options)


def meddift(
    spec: MethodSpec,
    fixed,
    moving,
    fixed_points_lps_mm: np.ndarray,
    device: str = "cpu",
    weights_dir: str | None = None,
    progress: ProgressFn = no_progress,
) -> MethodOutput:
    """MedDIFT on ``fixed``/``moving`` (:class:`Volume`): point matching or the dense field, by the spec's
    option class, with the spec's backbone. ``weights_dir`` is ignored by a backbone that needs none."""
    from ..features import create_featurizer

    backbone_options = {**spec.backbone_options, "device": device}
    if weights_dir:
        backbone_options.setdefault("weights_dir", weights_dir)
    featurizer = create_featurizer(spec.backbone, **backbone_options)
    fixed_features = featurizer.extract(fixed, scaled(progress, 0.0, 0.3))
    moving_features = featurizer.extract(moving, scaled(progress, 0.3, 0.6))
    if isinstance(spec.options, FieldOptions):
        from ..field import register

        displacement = register(fixed_features, moving_features, fixed, spec.options,
                                progress=scaled(progress, 0.6, 1.0))
        return MethodOutput(displacement.transform_points(fixed_points_lps_mm), displacement)
    from ..matching import match_points

    result = match_points(fixed_features, moving_features, fixed_points_lps_mm, options=spec.options,
                          progress=scaled(progress, 0.6, 1.0))
    return MethodOutput(result.points_lps_mm, None, {"reliable_fraction": float(np.mean(result.reliable)),
                                                     "mean_confidence": float(np.mean(result.confidence))},
                        confidence=np.asarray(result.confidence, float))


def run_method(
    spec: MethodSpec,
    data,
    device: str = "cpu",
    weights_dir: str | None = None,
    progress: ProgressFn = no_progress,
) -> MethodOutput:
    """Run ``spec`` on a loaded case (:class:`MedDIFTLib.evaluation.cases.CaseData` with volumes)."""
    points = data.fixed_points.points_lps_mm
    if spec.name == IDENTITY:
        return MethodOutput(np.array(points, float).reshape(-1, 3))
    reason = unavailable_reason(spec.name)
    if reason:
        raise BadInputError(reason)
    if spec.name == "bspline":
        return bspline(data.fixed, data.moving, points, data.fixed_mask, progress, **dataclasses.asdict(spec.options))
    if spec.name == "convexadam":
        return convexadam(data.fixed, data.moving, points, device, progress, **dataclasses.asdict(spec.options))
    return meddift(spec, data.fixed, data.moving, points, device, weights_dir, progress)
