"""The one engine: the lattice layout gives the point layout's match, the search lattice is capped
at the volume, and the parabola and confidence are shared."""

import numpy as np
import pytest
import torch

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.options import MatchOptions
from MedDIFTLib.features import FeatureLevel, FeaturePyramid
from MedDIFTLib.grid.nodes import node_grid
from MedDIFTLib.matching import Correspondences, confidence, match_lattice, match_points
from MedDIFTLib.matching.candidates import CandidateLattice

IMAGE = Geometry.create((28, 24, 14), (1.0, 1.25, 2.0), (10.0, -20.0, 5.0))


def _smooth(features: torch.Tensor, passes: int = 2) -> torch.Tensor:
    for _ in range(passes):
        features = torch.nn.functional.avg_pool3d(features[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return features


def _pyramid(seed: int, radii=(1, 0)) -> FeaturePyramid:
    """A full-resolution level and a level of twice the voxel size in i and j whose voxel centres
    sit on even image voxels (so a lattice of 2 mm nodes lies on both levels' voxels)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = Geometry.create((14, 12, 14), (2.0, 2.5, 2.0), IMAGE.origin_lps_mm)
    levels = []
    specs = (("full", IMAGE, 4, 1.0, radii[0]), ("half", coarse, 6, 0.6, radii[1]))
    for name, geometry, channels, weight, radius in specs:
        features = _smooth(torch.rand((channels, *geometry.shape_kji), generator=generator) - 0.4)
        levels.append(FeatureLevel(name, features, geometry, weight, radius))
    return FeaturePyramid(levels, IMAGE, "random")


def _shifted(pyramid: FeaturePyramid, shift_kji=(0, 1, 2)) -> FeaturePyramid:
    levels = []
    for level in pyramid.levels:
        noise = torch.rand(level.features.shape, generator=torch.Generator().manual_seed(9))
        features = level.features + 0.3 * _smooth(noise)
        levels.append(FeatureLevel(level.name, torch.roll(features, shift_kji, dims=(1, 2, 3)), level.geometry,
                                   level.weight, level.patch_radius))
    return FeaturePyramid(levels, pyramid.image_geometry, pyramid.backbone)


@pytest.mark.parametrize("subvoxel", [False, True])
def test_lattice_layout_gives_the_point_layout_match(subvoxel, monkeypatch):
    # the lattice layout has the parabola but not the point layout's pattern search on the finest level
    monkeypatch.setattr("MedDIFTLib.matching.points.pattern_applies", lambda pyramid: False)
    fixed = _pyramid(1)
    moving = _shifted(fixed)
    options = MatchOptions(search_radius_mm=3.5, coarse_to_fine=False, backward_check=False, subvoxel=subvoxel)
    lattice = match_lattice(fixed, moving, 2.0, options)
    nodes = lattice.matches.fixed_points_lps_mm
    ijk = IMAGE.lps_to_ijk(nodes)
    interior = np.all((ijk >= 5) & (ijk <= np.asarray(IMAGE.shape_ijk) - 6), axis=1)
    assert interior.sum() >= 20
    points = match_points(fixed, moving, nodes[interior], options=options)
    # float32 sums in a different order; the parabola turns 1e-6 of similarity into < 1e-3 mm
    np.testing.assert_allclose(lattice.matches.points_lps_mm[interior], points.points_lps_mm, atol=1e-3)
    np.testing.assert_allclose(lattice.matches.similarity[interior], points.similarity, atol=1e-5)
    np.testing.assert_allclose(lattice.matches.confidence[interior], points.confidence, atol=1e-5)


def test_lattice_layout_honours_the_patch_radius():
    fixed = _pyramid(2, radii=(0, 0))
    moving = _shifted(fixed)
    options = MatchOptions(search_radius_mm=3.0, coarse_to_fine=False, backward_check=False, subvoxel=False)
    plain = match_lattice(fixed, moving, 2.0, options).matches.similarity
    wide = match_lattice(fixed, moving, 2.0, MatchOptions(**{**options.__dict__, "patch_radius": 2})).matches.similarity
    assert np.abs(plain - wide).max() > 1e-3


def test_lattice_layout_finds_a_shift_with_backward_check():
    full = _pyramid(3)
    fixed = FeaturePyramid(full.levels[:1], IMAGE, "random")
    level = fixed.levels[0]
    rolled = torch.roll(level.features, (1, 2), dims=(2, 3))  # 2 voxels in i (2 mm), 1 in j (1.25 mm)
    moving = FeaturePyramid([FeatureLevel("full", rolled, IMAGE, 1.0, 1)], IMAGE, "random")
    lattice = match_lattice(fixed, moving, 2.0, MatchOptions(search_radius_mm=4.0, coarse_to_fine=False))
    ijk = IMAGE.lps_to_ijk(lattice.matches.fixed_points_lps_mm)
    interior = np.all((ijk >= 4) & (ijk <= np.asarray(IMAGE.shape_ijk) - 5), axis=1)
    displacement = lattice.matches.displacement_lps_mm[interior]
    assert np.median(np.linalg.norm(displacement - [2.0, 1.25, 0.0], axis=1)) < 0.3
    assert np.median(lattice.matches.forward_backward_mm[interior]) < 0.5
    assert lattice.on_grid(lattice.matches.confidence).shape == node_grid(IMAGE, 2.0).shape_kji


def test_candidate_lattice_is_capped_at_the_volume():
    huge = CandidateLattice.around(IMAGE, 1000.0)
    np.testing.assert_array_equal(huge.half, np.asarray(IMAGE.shape_ijk) - 1)
    coarse = CandidateLattice.around(IMAGE, 1000.0, step_mm=4.0)
    assert np.all(coarse.half * coarse.stride >= np.asarray(IMAGE.shape_ijk) - 1)
    assert np.all((coarse.half - 1) * coarse.stride < np.asarray(IMAGE.shape_ijk) - 1)


def test_huge_search_radius_matches_like_the_whole_volume():
    fixed = _pyramid(4)
    moving = _shifted(fixed)
    points = IMAGE.ijk_to_lps(np.array([[10.0, 8.0, 6.0], [20.0, 14.0, 7.0]]))
    whole = MatchOptions(search_radius_mm=float(np.linalg.norm(np.asarray(IMAGE.shape_ijk) * IMAGE.spacing_mm)))
    huge = MatchOptions(search_radius_mm=1000.0)
    np.testing.assert_allclose(match_points(fixed, moving, points, options=huge).points_lps_mm,
                               match_points(fixed, moving, points, options=whole).points_lps_mm)


def test_confidence_is_one_formula_in_mm():
    options = MatchOptions(fb_scale_mm=2.0, confidence_threshold=0.5)
    matches = Correspondences.scored(np.zeros((3, 3)), np.ones((3, 3)), np.array([0.9, 0.9, -0.2]),
                                     np.array([0.0, 2.0, 0.0]), options)
    np.testing.assert_allclose(matches.confidence, [0.9, 0.9 * np.exp(-0.5), 0.0])
    np.testing.assert_array_equal(matches.reliable, [True, True, False])
    np.testing.assert_allclose(confidence(np.array([np.nan]), np.array([0.7]), 3.0), [0.7])


def _diffusion_shaped(seed: int) -> FeaturePyramid:
    """Levels at 1/4 and 1/8 of the grid only (as MAISI's decoder levels), no patch."""
    generator = torch.Generator().manual_seed(seed)
    levels = []
    for scale, channels, weight in ((4, 16, 1.0), (8, 24, 1.0)):
        geometry = GLOBAL_IMAGE.downsampled(scale)
        features = torch.rand((channels, *geometry.shape_kji), generator=generator) - 0.5
        levels.append(FeatureLevel(f"1/{scale}", features, geometry, weight, 0))
    return FeaturePyramid(levels, GLOBAL_IMAGE, "random")


GLOBAL_IMAGE = Geometry.create((40, 32, 32), (1.0, 1.25, 1.5), (0.0, 0.0, 0.0))


def test_global_mode_finds_the_brute_force_maximum():
    """Uniform random coarse features: a rugged similarity with many near-equal peaks (keeping
    only the best coarse peak finds 3 of these 10 maxima, the best 4 find 6)."""
    from MedDIFTLib.evaluation.metrics import naive_full_resolution_similarity

    fixed, moving = _diffusion_shaped(11), _diffusion_shaped(12)
    fixed_ijk = np.random.default_rng(3).integers(4, np.asarray(GLOBAL_IMAGE.shape_ijk) - 4, (10, 3))
    points = GLOBAL_IMAGE.ijk_to_lps(fixed_ijk.astype(float))
    options = MatchOptions(mode="global", subvoxel=False, backward_check=False, context_mm=0.0)
    found = match_points(fixed, moving, points, options=options)
    k, j, i = np.meshgrid(*[np.arange(n) for n in GLOBAL_IMAGE.shape_kji], indexing="ij")
    voxels_lps = GLOBAL_IMAGE.ijk_to_lps(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*GLOBAL_IMAGE.shape_kji, 3)
    for ijk, similarity, matched in zip(fixed_ijk, found.similarity, found.points_lps_mm):
        naive = naive_full_resolution_similarity(fixed, moving, ijk).numpy()
        best = np.unravel_index(np.argmax(naive), naive.shape)
        assert similarity == pytest.approx(naive[best], abs=1e-5)
        np.testing.assert_allclose(matched, voxels_lps[best], atol=1e-6)


def test_windows_repeat_the_border_like_clipped_indices():
    """Boxes inside, across and wholly outside the grid equal gathering at clipped indices, for
    half-precision storage too."""
    from MedDIFTLib.grid.sampling import windows

    features = torch.rand((3, 5, 6, 7), generator=torch.Generator().manual_seed(2)).half()
    sizes = [4, 3, 5]
    starts = np.array([[1, 1, 0], [-2, 4, 3], [6, -5, -1], [9, 8, 7], [-9, -9, -9], [0, 0, 0]])
    boxes = windows(features, starts, sizes)
    assert boxes.dtype == torch.float32 and boxes.shape == (len(starts), 3, 5, 3, 4)
    for box, start in zip(boxes, starts):
        i, j, k = (np.clip(s + np.arange(n), 0, limit - 1) for s, n, limit in zip(start, sizes, (7, 6, 5)))
        expected = features[:, k[:, None, None], j[None, :, None], i[None, None, :]].float()
        assert torch.equal(box, expected)


@pytest.mark.parametrize(
    ("box_kji", "taps", "dilation", "stride_kji"),
    [((9, 11, 13), 3, 1, (1, 1, 1)), ((17, 10, 12), 3, 2, (2, 1, 3)), ((7, 7, 8), 1, 1, (1, 1, 1))],
)
def test_fft_correlation_equals_grouped_conv3d(box_kji, taps, dilation, stride_kji):
    """The FFT correlation of a box per row (kernel spectra from small DFT matrices) is the grouped
    ``conv3d`` of each row's box with its kernels, summed over channels, on odd, prime and
    padded lengths, dilated taps and strided samples; one box shared by every row's kernels (the
    conv3d path) gives the same."""
    from MedDIFTLib.matching.similarity import correlate

    generator = torch.Generator().manual_seed(4)
    batch, channels = 3, 5
    inputs = torch.randn((batch, channels, *box_kji), generator=generator)
    kernels = torch.randn((batch, channels, taps, taps, taps), generator=generator)
    expected = torch.nn.functional.conv3d(inputs.reshape(1, batch * channels, *box_kji), kernels,
                                          dilation=dilation, groups=batch)[0]
    expected = expected[:, :: stride_kji[0], :: stride_kji[1], :: stride_kji[2]]
    result = correlate(inputs, kernels, dilation, np.asarray(stride_kji))
    assert result.shape == expected.shape
    assert torch.allclose(result, expected, atol=1e-4 * channels * taps**3)
    shared = correlate(inputs[:1], kernels, dilation, np.asarray(stride_kji))
    per_row = correlate(inputs[:1].expand_as(inputs), kernels, dilation, np.asarray(stride_kji))
    assert shared.shape == per_row.shape
    assert torch.allclose(shared, per_row, atol=1e-4 * channels * taps**3)


def test_subvoxel_vertex_of_a_sampled_paraboloid():
    """The parabola step recovers the peak of a separable quadratic between lattice nodes, is 0 at
    a border (missing neighbour) and on a flat row."""
    from MedDIFTLib.matching.subvoxel import subvoxel_offsets

    k, j, i = np.meshgrid(np.arange(5.0), np.arange(6.0), np.arange(7.0), indexing="ij")
    peak_ijk = np.array([3.3, 2.2, 1.9])
    paraboloid = -((i - peak_ijk[0]) ** 2) - 2 * (j - peak_ijk[1]) ** 2 - 0.5 * (k - peak_ijk[2]) ** 2
    scores = np.stack([paraboloid, paraboloid, np.zeros_like(paraboloid)]).astype(np.float32)
    best = scores.reshape(3, -1).argmax(axis=1)
    best[1] = np.ravel_multi_index((2, 2, 0), scores.shape[1:])  # on the i = 0 border
    offsets = subvoxel_offsets(scores, best)
    assert np.allclose(offsets[0], peak_ijk - np.round(peak_ijk), atol=1e-5)
    assert offsets[1, 0] == 0.0
    assert np.all(offsets[2] == 0.0)
