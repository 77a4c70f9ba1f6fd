"""Lesion measurements on one grid: volume (mL), RECIST-style axial diameters (mm), mean HU, centre.

The axial plane is the plane of the two voxel axes closest to L and P (the third is the one most
along S). Per axial slice, the long diameter is the largest distance between the lesion's voxel
centres in world mm plus one in-plane voxel (edge to edge); the short axis is the lesion's width
perpendicular to that long axis, measured the same way. The slice with the longest diameter wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from ..core.geometry import Geometry

ML_PER_MM3 = 1e-3


@dataclass(frozen=True)
class Measurement:
    """One lesion at one time point: ``volume_ml``, ``long_mm`` / ``short_mm`` (axial, RECIST-style),
    ``mean_hu`` and ``centre_lps_mm`` (centre of mass). An empty lesion has volume 0 and NaN elsewhere."""

    volume_ml: float
    long_mm: float
    short_mm: float
    mean_hu: float
    centre_lps_mm: tuple[float, float, float]
    axial_slice: int = -1


EMPTY = Measurement(0.0, float("nan"), float("nan"), float("nan"), (float("nan"),) * 3)


def axial_axis(geometry: Geometry) -> int:
    """The voxel axis (0 = i, 1 = j, 2 = k) whose direction is most along S."""
    return int(np.argmax(np.abs(geometry.direction_matrix[2])))


def _diameters(points_lp_mm: np.ndarray, voxel_mm: float) -> tuple[float, float]:
    """Long diameter and perpendicular width (mm, edge to edge) of 2D points (voxel centres)."""
    if len(points_lp_mm) == 1:
        return voxel_mm, voxel_mm
    corners = points_lp_mm
    if len(points_lp_mm) > 3:
        try:
            corners = points_lp_mm[ConvexHull(points_lp_mm).vertices]
        except QhullError:
            corners = points_lp_mm
    gaps = corners[:, None, :] - corners[None, :, :]
    lengths = np.linalg.norm(gaps, axis=-1)
    first, second = np.unravel_index(np.argmax(lengths), lengths.shape)
    axis = gaps[first, second] / max(lengths[first, second], 1e-9)
    across = points_lp_mm @ np.array([-axis[1], axis[0]])
    return float(lengths[first, second]) + voxel_mm, float(np.ptp(across)) + voxel_mm


def measure(mask: np.ndarray, image: np.ndarray, geometry: Geometry) -> Measurement:
    """Measure the lesion ``mask`` (``[k, j, i]`` bool) of ``image`` (HU) on ``geometry``."""
    kji = np.argwhere(mask)
    if len(kji) == 0:
        return EMPTY
    ijk = kji[:, ::-1].astype(float)
    world = geometry.ijk_to_lps(ijk)
    volume_ml = len(kji) * float(np.prod(geometry.spacing_mm)) * ML_PER_MM3
    axis = axial_axis(geometry)
    in_plane = [n for n in range(3) if n != axis]
    voxel_mm = float(np.mean([geometry.spacing_mm[n] for n in in_plane]))
    best = (0.0, 0.0, -1)
    for index in np.unique(kji[:, 2 - axis]):
        on_slice = kji[:, 2 - axis] == index
        long_mm, short_mm = _diameters(world[on_slice][:, :2], voxel_mm)
        if long_mm > best[0]:
            best = (long_mm, short_mm, int(index))
    return Measurement(volume_ml, best[0], best[1], float(image[mask].mean()),
                       tuple(float(v) for v in world.mean(axis=0)), best[2])


def change_pct(before: float, after: float) -> float:
    """Relative change in percent (NaN when ``before`` is zero or either is NaN)."""
    if not np.isfinite(before) or not np.isfinite(after) or before <= 0:
        return float("nan")
    return 100.0 * (after / before - 1.0)
