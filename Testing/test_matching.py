"""Matching: exactness against the naive full-resolution matcher, recovery of known motion,
search modes, bounded memory, confidence and input checks."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume
from MedDIFTLib.core.options import MatchOptions, parse_options
from MedDIFTLib.evaluation.metrics import naive_full_resolution_similarity, tre_stats
from MedDIFTLib.evaluation.simulate import forstner_keypoints
from MedDIFTLib.features import FeatureLevel, FeaturePyramid, create_featurizer
from MedDIFTLib.matching import match_points
from MedDIFTLib.matching.similarity import LevelPatch

IMAGE = Geometry.create((32, 24, 16), (1.0, 1.25, 2.0), (10.0, -20.0, 5.0))


def _everywhere(volume: Volume) -> np.ndarray:
    return np.ones(volume.voxels.shape, bool)


def _random_pyramid(seed: int) -> FeaturePyramid:
    generator = torch.Generator().manual_seed(seed)
    levels = []
    for scale, channels, weight in ((1, 3, 1.0), (2, 5, 0.5), (4, 7, 2.0)):
        geometry = IMAGE.downsampled(scale)
        features = torch.rand((channels, *geometry.shape_kji), generator=generator) - 0.3
        levels.append(FeatureLevel(f"1/{scale}", features, geometry, weight))
    return FeaturePyramid(levels, IMAGE, "random")


def test_exact_mode_equals_naive_upsampling():
    fixed, moving = _random_pyramid(1), _random_pyramid(2)
    fixed_ijk = np.array([[5, 6, 4], [20, 12, 8], [30, 3, 14], [16, 20, 1]])
    points = IMAGE.ijk_to_lps(fixed_ijk.astype(float))
    radius = 6.0
    options = MatchOptions(search_radius_mm=radius, exact=True, subvoxel=False, backward_check=False,
                           coarse_to_fine=False)
    result = match_points(fixed, moving, points, options=options)
    k, j, i = np.meshgrid(*[np.arange(n) for n in IMAGE.shape_kji], indexing="ij")
    voxels_lps = IMAGE.ijk_to_lps(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*IMAGE.shape_kji, 3)
    for point, ijk, similarity, matched in zip(points, fixed_ijk, result.similarity, result.points_lps_mm):
        naive = naive_full_resolution_similarity(fixed, moving, ijk).numpy()
        window = np.linalg.norm(voxels_lps - point, axis=-1) <= radius
        best = np.unravel_index(np.argmax(np.where(window, naive, -np.inf)), naive.shape)
        assert abs(similarity - naive[best]) < 1e-5
        np.testing.assert_allclose(matched, voxels_lps[best], atol=1e-6)


def test_native_mode_finds_the_same_voxels_on_smooth_features():
    fixed = _random_pyramid(3)
    moving = FeaturePyramid([FeatureLevel(lv.name, torch.roll(lv.features, 1, dims=3), lv.geometry, lv.weight)
                             for lv in fixed.levels[:1]], IMAGE, "random")
    fixed = FeaturePyramid(fixed.levels[:1], IMAGE, "random")
    points = IMAGE.ijk_to_lps(np.array([[8.0, 8.0, 6.0], [20.0, 10.0, 9.0]]))
    options = MatchOptions(search_radius_mm=4.0, subvoxel=False, backward_check=False, coarse_to_fine=False)
    native = match_points(fixed, moving, points, options=options)
    exact = match_points(fixed, moving, points, options=MatchOptions(**{**options.__dict__, "exact": True}))
    np.testing.assert_allclose(native.points_lps_mm, exact.points_lps_mm)
    np.testing.assert_allclose(native.points_lps_mm, points + [1.0, 0.0, 0.0])
    np.testing.assert_allclose(native.similarity, 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def shifted_pair(pulmonary_ct):
    """The real pulmonary CT crop and a copy shifted by a sub-voxel translation, with keypoints."""
    shift_ijk = np.array([2.4, -1.7, 3.2])
    moved = ndimage.shift(pulmonary_ct.voxels, shift_ijk[::-1], order=3, mode="nearest")
    moving = Volume(moved.astype(np.float32), pulmonary_ct.geometry)
    points = forstner_keypoints(pulmonary_ct, _everywhere(pulmonary_ct), 30, margin_mm=15.0)
    truth = pulmonary_ct.geometry.ijk_to_lps(pulmonary_ct.geometry.lps_to_ijk(points) + shift_ijk)
    featurizer = create_featurizer("mind")
    return featurizer.extract(pulmonary_ct), featurizer.extract(moving), points, truth


def test_subvoxel_translation_recovered(shifted_pair):
    fixed, moving, points, truth = shifted_pair
    result = match_points(fixed, moving, points, options=MatchOptions(search_radius_mm=10.0))
    stats = tre_stats(result.points_lps_mm, truth)
    assert stats["mean"] < 0.5, stats
    assert result.reliable.mean() > 0.8
    assert np.all((result.confidence >= 0) & (result.confidence <= 1))


def test_without_subvoxel_refinement_error_is_larger(shifted_pair):
    fixed, moving, points, truth = shifted_pair
    coarse = match_points(fixed, moving, points, options=MatchOptions(search_radius_mm=10.0, subvoxel=False))
    refined = match_points(fixed, moving, points, options=MatchOptions(search_radius_mm=10.0))
    assert tre_stats(refined.points_lps_mm, truth)["mean"] < tre_stats(coarse.points_lps_mm, truth)["mean"]


def test_memory_budget_only_changes_batching(shifted_pair):
    fixed, moving, points, _ = shifted_pair
    roomy = match_points(fixed, moving, points[:8], options=MatchOptions(search_radius_mm=6.0))
    tight = match_points(fixed, moving, points[:8], options=MatchOptions(search_radius_mm=6.0, memory_budget_mb=0.5))
    np.testing.assert_allclose(roomy.points_lps_mm, tight.points_lps_mm, atol=1e-3)  # float32 sums, in mm


def test_global_mode_finds_a_large_shift(pulmonary_ct):
    shift_ijk = np.array([0, 22, 0])
    moved = np.roll(pulmonary_ct.voxels, shift_ijk[::-1], axis=(0, 1, 2))
    moving = Volume(moved, pulmonary_ct.geometry)
    points = forstner_keypoints(pulmonary_ct, _everywhere(pulmonary_ct), 6, margin_mm=40.0)
    truth = pulmonary_ct.geometry.ijk_to_lps(pulmonary_ct.geometry.lps_to_ijk(points) + shift_ijk)
    featurizer = create_featurizer("mind", scales=(1, 2))
    fixed_features, moving_features = featurizer.extract(pulmonary_ct), featurizer.extract(moving)
    local = match_points(fixed_features, moving_features, points, options=MatchOptions(search_radius_mm=10.0))
    found = match_points(fixed_features, moving_features, points,
                         options=MatchOptions(search_radius_mm=10.0, mode="global", coarse_step_mm=6.0))
    assert tre_stats(local.points_lps_mm, truth)["mean"] > 10.0
    assert tre_stats(found.points_lps_mm, truth)["p50"] < 1.0


def test_coarse_to_fine_agrees_with_full_search(shifted_pair):
    fixed, moving, points, truth = shifted_pair
    full = match_points(fixed, moving, points, options=MatchOptions(search_radius_mm=10.0, coarse_to_fine=False))
    options = MatchOptions(search_radius_mm=10.0, coarse_to_fine=True, coarse_step_mm=3.0)
    result = match_points(fixed, moving, points, options=options)
    assert np.mean(np.linalg.norm(result.points_lps_mm - full.points_lps_mm, axis=1) < 0.1) > 0.9
    assert tre_stats(result.points_lps_mm, truth)["p50"] < 0.5


def test_erased_region_is_flagged_unreliable(pulmonary_ct):
    """Points whose anatomy is gone from the moving image get a low confidence, and are kept."""
    moved = pulmonary_ct.voxels.copy()
    moved[:, :, : moved.shape[2] // 2] = -1000.0
    moving = Volume(moved, pulmonary_ct.geometry)
    points = forstner_keypoints(pulmonary_ct, _everywhere(pulmonary_ct), 40, margin_mm=10.0)
    erased = pulmonary_ct.geometry.lps_to_ijk(points)[:, 0] < moved.shape[2] // 2 - 10
    featurizer = create_featurizer("mind", scales=(1, 2))
    result = match_points(featurizer.extract(pulmonary_ct), featurizer.extract(moving), points,
                          options=MatchOptions(search_radius_mm=8.0))
    assert len(result.points_lps_mm) == len(points)
    assert erased.any() and (~erased).any()
    assert result.confidence[erased].mean() < 0.5 * result.confidence[~erased].mean()
    assert result.reliable[erased].mean() < 0.5


def test_points_outside_the_fixed_volume_are_rejected():
    pyramid = _random_pyramid(4)
    outside = IMAGE.ijk_to_lps(np.array([[5.0, 5.0, 5.0], [40.0, 5.0, 5.0]]))
    with pytest.raises(BadInputError, match="1 of 2 points lie outside the fixed volume"):
        match_points(pyramid, pyramid, outside)
    with pytest.raises(BadInputError, match="no points"):
        match_points(pyramid, pyramid, np.zeros((0, 3)))


@pytest.mark.parametrize("options, message", [
    ({"mode": "sideways"}, "'mode': 'sideways' is not one of local, global"),
    ({"search_radius_mm": -1.0}, "'search_radius_mm' must be > 0"),
    ({"search_radius_mm": float("nan")}, "'search_radius_mm' must be a finite number"),
    ({"confidence_threshold": 1.5}, "'confidence_threshold' must be <= 1"),
])
def test_bad_options_are_refused_naming_the_key(options, message):
    with pytest.raises(BadInputError, match=message):
        MatchOptions(**options)
    with pytest.raises(BadInputError, match=message):
        parse_options(MatchOptions, options)


def test_option_parser_names_unknown_keys_and_wrong_types():
    with pytest.raises(BadInputError, match="unknown match option.*radius_mm"):
        parse_options(MatchOptions, {"radius_mm": 3}, "match")
    with pytest.raises(BadInputError, match="'subvoxel': 'yes' is not true or false"):
        parse_options(MatchOptions, {"subvoxel": "yes"}, "match")
    assert parse_options(MatchOptions, {"level_weights": [1, 2], "patch_radius": 2.0}) == MatchOptions(
        level_weights=(1.0, 2.0), patch_radius=2)


def test_level_weights_must_fit_the_pyramid():
    pyramid = _random_pyramid(5)
    with pytest.raises(BadInputError, match="level weights"):
        match_points(pyramid, pyramid, IMAGE.ijk_to_lps(np.array([[5.0, 5.0, 5.0]])),
                     options=MatchOptions(level_weights=(1.0,)))


def test_backward_check_follows_the_priors(pulmonary_ct):
    """With priors that carry a large shift, the backward search starts from the match minus that
    shift, so correct matches keep a small forward-backward distance."""
    shift_ijk = np.array([0, 14, 0])
    moving = Volume(np.roll(pulmonary_ct.voxels, shift_ijk[::-1], axis=(0, 1, 2)), pulmonary_ct.geometry)
    points = forstner_keypoints(pulmonary_ct, _everywhere(pulmonary_ct), 8, margin_mm=30.0)
    offset = pulmonary_ct.geometry.ijk_to_lps(shift_ijk[None].astype(float))[0] - pulmonary_ct.geometry.origin_lps_mm
    featurizer = create_featurizer("mind", scales=(1, 2))
    result = match_points(featurizer.extract(pulmonary_ct), featurizer.extract(moving), points,
                          priors_lps_mm=points + offset, options=MatchOptions(search_radius_mm=6.0))
    np.testing.assert_allclose(np.median(result.points_lps_mm - points, axis=0), offset, atol=0.5)
    assert np.median(result.forward_backward_mm) < 1.0


@pytest.mark.parametrize("radius, step, expected", [(3, 1, (1, 7)), (3, 2, (2, 4)), (3, 4, (3, 3)), (2, 3, (2, 3)),
                                                     (0, 5, (1, 1))])
def test_patch_taps_stay_symmetric(radius, step, expected):
    patch = LevelPatch.of(radius, step)
    assert (patch.step, patch.taps) == expected
    spacing, count = expected
    offsets = patch.offsets_ijk()
    assert len(offsets) == count**3 and offsets.min() == -radius and offsets.max() == radius


@pytest.mark.parametrize("step", [1, 2])
def test_native_scoring_equals_exact_with_spaced_taps_also_at_the_border(step):
    fixed, moving = (FeaturePyramid(_random_pyramid(seed).levels[:1], IMAGE, "random") for seed in (5, 6))
    points = IMAGE.ijk_to_lps(np.array([[0.0, 0.0, 0.0], [31.0, 23.0, 15.0], [16.0, 12.0, 8.0], [2.0, 20.0, 3.0]]))
    options = MatchOptions(search_radius_mm=4.0, subvoxel=False, backward_check=False, coarse_to_fine=False,
                           patch_radius=2, patch_step=step)
    native = match_points(fixed, moving, points, options=options)
    exact = match_points(fixed, moving, points, options=MatchOptions(**{**options.__dict__, "exact": True}))
    np.testing.assert_allclose(native.points_lps_mm, exact.points_lps_mm)
    np.testing.assert_allclose(native.similarity, exact.similarity, atol=1e-5)


def _smooth_level_pyramid(grid: Geometry, image: Geometry, seed: int, shift_kji: tuple[int, int, int] = (0, 0, 0)):
    """One smooth random level on ``grid`` (a working grid over ``image``), rolled by ``shift_kji`` voxels."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((8, *grid.shape_kji), generator=generator).numpy()
    smooth = np.stack([ndimage.gaussian_filter(channel, 1.0) for channel in noise]) - 0.5
    features = torch.roll(torch.as_tensor(smooth, dtype=torch.float32), shift_kji, dims=(1, 2, 3))
    return FeaturePyramid([FeatureLevel("working", features, grid, 1.0, patch_radius=2)], image, "smooth")


def test_a_working_grid_somewhat_coarser_than_the_pixels_is_scored_natively_where_exact_agrees():
    """Thick slices with fine pixels: MIND's isotropic working grid (1.25 mm) is coarser than the
    0.625 mm pixels, so a lattice step is half a level voxel. That level still localises the peak by
    interpolating its similarity map (native, not the far slower exact scoring) and finds the
    motion as exact scoring does; a level of four lattice steps is scored exactly."""
    from MedDIFTLib.matching.candidates import CandidateLattice
    from MedDIFTLib.matching.similarity import PatchSimilarity

    image = Geometry.create((48, 48, 16), (0.625, 0.625, 2.5), (3.0, -7.0, 11.0))
    grid = image.working_grid(1.25)
    fixed = _smooth_level_pyramid(grid, image, 5)
    moving = _smooth_level_pyramid(grid, image, 5, (2, 1, -1))
    options = MatchOptions(search_radius_mm=5.0, backward_check=False, coarse_to_fine=False)
    fine = CandidateLattice.around(image, 3.0)
    assert [level.exact for level in PatchSimilarity(fixed, moving, options).plan(fine).levels] == [False]
    coarse = _smooth_level_pyramid(image.working_grid(2.5), image, 6)
    assert [level.exact for level in PatchSimilarity(coarse, coarse, options).plan(fine).levels] == [True]
    points = image.ijk_to_lps(np.array([[20.0, 24.0, 7.0], [28.0, 18.0, 9.0], [24.0, 30.0, 6.0]]))
    truth = points + np.array([-1.25, 1.25, 2.5])
    native = match_points(fixed, moving, points, options=options)
    exact = match_points(fixed, moving, points, options=MatchOptions(**{**options.__dict__, "exact": True}))
    assert np.abs(native.points_lps_mm - truth).max() < 0.3, native.points_lps_mm - truth
    assert np.abs(exact.points_lps_mm - truth).max() < 0.3, exact.points_lps_mm - truth


def test_an_unreliable_match_is_placed_by_its_reliable_neighbours(pulmonary_ct):
    """A point whose anatomy is erased in the moving image matches somewhere wrong and is flagged;
    with context placement it lands where its neighbours' motion carries it, still flagged, with
    the confidence of its own match; a reliable match is not moved."""
    shift_ijk = np.array([3, -2, 2])
    geometry = pulmonary_ct.geometry
    moved = np.roll(pulmonary_ct.voxels, shift_ijk[::-1], axis=(0, 1, 2))
    points = forstner_keypoints(pulmonary_ct, _everywhere(pulmonary_ct), 12, margin_mm=35.0)
    truth = geometry.ijk_to_lps(geometry.lps_to_ijk(points) + shift_ijk)
    k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij")
    world = geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(*k.shape, 3)
    moved[np.linalg.norm(world - truth[0], axis=-1) < 7.0] = float(np.median(pulmonary_ct.voxels))
    featurizer = create_featurizer("mind", scales=(1, 2))
    fixed, moving = featurizer.extract(pulmonary_ct), featurizer.extract(Volume(moved, geometry))
    alone = match_points(fixed, moving, points, options=MatchOptions(search_radius_mm=12.0, context_mm=0.0))
    placed = match_points(fixed, moving, points, options=MatchOptions(search_radius_mm=12.0, context_mm=8.0))
    error_alone = np.linalg.norm(alone.points_lps_mm - truth, axis=1)
    error_placed = np.linalg.norm(placed.points_lps_mm - truth, axis=1)
    assert not alone.reliable[0] and error_alone[0] > 3.0
    assert error_placed[0] < 1.0
    assert not placed.reliable[0]
    np.testing.assert_array_equal(placed.confidence, alone.confidence)
    np.testing.assert_array_equal(placed.points_lps_mm[alone.reliable], alone.points_lps_mm[alone.reliable])
