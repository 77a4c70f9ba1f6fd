"""A fused backbone: the pyramids of several backbones as one, e.g. ``mind+maisi``.

The fused pyramid is the union of the parts' levels, in part order. ``part_weights`` (one positive
number per part, default all 1) is each part's share of the fused similarity: a part's levels keep
their relative weights and are scaled to sum to its share, however many levels it has. Each level
keeps its own grid and its backbone's ``patch_radius`` advice, so the diffusion features' context and
MIND's local detail are scored side by side. How options reach the parts is the registry's business
(:func:`MedDIFTLib.features.registry.backbone_spec`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..core.errors import BadInputError
from ..core.io.volumes import Volume
from ..core.progress import ProgressFn, no_progress, scaled
from .protocol import FeaturePyramid, Featurizer

PART_SEPARATOR = "+"


def check_part_weights(part_weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """``part_weights`` as ``count`` positive finite floats (default all 1); else a :class:`BadInputError`."""
    if part_weights is None:
        return (1.0,) * count
    if isinstance(part_weights, (str, bytes)) or not isinstance(part_weights, Sequence):
        raise BadInputError(f"option 'part_weights' must be a list of {count} numbers, got {part_weights!r}")
    if len(part_weights) != count:
        raise BadInputError(f"option 'part_weights' has {len(part_weights)} numbers for {count} parts")
    weights = []
    for weight in part_weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise BadInputError(f"option 'part_weights' must hold numbers, got {weight!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise BadInputError(f"option 'part_weights' must hold positive numbers, got {weight}")
        weights.append(float(weight))
    return tuple(weights)


class FusedFeaturizer:
    """Featurizers ``parts`` (name -> featurizer, in order) extracted one after the other and fused."""

    def __init__(self, parts: Mapping[str, Featurizer], part_weights: Sequence[float] | None = None) -> None:
        if len(parts) < 2:
            raise BadInputError("a fused backbone needs at least two parts")
        self.parts = dict(parts)
        self.part_weights = check_part_weights(part_weights, len(self.parts))
        self.name = PART_SEPARATOR.join(self.parts)
        self.requires_weights = any(part.requires_weights for part in self.parts.values())

    @property
    def config(self) -> dict[str, Any]:
        """Every part's own configuration and share: it identifies the fused features fully."""
        return {
            "parts": [{"name": name, "config": part.config} for name, part in self.parts.items()],
            "part_weights": list(self.part_weights),
        }

    def extract(self, volume: Volume, progress: ProgressFn = no_progress) -> FeaturePyramid:
        """The parts' levels on their own grids, weighted so that part ``n`` contributes ``part_weights[n]``."""
        levels = []
        count = len(self.parts)
        for index, ((name, part), share) in enumerate(zip(self.parts.items(), self.part_weights)):
            pyramid = part.extract(volume, scaled(progress, index / count, (index + 1) / count))
            total = sum(level.weight for level in pyramid.levels)
            if total <= 0:
                raise BadInputError(f"backbone {name!r} gave level weights with no positive sum")
            levels += [replace(level, weight=share * level.weight / total) for level in pyramid.levels]
        progress("features", 1.0, f"{self.name} features done")
        return FeaturePyramid(levels, volume.geometry, self.name, self.config)
