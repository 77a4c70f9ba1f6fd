"""The baseline lesions carried onto the follow-up by a field computed only around each of them.

Tracking needs the field where the lesions are, not over the whole scan. Each lesion's centre is
first matched into the follow-up by the correspondence engine (searched as far as the field's
first level searches); around where it lands, a box of the follow-up covering the lesion grown
by ``margin_mm`` (fixed), and the same box moved back by that match and grown again by
``margin_mm`` in the baseline (moving), are registered from that match's translation, searched no
farther than ``margin_mm`` around it, on their crops of the two feature pyramids
(:meth:`~MedDIFTLib.features.protocol.FeaturePyramid.cropped`: the whole volumes' descriptors, so a
lazily filled pyramid computes only those boxes), and the lesion is carried through that field
(:func:`.carry.carry_labelmap`). A box the registration refuses (e.g. too little of it inside the
automatic region), or a lesion whose centre the engine does not find reliably (e.g. one that left the
follow-up's field of view, where the best candidate inside it is no match), falls back to the field over
the whole follow-up, computed once.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.geometry import Geometry, box_slices
from ..core.io.volumes import Volume
from ..core.options import FieldOptions, MatchOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeaturePyramid
from ..field import register
from ..grid.displacement_field import DisplacementField
from ..matching import match_points
from .carry import carry_labelmap


def _voxel_box(geometry: Geometry, points_lps_mm: np.ndarray, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The voxels ``[lo, hi)`` (ijk) of ``geometry`` covering ``points_lps_mm`` grown by ``margin_mm``."""
    margin = np.ceil(margin_mm / np.min(geometry.spacing_mm)).astype(int)
    return geometry.covering_box(points_lps_mm, margin_voxels=int(margin))


def _around_centre(field_options: FieldOptions, margin_mm: float) -> FieldOptions:
    """The field options of a lesion's box: its first level searches around the centre's match, no
    farther than the box's margin."""
    if not field_options.levels:
        return field_options
    first = field_options.levels[0]
    levels = (replace(first, search_radius_mm=min(first.search_radius_mm, margin_mm)), *field_options.levels[1:])
    return replace(field_options, levels=levels)


def carry_around_lesions(
    baseline: Volume,
    followup: Volume,
    baseline_labelmap: np.ndarray,
    labels: list[int],
    seeds_lps_mm: np.ndarray,
    baseline_pyramid: FeaturePyramid,
    followup_pyramid: FeaturePyramid,
    field_options: FieldOptions | None,
    margin_mm: float,
    progress: ProgressFn = no_progress,
) -> np.ndarray:
    """The ``labels`` of ``baseline_labelmap`` (``[k, j, i]`` on the baseline grid; ``seeds_lps_mm``
    their baseline centres, one row per label) carried onto the follow-up grid, each through the field
    of its own box (the module notes); an earlier label keeps a voxel two would take."""
    field_options = field_options or FieldOptions()
    search = MatchOptions(search_radius_mm=field_options.levels[0].search_radius_mm) if field_options.levels \
        else MatchOptions()
    centres = match_points(baseline_pyramid, followup_pyramid, seeds_lps_mm, None, search, scaled(progress, 0.0, 0.2))
    carried = np.zeros(followup.geometry.shape_kji, np.int32)
    whole_field: DisplacementField | None = None
    extents = ndimage.find_objects(baseline_labelmap)
    for n, label in enumerate(labels):
        report = scaled(progress, 0.2 + 0.8 * n / len(labels), 0.2 + 0.8 * (n + 1) / len(labels))
        extent = extents[label - 1] if label - 1 < len(extents) else None
        if extent is None:
            continue
        report("field", 0.0, f"lesion {label}: field around it")
        carried_part = None
        if centres.reliable[n]:
            lesion_lps = baseline.geometry.box_corners_lps([s.start for s in extent[::-1]],
                                                           [s.stop for s in extent[::-1]])
            shift_mm = centres.points_lps_mm[n] - seeds_lps_mm[n]  # baseline -> follow-up
            carried_part = _carried_in_box(baseline, followup, baseline_labelmap, label, lesion_lps, shift_mm,
                                           baseline_pyramid, followup_pyramid, field_options, margin_mm, report)
        if carried_part is None:  # no reliable centre, or the box is refused: the whole follow-up's field, once
            if whole_field is None:
                whole_field = register(followup_pyramid, baseline_pyramid, followup, field_options,
                                       progress=scaled(report, 0.0, 0.9))
            carried_part = (carry_labelmap(baseline_labelmap, baseline.geometry, [label], whole_field),
                            box_slices(np.zeros(3, int), followup.geometry.shape_ijk))
        part, window = carried_part
        free = (part == label) & (carried[window] == 0)
        carried[window][free] = label
    return carried


def _carried_in_box(
    baseline: Volume,
    followup: Volume,
    baseline_labelmap: np.ndarray,
    label: int,
    lesion_lps_mm: np.ndarray,
    shift_mm: np.ndarray,
    baseline_pyramid: FeaturePyramid,
    followup_pyramid: FeaturePyramid,
    field_options: FieldOptions,
    margin_mm: float,
    progress: ProgressFn,
) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """``label`` (its baseline box's corners ``lesion_lps_mm``, moved by ``shift_mm`` into the follow-up)
    carried onto the follow-up box around it by the field registered there: that box's ``[k, j, i]``
    labels and its slices of the follow-up grid; None when the box is too thin or the registration
    refuses it."""
    fixed_lo, fixed_hi = _voxel_box(followup.geometry, lesion_lps_mm + shift_mm, margin_mm)
    if np.any(fixed_hi - fixed_lo < 2):
        return None
    fixed_corners = followup.geometry.box_corners_lps(fixed_lo, fixed_hi)
    moving_lo, moving_hi = _voxel_box(baseline.geometry, fixed_corners - shift_mm, margin_mm)
    if np.any(moving_hi - moving_lo < 2):
        return None
    window = box_slices(fixed_lo, fixed_hi)
    fixed_box = followup.geometry.box(fixed_lo, fixed_hi)
    fixed = Volume(np.ascontiguousarray(followup.voxels[window]), fixed_box, followup.name)
    centre_shift = DisplacementField(np.broadcast_to(-shift_mm, (*fixed_box.shape_kji, 3)).copy(), fixed_box)
    try:
        field = register(followup_pyramid.cropped(fixed_lo, fixed_hi), baseline_pyramid.cropped(moving_lo, moving_hi),
                         fixed, _around_centre(field_options, margin_mm), progress=scaled(progress, 0.0, 0.9),
                         initial=centre_shift)
    except BadInputError:
        return None
    progress("carry", 0.9, f"lesion {label}: carrying it")
    return carry_labelmap(baseline_labelmap, baseline.geometry, [label], field), window
