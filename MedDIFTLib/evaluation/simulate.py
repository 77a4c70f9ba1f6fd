"""Realistic synthetic pairs: a real CT warped by a known breathing-like motion.

Real image pairs with landmarks are few (../shared/data holds four liver MRI pairs), so accuracy is
also measured on pairs made from one real CT (the fixed image) and a moving image built from it:

- motion: largest near the diaphragm (it grows from the lung apex to the lung base), mostly
  superior-inferior with a smaller anterior-posterior part, confined to the lungs by a smooth
  lung weight (so the chest wall barely moves: approximate sliding), plus a seeded smooth random
  component; scaled so that the mean displacement at the fixed points is ``mean_motion_mm``;
- lung density follows the local volume change (mass preservation: HU + 1000 scales with the
  Jacobian determinant of the moving-to-fixed map inside lung-density voxels);
- the moving image lives on a slightly coarser grid (``moving_spacing_factor``) and carries
  Gaussian noise of ``noise_hu``.

The motion is stored as a pull field ``v`` on the moving grid: ``M(y) = F(y + v(y))``. A fixed
point ``x`` corresponds to the moving point ``y`` with ``y + v(y) = x``, solved by fixed-point
iteration (the field is contractive).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.points import PointSet
from ..core.io.volumes import Volume
from ..core.options import SimulationOptions, parse_options
from ..field import jacobian_determinant
from ..grid.displacement_field import DisplacementField
from .dirlab_motion import DIRLAB_MOTIONS, dirlab_pull_field

LUNG_HU = -400.0
LUNG_DENSITY_HU = -200.0


@dataclass
class SyntheticPair:
    """Fixed and moving volumes with corresponding points (ground truth), LPS mm."""

    fixed: Volume
    moving: Volume
    fixed_points: PointSet
    moving_points: PointSet
    pull_field_lps_mm: np.ndarray  # [k, j, i, 3] on field_geometry (trilinear): M(y) = F(y + v(y))
    field_geometry: Geometry
    jacobian_min: float


def _sample_field(field_lps_mm: np.ndarray, geometry: Geometry, points_lps_mm: np.ndarray) -> np.ndarray:
    """Trilinear samples (N, 3) of a [k, j, i, 3] field at LPS points; nearest-edge outside."""
    kji = geometry.lps_to_ijk(points_lps_mm)[:, ::-1].T
    return np.stack(
        [ndimage.map_coordinates(field_lps_mm[..., c], kji, order=1, mode="nearest") for c in range(3)], axis=1
    )


def invert_pull_field(
    field_lps_mm: np.ndarray, geometry: Geometry, points_lps_mm: np.ndarray, iterations: int = 50
) -> np.ndarray:
    """Solve ``y + v(y) = x`` for each x (N, 3) by fixed-point iteration (v contractive)."""
    targets = np.asarray(points_lps_mm, float).reshape(-1, 3)
    solution = targets.copy()
    for _ in range(iterations):
        solution = targets - _sample_field(field_lps_mm, geometry, solution)
    return solution


def lung_mask(volume: Volume) -> np.ndarray:
    """Lung-density voxels (HU < -400) without the air around the body.

    Air components reaching the corner columns of the axial slices are taken as outside air.
    """
    air = volume.voxels < LUNG_HU
    labels, _ = ndimage.label(air)
    corners = labels[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    outside = np.unique(corners[corners > 0])
    return air & ~np.isin(labels, outside)


def forstner_keypoints(
    volume: Volume, mask: np.ndarray, count: int, margin_mm: float, seed: int = 0, min_spacing_mm: float = 2.0
) -> np.ndarray:
    """Up to ``count`` distinctive points (LPS mm) inside ``mask``: Förstner corner maxima.

    The response is det/trace of the gradient structure tensor (integration 2 mm); maxima are
    kept at least ~4 voxels apart and ``margin_mm`` inside the grid. Fine grids are first
    averaged to voxels of at least ``min_spacing_mm`` (keypoints need no finer placement).
    """
    factors = np.maximum(1, np.floor(min_spacing_mm / np.asarray(volume.geometry.spacing_mm))).astype(int)
    if (factors > 1).any():
        geometry = volume.geometry.downsampled(tuple(factors))
        volume = Volume(_block_mean(volume.voxels, factors[::-1]), geometry, volume.name)
        mask = _block_mean(mask, factors[::-1]) > 0.5
    spacing_kji = np.asarray(volume.geometry.spacing_mm)[::-1]
    image = ndimage.gaussian_filter(volume.voxels, 1.0 / np.maximum(spacing_kji, 1e-6))
    gradients = [ndimage.sobel(image, axis=a) / spacing_kji[a] for a in range(3)]
    sigma = 2.0 / spacing_kji
    tensor = {}
    for a in range(3):
        for b in range(a, 3):
            tensor[a, b] = ndimage.gaussian_filter(gradients[a] * gradients[b], sigma)
    del gradients
    det = (
        tensor[0, 0] * (tensor[1, 1] * tensor[2, 2] - tensor[1, 2] ** 2)
        - tensor[0, 1] * (tensor[0, 1] * tensor[2, 2] - tensor[1, 2] * tensor[0, 2])
        + tensor[0, 2] * (tensor[0, 1] * tensor[1, 2] - tensor[1, 1] * tensor[0, 2])
    )
    response = det / (tensor[0, 0] + tensor[1, 1] + tensor[2, 2] + 1e-6)
    del tensor, det
    margin = np.ceil(margin_mm / spacing_kji).astype(int)
    inside = np.zeros_like(mask)
    inside[margin[0] : -margin[0] or None, margin[1] : -margin[1] or None, margin[2] : -margin[2] or None] = True
    window = np.maximum(3, np.round(4.0 * np.min(spacing_kji) / spacing_kji).astype(int) * 2 + 1)
    peaks = (response == ndimage.maximum_filter(response, size=tuple(window))) & mask & inside & (response > 0)
    kji = np.argwhere(peaks)
    if len(kji) == 0:
        raise BadInputError(f"{volume.name or 'volume'}: no distinctive points found inside the lungs")
    strongest = np.argsort(response[tuple(kji.T)])[::-1][: 4 * count]
    chosen = np.random.default_rng(seed).permutation(strongest)[:count]
    return volume.geometry.ijk_to_lps(kji[chosen][:, ::-1].astype(float))


def _moving_geometry(fixed: Geometry, spacing_factor: float) -> Geometry:
    """Same extent and orientation as ``fixed`` with voxels ``spacing_factor`` times larger."""
    spacing = np.asarray(fixed.spacing_mm) * spacing_factor
    extent = np.asarray(fixed.spacing_mm) * (np.asarray(fixed.shape_ijk) - 1)
    shape = np.floor(extent / spacing).astype(int) + 1
    return Geometry.create(shape, spacing, fixed.origin_lps_mm, fixed.direction_matrix)


def _world_axes(geometry: Geometry) -> np.ndarray:
    """LPS coordinates [k, j, i, 3] of every voxel centre (float32)."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in geometry.shape_kji], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1)
    affine = geometry.affine_ijk_to_lps.astype(np.float32)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _block_mean(values: np.ndarray, factors_kji: np.ndarray) -> np.ndarray:
    """Average over blocks of ``factors_kji`` voxels (the grid of ``Geometry.downsampled``)."""
    shape = [n // f for n, f in zip(values.shape, factors_kji)]
    cropped = values[: shape[0] * factors_kji[0], : shape[1] * factors_kji[1], : shape[2] * factors_kji[2]]
    blocks = cropped.reshape(shape[0], factors_kji[0], shape[1], factors_kji[1], shape[2], factors_kji[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _coarse_lungs(fixed: Volume, step_mm: float) -> tuple[Geometry, np.ndarray]:
    """A grid of about ``step_mm`` covering the fixed image and the lung fraction [k, j, i] of its voxels."""
    factors = np.maximum(1, np.floor(step_mm / np.asarray(fixed.geometry.spacing_mm))).astype(int)
    lungs = lung_mask(fixed)
    if lungs.mean() < 0.01:
        lungs = fixed.voxels < LUNG_HU
    return fixed.geometry.downsampled(tuple(factors)), _block_mean(lungs, factors[::-1])


def breathing_pull_field(fixed: Volume, seed: int, step_mm: float = 4.0) -> tuple[Geometry, np.ndarray]:
    """Unscaled breathing-like pull field [k, j, i, 3] (LPS mm, peak ~1 mm) and its grid.

    The motion is smooth on a scale of centimetres, so it lives on a grid of about ``step_mm``
    covering the fixed image; trilinear interpolation defines it everywhere.
    """
    coarse, lung_fraction = _coarse_lungs(fixed, step_mm)
    spacing_kji = np.asarray(coarse.spacing_mm)[::-1]
    weight = ndimage.gaussian_filter(lung_fraction, 15.0 / spacing_kji)
    weight /= max(float(weight.max()), 1e-6)
    world = _world_axes(coarse)
    in_lung = lung_fraction > 0.5
    lung_world = world[in_lung] if in_lung.any() else world.reshape(-1, 3)
    top, bottom = float(lung_world[:, 2].max()), float(lung_world[:, 2].min())
    towards_base = np.clip((top - world[..., 2]) / max(top - bottom, 1e-6), 0.0, 1.0) ** 1.2
    front = float(lung_world[:, 1].max())
    towards_front = np.clip((front - world[..., 1]) / max(float(np.ptp(lung_world[:, 1])), 1e-6), 0.0, 1.0)
    field = np.zeros((*coarse.shape_kji, 3), np.float32)
    field[..., 2] = -weight * towards_base
    field[..., 1] = 0.3 * weight * towards_base * towards_front
    rng = np.random.default_rng(seed)
    for c in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal(coarse.shape_kji).astype(np.float32), 20.0 / spacing_kji)
        field[..., c] += 0.15 * weight * noise / max(float(np.abs(noise).max()), 1e-6)
    return coarse, field


def motion_pull_field(fixed: Volume, options: SimulationOptions, step_mm: float = 4.0) -> tuple[Geometry, np.ndarray]:
    """The pull field [k, j, i, 3] (LPS mm) of ``options.motion`` on a grid of about ``step_mm``: the
    unscaled breathing model, or the DIR-Lab motion in mm (times ``motion_scale``, see
    :mod:`MedDIFTLib.evaluation.dirlab_motion`)."""
    if options.motion not in DIRLAB_MOTIONS:
        return breathing_pull_field(fixed, options.seed, step_mm)
    coarse, lung_fraction = _coarse_lungs(fixed, step_mm)
    lungs = lung_fraction > 0.5
    field = dirlab_pull_field(DIRLAB_MOTIONS[options.motion], lungs if lungs.any() else lung_fraction > 0,
                              coarse, coarse, options.motion_scale)
    return coarse, field


def make_synthetic_pair(
    volume: Volume,
    seed: int = SimulationOptions.seed,
    mean_motion_mm: float = SimulationOptions.mean_motion_mm,
    points_lps_mm: np.ndarray | None = None,
    labels: list[str] | None = None,
    num_keypoints: int = SimulationOptions.num_keypoints,
    noise_hu: float = SimulationOptions.noise_hu,
    moving_spacing_factor: float = SimulationOptions.spacing_factor,
    allow_folding: bool = SimulationOptions.allow_folding,
    motion: str = SimulationOptions.motion,
    motion_scale: float = SimulationOptions.motion_scale,
) -> SyntheticPair:
    """Warp ``volume`` (the fixed image, HU) into a moving image with known motion
    (the settings of :class:`SimulationOptions`, checked there).

    ``points_lps_mm`` (e.g. real landmarks) become the fixed points; without them Förstner
    keypoints inside the lungs are used. The breathing motion is scaled to ``mean_motion_mm`` at the
    points; a DIR-Lab motion keeps its real size times ``motion_scale``. Points whose true partner
    leaves the moving grid are dropped (with their labels). A motion whose map folds (Jacobian
    determinant <= 0 somewhere) has no one-to-one ground truth: it is refused unless ``allow_folding``.
    """
    options = parse_options(SimulationOptions, {
        "seed": seed, "mean_motion_mm": mean_motion_mm, "num_keypoints": num_keypoints, "noise_hu": noise_hu,
        "spacing_factor": moving_spacing_factor, "allow_folding": allow_folding, "motion": motion,
        "motion_scale": motion_scale})
    moving_geometry = _moving_geometry(volume.geometry, moving_spacing_factor)
    field_geometry, unit_field = motion_pull_field(volume, options)
    scaled = motion not in DIRLAB_MOTIONS
    if points_lps_mm is None:
        mask = lung_mask(volume)
        if mask.mean() < 0.01:
            mask = volume.voxels < LUNG_HU
        points_lps_mm = forstner_keypoints(volume, mask, num_keypoints, margin_mm=10.0, seed=seed)
        labels = [f"K-{n + 1}" for n in range(len(points_lps_mm))]
    points = np.asarray(points_lps_mm, float).reshape(-1, 3)
    labels = labels if labels is not None else [str(n + 1) for n in range(len(points))]
    scale = 1.0 if mean_motion_mm > 0 or not scaled else 0.0
    for _ in range(4 if mean_motion_mm > 0 and scaled else 0):
        motion = np.linalg.norm(invert_pull_field(unit_field * scale, field_geometry, points) - points, axis=1).mean()
        if motion < 1e-6 * scale:
            raise BadInputError("the points lie where the synthetic motion is zero (outside the lungs?)")
        scale *= mean_motion_mm / motion
    pull_field = unit_field * np.float32(scale)
    determinant = jacobian_determinant(DisplacementField(pull_field, field_geometry))
    if determinant.min() <= 0 and not allow_folding:
        size = f"a mean motion of {mean_motion_mm:g} mm" if scaled else f"{motion} at scale {motion_scale:g}"
        raise BadInputError(f"{size} folds the synthetic ground truth (Jacobian determinant min "
                            f"{determinant.min():.2f} <= 0): choose a smaller motion")

    sample_lps = _world_axes(moving_geometry).reshape(-1, 3)
    field_kji = field_geometry.lps_to_ijk(sample_lps)[:, ::-1].T
    for c in range(3):
        sample_lps[:, c] += ndimage.map_coordinates(pull_field[..., c], field_kji, order=1, mode="nearest")
    volume_change = ndimage.map_coordinates(determinant, field_kji, order=1, mode="nearest")
    del field_kji
    source_kji = volume.geometry.lps_to_ijk(sample_lps)[:, ::-1].T
    del sample_lps
    low = float(volume.voxels.min())
    moving = ndimage.map_coordinates(volume.voxels, source_kji, order=1, mode="constant", cval=low)
    del source_kji
    lung_density = moving < LUNG_DENSITY_HU
    moving[lung_density] = (moving[lung_density] + 1000.0) * volume_change[lung_density] - 1000.0
    moving = moving.reshape(moving_geometry.shape_kji).astype(np.float32)
    moving += np.random.default_rng(seed + 1).normal(0.0, noise_hu, moving.shape).astype(np.float32)

    moving_volume = Volume(moving, moving_geometry, name=f"{volume.name or 'volume'}_moved_seed{seed}")
    true_points = invert_pull_field(pull_field, field_geometry, points)
    keep = moving_geometry.contains_lps(true_points, margin_voxels=0.0)
    kept_labels = [label for label, kept in zip(labels, keep) if kept]
    return SyntheticPair(
        fixed=volume,
        moving=moving_volume,
        fixed_points=PointSet(points[keep], kept_labels),
        moving_points=PointSet(true_points[keep], kept_labels),
        pull_field_lps_mm=pull_field,
        field_geometry=field_geometry,
        jacobian_min=float(determinant.min()),
    )


def phantom_ct(seed: int = 0) -> Volume:
    """A small synthetic chest-like CT in HU (64 x 56 x 48 voxels of 2.5 mm): a soft-tissue body,
    two lungs at -850 HU and vessel-like bright tubes and nodules inside them. It stands in for a
    real scan when none is at hand (``meddift demo`` without ../shared/data)."""
    rng = np.random.default_rng(seed)
    geometry = Geometry.create((64, 56, 48), (2.5, 2.5, 2.5), (-80.0, -70.0, -60.0))
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in geometry.shape_kji], indexing="ij")
    centre = np.asarray(geometry.shape_ijk, np.float32) / 2
    body = ((i - centre[0]) / 30) ** 2 + ((j - centre[1]) / 25) ** 2 < 1
    voxels = np.where(body, 40.0, -1000.0).astype(np.float32)
    for side in (-1, 1):
        lung = (((i - centre[0] - side * 13) / 11) ** 2 + ((j - centre[1]) / 17) ** 2 + ((k - centre[2]) / 21) ** 2) < 1
        voxels[lung] = -850.0
    lungs = voxels == -850.0
    for _ in range(60):
        start, direction = rng.uniform([8, 8, 8], np.asarray(geometry.shape_ijk) - 8), rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for step in np.linspace(0, rng.uniform(6, 18), 40):
            x, y, z = start + step * direction
            near = (i - x) ** 2 + (j - y) ** 2 + (k - z) ** 2 < rng.uniform(0.6, 1.8) ** 2
            voxels[near & lungs] = 30.0
    voxels = ndimage.gaussian_filter(voxels, 0.7) + rng.normal(0.0, 10.0, voxels.shape).astype(np.float32)
    return Volume(voxels.astype(np.float32), geometry, name="phantom")
