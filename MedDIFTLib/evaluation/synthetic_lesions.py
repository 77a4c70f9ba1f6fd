"""Longitudinal lesion pairs from a real CT, and the lesion tracking metrics.

A pair (:func:`make_lesion_pair`): solid nodules (radius ``radius_mm``, soft-tissue HU with a
smooth texture and a soft edge) are inserted deep in the lungs of the CT: the baseline. The
follow-up is the same CT with each nodule grown or shrunk by a known volume factor
(log-uniform in ``volume_factor``) in the follow-up: the CT is warped by the motion of
:func:`MedDIFTLib.evaluation.simulate.make_synthetic_pair` (with its lung density change, noise and
coarser grid) and each nodule is blended in afterwards, at the position the same motion gives it
(its texture pulled through the motion, with fresh noise). Blending after the warp keeps the
density change to the lung's share of a voxel: solid tissue does not densify, and scaling a whole
soft-edge voxel by the lung's volume change would move the nodule's visible edge away from its
true boundary where the lung is compressed. Truth: labelmaps on both grids (the nodule is where
the distance to its centre is at most its radius: the middle of the soft edge) and the centres in
both.

Metrics per lesion (:func:`lesion_metrics`): centre error (mm), hit within the follow-up radius and
within 10 mm (the DeepLesion tracking metrics), Dice of the follow-up segmentation, and the
volume-change error (percentage points, against the change of the truth labelmaps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.volumes import Volume
from ..core.options import SimulationOptions
from .simulate import LUNG_HU, lung_mask, make_synthetic_pair

EDGE_MM = 0.6
TEXTURE_HU = 25.0
HIT_MM = 10.0


@dataclass
class LesionPair:
    """Baseline and follow-up CT (HU), truth labelmaps (``[k, j, i]`` int32, label n+1 = nodule n)
    on each grid, centres (LPS mm) and radii (mm) at both time points, and the volume factors."""

    baseline: Volume
    followup: Volume
    baseline_labelmap: np.ndarray
    followup_labelmap: np.ndarray
    labels: list[int]
    baseline_centres_lps_mm: np.ndarray
    followup_centres_lps_mm: np.ndarray
    baseline_radii_mm: np.ndarray
    followup_radii_mm: np.ndarray
    volume_factors: np.ndarray


def _voxel_world(geometry: Geometry, box: tuple[slice, ...]) -> np.ndarray:
    """LPS mm ``[k, j, i, 3]`` of the voxel centres in ``box`` (``[k, j, i]`` slices)."""
    kji = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), axis=-1)
    return geometry.ijk_to_lps(kji[..., ::-1].reshape(-1, 3).astype(float)).reshape(*kji.shape)


def _box_around(geometry: Geometry, centre_lps_mm: np.ndarray, half_mm: float) -> tuple[slice, ...]:
    ijk = geometry.lps_to_ijk(np.asarray(centre_lps_mm, float)[None])[0]
    half = np.ceil(half_mm / np.asarray(geometry.spacing_mm)) + 1
    low = np.maximum(np.floor(ijk - half), 0).astype(int)
    high = np.minimum(np.ceil(ijk + half) + 1, geometry.shape_ijk).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1]))


def nodule_sites(ct: Volume, count: int, radius_mm: tuple[float, float], largest_factor: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` centres (LPS mm) and radii (mm) deep in the lungs: every nodule, grown by
    ``largest_factor`` in volume, stays 2 mm inside lung-density voxels (the lungs of
    :func:`~.simulate.lung_mask`, or every voxel below -400 HU in a crop whose lungs reach its
    corners) and 8 mm from the others; a radius that does not fit is drawn again."""
    lungs = lung_mask(ct)
    if lungs.mean() < 0.01:
        lungs = ct.voxels < LUNG_HU
    spacing_kji = np.asarray(ct.geometry.spacing_mm)[::-1]
    depth_mm = ndimage.distance_transform_edt(np.pad(lungs, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    centres, radii = [], []
    for _ in range(40 * count):
        if len(centres) == count:
            break
        radius = float(rng.uniform(*radius_mm))
        reach = radius * largest_factor ** (1.0 / 3.0)
        deep = np.argwhere(depth_mm >= reach + 2.0)
        if len(deep) == 0:
            continue
        centre = ct.geometry.ijk_to_lps(deep[rng.integers(len(deep))][::-1][None].astype(float))[0]
        if all(np.linalg.norm(centre - other) >= reach + other_reach + 8.0
               for other, other_reach in zip(centres, [r * largest_factor ** (1 / 3) for r in radii])):
            centres.append(centre)
            radii.append(radius)
    if not centres:
        raise BadInputError(f"{ct.name or 'CT'}: no room in the lungs for a nodule of {radius_mm[0]:g} mm radius")
    return np.asarray(centres), np.asarray(radii)


def _texture(geometry: Geometry, box: tuple[slice, ...], density_hu: float, seed: int) -> np.ndarray:
    """A nodule's HU over ``box`` of ``geometry``: ``density_hu`` plus smooth noise of ``TEXTURE_HU``."""
    shape = tuple(s.stop - s.start for s in box)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape),
                                    1.0 / np.asarray(geometry.spacing_mm)[::-1])
    return density_hu + TEXTURE_HU * noise / max(float(noise.std()), 1e-6)


def _edge_weight(distance_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    """The nodule's share of a voxel at ``distance_mm`` from its centre (one half at the radius)."""
    return 1.0 / (1.0 + np.exp(-(radius_mm - distance_mm) / EDGE_MM))


def insert_nodules(ct: Volume, centres_lps_mm: np.ndarray, radii_mm: np.ndarray, density_hu: np.ndarray,
                   texture_seed: int) -> tuple[Volume, np.ndarray]:
    """``ct`` with solid nodules blended in (soft edge of ``EDGE_MM``, texture of ``TEXTURE_HU``) and
    their labelmap (distance to the centre at most the radius)."""
    voxels = ct.voxels.copy()
    labelmap = np.zeros(ct.geometry.shape_kji, np.int32)
    for n, (centre, radius) in enumerate(zip(centres_lps_mm, radii_mm)):
        box = _box_around(ct.geometry, centre, radius + 4 * EDGE_MM)
        distance = np.linalg.norm(_voxel_world(ct.geometry, box) - centre, axis=-1)
        weight = _edge_weight(distance, radius)
        texture = _texture(ct.geometry, box, density_hu[n], texture_seed + n)
        voxels[box] = voxels[box] * (1.0 - weight) + texture * weight
        labelmap[box][distance <= radius] = n + 1
    return Volume(voxels.astype(np.float32), ct.geometry, ct.name), labelmap


def make_lesion_pair(ct: Volume, count: int = 6, seed: int = 0, mean_motion_mm: float = 7.0,
                     radius_mm: tuple[float, float] = (4.0, 12.0),
                     volume_factor: tuple[float, float] = (0.5, 2.0), motion: str = "breathing") -> LesionPair:
    """A baseline/follow-up pair with ``count`` nodules of ``ct`` (see the module notes); ``motion`` is
    the motion family of :class:`MedDIFTLib.core.options.SimulationOptions` (``mean_motion_mm``
    applies to the breathing model only)."""
    rng = np.random.default_rng(seed)
    centres, radii = nodule_sites(ct, count, radius_mm, volume_factor[1], rng)
    factors = np.exp(rng.uniform(np.log(volume_factor[0]), np.log(volume_factor[1]), len(radii)))
    density = rng.uniform(0.0, 60.0, len(radii))
    baseline, baseline_labelmap = insert_nodules(ct, centres, radii, density, seed * 100)
    grown = radii * factors ** (1.0 / 3.0)
    labels = [str(n + 1) for n in range(len(radii))]
    moved = make_synthetic_pair(ct, seed=seed, mean_motion_mm=mean_motion_mm, points_lps_mm=centres,
                                labels=labels, motion=motion)
    kept = np.asarray([int(label) - 1 for label in moved.moving_points.labels], int)
    followup = moved.moving.voxels.copy()
    followup_labelmap = np.zeros(moved.moving.geometry.shape_kji, np.int32)
    noise = np.random.default_rng(seed + 2)
    for n, centre in zip(kept, moved.moving_points.points_lps_mm):
        box = _box_around(moved.moving.geometry, centre, grown[n] + 5.0)
        world = _voxel_world(moved.moving.geometry, box)
        field_kji = moved.field_geometry.lps_to_ijk(world.reshape(-1, 3))[:, ::-1].T
        pulled = world.reshape(-1, 3) + np.stack(
            [ndimage.map_coordinates(moved.pull_field_lps_mm[..., c], field_kji, order=1, mode="nearest")
             for c in range(3)], axis=1)
        distance = np.linalg.norm(pulled - centres[n], axis=1).reshape(world.shape[:3])
        texture_box = _box_around(ct.geometry, centres[n], grown[n] + 4 * EDGE_MM)
        texture_kji = (ct.geometry.lps_to_ijk(pulled)[:, ::-1] - [s.start for s in texture_box]).T
        texture = ndimage.map_coordinates(_texture(ct.geometry, texture_box, density[n], seed * 100 + n),
                                          texture_kji, order=1, mode="nearest").reshape(distance.shape)
        texture += noise.normal(0.0, SimulationOptions.noise_hu, distance.shape)
        weight = _edge_weight(distance, grown[n])
        followup[box] = followup[box] * (1.0 - weight) + texture * weight
        followup_labelmap[box][distance <= grown[n]] = n + 1
    followup = Volume(followup.astype(np.float32), moved.moving.geometry, moved.moving.name)
    baseline_labelmap[~np.isin(baseline_labelmap, kept + 1)] = 0
    return LesionPair(Volume(baseline.voxels, baseline.geometry, f"{ct.name}_baseline_seed{seed}"),
                      Volume(followup.voxels, followup.geometry, f"{ct.name}_followup_seed{seed}"),
                      baseline_labelmap, followup_labelmap, [int(n + 1) for n in kept], centres[kept],
                      moved.moving_points.points_lps_mm, radii[kept], grown[kept], factors[kept])


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1 when both are empty)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float((predicted & truth).sum()) / total


def lesion_metrics(pair: LesionPair, labelmap: np.ndarray, centres_lps_mm: np.ndarray) -> list[dict]:
    """Per lesion of ``pair``: centre error (mm), hits, Dice and volume-change error (points) of a
    predicted follow-up ``labelmap`` (on the follow-up grid, the pair's label values) and centres (N, 3).

    Volume changes are relative to the baseline truth labelmap's volume; the true change is the one
    of the truth labelmaps (what a perfect segmentation on these grids measures: on thick slices it
    differs from the nominal ``volume_factors``, which are reported beside it)."""
    rows = []
    baseline_voxel_ml = float(np.prod(pair.baseline.geometry.spacing_mm)) * 1e-3
    voxel_ml = float(np.prod(pair.followup.geometry.spacing_mm)) * 1e-3
    for n, label in enumerate(pair.labels):
        error = float(np.linalg.norm(np.asarray(centres_lps_mm[n]) - pair.followup_centres_lps_mm[n]))
        baseline_ml = float((pair.baseline_labelmap == label).sum()) * baseline_voxel_ml
        predicted_ml = float((labelmap == label).sum()) * voxel_ml
        true_ml = float((pair.followup_labelmap == label).sum()) * voxel_ml
        rows.append({"label": label, "radius_mm": float(pair.followup_radii_mm[n]),
                     "volume_factor": float(pair.volume_factors[n]),
                     "true_change_pct": 100.0 * (true_ml / baseline_ml - 1.0), "centre_error_mm": error,
                     "hit_radius": bool(error <= pair.followup_radii_mm[n]), "hit_10mm": bool(error <= HIT_MM),
                     "dice": dice(labelmap == label, pair.followup_labelmap == label),
                     "volume_change_error_points": 100.0 * abs(predicted_ml - true_ml) / baseline_ml})
    return rows


def summarise(rows: list[dict]) -> dict[str, float]:
    """Centre error mean (mm), hit rates, Dice median and volume-change error median (points) over ``rows``."""
    if not rows:
        return {}
    column = {key: np.asarray([row[key] for row in rows], float) for key in rows[0]}
    return {"lesions": len(rows), "centre_error_mean_mm": float(np.nanmean(column["centre_error_mm"])),
            "hit_rate_radius": float(column["hit_radius"].mean()), "hit_rate_10mm": float(column["hit_10mm"].mean()),
            "dice_median": float(np.median(column["dice"])),
            "volume_change_error_median_points": float(np.nanmedian(column["volume_change_error_points"]))}
