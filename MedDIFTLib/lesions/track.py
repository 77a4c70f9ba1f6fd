"""The lesion tracking job: baseline lesions -> found, segmented and measured in the follow-up.

1. From points only: each lesion is segmented at baseline (:func:`.refine.segment_from_seed`) and
   its centre of mass, not the clicked point, is the centre tracked.
2. The field with fixed = follow-up and moving = baseline (:func:`MedDIFTLib.field.register`, or a
   given field) carries the labelmap onto the follow-up grid (:mod:`.carry`). Unless a field is given
   or ``field_margin_mm`` is 0, it is computed only around each lesion (:mod:`.local_fields`).
3. Each lesion's baseline centre is matched into the follow-up by the correspondence engine
   (:func:`MedDIFTLib.matching.match_points`), searched around the carried lesion's centre; the
   match carries the confidence and forward-backward distance. An unreliable centre match is not
   placed by the engine's context (``context_mm = 0``): the carried lesion is its context (step 4).
4. Refinement (:mod:`.refine`) grows each lesion in the follow-up image from its match, the carried
   lesion as a fallback prior.
5. Measurements at both time points (:mod:`.measure`) and status flags: ``not_found`` (nothing left
   in the follow-up), ``leaves_volume`` (the lesion reaches or passes the follow-up border),
   ``merges`` (it meets another tracked lesion), ``low_confidence`` (the centre match is below the
   threshold), ``touches_border`` (the baseline lesion touches the baseline border),
   ``unsupported_growth`` (refinement grew it until its limits, not an edge of the image, stopped
   it: its follow-up size is not measured, see :mod:`.refine`). The reported
   follow-up centre is the engine's match, which exists even where the segmentation is empty; the
   segmentation's centre of mass is kept as ``segmented_centre_lps_mm``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..core.io.volumes import Volume
from ..core.options import FieldOptions, LesionOptions, MatchOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeaturePyramid
from ..field import register
from ..grid.displacement_field import DisplacementField
from ..matching import match_points
from .carry import carry_labelmap
from .inputs import Lesions, centroids_lps_mm, touches_border
from .local_fields import carry_around_lesions
from .measure import EMPTY, Measurement, change_pct, measure
from .refine import OPEN_SURFACE_LIMIT, equivalent_radius_mm, fit_lesion, learned_threshold, segment_from_seed


@dataclass
class LesionResult:
    """One tracked lesion: label value and name, follow-up centre (the engine's match, LPS mm) and
    the follow-up segmentation's centre of mass, the match's confidence and forward-backward
    distance (mm), both measurements, changes (%) and flags."""

    label: int
    name: str
    centre_lps_mm: np.ndarray
    segmented_centre_lps_mm: np.ndarray
    confidence: float
    forward_backward_mm: float
    baseline: Measurement
    followup: Measurement
    flags: list[str] = field(default_factory=list)
    color: tuple[float, float, float] | None = None

    @property
    def status(self) -> str:
        """``ok`` or the flags joined by ``;``."""
        return ";".join(self.flags) or "ok"

    @property
    def volume_change_pct(self) -> float:
        return change_pct(self.baseline.volume_ml, self.followup.volume_ml)

    @property
    def diameter_change_pct(self) -> float:
        return change_pct(self.baseline.long_mm, self.followup.long_mm)


@dataclass
class TrackResult:
    """The lesions, the baseline labelmap used, the carried and the final follow-up labelmaps
    (``[k, j, i]`` int32 on the follow-up grid) and seconds per step."""

    lesions: list[LesionResult]
    baseline_labelmap: np.ndarray
    carried_labelmap: np.ndarray
    followup_labelmap: np.ndarray
    seconds: dict[str, float]


def _baseline_labelmap(lesions: Lesions, baseline: Volume, options: LesionOptions) -> np.ndarray:
    """The lesions' labelmap; lesions given as points are segmented first (earlier ones keep shared voxels)."""
    if not lesions.from_points:
        return lesions.labelmap
    labelmap = np.zeros(baseline.geometry.shape_kji, np.int32)
    for label, seed in zip(lesions.labels, lesions.seeds_lps_mm):
        mask = segment_from_seed(baseline.voxels, baseline.geometry, seed, options.seed_radius_mm)
        labelmap[mask & (labelmap == 0)] = label
    return labelmap


def _centre_priors(carried: np.ndarray, labels: list[int], seeds: np.ndarray, geometry) -> np.ndarray:
    """Where to search each centre: the carried lesion's centre of mass, else the seed's world position."""
    centres = centroids_lps_mm(carried, labels, geometry)
    return np.where(np.isfinite(centres), centres, seeds)


def track_lesions(
    baseline: Volume,
    followup: Volume,
    lesions: Lesions,
    baseline_pyramid: FeaturePyramid,
    followup_pyramid: FeaturePyramid,
    options: LesionOptions | None = None,
    field_options: FieldOptions | None = None,
    displacement: DisplacementField | None = None,
    progress: ProgressFn = no_progress,
) -> TrackResult:
    """Track ``lesions`` of ``baseline`` into ``followup`` (HU volumes, their feature pyramids).

    ``displacement`` (fixed = follow-up grid, moving = baseline; ITK convention) replaces the
    registration when given.
    """
    options = options or LesionOptions()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    geometry = followup.geometry
    baseline_labelmap = _baseline_labelmap(lesions, baseline, options)
    seeds = lesions.seeds_lps_mm.copy()
    present = [label for label in lesions.labels if (baseline_labelmap == label).any()]
    if lesions.from_points and present:
        seeds[[lesions.labels.index(label) for label in present]] = centroids_lps_mm(
            baseline_labelmap, present, baseline.geometry)
    if displacement is None and options.field_margin_mm > 0:
        present_seeds = seeds[[lesions.labels.index(label) for label in present]]
        carried = carry_around_lesions(baseline, followup, baseline_labelmap, present, present_seeds,
                                       baseline_pyramid, followup_pyramid, field_options, options.field_margin_mm,
                                       scaled(progress, 0.0, 0.75))
        seconds["field"] = time.perf_counter() - start
    else:
        if displacement is None:
            displacement = register(followup_pyramid, baseline_pyramid, followup, field_options,
                                    progress=scaled(progress, 0.0, 0.7))
        seconds["field"] = time.perf_counter() - start
        mark = time.perf_counter()
        progress("carry", 0.7, "carrying the labelmap onto the follow-up grid")
        carried = carry_labelmap(baseline_labelmap, baseline.geometry, present, displacement)
        seconds["carry"] = time.perf_counter() - mark
    mark = time.perf_counter()
    priors = _centre_priors(carried, lesions.labels, seeds, geometry)
    matches = match_points(baseline_pyramid, followup_pyramid, seeds, priors,
                           MatchOptions(search_radius_mm=options.centre_search_radius_mm,
                                        confidence_threshold=options.confidence_threshold, context_mm=0.0),
                           scaled(progress, 0.75, 0.9))
    seconds["centres"] = time.perf_counter() - mark
    mark = time.perf_counter()
    progress("refine", 0.9, "fitting the lesions to the follow-up")
    followup_labelmap = np.zeros(geometry.shape_kji, np.int32)
    results = []
    for n, (label, name) in enumerate(zip(lesions.labels, lesions.names)):
        base_mask = baseline_labelmap == label
        carried_mask = carried == label
        flags = ["touches_border"] if touches_border(base_mask) else []
        mask = carried_mask
        if options.refine and base_mask.any() and carried_mask.any():
            threshold = learned_threshold(base_mask, baseline.voxels, baseline.geometry)
            refinement = fit_lesion(carried_mask, followup.voxels, geometry, threshold, matches.points_lps_mm[n],
                                    equivalent_radius_mm(base_mask, baseline.geometry), options.growth_margin_mm,
                                    options.largest_volume_factor)
            mask = refinement.mask
            if refinement.open_surface > OPEN_SURFACE_LIMIT:
                flags.append("unsupported_growth")
        if (followup_labelmap[mask] != 0).any():
            flags.append("merges")
            for other in results:
                if other.label in followup_labelmap[mask] and "merges" not in other.flags:
                    other.flags.append("merges")
        mask = mask & (followup_labelmap == 0)
        followup_labelmap[mask] = label
        if not mask.any():
            flags.append("leaves_volume" if not geometry.contains_lps(priors[n : n + 1])[0] else "not_found")
        elif touches_border(mask):
            flags.append("leaves_volume")
        if not matches.reliable[n]:
            flags.append("low_confidence")
        after = measure(mask, followup.voxels, geometry) if mask.any() else EMPTY
        results.append(LesionResult(
            label, name, matches.points_lps_mm[n], np.asarray(after.centre_lps_mm), float(matches.confidence[n]),
            float(matches.forward_backward_mm[n]), measure(base_mask, baseline.voxels, baseline.geometry),
            after, flags, lesions.colors.get(label)))
    seconds["refine"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start
    progress("refine", 1.0, "done")
    return TrackResult(results, baseline_labelmap, carried, followup_labelmap,
                       {name: round(value, 3) for name, value in seconds.items()})
