"""Dense displacement field: known motions come back with the right sign and size, the field agrees
with direct matches, and its files load in SimpleITK as a displacement field that maps points,
warps and inverts the same way; Jacobian statistics, outputs and the ``register`` command."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from MedDIFTLib.cli import main
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import PointSet, Volume, read_points, read_volume, write_points, write_volume
from MedDIFTLib.core.options import MatchOptions
from MedDIFTLib.features import FeatureLevel, FeaturePyramid, create_featurizer
from MedDIFTLib.field import (
    FieldLevel,
    FieldOptions,
    invert,
    jacobian_determinant,
    jacobian_stats,
    read_field,
    register,
    register_and_write,
    warp_volume,
    write_field,
)
from MedDIFTLib.field.smoothing import gaussian_filter
from MedDIFTLib.grid.cells import cell_average, cell_grid
from MedDIFTLib.grid.displacement_field import DisplacementField
from MedDIFTLib.matching import match_points

SHAPE_IJK = (40, 36, 32)
SPACING_MM = (2.0, 2.0, 2.0)
ORIGIN_LPS = (-40.0, 30.0, 100.0)
# Small synthetic volumes are not CT in HU with a body around them: search the whole grid.
WHOLE_GRID = FieldOptions(automatic_region=False)
# Tolerances (mm) on smooth synthetic motion imaged at 2 mm voxels.
TRANSLATION_TOLERANCE_MM = 0.5
DEFORMATION_TOLERANCE_MM = 1.0


def _texture(seed: int = 0, shape_ijk=SHAPE_IJK) -> np.ndarray:
    """CT-like blobs in HU, array order [k, j, i]."""
    noise = np.random.default_rng(seed).standard_normal(shape_ijk[::-1])
    smooth = ndimage.gaussian_filter(noise, 2.0)
    return (-400.0 + 600.0 * smooth / np.abs(smooth).max()).astype(np.float32)


def _volume(voxels: np.ndarray, geometry: Geometry | None = None, name: str = "") -> Volume:
    geometry = geometry or Geometry.create(SHAPE_IJK, SPACING_MM, ORIGIN_LPS)
    return Volume(np.ascontiguousarray(voxels, dtype=np.float32), geometry, name)


def _interior_points(geometry: Geometry, margin_voxels: int = 10, step: int = 4) -> np.ndarray:
    axes = [np.arange(margin_voxels, n - margin_voxels, step) for n in geometry.shape_ijk]
    i, j, k = np.meshgrid(*axes, indexing="ij")
    return geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float))


def _pull(fixed: Volume, pull_lps_mm: np.ndarray) -> Volume:
    """Moving image ``M(y) = F(y + w(y))`` for a pull field ``w`` [k, j, i, 3] on the fixed grid."""
    geometry = fixed.geometry
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij"), axis=-1)
    ijk = kji[..., ::-1].reshape(-1, 3).astype(float)
    sources = geometry.lps_to_ijk(geometry.ijk_to_lps(ijk) + pull_lps_mm.reshape(-1, 3))
    voxels = ndimage.map_coordinates(fixed.voxels, sources[:, ::-1].T, order=3, mode="nearest")
    return _volume(voxels.reshape(geometry.shape_kji), geometry, "moving")


def _true_moving(pull_lps_mm: np.ndarray, geometry: Geometry, points_lps_mm: np.ndarray) -> np.ndarray:
    """Solve ``y + w(y) = x``: where fixed points ``x`` lie in the moving image."""
    solution = points_lps_mm.copy()
    for _ in range(60):
        kji = geometry.lps_to_ijk(solution)[:, ::-1].T
        pull = np.stack([ndimage.map_coordinates(pull_lps_mm[..., c], kji, order=1, mode="nearest")
                         for c in range(3)], axis=1)
        solution = points_lps_mm - pull
    return solution


def _smooth_pull(geometry: Geometry, amplitude_mm: float = 3.0) -> np.ndarray:
    """A smooth, invertible pull field [k, j, i, 3] (LPS mm)."""
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij"), axis=-1)
    lps = geometry.ijk_to_lps(kji[..., ::-1].reshape(-1, 3).astype(float)).reshape(*geometry.shape_kji, 3)
    centre = geometry.ijk_to_lps((np.asarray(geometry.shape_ijk)[None] - 1) / 2.0)[0]
    relative = (lps - centre) / 30.0
    field = np.zeros_like(lps)
    field[..., 0] = amplitude_mm * np.sin(relative[..., 2] + 0.3)
    field[..., 1] = -0.7 * amplitude_mm * np.cos(relative[..., 0])
    field[..., 2] = 0.8 * amplitude_mm * np.exp(-np.sum(relative**2, axis=-1))
    return field


@pytest.fixture(scope="module")
def mind():
    return create_featurizer("mind")


@pytest.fixture(scope="module")
def translated_pair(mind):
    """Moving = fixed moved by +(4, -2, 3) mm: fixed x lies at x + t in the moving image."""
    fixed = _volume(_texture(1), name="fixed")
    shift_mm = np.array([4.0, -2.0, 3.0])
    moving = _volume(ndimage.shift(fixed.voxels, (shift_mm / SPACING_MM)[::-1], order=3, mode="nearest"),
                     name="moving")
    fixed_pyramid, moving_pyramid = mind.extract(fixed), mind.extract(moving)
    field = register(fixed_pyramid, moving_pyramid, fixed, WHOLE_GRID)
    return fixed, moving, fixed_pyramid, moving_pyramid, field, shift_mm


@pytest.fixture(scope="module")
def deformed_pair(mind):
    fixed = _volume(_texture(2), name="fixed")
    pull = _smooth_pull(fixed.geometry)
    moving = _pull(fixed, pull)
    fixed_pyramid, moving_pyramid = mind.extract(fixed), mind.extract(moving)
    field = register(fixed_pyramid, moving_pyramid, fixed, WHOLE_GRID)
    return fixed, moving, fixed_pyramid, moving_pyramid, field, pull


def _random_field(geometry: Geometry, amplitude_mm: float = 2.0, seed: int = 0) -> DisplacementField:
    noise = np.random.default_rng(seed).standard_normal((*geometry.shape_kji, 3))
    smooth = np.stack([ndimage.gaussian_filter(noise[..., c], 4.0) for c in range(3)], axis=-1)
    return DisplacementField((amplitude_mm * smooth / np.abs(smooth).max()).astype(np.float32), geometry)


OBLIQUE = Geometry.create(
    (20, 18, 12), (1.5, 1.2, 2.5), (12.0, -7.0, 40.0),
    np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]),
)


def test_translation_recovered_with_sign_and_magnitude(translated_pair):
    fixed, _, _, _, field, shift_mm = translated_pair
    points = _interior_points(fixed.geometry)
    displacement = field.transform_points(points) - points
    error = np.linalg.norm(displacement - shift_mm, axis=1)
    assert np.allclose(displacement.mean(axis=0), shift_mm, atol=TRANSLATION_TOLERANCE_MM)
    assert np.median(error) < TRANSLATION_TOLERANCE_MM


def test_coarse_to_fine_levels_without_optimisation(translated_pair):
    """A second, finer search level (sampled through the first level's field) keeps the translation."""
    fixed, _, fixed_pyramid, moving_pyramid, _, shift_mm = translated_pair
    levels = (FieldLevel(6.0, 24.0, 10.0), FieldLevel(3.0, 6.0, 5.0))
    field = register(fixed_pyramid, moving_pyramid, fixed,
                     FieldOptions(levels=levels, optimise_iterations=0, automatic_region=False))
    points = _interior_points(fixed.geometry)
    assert np.allclose(np.median(field.transform_points(points) - points, axis=0), shift_mm, atol=0.5)


def test_the_first_level_searches_around_the_initial_field(translated_pair):
    """A search radius shorter than the motion finds it from an initial field near it, and not from identity."""
    fixed, _, fixed_pyramid, moving_pyramid, _, shift_mm = translated_pair
    options = FieldOptions(levels=(FieldLevel(6.0, 3.5, 10.0, step_mm=2.0),), optimise_iterations=0,
                           automatic_region=False)
    near = np.broadcast_to(shift_mm + [2.0, 2.0, 0.0], (*fixed.geometry.shape_kji, 3)).astype(np.float32)
    initial = DisplacementField(near.copy(), fixed.geometry)
    points = _interior_points(fixed.geometry)
    for start, found in ((initial, True), (None, False)):
        field = register(fixed_pyramid, moving_pyramid, fixed, options, initial=start)
        error = np.median(np.linalg.norm(field.transform_points(points) - points - shift_mm, axis=1))
        assert (error < TRANSLATION_TOLERANCE_MM) == found


def test_smooth_deformation_recovered(deformed_pair):
    fixed, _, _, _, field, pull = deformed_pair
    points = _interior_points(fixed.geometry)
    truth = _true_moving(pull, fixed.geometry, points)
    initial = np.linalg.norm(truth - points, axis=1).mean()
    error = np.linalg.norm(field.transform_points(points) - truth, axis=1)
    assert initial > 2.0
    assert error.mean() < DEFORMATION_TOLERANCE_MM
    assert error.mean() < 0.3 * initial


def test_field_points_land_on_direct_matches(deformed_pair):
    """Fixed points pushed through the field land within one voxel (2 mm) of the matcher's own
    reliable answers for 90 % of them, and within half a voxel at the median."""
    fixed, _, fixed_pyramid, moving_pyramid, field, _ = deformed_pair
    points = _interior_points(fixed.geometry)
    options = MatchOptions(search_radius_mm=8.0, patch_radius=1)
    matches = match_points(fixed_pyramid, moving_pyramid, points, options=options)
    reliable = matches.reliable
    assert reliable.mean() > 0.5
    distance = np.linalg.norm(field.transform_points(points[reliable]) - matches.points_lps_mm[reliable], axis=1)
    assert np.median(distance) < 1.0
    assert np.percentile(distance, 90) < 2.0


def test_field_has_no_folds_on_smooth_motion(deformed_pair):
    """No fold anywhere; inside a two-voxel rim (where the field is extrapolated past the last
    nodes and the descriptors repeat the border) the volume change stays that of a smooth motion."""
    field = deformed_pair[4]
    assert jacobian_stats(field)["fraction_folding"] == 0.0
    interior = np.zeros(field.geometry.shape_kji, bool)
    interior[2:-2, 2:-2, 2:-2] = True
    stats = jacobian_stats(field, interior)
    assert 0.5 < stats["min"] <= stats["mean"] <= stats["max"] < 1.5


def test_any_backbone_wide_coarse_pyramid(translated_pair):
    """A pyramid with one wide (40-channel) coarse level and no MIND: still the right translation."""
    fixed, moving, _, _, _, shift_mm = translated_pair

    def pyramid(volume: Volume) -> FeaturePyramid:
        image = torch.from_numpy(volume.voxels)[None, None] / 500.0
        filters = torch.nn.functional.normalize(
            torch.randn((40, 1, 3, 3, 3), generator=torch.Generator().manual_seed(5)), dim=(2, 3, 4)
        )
        responses = torch.nn.functional.conv3d(image, filters, padding=1)
        pooled = torch.nn.functional.avg_pool3d(responses, 2)[0]
        return FeaturePyramid([FeatureLevel("wide", pooled, volume.geometry.downsampled(2))], volume.geometry, "test")

    field = register(pyramid(fixed), pyramid(moving), fixed, WHOLE_GRID)
    points = _interior_points(fixed.geometry)
    displacement = field.transform_points(points) - points
    assert np.allclose(np.median(displacement, axis=0), shift_mm, atol=1.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".h5"])
def test_field_file_maps_points_as_sitk_displacement_field(tmp_path, suffix):
    field = _random_field(OBLIQUE)
    path = tmp_path / f"field{suffix}"
    write_field(field, path)
    if suffix == ".h5":
        transform = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(path)))
    else:
        image = sitk.ReadImage(str(path))
        assert image.GetNumberOfComponentsPerPixel() == 3
        assert image.GetPixelID() == sitk.sitkVectorFloat32  # ITK's usual field type, half of float64's size
        transform = sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
    points = OBLIQUE.ijk_to_lps(np.random.default_rng(1).uniform(0, np.asarray(OBLIQUE.shape_ijk) - 1, (50, 3)))
    through_sitk = np.array([transform.TransformPoint([float(v) for v in p]) for p in points])
    np.testing.assert_allclose(field.transform_points(points), through_sitk, atol=1e-4)
    back = read_field(path)
    assert back.geometry.same_grid(field.geometry)
    np.testing.assert_allclose(back.displacement_lps_mm, field.displacement_lps_mm, atol=1e-6)


def test_points_far_outside_the_grid_do_not_move():
    field = _random_field(OBLIQUE)
    outside = OBLIQUE.ijk_to_lps(np.array([[-5.0, 3.0, 3.0], [3.0, 3.0, 40.0]]))
    np.testing.assert_allclose(field.transform_points(outside), outside)


def test_warp_equals_sitk_resample_through_the_field(tmp_path):
    field = _random_field(OBLIQUE, amplitude_mm=3.0)
    moving_geometry = Geometry.create((16, 16, 14), (1.7, 1.6, 2.2), (8.0, -12.0, 38.0))
    moving = _volume(_texture(3, moving_geometry.shape_ijk), moving_geometry, "moving")
    warped = warp_volume(moving, field, default_value=-1000.0)
    write_field(field, tmp_path / "field.h5")
    transform = sitk.ReadTransform(str(tmp_path / "field.h5"))
    reference = sitk.Resample(moving.to_sitk(), warped.to_sitk(), transform, sitk.sitkLinear, -1000.0)
    assert warped.geometry.same_grid(OBLIQUE)
    np.testing.assert_allclose(warped.voxels, sitk.GetArrayFromImage(reference), atol=1e-2)


def test_inverse_maps_moving_points_back():
    field = _random_field(OBLIQUE, amplitude_mm=2.0)
    corners = OBLIQUE.ijk_to_lps(np.array(np.meshgrid([0, 19], [0, 17], [0, 11])).reshape(3, -1).T.astype(float))
    low, high = corners.min(axis=0) - 4.0, corners.max(axis=0) + 4.0
    moving_geometry = Geometry.create(np.ceil((high - low) / 1.5).astype(int) + 1, (1.5, 1.5, 1.5), low)
    inverse = invert(field, moving_geometry)
    assert inverse.geometry.same_grid(moving_geometry)
    points = OBLIQUE.ijk_to_lps(np.random.default_rng(2).uniform(3, np.asarray(OBLIQUE.shape_ijk) - 4, (40, 3)))
    moved = field.transform_points(points)
    np.testing.assert_allclose(inverse.transform_points(moved), points, atol=0.05)


def test_jacobian_of_a_linear_field_and_of_a_fold():
    matrix = np.array([[0.1, 0.05, 0.0], [0.0, -0.2, 0.02], [0.03, 0.0, 0.15]])
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in OBLIQUE.shape_kji], indexing="ij"), axis=-1)
    lps = OBLIQUE.ijk_to_lps(kji[..., ::-1].reshape(-1, 3).astype(float))
    linear = DisplacementField((lps @ matrix.T).reshape(*OBLIQUE.shape_kji, 3).astype(np.float32), OBLIQUE)
    np.testing.assert_allclose(jacobian_determinant(linear), np.linalg.det(np.eye(3) + matrix), rtol=1e-4)
    folding = DisplacementField((lps @ (-2.0 * np.eye(3)).T).reshape(*OBLIQUE.shape_kji, 3).astype(np.float32),
                                OBLIQUE)
    stats = jacobian_stats(folding)
    assert stats["fraction_folding"] == 1.0 and stats["min"] < 0


def test_register_and_write_outputs(tmp_path, translated_pair):
    fixed, moving, fixed_pyramid, moving_pyramid, _, shift_mm = translated_pair
    options = FieldOptions(automatic_region=False, optimise_iterations=3)
    moving = dataclasses.replace(moving, stored_dtype="int16")  # as read from an int16 CT file
    summary = register_and_write(fixed, moving, fixed_pyramid, moving_pyramid, tmp_path / "t.nii.gz",
                                 tmp_path / "inverse.h5", tmp_path / "warped.nrrd", options)
    assert sitk.ReadImage(str(tmp_path / "warped.nrrd")).GetPixelID() == sitk.sitkInt16
    json.dumps(summary)
    assert summary["jacobian"]["fraction_folding"] == 0.0
    assert set(summary["seconds"]) >= {"register", "inverse", "warp", "total"}
    inverse = read_field(tmp_path / "inverse.h5")
    assert inverse.geometry.same_grid(moving.geometry)
    centre = _interior_points(fixed.geometry, margin_voxels=14, step=8)
    np.testing.assert_allclose(inverse.transform_points(centre) - centre, -np.tile(shift_mm, (len(centre), 1)),
                               atol=1.0)
    warped = read_volume(tmp_path / "warped.nrrd")
    inner = (slice(8, -8),) * 3
    error = np.abs(warped.voxels[inner] - fixed.voxels[inner]).mean()
    assert error < 0.25 * np.abs(moving.voxels[inner] - fixed.voxels[inner]).mean()


def test_bad_outputs_and_options_fail_before_any_work(tmp_path, translated_pair):
    fixed, moving, fixed_pyramid, moving_pyramid, _, _ = translated_pair
    with pytest.raises(BadInputError, match="format"):
        register_and_write(fixed, moving, fixed_pyramid, moving_pyramid, tmp_path / "t.txt")
    with pytest.raises(BadInputError, match="'spacing_mm' must be > 0"):
        register(fixed_pyramid, moving_pyramid, fixed, FieldOptions(levels=(FieldLevel(0.0, 10.0, 5.0),)))
    with pytest.raises(BadInputError, match="different grids"):
        register(fixed_pyramid, moving_pyramid, _volume(fixed.voxels, Geometry.create(SHAPE_IJK, SPACING_MM)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadInputError, match="displacement field"):
        write_volume(fixed, tmp_path / "scalar.nii.gz")
        read_field(tmp_path / "scalar.nii.gz")


def test_cli_register_writes_a_field_and_carries_points(tmp_path, translated_pair, capsys):
    fixed, moving, _, _, _, shift_mm = translated_pair
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    points = _interior_points(fixed.geometry, margin_voxels=12, step=8)
    write_points(PointSet(points, [f"P{n}" for n in range(len(points))]), tmp_path / "points.mrk.json")
    code = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"),
                 "--out-transform", str(tmp_path / "field.h5"), "--out-warped", str(tmp_path / "warped.nii.gz"),
                 "--points", str(tmp_path / "points.mrk.json"), "--out-points", str(tmp_path / "moved.csv"),
                 "--mask", str(tmp_path / "fixed.nii.gz"), "--quiet"])
    assert code == 0
    assert "Jacobian determinant" in capsys.readouterr().out
    transform = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(tmp_path / "field.h5")))
    moved = read_points(tmp_path / "moved.csv")
    assert moved.labels == [f"P{n}" for n in range(len(points))]
    assert np.allclose(np.median(moved.points_lps_mm - points, axis=0), shift_mm, atol=TRANSLATION_TOLERANCE_MM)
    np.testing.assert_allclose(moved.points_lps_mm, [transform.TransformPoint(p.tolist()) for p in points], atol=1e-3)
    assert (tmp_path / "warped.nii.gz").exists()


def test_cli_register_rejects_unpaired_point_options(tmp_path, capsys):
    code = main(["register", "a.nii.gz", "b.nii.gz", "--out-transform", str(tmp_path / "t.h5"),
                 "--points", "p.csv", "--quiet"])
    assert code == 2
    assert "--points and --out-points" in capsys.readouterr().err


def test_real_ct_synthetic_breathing_pair(elastix_ct):
    """The smallest real chest CT warped by the project's breathing simulation: the error falls to
    a fraction of the motion and the field does not fold."""
    from MedDIFTLib.evaluation.simulate import make_synthetic_pair

    pair = make_synthetic_pair(elastix_ct, seed=0, mean_motion_mm=6.0)
    mind = create_featurizer("mind")
    field = register(mind.extract(pair.fixed), mind.extract(pair.moving), pair.fixed)
    truth = pair.moving_points.points_lps_mm
    error = np.linalg.norm(field.transform_points(pair.fixed_points.points_lps_mm) - truth, axis=1)
    initial = np.linalg.norm(truth - pair.fixed_points.points_lps_mm, axis=1)
    assert error.mean() < 0.5 * initial.mean()
    assert jacobian_stats(field)["fraction_folding"] < 1e-3


def test_gauss_newton_terms_match_autograd_on_linear_descriptors(monkeypatch):
    """Descriptors linear in the voxel position (central differences and trilinear sampling are
    then exact): the optimisation's gradient and Hessian halves are half the data energy's
    derivatives, for a moving grid whose axes are not the fixed one's; taken a few nodes at a time,
    the same terms."""
    from MedDIFTLib.field.optimise import _linearise, _SimilarityTerm
    from MedDIFTLib.grid.sampling import channels_last

    generator = torch.Generator().manual_seed(3)
    channels, count = 5, 7
    slopes = torch.randn((channels, 3), generator=generator, dtype=torch.float64)
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (9, 10, 11)], indexing="ij")
    grid_ijk = torch.stack([i, j, k])  # (3, K, J, I)
    moving = torch.einsum("ca,akji->ckji", slopes, grid_ijk)
    derivatives = [slopes[:, axis, None, None, None].expand_as(moving) for axis in range(3)]
    stack = channels_last(torch.cat([moving, *derivatives]).float())
    to_ijk = torch.tensor([[0.5, 0.1, 0.0], [0.0, 0.4, 0.2], [0.1, 0.0, 0.6]])
    base = 3.0 + 4.0 * torch.rand((count, 3), generator=generator)
    fixed = torch.randn((channels, count), generator=generator)
    term = _SimilarityTerm(fixed, base, to_ijk, stack)
    displacement = torch.randn((count, 3), generator=generator)
    energy, gradient, hessian = _linearise(term, displacement)

    def data_energy(values: torch.Tensor) -> torch.Tensor:
        ijk = base.double() + values @ to_ijk.double()
        return ((ijk @ slopes.T).T - fixed.double()).pow(2).sum()

    expected_gradient = torch.autograd.functional.jacobian(data_energy, displacement.double())
    expected_hessian = torch.autograd.functional.hessian(data_energy, displacement.double())
    per_node = expected_hessian[torch.arange(count), :, torch.arange(count), :]  # (N, 3, 3)
    assert energy == pytest.approx(float(data_energy(displacement.double())), rel=1e-4)
    assert torch.allclose(gradient.double(), 0.5 * expected_gradient.T, atol=1e-3)
    assert torch.allclose(hessian.double(), 0.5 * per_node.permute(1, 2, 0), atol=1e-3)
    assert _linearise(term, displacement, derivatives=False) == (energy, None, None)
    monkeypatch.setattr(sys.modules["MedDIFTLib.field.optimise"], "LINEARISE_NODES", 3)  # 7 nodes: 3 + 3 + 1
    chunked_energy, chunked_gradient, chunked_hessian = _linearise(term, displacement)
    assert chunked_energy == pytest.approx(energy, rel=1e-6)
    assert torch.allclose(chunked_gradient, gradient, rtol=1e-6, atol=1e-6)
    assert torch.allclose(chunked_hessian, hessian, rtol=1e-6, atol=1e-6)


def test_matches_on_nodes_read_their_node_and_fit_as_eight_corner_matches():
    """The lattice's matches lie on the grid's nodes: the match term keeps one corner per match, and
    the fit (no block term: diagonal preconditioner) equals the fit with all eight corners."""
    from MedDIFTLib.field.solver import MatchTerm, minimise
    from MedDIFTLib.grid.nodes import grid_points

    grid = Geometry.create([7, 6, 5], [3.0, 2.5, 4.0], [10.0, -5.0, 2.0], np.eye(3))
    generator = np.random.default_rng(8)
    nodes = grid_points(grid)
    displacement = generator.normal(size=nodes.shape)
    weight = generator.uniform(0.2, 1.0, len(nodes))
    term = MatchTerm.at_points(grid, nodes, displacement, weight, 2.0)
    assert term.corners.shape == (len(nodes), 1)
    assert np.array_equal(term.corners[:, 0].numpy(), np.arange(len(nodes)))
    nudged = MatchTerm.at_points(grid, nodes + 1e-3, displacement, weight, 2.0)  # between nodes: eight corners
    eight = MatchTerm(
        nudged.corners, torch.nn.functional.one_hot(torch.zeros(len(nodes), dtype=torch.long), 8).float(),
        term.displacement, term.weight, 2.0,
    )
    eight.corners[:, 0] = term.corners[:, 0]
    start = torch.zeros((3, *grid.shape_kji))
    one_corner = minimise(start, grid, 1.0, 0.2, 3, 3.0, matches=term)
    eight_corners = minimise(start, grid, 1.0, 0.2, 3, 3.0, matches=eight)
    assert torch.allclose(one_corner, eight_corners, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (2, 1, 2, 4), (4, 3, 1, 2)])
def test_moving_stack_holds_the_features_and_their_central_differences(shape):
    """The optimisation's channels-last stack equals the features followed by ``torch.gradient``
    along i, j and k (zeros along an axis of one voxel)."""
    from MedDIFTLib.field.optimise import _with_derivatives

    features = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    derivatives = [torch.gradient(features, dim=axis)[0] if shape[axis] > 1 else torch.zeros_like(features)
                   for axis in (3, 2, 1)]
    stack = _with_derivatives(features)
    assert stack.stride(0) == 1
    assert torch.equal(stack, torch.cat([features, *derivatives]))


def test_block_jacobi_inverse_of_symmetric_positive_definite_blocks():
    from MedDIFTLib.field.solver import _symmetric_inverse

    generator = torch.Generator().manual_seed(5)
    factors = torch.randn((40, 3, 3), generator=generator, dtype=torch.float64)
    blocks = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    inverse = _symmetric_inverse(blocks.permute(1, 2, 0).float().contiguous()).permute(2, 0, 1)
    assert torch.allclose(inverse.double() @ blocks, torch.eye(3, dtype=torch.float64).expand(40, 3, 3), atol=1e-3)


@pytest.mark.parametrize(
    ("spacing_mm", "voxels_mm", "nodes_mm"),
    [
        (3.0, (1.5, 1.5, 1.5), (3.0, 3.0, 3.0)),  # whole voxels: cells of 2
        (3.0, (2.0, 2.0, 2.0), (3.0, 3.0, 3.0)),  # pooling 2 would give 4 mm: nodes 3 mm apart
        (3.0, (0.98, 0.98, 2.0), (2.94, 2.94, 3.0)),  # whole cells within the tolerance where they fit
        (3.0, (2.73, 2.73, 5.0), (2.73, 2.73, 5.0)),  # voxels as coarse as the spacing stay
    ],
)
def test_cells_of_about_the_spacing_average_a_linear_ramp_exactly(spacing_mm, voxels_mm, nodes_mm):
    """Cell averages of a field linear in the position equal the field at the cell nodes, whether
    the nodes are whole-voxel cell centres or lie between voxels (resampled)."""
    geometry = Geometry.create((23, 20, 17), voxels_mm, (5.0, -3.0, 11.0))
    grid = cell_grid(geometry, spacing_mm)
    assert np.allclose(grid.spacing_mm, nodes_mm)
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij"), axis=-1)
    lps = geometry.ijk_to_lps(kji[..., ::-1].reshape(-1, 3).astype(float))
    ramp = torch.as_tensor((lps @ np.array([0.3, -0.2, 0.5])).reshape(1, *geometry.shape_kji), dtype=torch.float32)
    averaged, averaged_grid = cell_average(ramp, geometry, spacing_mm)
    assert averaged_grid.same_grid(grid) and averaged.shape[1:] == grid.shape_kji
    node_kji = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape_kji], indexing="ij"), axis=-1)
    nodes = grid.ijk_to_lps(node_kji[..., ::-1].reshape(-1, 3).astype(float))
    full_cells = np.all(nodes <= lps.max(axis=0) - np.asarray(nodes_mm) / 2 + 1e-6, axis=1)  # partial last cells
    expected = nodes @ np.array([0.3, -0.2, 0.5])
    assert np.allclose(averaged.reshape(-1).numpy()[full_cells], expected[full_cells], atol=1e-4)


@pytest.mark.parametrize("voxels_mm", [(2.0, 2.0, 1.0), (0.98, 0.98, 2.0), (2.73, 2.73, 5.0)])
def test_descriptors_prepared_slab_by_slab_pool_as_the_whole_level(monkeypatch, voxels_mm):
    """Normalising float16 descriptors slab by slab of whole cells (a few planes of cells at a time,
    a partial last cell included) gives the cell averages of the whole level normalised at once (to float
    rounding: the pooling may sum a cell in another order)."""
    from MedDIFTLib.grid import cells
    from MedDIFTLib.grid.vectors import unit_vectors

    geometry = Geometry.create((21, 19, 23), voxels_mm, (5.0, -3.0, 11.0))
    stored = torch.randn((6, *geometry.shape_kji), generator=torch.Generator().manual_seed(3)).half()
    whole, whole_grid = cell_average(unit_vectors(stored.float(), 0), geometry, 3.0)
    monkeypatch.setattr(cells, "SLAB_VOXELS", 6 * 19 * 21 * 3)  # three planes of six channels: several slabs
    prepared, grid = cell_average(stored, geometry, 3.0, lambda slab: unit_vectors(slab.float(), 0))
    assert grid.same_grid(whole_grid)
    assert torch.allclose(prepared, whole, rtol=0.0, atol=1e-6)  # the same cells; float sums may reorder


@pytest.fixture(scope="module")
def sliding_pair(mind):
    """Two blocks sliding past each other along i: slices k < 16 move +4 mm, slices k >= 16 move
    -4 mm (a tangential jump at the plane between them, as the liver slides along the wall)."""
    fixed = _volume(_texture(3), name="fixed")
    pull = np.zeros((*fixed.geometry.shape_kji, 3), np.float32)
    pull[:16, ..., 0], pull[16:, ..., 0] = -4.0, 4.0  # M(y) = F(y + w(y)): fixed x lies at x - w
    moving = _pull(fixed, pull)
    fixed_pyramid, moving_pyramid = mind.extract(fixed), mind.extract(moving)
    return fixed, fixed_pyramid, moving_pyramid, pull


def _sliding_error(sliding_pair, break_gradient) -> tuple[np.ndarray, np.ndarray, DisplacementField]:
    fixed, fixed_pyramid, moving_pyramid, pull = sliding_pair
    options = dataclasses.replace(WHOLE_GRID, break_gradient=break_gradient)
    field = register(fixed_pyramid, moving_pyramid, fixed, options)
    points = _interior_points(fixed.geometry, margin_voxels=8, step=2)
    truth = points - pull[0, 0, 0] * np.where(fixed.geometry.lps_to_ijk(points)[:, 2:3] < 15.5, 1.0, -1.0)
    distance_voxels = np.abs(fixed.geometry.lps_to_ijk(points)[:, 2] - 15.5)
    return np.linalg.norm(field.transform_points(points) - truth, axis=1), distance_voxels, field


def test_the_field_breaks_where_the_motion_slides(sliding_pair):
    """Near the sliding plane the default field (total variation above ``break_gradient``) follows
    each side far better than diffusion, which spreads the 8 mm jump; it does not fold."""
    error, distance, field = _sliding_error(sliding_pair, FieldOptions().break_gradient)
    diffusion_error, _, _ = _sliding_error(sliding_pair, None)
    near = (distance > 2.0) & (distance < 4.0)  # 4-8 mm from the plane (patches of 7 voxels reach across)
    assert error[near].mean() < 0.75
    assert error[near].mean() < 0.7 * diffusion_error[near].mean()
    assert jacobian_stats(field)["fraction_folding"] < 1e-3


def test_the_field_honours_confident_consistent_matches(sliding_pair, deformed_pair):
    """Where the engine's match is confident and its forward-backward check consistent (under one
    voxel), the field lands within a voxel of it (2 mm), half a voxel at the median: on a smooth
    motion and on both sides of a sliding plane."""
    sliding_field = _sliding_error(sliding_pair, FieldOptions().break_gradient)[2]
    for fixed, fixed_pyramid, moving_pyramid, field in (
        (*sliding_pair[:3], sliding_field),
        (deformed_pair[0], *deformed_pair[2:5]),
    ):
        points = _interior_points(fixed.geometry, margin_voxels=8, step=3)
        matches = match_points(fixed_pyramid, moving_pyramid, points, options=MatchOptions(search_radius_mm=12.0))
        trusted = matches.reliable & (matches.forward_backward_mm < 2.0)
        assert trusted.mean() > 0.5
        distance = np.linalg.norm(field.transform_points(points[trusted]) - matches.points_lps_mm[trusted], axis=1)
        assert np.median(distance) < 1.0
        assert np.percentile(distance, 90) < 2.0


def _unfolded_over_the_whole_grid(field: torch.Tensor, grid: Geometry) -> torch.Tensor:
    """The reference of ``solver.unfolded``: every round smooths the whole grid and keeps the
    smoothing within ``FOLD_MARGIN`` nodes of each fold."""
    from MedDIFTLib.field.displacement import determinant_of_tensor
    from MedDIFTLib.field.solver import FOLD_DETERMINANT, FOLD_MARGIN, UNFOLD_ROUNDS

    for _ in range(UNFOLD_ROUNDS):
        folding = determinant_of_tensor(field, grid) <= FOLD_DETERMINANT
        if not folding.any():
            break
        near = torch.from_numpy(ndimage.maximum_filter(folding, 2 * FOLD_MARGIN + 1))
        field = torch.where(near, gaussian_filter(field, (1.0, 1.0, 1.0)), field)
    return field


def test_folds_are_smoothed_away_in_boxes_as_over_the_whole_grid():
    """Folds far apart, near each other and on the grid's border: smoothing box by box gives the
    same field as smoothing the whole grid each round, and the folds are gone."""
    from MedDIFTLib.field.displacement import determinant_of_tensor
    from MedDIFTLib.field.solver import unfolded

    grid = Geometry.create((40, 34, 30), (2.0, 2.5, 3.0), ORIGIN_LPS)
    kji = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in grid.shape_kji], indexing="ij"))
    field = np.zeros((3, *grid.shape_kji), np.float32)
    centres_kji = [(5, 6, 7), (24, 20, 30), (24, 20, 37), (0, 33, 0)]  # apart, close together, on the border
    for centre_kji, strength in zip(centres_kji, (15.0, -15.0, 15.0, 15.0)):
        distance = np.linalg.norm(kji - np.array(centre_kji, float)[:, None, None, None], axis=0)
        field[2] += strength * np.exp(-((distance / 1.5) ** 2))  # a sharp bump along k folds there
    field = torch.from_numpy(field)
    determinant = determinant_of_tensor(field, grid)
    for k, j, i in centres_kji:
        assert (determinant[max(k - 3, 0) : k + 4, max(j - 3, 0) : j + 4, max(i - 3, 0) : i + 4] <= 0).any()
    result = unfolded(field, grid)
    assert torch.equal(result, _unfolded_over_the_whole_grid(field, grid))
    assert (determinant_of_tensor(result, grid) > 0).all()
    assert torch.equal(result[:, 12:18, 10:16, 14:22], field[:, 12:18, 10:16, 14:22])  # far from folds: kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_register_on_cuda_gives_the_cpu_field(deformed_pair):
    """Features made on the GPU give the field the CPU gives, within floating-point reordering
    (0.05 mm at interior points): ``meddift register --device cuda`` runs the whole field there."""
    fixed, moving, _, _, cpu_field, _ = deformed_pair
    gpu = create_featurizer("mind", device="cuda")
    gpu_field = register(gpu.extract(fixed), gpu.extract(moving), fixed, WHOLE_GRID)
    points = _interior_points(fixed.geometry)
    difference = np.linalg.norm(gpu_field.transform_points(points) - cpu_field.transform_points(points), axis=1)
    assert difference.max() < 0.05
