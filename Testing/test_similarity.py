"""The one fused patch similarity: every evaluation (the point layout's fast boxes, the dense search's
whole-level map, the lattice layout's shared shifts, forward and backward) equals the reference
(trilinear features at every tap, then cosine) at the level's voxels, on random features over an
oblique grid of anisotropic voxels, the border included."""

import numpy as np
import pytest
import torch

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.options import MatchOptions
from MedDIFTLib.core.progress import no_progress
from MedDIFTLib.features import FeatureLevel, FeaturePyramid
from MedDIFTLib.grid.nodes import grid_points
from MedDIFTLib.matching.candidates import CandidateLattice
from MedDIFTLib.matching.lattice import _level_similarity
from MedDIFTLib.matching.similarity import PatchSimilarity, exact_similarity, voxel_similarity

_ANGLE = 0.4
OBLIQUE = Geometry.create(
    (11, 9, 7), (1.0, 1.5, 2.5), (4.0, -3.0, 8.0),
    ((np.cos(_ANGLE), 0.0, np.sin(_ANGLE)), (0.0, 1.0, 0.0), (-np.sin(_ANGLE), 0.0, np.cos(_ANGLE))),
)
"""Rotated about the second axis, voxels of three different sides."""


def _pyramid(seed: int) -> FeaturePyramid:
    """One level of rough random features on the image grid itself (every candidate on its voxels)."""
    features = torch.rand((5, *OBLIQUE.shape_kji), generator=torch.Generator().manual_seed(seed)) - 0.4
    return FeaturePyramid([FeatureLevel("grid", features, OBLIQUE, 1.0, patch_radius=2)], OBLIQUE, "random")


def _similarity(step: int, exact: bool) -> PatchSimilarity:
    return PatchSimilarity(_pyramid(1), _pyramid(2), MatchOptions(patch_step=step, exact=exact))


POINTS_IJK = np.array([[0, 0, 0], [10, 8, 6], [5, 4, 3], [1, 7, 5], [9, 2, 1]], float)
"""Fixed voxels, corners and faces among them."""


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_the_point_layouts_fast_evaluation_equals_the_reference(step, stride):
    fast, reference = _similarity(step, False), _similarity(step, True)
    lattice = CandidateLattice(np.array([2, 1, 2]), np.array([stride, 1, stride]), 100.0)
    fast_plan, reference_plan = fast.plan(lattice), reference.plan(lattice)
    assert [level.exact for level in fast_plan.levels] == [False]
    assert [level.exact for level in reference_plan.levels] == [True]
    descriptors = fast.fixed_descriptors(OBLIQUE.ijk_to_lps(POINTS_IJK))
    centres = POINTS_IJK[::-1]  # moving windows elsewhere, at the border too
    expected = reference.score(descriptors, centres, reference_plan)
    assert expected.shape == (len(POINTS_IJK), lattice.size)
    candidates = centres[:, None, :] + lattice.offsets_ijk()[None]
    inside = torch.as_tensor(np.all((candidates >= 0) & (candidates <= np.asarray(OBLIQUE.shape_ijk) - 1), axis=2))
    assert inside.sum() > 50 and expected[inside].abs().max() > 0.05  # outside, the search never picks
    torch.testing.assert_close(fast.score(descriptors, centres, fast_plan)[inside], expected[inside], atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [1, 2])
def test_the_dense_searchs_whole_level_map_equals_the_reference(step):
    similarity = _similarity(step, False)
    level, patch = similarity.moving.levels[0], similarity.patches[0]
    descriptors = similarity.fixed_descriptors(OBLIQUE.ijk_to_lps(POINTS_IJK))[0]
    sizes = [n + 2 * patch.radius for n in OBLIQUE.shape_ijk]
    whole = voxel_similarity(level, patch, descriptors, np.zeros((1, 3), int), sizes, np.ones(3, int))
    assert whole.shape == (len(POINTS_IJK), *OBLIQUE.shape_kji)
    voxels = torch.as_tensor(OBLIQUE.lps_to_ijk(grid_points(OBLIQUE)), dtype=torch.float32)
    expected = exact_similarity(level, patch, descriptors, voxels.expand(len(POINTS_IJK), -1, -1))
    torch.testing.assert_close(whole.reshape(len(POINTS_IJK), -1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [1, 2])
def test_the_lattice_layouts_shared_shifts_equal_the_reference_both_ways(step):
    similarity = _similarity(step, False)
    fixed, moving = similarity.fixed.levels[0], similarity.moving.levels[0]
    patch = similarity.patches[0]
    shifts_ijk = np.array([[0, 0, 0], [1, 0, 0], [-2, 1, 1], [0, -1, 2], [3, 2, -1]], float)
    shifts_mm = shifts_ijk @ OBLIQUE.affine_ijk_to_lps[:3, :3].T
    forward, backward = _level_similarity(fixed, moving, patch, OBLIQUE, shifts_mm, None, no_progress)
    nodes = grid_points(OBLIQUE)
    nodes_ijk = torch.as_tensor(OBLIQUE.lps_to_ijk(nodes), dtype=torch.float32)
    at_nodes = similarity.fixed_descriptors(nodes)[0]
    candidates = nodes_ijk[:, None, :] + torch.as_tensor(shifts_ijk, dtype=torch.float32)[None]
    expected_forward = exact_similarity(moving, patch, at_nodes, candidates).T
    torch.testing.assert_close(forward, expected_forward, atol=1e-5, rtol=0)
    for row, shift in enumerate(shifts_mm):  # the moving node scores the fixed point one shift back
        from_fixed = similarity.fixed_descriptors(nodes - shift)[0]
        expected_backward = exact_similarity(moving, patch, from_fixed, nodes_ijk[:, None, :])[:, 0]
        inside = torch.as_tensor(OBLIQUE.contains_lps(nodes - shift, margin_voxels=0.0))  # outside, never picked
        assert inside.sum() > len(nodes) / 4
        torch.testing.assert_close(backward[row][inside], expected_backward[inside], atol=1e-5, rtol=0)
