"""Sub-voxel refinement of point matches: the pattern search on the finest level."""

import numpy as np
import pytest
import torch

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.options import MatchOptions
from MedDIFTLib.features import FeatureLevel, FeaturePyramid
from MedDIFTLib.matching import match_points
from MedDIFTLib.matching.descriptors import sample_patches
from MedDIFTLib.matching.similarity import PatchSimilarity
from MedDIFTLib.matching.subvoxel import _PATTERN, _moved_patches, pattern_applies, pattern_refine

THICK = Geometry.create((40, 40, 12), (0.7, 0.7, 2.8), (3.0, -7.0, 11.0))
"""An image of thick slices; its isotropic working grid (1.4 mm) carries the features."""


def _blob_pyramid(shift_mm: np.ndarray, seed: int = 3) -> FeaturePyramid:
    """Smooth analytic features (sums of Gaussian blobs in mm) on the working grid of :data:`THICK`,
    sampled at ``x - shift_mm``: a fixed point ``x`` lies at ``x + shift_mm`` in this pyramid."""
    grid = THICK.working_grid(1.4)
    generator = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape_kji], indexing="ij")
    voxels_lps = grid.ijk_to_lps(np.stack([i, j, k], -1).reshape(-1, 3).astype(float))
    lower, upper = voxels_lps.min(axis=0), voxels_lps.max(axis=0)
    voxels_lps = voxels_lps - shift_mm
    channels = []
    for _ in range(6):
        centres = generator.uniform(lower, upper, size=(40, 3))
        signs = generator.choice([-1.0, 1.0], size=40)
        squared = ((voxels_lps[:, None, :] - centres[None]) ** 2).sum(axis=2)
        channels.append((signs * np.exp(-squared / (2 * 3.0**2))).sum(axis=1).reshape(grid.shape_kji))
    features = torch.as_tensor(np.stack(channels), dtype=torch.float32)
    return FeaturePyramid([FeatureLevel("working", features, grid, 1.0, patch_radius=2)], THICK, "blobs")


@pytest.mark.parametrize("tap_step", [1, 2])
def test_moved_patches_equal_trilinear_samples_at_the_moved_taps(tap_step):
    level = _blob_pyramid(np.zeros(3)).levels[0]
    radius, step = 2, 0.25
    start_ijk = np.array([[6.3, 7.8, 5.1], [10.0, 4.45, 8.9], [3.2, 12.6, 6.7]])
    start_voxel = np.floor(start_ijk)
    centres = start_ijk - start_voxel + [[0.5, -0.25, 0.75], [0.0, 0.0, 0.0], [-0.75, 0.5, 0.25]]
    boxes = level.boxes(start_voxel.astype(int) - radius - 1, [2 * radius + 4] * 3)
    moved = _moved_patches(boxes, torch.as_tensor(centres, dtype=torch.float32), step, radius, tap_step)
    taps = np.arange(-radius, radius + 1, tap_step, dtype=float)
    tk, tj, ti = np.meshgrid(taps, taps, taps, indexing="ij")
    taps_ijk = np.stack([ti.ravel(), tj.ravel(), tk.ravel()], axis=1)
    positions_ijk = (start_voxel + centres)[:, None, None, :] + step * _PATTERN[None, :, None, :] + taps_ijk[None, None]
    positions_lps = level.geometry.ijk_to_lps(positions_ijk.reshape(-1, 3)).reshape(3, -1, 3)
    reference = sample_patches(level, positions_lps).reshape(moved.shape)
    normalised = moved / moved.norm(dim=3, keepdim=True)
    np.testing.assert_allclose(normalised.numpy(), reference.numpy(), atol=1e-5)


def test_a_fraction_of_a_thick_slice_is_recovered_to_a_seventh_of_a_working_voxel():
    shift_mm = np.array([0.53, -0.86, 1.94])  # 0.7 mm pixels, 2.8 mm slices, 1.4 mm working voxels
    fixed, moving = _blob_pyramid(np.zeros(3)), _blob_pyramid(shift_mm)
    points = THICK.ijk_to_lps(np.array([[14.0, 20.0, 5.0], [24.0, 16.0, 6.0], [20.0, 25.0, 4.0], [17.0, 13.0, 7.0]]))
    options = MatchOptions(search_radius_mm=5.0, backward_check=False, coarse_to_fine=False)
    refined = match_points(fixed, moving, points, options=options)
    lattice_only = match_points(fixed, moving, points, options=MatchOptions(**{**options.__dict__, "subvoxel": False}))
    refined_error = np.linalg.norm(refined.points_lps_mm - (points + shift_mm), axis=1)
    lattice_error = np.linalg.norm(lattice_only.points_lps_mm - (points + shift_mm), axis=1)
    assert refined_error.max() < 0.2, refined_error
    assert lattice_error.mean() > 3 * refined_error.mean(), (lattice_error, refined_error)


def test_the_pattern_never_leaves_the_moving_volume():
    fixed, moving = _blob_pyramid(np.zeros(3)), _blob_pyramid(np.array([-2.0, -2.0, -4.0]))
    corner = THICK.ijk_to_lps(np.zeros((1, 3)))
    similarity = PatchSimilarity(fixed, moving, MatchOptions())
    refined = pattern_refine(similarity, similarity.fixed_descriptors(corner), corner)
    assert THICK.contains_lps(refined, margin_voxels=0.0).all()
    far = THICK.ijk_to_lps(np.array([[39.0, 39.0, 11.0]]))
    refined = pattern_refine(similarity, similarity.fixed_descriptors(far), far)
    assert THICK.contains_lps(refined, margin_voxels=0.0).all()


def test_a_flat_score_does_not_drift_and_coarse_levels_are_not_searched():
    grid = THICK.working_grid(1.4)
    flat = FeaturePyramid([FeatureLevel("flat", torch.ones((4, *grid.shape_kji)), grid, 1.0, 1)], THICK, "flat")
    points = THICK.ijk_to_lps(np.array([[14.3, 20.6, 5.2]]))
    similarity = PatchSimilarity(flat, flat, MatchOptions())
    np.testing.assert_allclose(pattern_refine(similarity, similarity.fixed_descriptors(points), points), points)
    assert pattern_applies(_blob_pyramid(np.zeros(3)))
    quarter = THICK.downsampled(4)
    level = FeatureLevel("1/4", torch.ones((4, *quarter.shape_kji)), quarter, 1.0, 0)
    coarse = FeaturePyramid([level], THICK, "diffusion")
    assert not pattern_applies(coarse)
