"""Geometry: LPS <-> ijk and the pooled-level convention used by every backbone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedDIFTLib.core.geometry import Geometry


def test_ijk_lps_round_trip_with_oblique_direction(oblique_geometry):
    ijk = np.array([[0.0, 0.0, 0.0], [3.5, 2.25, 7.0], [11.0, 9.0, 0.5]])
    lps = oblique_geometry.ijk_to_lps(ijk)
    np.testing.assert_allclose(lps[0], oblique_geometry.origin_lps_mm)
    np.testing.assert_allclose(oblique_geometry.lps_to_ijk(lps), ijk, atol=1e-9)
    step = oblique_geometry.ijk_to_lps([[0.0, 0.0, 1.0]])[0] - lps[0]
    np.testing.assert_allclose(step, [0.0, 0.0, -2.5], atol=1e-9)


def test_contains_uses_half_voxel_margin(oblique_geometry):
    inside = oblique_geometry.ijk_to_lps([[-0.4, 0.0, 0.0], [11.4, 9.0, 7.0]])
    outside = oblique_geometry.ijk_to_lps([[-0.6, 0.0, 0.0], [5.0, 9.6, 3.0]])
    assert oblique_geometry.contains_lps(inside).all()
    assert not oblique_geometry.contains_lps(outside).any()


def test_downsampled_grid_matches_trilinear_upsampling():
    """A pooled level upsampled with align_corners=False lands back on the image grid."""
    geometry = Geometry.create((8, 8, 8), (1.0, 2.0, 3.0), (5.0, -5.0, 0.0))
    level = geometry.downsampled(2)
    values = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)
    upsampled = F.interpolate(values, scale_factor=2, mode="trilinear", align_corners=False)[0, 0]
    ijk_image = np.array([3.0, 4.0, 2.0])
    ijk_level = level.lps_to_ijk(geometry.ijk_to_lps(ijk_image[None]))[0]
    corner = np.floor(ijk_level).astype(int)
    fraction = ijk_level - corner
    expected = 0.0
    for offset in np.ndindex(2, 2, 2):
        weight = np.prod(np.where(offset, fraction, 1 - fraction))
        i, j, k = corner + offset
        expected += weight * float(values[0, 0, k, j, i])
    assert abs(float(upsampled[2, 4, 3]) - expected) < 1e-12


def test_voxels_up_to_five_percent_apart_count_as_cubic_for_features_and_baselines_alike():
    """One rule (Geometry.cubic) decides thick slices for MIND's working grid and ConvexAdam's grid."""
    from MedDIFTLib.core.io import Volume
    from MedDIFTLib.evaluation.baselines import convexadam_spacing_mm
    from MedDIFTLib.features.mind import MindFeaturizer

    near_cubic = Geometry.create((20, 20, 20), (1.0, 1.0, 1.05))
    thick = Geometry.create((20, 20, 8), (1.37, 1.37, 4.0))
    assert near_cubic.cubic and not thick.cubic
    assert convexadam_spacing_mm(near_cubic, near_cubic) == 2.0
    assert convexadam_spacing_mm(thick, thick) == 1.37
    def working_grid(geometry: Geometry) -> Geometry:
        return MindFeaturizer().working_image(Volume(np.zeros(geometry.shape_kji, np.float32), geometry)).geometry

    assert working_grid(near_cubic) == near_cubic
    assert np.allclose(working_grid(thick).spacing_mm, 1.37)


def test_box_is_the_sub_grid_and_covering_box_holds_the_reads(oblique_geometry):
    lo, hi = np.array([2, 3, 1]), np.array([9, 7, 6])
    box = oblique_geometry.box(lo, hi)
    assert box.shape_ijk == (7, 4, 5) and box.spacing_mm == oblique_geometry.spacing_mm
    ijk = np.array([[0.0, 0.0, 0.0], [6.0, 3.0, 4.0], [2.5, 1.25, 3.5]])
    np.testing.assert_allclose(box.ijk_to_lps(ijk), oblique_geometry.ijk_to_lps(ijk + lo), atol=1e-9)
    corners = oblique_geometry.box_corners_lps(lo, hi)
    np.testing.assert_allclose(oblique_geometry.lps_to_ijk(corners).min(axis=0), lo, atol=1e-9)
    np.testing.assert_allclose(oblique_geometry.lps_to_ijk(corners).max(axis=0), hi - 1, atol=1e-9)
    # every trilinear read at these points lies in the covering box; clipped to the grid, grown by the margin
    points = oblique_geometry.ijk_to_lps([[2.2, 3.7, 1.5], [5.5, 4.5, 2.5]])
    np.testing.assert_array_equal(np.stack(oblique_geometry.covering_box(points)), [[2, 3, 1], [7, 6, 4]])
    np.testing.assert_array_equal(np.stack(oblique_geometry.covering_box(points, 3)), [[0, 0, 0], [10, 9, 7]])
    with pytest.raises(ValueError, match="empty box"):
        oblique_geometry.box(lo, lo + [1, 0, 1])
