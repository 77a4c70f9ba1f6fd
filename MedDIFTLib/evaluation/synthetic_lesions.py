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

A series (:func:`make_lesion_series`): the same baseline and 2-4 follow-ups, each made as a pair's
follow-up with its own draw of the motion, each nodule following a volume course over time (grows,
shrinks, shrinks then grows; in some series one disappears). The truth adds the RECIST 1.1 response
per time point, from the truth labelmaps by the rules of :mod:`MedDIFTLib.lesions.response`.

Metrics per lesion (:func:`lesion_metrics`): centre error (mm), hit within the follow-up radius and
within 10 mm (the DeepLesion tracking metrics), Dice of the follow-up segmentation, and the
volume-change error (percentage points, against the change of the truth labelmaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.geometry import Geometry, box_slices
from ..core.io.volumes import Volume
from ..core.options import SeriesOptions, SimulationOptions
from ..lesions.measure import measure
from ..lesions.response import Response
from ..lesions.series import LesionVisit, choose_targets, responses_of
from .dirlab_motion import DIRLAB_MOTIONS
from .simulate import LUNG_HU, SyntheticPair, lung_mask, make_synthetic_pair

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
    return box_slices(low, high)


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


def blend_moved_nodules(ct: Volume, moved: SyntheticPair, nodules: np.ndarray, moved_centres_lps_mm: np.ndarray,
                        centres_lps_mm: np.ndarray, radii_mm: np.ndarray, density_hu: np.ndarray, texture_seed: int,
                        noise: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The moved CT of ``moved`` (the warp of ``ct``) with nodules ``nodules`` (indices into
    ``centres_lps_mm``, LPS mm on ``ct``, ``radii_mm`` and ``density_hu``) blended in at their moved
    centres ``moved_centres_lps_mm`` (one per entry of ``nodules``), their texture pulled through the
    motion, and their labelmap (label n+1 = nodule n). A nodule of radius 0 is gone: nothing is
    blended and it has no label."""
    followup = moved.moving.voxels.copy()
    labelmap = np.zeros(moved.moving.geometry.shape_kji, np.int32)
    for n, centre in zip(nodules, moved_centres_lps_mm):
        if radii_mm[n] <= 0:
            continue
        box = _box_around(moved.moving.geometry, centre, radii_mm[n] + 5.0)
        world = _voxel_world(moved.moving.geometry, box)
        field_kji = moved.field_geometry.lps_to_ijk(world.reshape(-1, 3))[:, ::-1].T
        pulled = world.reshape(-1, 3) + np.stack(
            [ndimage.map_coordinates(moved.pull_field_lps_mm[..., c], field_kji, order=1, mode="nearest")
             for c in range(3)], axis=1)
        distance = np.linalg.norm(pulled - centres_lps_mm[n], axis=1).reshape(world.shape[:3])
        texture_box = _box_around(ct.geometry, centres_lps_mm[n], radii_mm[n] + 4 * EDGE_MM)
        texture_kji = (ct.geometry.lps_to_ijk(pulled)[:, ::-1] - [s.start for s in texture_box]).T
        texture = ndimage.map_coordinates(_texture(ct.geometry, texture_box, density_hu[n], texture_seed + n),
                                          texture_kji, order=1, mode="nearest").reshape(distance.shape)
        texture += noise.normal(0.0, SimulationOptions.noise_hu, distance.shape)
        weight = _edge_weight(distance, radii_mm[n])
        followup[box] = followup[box] * (1.0 - weight) + texture * weight
        labelmap[box][distance <= radii_mm[n]] = n + 1
    return followup.astype(np.float32), labelmap


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
    followup, followup_labelmap = blend_moved_nodules(ct, moved, kept, moved.moving_points.points_lps_mm, centres,
                                                      grown, density, seed * 100, np.random.default_rng(seed + 2))
    baseline_labelmap[~np.isin(baseline_labelmap, kept + 1)] = 0
    return LesionPair(Volume(baseline.voxels, baseline.geometry, f"{ct.name}_baseline_seed{seed}"),
                      Volume(followup, moved.moving.geometry, f"{ct.name}_followup_seed{seed}"),
                      baseline_labelmap, followup_labelmap, [int(n + 1) for n in kept], centres[kept],
                      moved.moving_points.points_lps_mm, radii[kept], grown[kept], factors[kept])


TRAJECTORIES = ("grows", "shrinks", "shrinks then grows")
"""The volume courses a nodule of a series draws from; ``disappears`` is given to one nodule of a series."""
MOTION_FACTOR = (0.6, 1.4)
"""Range of the factor drawn per follow-up on the motion's size (the breathing model's mean motion, or the
DIR-Lab displacements' scale): breath holds differ in depth."""


@dataclass
class LesionSeries:
    """A baseline and its follow-ups (``scans``, HU, baseline first), the truth per time point:
    ``labelmaps[t]`` (``[k, j, i]`` int32 on scan ``t``'s grid, label n+1 = nodule n, empty for a nodule
    gone), ``centres_lps_mm[t, n]`` (where the motion takes the nodule's centre, also once it is gone),
    ``radii_mm[t, n]`` (0 = gone); each nodule's ``trajectories`` name, the mean true motion of each
    follow-up at the nodule centres (mm), and the RECIST 1.1 ``targets`` and ``responses`` of the truth
    labelmaps (:func:`labelmap_responses`)."""

    scans: list[Volume]
    labelmaps: list[np.ndarray]
    labels: list[int]
    centres_lps_mm: np.ndarray
    radii_mm: np.ndarray
    trajectories: list[str]
    motion_mm: list[float]
    targets: list[int]
    responses: list[Response]

    def pair(self, time_point: int) -> LesionPair:
        """Baseline and follow-up ``time_point`` as a pair (what :func:`lesion_metrics` scores)."""
        return LesionPair(self.scans[0], self.scans[time_point], self.labelmaps[0], self.labelmaps[time_point],
                          self.labels, self.centres_lps_mm[0], self.centres_lps_mm[time_point], self.radii_mm[0],
                          self.radii_mm[time_point], (self.radii_mm[time_point] / self.radii_mm[0]) ** 3)


def volume_course(trajectory: str, followups: int, rng: np.random.Generator,
                  volume_factor: tuple[float, float] = (0.25, 3.0)) -> np.ndarray:
    """The volume factors (against baseline) of a nodule at follow-ups 1..``followups``, log-linear in time
    between the factors drawn (log-uniform) for its turning points:

    - ``grows`` to 1.5x-``volume_factor[1]`` at the last follow-up;
    - ``shrinks`` to ``volume_factor[0]``-0.6x;
    - ``shrinks then grows``: down to ``volume_factor[0]``-0.6x at follow-up ceil(followups / 2), then up
      to 1x-``volume_factor[1]`` at the last;
    - ``disappears``: shrinking towards ``volume_factor[0]``, gone (0) from follow-up followups // 2 + 1 on.

    The default range reaches RECIST's thresholds: a sphere's diameter is 30 % smaller at 0.34x its volume
    and 20 % larger at 1.73x.
    """
    time = np.arange(1, followups + 1, dtype=float)
    low, high = np.log(volume_factor[0]), np.log(volume_factor[1])
    if trajectory == "grows":
        return np.exp(rng.uniform(np.log(1.5), high) * time / followups)
    if trajectory == "shrinks":
        return np.exp(rng.uniform(low, np.log(0.6)) * time / followups)
    if trajectory == "shrinks then grows":
        turn = math.ceil(followups / 2)
        nadir, last = rng.uniform(low, np.log(0.6)), rng.uniform(0.0, high)
        return np.exp(np.interp(time, [0.0, turn, followups], [0.0, nadir, last]))
    if trajectory == "disappears":
        gone = followups // 2 + 1
        return np.where(time < gone, np.exp(low * time / gone), 0.0)
    raise ValueError(f"unknown trajectory {trajectory!r}; choose from {(*TRAJECTORIES, 'disappears')}")


def make_lesion_series(ct: Volume, seed: int = 0, time_points: int = 4, motion: str = "breathing",
                       mean_motion_mm: float = 7.0, count: int = 4, radius_mm: tuple[float, float] = (5.0, 12.0),
                       volume_factor: tuple[float, float] = (0.25, 3.0), disappears: bool = False) -> LesionSeries:
    """A series of ``time_points`` scans (the baseline and 2-4 follow-ups) with ``count`` nodules of
    ``ct``, made as :func:`make_lesion_pair` makes its follow-up: each follow-up is ``ct`` warped by its
    own draw of the ``motion`` family (another random motion of the breathing model, its mean motion
    ``mean_motion_mm`` times a factor in :data:`MOTION_FACTOR`; the DIR-Lab motion scaled by such a
    factor), with lung density change, noise and the coarser grid, and each nodule blended in at its
    moved centre with the volume of its course (:func:`volume_course` within ``volume_factor``: a
    trajectory of :data:`TRAJECTORIES` per nodule; with ``disappears``, one nodule disappears). A nodule that leaves
    any follow-up's grid is left out of the whole series. The truth response is RECIST 1.1 on the truth
    labelmaps."""
    if not 3 <= time_points <= 5:
        raise BadInputError(f"a series has 3-5 time points (the baseline and 2-4 follow-ups), not {time_points}")
    followups = time_points - 1
    rng = np.random.default_rng(seed)
    centres, radii = nodule_sites(ct, count, radius_mm, volume_factor[1], rng)
    density = rng.uniform(0.0, 60.0, len(radii))
    trajectories = [str(name) for name in rng.choice(TRAJECTORIES, len(radii))]
    if disappears:
        trajectories[int(rng.integers(len(radii)))] = "disappears"
    factors = np.stack([volume_course(name, followups, rng, volume_factor) for name in trajectories], axis=1)
    radii_over_time = np.vstack([radii, radii * np.cbrt(factors)])
    baseline, baseline_labelmap = insert_nodules(ct, centres, radii, density, seed * 100)
    labels = [str(n + 1) for n in range(len(radii))]
    motion_seeds = np.random.SeedSequence(seed).generate_state(followups)
    moves = []
    for motion_seed in motion_seeds:
        size = float(rng.uniform(*MOTION_FACTOR))
        moves.append(make_synthetic_pair(
            ct, seed=int(motion_seed), points_lps_mm=centres, labels=labels, motion=motion,
            **({"motion_scale": size} if motion in DIRLAB_MOTIONS else {"mean_motion_mm": mean_motion_mm * size})))
    kept = np.asarray([n for n in range(len(radii)) if all(str(n + 1) in moved.moving_points.labels
                                                              for moved in moves)], int)
    if len(kept) == 0:
        raise BadInputError(f"{ct.name or 'CT'}: every nodule leaves the grid of a follow-up")
    scans = [Volume(baseline.voxels, baseline.geometry, f"{ct.name}_series{seed}_t0")]
    labelmaps = [np.where(np.isin(baseline_labelmap, kept + 1), baseline_labelmap, 0).astype(np.int32)]
    moved_centres = [centres[kept]]
    for time_point, (moved, motion_seed) in enumerate(zip(moves, motion_seeds), start=1):
        where = dict(zip(moved.moving_points.labels, moved.moving_points.points_lps_mm))
        moved_centres.append(np.asarray([where[str(n + 1)] for n in kept]))
        voxels, labelmap = blend_moved_nodules(ct, moved, kept, moved_centres[-1], centres,
                                               radii_over_time[time_point], density, seed * 100,
                                               np.random.default_rng(int(motion_seed) + 2))
        scans.append(Volume(voxels, moved.moving.geometry, f"{ct.name}_series{seed}_t{time_point}"))
        labelmaps.append(labelmap)
    motion_mm = [float(np.linalg.norm(moved_centres[t] - moved_centres[0], axis=1).mean())
                 for t in range(1, time_points)]
    labels_kept = [int(n + 1) for n in kept]
    targets, responses = labelmap_responses(scans, labelmaps, labels_kept)
    return LesionSeries(scans, labelmaps, labels_kept, np.stack(moved_centres), radii_over_time[:, kept],
                        [trajectories[n] for n in kept], motion_mm, targets, responses)


def labelmap_responses(scans: list[Volume], labelmaps: list[np.ndarray], labels: list[int],
                       options: SeriesOptions | None = None) -> tuple[list[int], list[Response]]:
    """The RECIST 1.1 target lesions and response per time point of one labelmap per scan (baseline
    first; each lesion measured on its scan as :func:`MedDIFTLib.lesions.measure.measure` does, the
    targets and sums as :func:`MedDIFTLib.lesions.series.track_series` chooses and adds them)."""
    visits = [[LesionVisit(label, str(label), time_point, np.full(3, np.nan), math.nan, math.nan,
                           measure(labelmap == label, scan.voxels, scan.geometry))
               for label in labels] for time_point, (scan, labelmap) in enumerate(zip(scans, labelmaps))]
    targets = choose_targets(visits[0], options or SeriesOptions())
    return targets, responses_of(visits, targets)


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
