"""``meddift eval`` and its parts: dataset layouts (DIR-Lab, COPDgene, Learn2Reg, manifest, pair folders)
on small fixtures made here, the baselines' direction convention and working grid, the reports and their
display windows, and the error paths."""

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA_DIR, DIRLAB_DIR, require

from MedDIFTLib.cli import main
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import PointSet, Volume, write_points, write_volume
from MedDIFTLib.core.options import BSplineOptions, FieldOptions, MatchOptions
from MedDIFTLib.evaluation.baselines import bspline, convexadam, convexadam_spacing_mm, unavailable_reason
from MedDIFTLib.evaluation.cases import RawGeometry
from MedDIFTLib.evaluation.datasets import detect_layout, load_case, open_dataset
from MedDIFTLib.evaluation.methods import method_names, parse_method, run_method
from MedDIFTLib.evaluation.metrics import confidence_correlation
from MedDIFTLib.evaluation.raw import DIRLAB_4DCT, read_raw_volume
from MedDIFTLib.evaluation.report import (
    HU_WINDOW,
    PointTable,
    display_window,
    make_plots,
    markdown_tables,
    read_point_table,
    summarise,
    write_point_table,
    write_tables,
)
from MedDIFTLib.evaluation.simulate import phantom_ct

LIVER_PAIRS_DIR = DATA_DIR / "liver4dmri_real_pairs"


def _sparse(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size)


def _write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(str(v) for v in row) + "\n" for row in rows))


def _raw_size(geometry: RawGeometry) -> int:
    return int(np.prod(geometry.shape_ijk)) * 2


def _small_volume(origin=(-20.0, 10.0, 30.0)) -> Volume:
    voxels = np.random.default_rng(0).normal(0, 100, (6, 8, 10)).astype(np.float32)
    return Volume(voxels, Geometry.create((10, 8, 6), (1.5, 1.5, 2.0), origin))


# ---------------------------------------------------------------- dataset layouts


def test_dirlab_layout_uses_published_geometry_and_names_missing_files(tmp_path):
    _sparse(tmp_path / "Case1Pack" / "Images" / "case1_T00_s.img", _raw_size(DIRLAB_4DCT[1]))
    _sparse(tmp_path / "Case1Pack" / "Images" / "case1_T50_s.img", _raw_size(DIRLAB_4DCT[1]))
    _write_lines(tmp_path / "Case1Pack" / "ExtremePhases" / "Case1_300_T00_xyz.txt", [(10, 20, 5), (1, 1, 1)])
    _write_lines(tmp_path / "Case1Pack" / "ExtremePhases" / "Case1_300_T50_xyz.txt", [(12, 20, 6), (1, 2, 1)])
    _sparse(tmp_path / "Case8Deploy" / "Images" / "case8_T00.img", 10)
    _write_lines(tmp_path / "Case8Deploy" / "extremePhases" / "case8_dirLab300_T00_xyz.txt", [(1, 1, 1)])
    assert detect_layout(tmp_path) == "dirlab"
    dataset = open_dataset(tmp_path)
    assert [case.name for case in dataset.cases] == ["case1", "case8"]
    case1 = dataset.cases[0]
    assert case1.fixed_image.endswith("case1_T00_s.img") and case1.moving_points.endswith("T50_xyz.txt")
    assert case1.published_initial_mm == pytest.approx(3.89)
    data = load_case(case1, images=False)
    np.testing.assert_allclose(data.fixed_points.points_lps_mm[0], [9 * 0.97, 19 * 0.97, 4 * 2.5])
    np.testing.assert_allclose(data.moving_points.points_lps_mm[1] - data.fixed_points.points_lps_mm[1],
                               [0, 0.97, 0])
    with pytest.raises(BadInputError, match=r"case8 has no .*T50 image.*T50 landmark file"):
        load_case(dataset.cases[1])


def test_raw_volume_is_read_in_ijk_order_shifted_to_hu_and_size_checked(tmp_path):
    raw = RawGeometry((4, 3, 2), (1.0, 1.0, 2.0))
    values = np.arange(24, dtype="<i2") + 1024
    path = tmp_path / "case_T00.img"
    values.tofile(path)
    volume = read_raw_volume(path, raw)
    assert volume.voxels.shape == (2, 3, 4)
    assert volume.voxels[0, 0, 1] == 1 and volume.voxels[1, 2, 3] == 23
    assert volume.geometry.spacing_mm == (1.0, 1.0, 2.0)
    values[:-1].tofile(path)
    with pytest.raises(BadInputError, match=r"case_T00.img: 46 bytes, but the published 4x3x2 int16 volume has 48"):
        read_raw_volume(path, raw)


@pytest.mark.parametrize("case, published", [(1, 3.89), (2, 4.34)])
def test_dirlab_reader_reproduces_the_published_initial_error(tmp_path, case, published, capsys):
    """The real DIR-Lab landmark files (back in their published 1-based txt form) on blank images of the
    published size: ``meddift eval --methods identity`` must give the published initial distance."""
    folder = require(DIRLAB_DIR / f"case{case}")
    pack = tmp_path / f"Case{case}Pack"
    for phase in ("T00", "T50"):
        rows = np.loadtxt(folder / f"case{case}_{phase}_landmarks.csv", delimiter=",", skiprows=1).astype(int) + 1
        _write_lines(pack / "ExtremePhases" / f"Case{case}_300_{phase}_xyz.txt", rows)
        _sparse(pack / "Images" / f"case{case}_{phase}_s.img", _raw_size(DIRLAB_4DCT[case]))
    out = tmp_path / "results"
    assert main(["eval", str(tmp_path), "--methods", "identity", "--out", str(out), "--in-process", "--quiet"]) == 0
    record = json.loads((out / "results.json").read_text())["cases"][0]
    assert record["points"] == 300
    assert record["mean"] == pytest.approx(published, abs=0.005)
    assert f"published initial {published:.2f}" in (out / "results.md").read_text()


def test_copdgene_layout_pairs_inspiration_with_expiration(tmp_path):
    geometry = RawGeometry((512, 512, 121), (0.625, 0.625, 2.5))
    folder = tmp_path / "copd1" / "copd1"
    for phase in ("i", "e"):
        _sparse(folder / f"copd1_{phase}BHCT.img", _raw_size(geometry))
    _write_lines(folder / "copd1_300_iBH_xyz_r1.txt", [(100, 200, 50)])
    _write_lines(folder / "copd1_300_eBH_xyz_r1.txt", [(100, 210, 40)])
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "copdgene"
    case = dataset.cases[0]
    assert case.name == "copd1" and case.fixed_image.endswith("copd1_iBHCT.img")
    data = load_case(case, images=False)
    np.testing.assert_allclose(data.moving_points.points_lps_mm - data.fixed_points.points_lps_mm,
                               [[0, 10 * 0.625, -10 * 2.5]])
    (folder / "copd1_300_eBH_xyz_r1.txt").unlink()
    with pytest.raises(BadInputError, match="copd1 has no eBH landmark file"):
        load_case(open_dataset(tmp_path).cases[0])


def test_learn2reg_layout_reads_json_pairs_keypoints_and_masks(tmp_path):
    fixed, moving = _small_volume(), _small_volume(origin=(-19.0, 10.0, 30.0))
    for name, volume in (("Lung_0001_0000", fixed), ("Lung_0001_0001", moving), ("Lung_0002_0000", fixed),
                         ("Lung_0002_0001", moving)):
        write_volume(volume, tmp_path / "imagesTr" / f"{name}.nii.gz")
    mask = Volume(np.ones((6, 8, 10), np.float32), fixed.geometry)
    write_volume(mask, tmp_path / "masksTr" / "Lung_0001_0000.nii.gz")
    (tmp_path / "keypointsTr").mkdir()
    (tmp_path / "keypointsTr" / "Lung_0001_0000.csv").write_text("1.0,2.0,3.0\n4.5,5.0,1.0\n")
    (tmp_path / "keypointsTr" / "Lung_0001_0001.csv").write_text("1.0,2.0,3.0\n4.0,5.0,1.0\n")
    def pairs(n: int) -> list[dict]:
        return [{"fixed": f"./imagesTr/Lung_000{n}_0000.nii.gz", "moving": f"./imagesTr/Lung_000{n}_0001.nii.gz"}]

    (tmp_path / "LungCT_dataset.json").write_text(json.dumps({"registration_val": pairs(1),
                                                              "training_paired_images": pairs(2)}))
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "learn2reg" and [c.name for c in dataset.cases] == ["Lung_0001_0000-0001"]
    data = load_case(dataset.cases[0])
    np.testing.assert_allclose(data.fixed_points.points_lps_mm, fixed.geometry.ijk_to_lps([[1, 2, 3], [4.5, 5, 1]]))
    np.testing.assert_allclose(data.moving_points.points_lps_mm[0] - data.fixed_points.points_lps_mm[0], [1, 0, 0])
    assert data.fixed_mask is not None and data.fixed_mask.voxels.sum() == 480
    train = open_dataset(tmp_path, split="train").cases[0]
    with pytest.raises(BadInputError, match="no keypoint files Lung_0002_0000.csv and Lung_0002_0001.csv"):
        load_case(train)


def test_manifest_pairs_points_by_label_and_names_bad_files(tmp_path):
    volume = _small_volume()
    write_volume(volume, tmp_path / "img" / "fixed.nii.gz")
    write_volume(volume, tmp_path / "img" / "moving.nii.gz")
    points = volume.geometry.ijk_to_lps([[1, 1, 1], [5, 4, 3], [8, 6, 4]])
    write_points(PointSet(points, ["a", "b", "c"]), tmp_path / "fixed.csv")
    write_points(PointSet(points[::-1] + [0, 0, 2], ["c", "b", "a"]), tmp_path / "moving.csv")
    write_points(PointSet(points[:2], ["a", "b"]), tmp_path / "two.csv")
    rows = [["case", "fixed", "moving", "fixed_points", "moving_points"],
            ["good", "img/fixed.nii.gz", "img/moving.nii.gz", "fixed.csv", "moving.csv"],
            ["short", "img/fixed.nii.gz", "img/moving.nii.gz", "fixed.csv", "two.csv"],
            ["absent", "img/fixed.nii.gz", "img/nothing.nii.gz", "fixed.csv", "moving.csv"]]
    with (tmp_path / "pairs.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    dataset = open_dataset(tmp_path / "pairs.csv")
    assert dataset.layout == "manifest" and [c.name for c in dataset.cases] == ["good", "short", "absent"]
    good = load_case(dataset.cases[0])
    assert good.moving_points.labels == ["a", "b", "c"]
    np.testing.assert_allclose(good.moving_points.points_lps_mm - good.fixed_points.points_lps_mm, [[0, 0, 2]] * 3)
    with pytest.raises(BadInputError, match=r"two.csv: 2 points, but .*fixed.csv has 3"):
        load_case(dataset.cases[1])
    with pytest.raises(BadInputError, match=r"nothing.nii.gz: no such file"):
        load_case(dataset.cases[2])
    (tmp_path / "bad.csv").write_text("fixed,moving\na.nii.gz,b.nii.gz\n")
    with pytest.raises(BadInputError, match=r"bad.csv: manifest lacks column\(s\) fixed_points, moving_points"):
        open_dataset(tmp_path / "bad.csv")
    with pytest.raises(BadInputError, match="no case named nope"):
        dataset.select(["nope"])


def _pair_folder(folder: Path, volume: Volume, shift_mm: float, points_name: str = "moving_points.csv") -> None:
    """A pair folder as liver4dmri_real_pairs has them: images, and ``label,l,p,s`` CSVs whose rows pair."""
    write_volume(volume, folder / "fixed.nii.gz")
    write_volume(volume, folder / "moving.nii.gz")
    points = volume.geometry.ijk_to_lps([[1, 1, 1], [5, 4, 3], [8, 6, 4]])
    write_points(PointSet(points, ["liver-00", "liver-01", "outside-00"]), folder / "fixed_points.csv")
    write_points(PointSet(points + [0, shift_mm, 0], ["liver-00", "liver-01", "outside-00"]), folder / points_name)


def test_pair_folders_layout_is_detected_and_names_a_missing_file(tmp_path):
    volume = _small_volume()
    _pair_folder(tmp_path / "pair-b", volume, 2.0)
    _pair_folder(tmp_path / "pair-a", volume, 1.0)
    _pair_folder(tmp_path / "no-moving-points", volume, 1.0, points_name="other.csv")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("not a pair")
    assert detect_layout(tmp_path) == "pairs"
    dataset = open_dataset(tmp_path)
    assert [case.name for case in dataset.cases] == ["no-moving-points", "pair-a", "pair-b"]
    pair = load_case(dataset.cases[2])
    assert pair.fixed_points.labels == pair.moving_points.labels == ["liver-00", "liver-01", "outside-00"]
    np.testing.assert_allclose(pair.moving_points.points_lps_mm - pair.fixed_points.points_lps_mm, [[0, 2, 0]] * 3)
    assert pair.fixed.geometry.same_grid(volume.geometry) and pair.fixed_mask is None
    missing = r"no-moving-points: no moving_points file \(looked for moving_points with .*\.csv\)"
    with pytest.raises(BadInputError, match=missing):
        load_case(dataset.cases[0])
    single = open_dataset(tmp_path / "pair-a", layout="pairs")  # one pair folder is a dataset of one case
    assert [case.name for case in single.cases] == ["pair-a"] and detect_layout(tmp_path / "pair-a") == "pairs"
    write_volume(volume, tmp_path / "pair-a" / "moving.nrrd")
    with pytest.raises(BadInputError, match=r"several moving files \(moving.nii.gz, moving.nrrd\)"):
        load_case(open_dataset(tmp_path).select(["pair-a"]).cases[0])


def test_the_real_liver_pairs_are_read_as_pair_folders():
    dataset = open_dataset(require(LIVER_PAIRS_DIR))
    assert dataset.layout == "pairs" and len(dataset.cases) == 4
    for case in dataset.cases:
        pair = load_case(case, images=False)
        labels = pair.fixed_points.labels
        assert len(labels) == 52 and labels == pair.moving_points.labels
        assert sum(label.startswith("liver-") for label in labels) == 32
        assert sum(label.startswith("outside-") for label in labels) == 20
        np.testing.assert_allclose(pair.fixed_geometry.spacing_mm, (1.36719, 1.36719, 4.0), atol=1e-4)


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadInputError, match=r"unknown dataset layout; expected a DIR-Lab 4DCT folder"):
        open_dataset(tmp_path)
    with pytest.raises(BadInputError, match="no such file or folder"):
        open_dataset(tmp_path / "absent")


# ---------------------------------------------------------------- methods


def test_method_specs_are_parsed_and_checked():
    spec = parse_method("mind:search_radius_mm=15,patch_radius=2,level_weights=[1,0.5,0.25]")
    assert spec.name == "mind" and spec.backbone == "mind" and spec.backbone_options == {"patch_radius": 2}
    assert spec.options == MatchOptions(search_radius_mm=15.0, level_weights=(1.0, 0.5, 0.25))
    assert spec.slug == "mind_search_radius_mm-15_patch_radius-2_level_weights-_1_0.5_0.25"
    field = parse_method("mind-field:optimise_iterations=0,levels=[[8,20,12,1]]")
    assert isinstance(field.options, FieldOptions) and field.options.levels[0].spacing_mm == 8.0
    assert parse_method("bspline:control_spacing_mm=12").options == BSplineOptions(control_spacing_mm=12.0)
    assert {"identity", "mind", "mind-field", "bspline", "convexadam"} <= set(method_names())
    with pytest.raises(BadInputError, match="unknown method 'elastix'; choose from: identity, "):
        parse_method("elastix")
    with pytest.raises(BadInputError, match="method 'bspline' does not take option.*grid"):
        parse_method("bspline:grid=3")
    with pytest.raises(BadInputError, match="is not KEY=VALUE"):
        parse_method("mind:15")
    with pytest.raises(BadInputError, match="method 'identity' does not take option"):
        parse_method("identity:seed=1")


@pytest.mark.parametrize("text, message", [
    ("bspline:metric=ssd", "option 'metric': 'ssd' is not one of meansquares, correlation, mattes"),
    ("bspline:levels=0", "option 'levels' must be >= 1"),
    ("bspline:samples=\"many\"", "bspline option 'samples': 'many' is not a whole number"),
    ("convexadam:ic=2", "convexadam option 'ic': 2 is not true or false"),
    ("mind:search_radius_mm=0", "option 'search_radius_mm' must be > 0"),
    ("mind:mode=everywhere", "option 'mode': 'everywhere' is not one of local, global"),
    ("mind-field:levels=[[0,20,10,1]]", "option 'spacing_mm' must be > 0"),
])
def test_method_options_are_typed_and_range_checked(text, message):
    with pytest.raises(BadInputError, match=message.replace("(", r"\(")):
        parse_method(text)


def test_baselines_check_their_options_before_any_work():
    with pytest.raises(BadInputError, match="'ssd' is not one of meansquares, correlation, mattes"):
        bspline(None, None, np.zeros((1, 3)), metric="ssd")
    with pytest.raises(BadInputError, match="unknown bspline option"):
        bspline(None, None, np.zeros((1, 3)), grid=3)


def test_confidence_correlation_is_negative_when_confidence_follows_the_error():
    errors = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    result = confidence_correlation(np.array([0.9, 0.8, 0.5, 0.3, 0.1]), errors)
    assert result["spearman"] == pytest.approx(-1.0) and -1.0 <= result["pearson"] < -0.8
    assert confidence_correlation(np.full(5, 0.7), errors) == {"spearman": None, "pearson": None}
    assert confidence_correlation(np.array([0.9, 0.1]), np.array([1.0, 2.0]))["spearman"] is None


@pytest.fixture(scope="module")
def phantom():
    return phantom_ct(seed=1)


@pytest.fixture(scope="module")
def shifted_phantom(phantom):
    """The phantom and a copy whose world position moved by ``shift``: M(y) = F(y - shift), so a fixed
    point x lies at x + shift in the moving image (what every method must predict). The shift differs
    along every axis, so a swapped axis or sign shows."""
    fixed = phantom
    shift = np.array([6.0, -1.0, -3.0])
    moving = Volume(fixed.voxels.copy(), Geometry.create(fixed.geometry.shape_ijk, fixed.geometry.spacing_mm,
                                                         np.asarray(fixed.geometry.origin_lps_mm) + shift))
    points = fixed.geometry.ijk_to_lps(np.array([[24, 28, 24], [40, 28, 20], [32, 20, 28], [30, 36, 22]], float))
    return fixed, moving, points, shift


@pytest.mark.parametrize("metric", ["meansquares", "correlation"])
def test_bspline_predicts_moving_points_in_the_itk_direction(shifted_phantom, metric):
    fixed, moving, points, shift = shifted_phantom
    output = bspline(fixed, moving, points, iterations=20, samples=3000, metric=metric)
    assert np.abs(output.points_lps_mm - (points + shift)).max() < 1.0
    np.testing.assert_allclose(output.field.transform_points(points), output.points_lps_mm, atol=0.2)


@pytest.mark.skipif(unavailable_reason("convexadam") is not None, reason="convexAdam not installed")
def test_convexadam_voxel_steps_become_lps_mm_on_the_working_grid(shifted_phantom, monkeypatch):
    """ConvexAdam's output is voxel steps along the array axes [k, j, i] of the working grid: a step of
    (1, 2, 3) voxels of 2.5 mm is 2.5 * (3, 2, 1) mm in LPS (identity direction)."""
    import convexAdam.convex_adam_MIND as module

    fixed, moving, points, _ = shifted_phantom
    calls = {}

    def fake_convex_adam_pt(img_fixed, img_moving, **options):
        calls.update(shape=tuple(img_fixed.shape), moving_shape=tuple(img_moving.shape), **options)
        return np.broadcast_to(np.array([1.0, 2.0, 3.0]), (*img_fixed.shape, 3)).copy()

    monkeypatch.setattr(module, "convex_adam_pt", fake_convex_adam_pt)
    output = convexadam(fixed, moving, points, working_spacing_mm=2.5, grid_sp=4)
    np.testing.assert_allclose(output.points_lps_mm - points, [[7.5, 5.0, 2.5]] * len(points), atol=1e-5)
    assert calls["shape"] == calls["moving_shape"] == (48, 56, 64) and calls["grid_sp"] == 4
    assert calls["lambda_weight"] == 1.25 and output.field.geometry.spacing_mm == (2.5, 2.5, 2.5)


def test_convexadam_works_at_the_finest_spacing_where_the_voxels_are_not_cubic():
    thick_mri = Geometry.create((166, 195, 25), (1.367, 1.367, 4.0))
    thick_ct = Geometry.create((57, 78, 64), (2.73, 2.73, 5.0))
    cubic_ct = Geometry.create((122, 102, 112), (1.5, 1.5, 1.5))
    coarser_moving = Geometry.create((111, 93, 102), (1.65, 1.65, 1.65))  # a synthetic pair's 1.1x moving grid
    coarse_ct = Geometry.create((40, 40, 40), (3.0, 3.0, 3.0))
    assert convexadam_spacing_mm(thick_mri, thick_mri) == pytest.approx(1.367)
    assert convexadam_spacing_mm(thick_ct, thick_ct) == pytest.approx(2.73)
    assert convexadam_spacing_mm(cubic_ct, coarser_moving) == 2.0
    assert convexadam_spacing_mm(cubic_ct, thick_mri) == pytest.approx(1.367)  # either image's thick slices count
    assert convexadam_spacing_mm(coarse_ct, coarse_ct) == 3.0
    assert convexadam_spacing_mm(thick_mri, thick_mri, 2.5, thick_slices_at_finest=False) == 2.5
    assert convexadam_spacing_mm(cubic_ct, cubic_ct, working_spacing_mm=1.0) == 1.5


@pytest.mark.skipif(unavailable_reason("convexadam") is not None, reason="convexAdam not installed")
def test_convexadam_runs_thick_slices_on_an_isotropic_grid_of_their_finest_spacing(monkeypatch):
    import convexAdam.convex_adam_MIND as module

    calls = {}

    def fake_convex_adam_pt(img_fixed, img_moving, **options):
        calls.update(fixed=img_fixed.numpy(), moving=img_moving.numpy())
        return np.zeros((*img_fixed.shape, 3))

    monkeypatch.setattr(module, "convex_adam_pt", fake_convex_adam_pt)
    mri = Volume(np.full((10, 30, 20), 100.0, np.float32), Geometry.create((20, 30, 10), (1.25, 1.25, 4.0)))
    moving = Volume(mri.voxels, Geometry.create((20, 30, 10), (1.25, 1.25, 4.0), (0.0, 0.0, 2.0)))
    output = convexadam(mri, moving, np.zeros((1, 3)))
    assert output.field.geometry.spacing_mm == (1.25, 1.25, 1.25) and calls["fixed"].shape == (29, 30, 20)
    # the moving image, 2 mm further along k, leaves the fixed grid's first slices uncovered: they take its
    # lowest value (MR signal 100 here), never a CT air value of -1000 (an edge ConvexAdam's MIND would follow)
    assert calls["moving"].min() == 100.0
    assert convexadam(mri, moving, np.zeros((1, 3)), working_spacing_mm=2.5,
                      thick_slices_at_finest=False).field.geometry.spacing_mm == (2.5, 2.5, 2.5)


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason("convexadam") is not None, reason="convexAdam not installed")
def test_convexadam_predicts_moving_points_in_the_itk_direction(shifted_phantom):
    fixed, moving, points, shift = shifted_phantom
    output = convexadam(fixed, moving, points, working_spacing_mm=2.5)
    assert np.linalg.norm(output.points_lps_mm - (points + shift), axis=1).mean() < 1.5


def test_meddift_and_identity_through_run_method(shifted_phantom):
    fixed, moving, points, shift = shifted_phantom

    class Data:
        fixed_points = PointSet(points, ["1", "2", "3", "4"])
        fixed_mask = None

    Data.fixed, Data.moving = fixed, moving
    np.testing.assert_array_equal(run_method(parse_method("identity"), Data).points_lps_mm, points)
    matched = run_method(parse_method("mind:search_radius_mm=10"), Data, device="cpu")
    assert np.linalg.norm(matched.points_lps_mm - (points + shift), axis=1).mean() < 1.0
    assert 0.0 <= matched.details["reliable_fraction"] <= 1.0 and matched.field is None


# ---------------------------------------------------------------- reports


def _table(error_mm: float, count: int = 4) -> PointTable:
    fixed = np.zeros((count, 3))
    true = np.tile([3.0, 4.0, 0.0], (count, 1))
    return PointTable([str(n) for n in range(count)], fixed, true, true + [error_mm, 0, 0])


def test_report_tables_pool_points_and_record_failures(tmp_path):
    records = [
        {"case": "a", "method": "identity", "status": "ok", "points": 4, "initial_mean": 5.0, "mean": 5.0,
         "std": 0.0, "p50": 5.0, "p95": 5.0, "max": 5.0, "folding_fraction": None, "seconds": 0.1,
         "peak_rss_mb": 300.0},
        {"case": "a", "method": "bspline", "status": "ok", "points": 4, "initial_mean": 5.0, "mean": 1.0,
         "std": 0.0, "p50": 1.0, "p95": 1.0, "max": 1.0, "folding_fraction": 0.001, "seconds": 3.0,
         "peak_rss_mb": 900.0},
        {"case": "b", "method": "identity", "status": "ok", "points": 4, "initial_mean": 5.0, "mean": 5.0,
         "std": 0.0, "p50": 5.0, "p95": 5.0, "max": 5.0, "folding_fraction": None, "seconds": 0.1,
         "peak_rss_mb": 310.0},
        {"case": "b", "method": "bspline", "status": "failed", "error": "b/moving.nii.gz: no such file"},
    ]
    tables = {("a", "identity"): _table(5.0), ("a", "bspline"): _table(1.0), ("b", "identity"): _table(5.0)}
    overall = summarise(records, tables, ["identity", "bspline"])
    assert overall[0]["points"] == 8 and overall[0]["mean"] == pytest.approx(5.0)
    assert overall[1]["cases_ok"] == 1 and overall[1]["mean"] == pytest.approx(1.0)
    assert overall[1]["folding_fraction"] == pytest.approx(0.001) and overall[1]["peak_rss_mb"] == 900.0
    payload = {"dataset": {"path": "x", "layout": "manifest"}, "cases": records, "overall": overall}
    write_tables(tmp_path, payload)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["case"], r["method"], r["status"]) for r in rows][-2:] == [("ALL", "identity", "ok"),
                                                                           ("ALL", "bspline", "ok")]
    assert rows[3]["error"] == "b/moving.nii.gz: no such file"
    markdown = (tmp_path / "results.md").read_text()
    assert "| bspline | 1/2 | 4 | 5.00 | 1.00 |" in markdown and "failed: b/moving.nii.gz: no such file" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["overall"][1]["method"] == "bspline"
    assert markdown_tables(records, overall).count("\n| a |") == 2


def test_plots_are_written_and_skipped_cleanly_without_matplotlib(tmp_path, monkeypatch, phantom):
    volume = phantom
    records = [{"case": "a", "method": m, "status": "ok"} for m in ("identity", "mind")]
    centre = volume.geometry.ijk_to_lps([[30, 28, 24]] * 4)
    table = PointTable(list("abcd"), centre, centre + [2, 0, 0], centre + [2, 1, 0])
    tables = {("a", "identity"): table, ("a", "mind"): table}
    notes = make_plots(tmp_path, records, tables, ["identity", "mind"], lambda case: (volume, volume),
                       {"identity": "identity", "mind": "mind"}, worst_count=2)
    assert notes == []
    for name in ("tre_boxplot.png", "error_vs_initial.png", "worst_mind.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    notes = make_plots(tmp_path / "none", records, tables, ["identity", "mind"], lambda case: (volume, volume),
                       {"identity": "identity", "mind": "mind"})
    assert "matplotlib is not installed" in notes[0] and not (tmp_path / "none").exists()


def test_slices_are_drawn_in_a_window_of_their_own_modality():
    ct = phantom_ct(seed=2)
    assert display_window(ct) == HU_WINDOW
    signal = np.random.default_rng(0).uniform(0.0, 250.0, (10, 30, 20)).astype(np.float32)
    signal[0, 0, :5] = 4000.0  # a few bright voxels must not set the window
    mri = Volume(signal, Geometry.create((20, 30, 10), (1.37, 1.37, 4.0)))
    low, high = display_window(mri)
    assert 0.0 <= low < 5.0 and 245.0 < high <= 250.0
    flat = Volume(np.full((4, 4, 4), 7.0, np.float32), Geometry.create((4, 4, 4), (1.0, 1.0, 1.0)))
    assert display_window(flat) == (7.0, 8.0)


# ---------------------------------------------------------------- command line


def test_simulate_manifest_then_eval_keeps_going_past_a_bad_case(tmp_path, capsys, phantom):
    cts = tmp_path / "cts"
    write_volume(phantom, cts / "alpha.nii.gz", sitk.sitkInt16)
    volume = phantom
    write_volume(volume, cts / "beta" / "image.nii.gz", sitk.sitkInt16)
    write_points(PointSet(volume.geometry.ijk_to_lps([[20, 28, 24], [44, 28, 24], [32, 20, 18]]), ["x", "y", "z"]),
                 cts / "beta" / "landmarks.csv")
    (cts / "broken.nii.gz").write_text("not an image")
    pairs = tmp_path / "pairs"
    assert main(["simulate", "--manifest", str(cts), str(pairs), "--num-keypoints", "20", "--seed", "1"]) == 1
    captured = capsys.readouterr()
    assert "skipped broken: " in captured.err and "broken.nii.gz" in captured.err
    rows = list(csv.DictReader((pairs / "manifest.csv").open()))
    assert [r["case"] for r in rows] == ["alpha", "beta"]
    assert json.loads((pairs / "beta" / "pair.json").read_text())["points"] == 3
    with (pairs / "manifest.csv").open("a") as handle:
        handle.write("gamma,alpha/fixed.nii.gz,gamma/missing.nii.gz,alpha/fixed_points.csv,"
                     "alpha/moving_points_true.csv\n")
    out = tmp_path / "results"
    code = main(["eval", str(pairs / "manifest.csv"), "--methods", "identity", "mind", "--out", str(out),
                 "--device", "cpu", "--quiet", "--in-process"])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    status = {(r["case"], r["method"]): r for r in results["cases"]}
    assert status[("alpha", "mind")]["status"] == "ok" and status[("beta", "identity")]["points"] == 3
    assert status[("gamma", "mind")]["status"] == "failed"
    assert "gamma/missing.nii.gz: no such file" in status[("gamma", "mind")]["error"]
    assert status[("alpha", "mind")]["peak_rss_mb"] > 50
    assert "confidence_spearman" in status[("alpha", "mind")] and "confidence_spearman" not in status[("alpha",
                                                                                                     "identity")]
    assert read_point_table(out / "points" / "alpha" / "mind.csv").confidence is not None
    overall = {r["method"]: r for r in results["overall"]}
    assert overall["mind"]["mean"] < 0.5 * overall["identity"]["mean"] and overall["mind"]["cases_ok"] == 2
    assert (out / "points" / "beta" / "mind.csv").is_file()
    assert (out / "plots" / "worst_mind.png").is_file()
    assert "| mind | 2/3 |" in capsys.readouterr().out


def test_eval_runs_each_case_in_its_own_process_and_records_a_timeout(tmp_path):
    volume = _small_volume()
    write_volume(volume, tmp_path / "f.nii.gz")
    write_points(PointSet(volume.geometry.ijk_to_lps([[2, 2, 2], [5, 4, 3]]), ["p", "q"]), tmp_path / "p.csv")
    (tmp_path / "m.csv").write_text("fixed,moving,fixed_points,moving_points\nf.nii.gz,f.nii.gz,p.csv,p.csv\n")
    out = tmp_path / "out"
    ballast = np.ones(2**27)  # 1 GiB in this (parent) process: the run's own peak must not include it
    assert main(["eval", str(tmp_path / "m.csv"), "--methods", "identity", "--out", str(out), "--quiet"]) == 0
    del ballast
    record = json.loads((out / "results.json").read_text())["cases"][0]
    assert record["status"] == "ok" and record["points"] == 2 and record["mean"] == 0.0
    assert 20 < record["peak_rss_mb"] < 700 and (out / "logs" / "case1__identity.log").is_file()
    assert main(["eval", str(tmp_path / "m.csv"), "--methods", "identity", "--out", str(tmp_path / "again"),
                 "--timeout-s", "0.01", "--quiet"]) == 1
    record = json.loads((tmp_path / "again" / "results.json").read_text())["cases"][0]
    assert record["status"] == "failed" and record["error"].startswith("timed out after")


_GRANDCHILD_RUN = """\
import os, subprocess, sys, time
pid_file = sys.argv[1]
# the grandchild does not hold the run's output pipe, so only a process-tree kill can end it
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
with open(pid_file + ".tmp", "w") as file:
    file.write(str(grandchild.pid))
os.replace(pid_file + ".tmp", pid_file)
print("grandchild started", flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in run is checked with POSIX process groups")
def test_a_timed_out_isolated_run_leaves_no_grandchild_alive(tmp_path, monkeypatch):
    """A run that started a process of its own and then hung: the timeout ends both (the whole
    process tree, not only the direct child) and the record says it timed out."""
    psutil = pytest.importorskip("psutil")
    import MedDIFTLib.evaluation.runner as runner

    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setattr(runner, "isolated_command",
                        lambda job_path: [sys.executable, "-c", _GRANDCHILD_RUN, str(pid_file)])
    job = {"case": {"name": "stuck"}, "method": "identity"}
    record = None
    for timeout_s in (2.0, 8.0, 30.0):  # longer until the stand-in had time to start its grandchild
        record = runner.run_isolated(job, tmp_path, tmp_path / "run.log", timeout_s)
        if pid_file.is_file():
            break
    assert pid_file.is_file(), "the stand-in run never started its grandchild"
    grandchild = int(pid_file.read_text())

    def alive() -> bool:
        try:
            return psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        deadline = time.monotonic() + 30.0
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(), "the timed-out run's grandchild is still running"
    finally:
        if alive():
            psutil.Process(grandchild).kill()
    assert record["status"] == "failed" and record["error"].startswith("timed out after")
    assert "grandchild started" in (tmp_path / "run.log").read_text()


def test_eval_bad_arguments_end_with_a_message_and_no_output(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "m.csv").write_text("fixed,moving,fixed_points,moving_points\n")
    assert main(["eval", str(tmp_path / "m.csv"), "--methods", "nonsense", "--out", str(out)]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err and not out.exists()
    assert main(["eval", str(tmp_path / "m.csv"), "--out", str(out)]) == 2
    assert "no cases found" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "old.txt").write_text("keep")
    assert main(["eval", str(tmp_path / "m.csv"), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_report_carries_the_confidence_error_correlation(tmp_path):
    fixed = np.zeros((5, 3))
    true = np.tile([3.0, 4.0, 0.0], (5, 1))
    errors = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    scored = PointTable(list("abcde"), fixed, true, true + errors[:, None] * [1, 0, 0],
                        np.array([0.9, 0.8, 0.5, 0.3, 0.1]))
    write_point_table(scored, tmp_path / "points.csv")
    again = read_point_table(tmp_path / "points.csv")
    np.testing.assert_allclose(again.confidence, scored.confidence)
    assert read_point_table_without_confidence(tmp_path).confidence is None
    record = {"case": "a", "method": "mind", "status": "ok", "points": 5, "initial_mean": 5.0, "mean": 3.1,
              "std": 1.0, "p50": 2.0, "p95": 7.2, "max": 8.0, "seconds": 1.0, "confidence_spearman": -1.0,
              "confidence_pearson": -0.9}
    overall = summarise([record], {("a", "mind"): again}, ["mind"])
    assert overall[0]["confidence_spearman"] == pytest.approx(-1.0)
    write_tables(tmp_path, {"dataset": {"path": "x", "layout": "manifest"}, "cases": [record], "overall": overall})
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows[-1]["confidence_spearman"] == "-1.0000" and float(rows[0]["confidence_pearson"]) == -0.9
    markdown = (tmp_path / "results.md").read_text()
    assert "conf. ρ" in markdown and "| -1.00 |" in markdown


def read_point_table_without_confidence(folder):
    unscored = PointTable(["a"], np.zeros((1, 3)), np.ones((1, 3)), np.ones((1, 3)))
    write_point_table(unscored, folder / "unscored.csv")
    return read_point_table(folder / "unscored.csv")


def _tiny_manifest(folder, cases=2):
    volume = _small_volume()
    write_volume(volume, folder / "f.nii.gz")
    write_points(PointSet(volume.geometry.ijk_to_lps([[2, 2, 2], [5, 4, 3]]), ["p", "q"]), folder / "p.csv")
    rows = "".join(f"c{n},f.nii.gz,f.nii.gz,p.csv,p.csv\n" for n in range(cases))
    (folder / "m.csv").write_text("case,fixed,moving,fixed_points,moving_points\n" + rows)
    return folder / "m.csv"


def test_eval_interrupted_says_so_and_resumes_or_overwrites(tmp_path, monkeypatch, capsys):
    import MedDIFTLib.evaluation.baselines as baselines
    import MedDIFTLib.evaluation.runner as runner

    manifest = _tiny_manifest(tmp_path)
    out = tmp_path / "out"
    real_evaluate, calls, interrupt = runner.evaluate, [], [True]

    def interrupted_on_second_run(job, isolated):
        calls.append(job["case"]["name"])
        if len(calls) == 2 and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt
        return real_evaluate(job, isolated)

    monkeypatch.setattr(baselines, "unavailable_reason", lambda name: "not here (test)" if name == "bspline" else None)
    monkeypatch.setattr(runner, "evaluate", interrupted_on_second_run)
    command = ["eval", str(manifest), "--methods", "identity", "bspline", "--out", str(out), "--in-process", "--quiet"]
    assert main(command) == 130
    markdown = (out / "results.md").read_text()
    assert "**Interrupted**: the run was stopped after 2 of 4" in markdown and "--resume" in markdown
    assert "skipped: not here (test)" in markdown and "Note: bspline skipped: not here (test)" in markdown
    assert json.loads((out / "results.json").read_text())["state"] == "interrupted"
    capsys.readouterr()
    assert main(command) == 2
    assert "give --resume to finish the run there or --overwrite" in capsys.readouterr().err
    calls.clear()
    assert main([*command, "--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert calls == ["c1"] and results["state"] == "done" and len(results["cases"]) == 4
    assert results["cases"][0].get("resumed") and "Interrupted" not in (out / "results.md").read_text()
    calls.clear()
    assert main([*command, "--overwrite"]) == 0
    assert calls == ["c0", "c1"] and not any(r.get("resumed") for r in
                                              json.loads((out / "results.json").read_text())["cases"])
    assert main([*command, "--resume", "--overwrite"]) == 2
    other = tmp_path / "other.csv"
    other.write_text(manifest.read_text())
    assert main(["eval", str(other), "--methods", "identity", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["under a file", "proc"])
def test_eval_unwritable_out_is_refused_before_any_work(tmp_path, capsys, where):
    manifest = _tiny_manifest(tmp_path, cases=1)
    (tmp_path / "plain").write_text("a file")
    out = tmp_path / "plain" / "results" if where == "under a file" else Path("/proc/meddift_results")
    assert main(["eval", str(manifest), "--methods", "identity", "--out", str(out), "--in-process", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("meddift: error:") and len(error.splitlines()) == 1 and "Traceback" not in error
    assert (tmp_path / "plain").read_text() == "a file" and not out.exists()
