"""Lesion tracking: inputs, carry, refinement, measurements, the ``track`` job and command, the
longitudinal pair generator and metrics, and the Slicer scene glue on slicer-core's segmentation nodes.

Everything runs on small synthetic volumes (seconds); LPS mm throughout, RAS = LPS with x and y negated.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk

from MedDIFTLib.cli import main
from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import PointSet, read_volume, write_points, write_volume
from MedDIFTLib.core.io.volumes import Volume
from MedDIFTLib.core.options import FieldLevel, FieldOptions, LesionOptions
from MedDIFTLib.evaluation.simulate import phantom_ct
from MedDIFTLib.evaluation.synthetic_lesions import dice, lesion_metrics, make_lesion_pair, summarise
from MedDIFTLib.features import create_featurizer
from MedDIFTLib.field import register
from MedDIFTLib.grid.displacement_field import DisplacementField
from MedDIFTLib.lesions.carry import carry_labelmap
from MedDIFTLib.lesions.inputs import lesions_from_labelmap, lesions_from_points, read_lesions
from MedDIFTLib.lesions.measure import measure
from MedDIFTLib.lesions.outputs import CSV_COLUMNS, FILES
from MedDIFTLib.lesions.refine import learned_threshold, refine_lesion, segment_from_seed
from MedDIFTLib.lesions.track import track_lesions
from MedDIFTLib.worker.protocol.results import TrackedLesion

FAST_FIELD = FieldOptions(levels=(FieldLevel(spacing_mm=8.0, search_radius_mm=12.0),), optimise_iterations=0)
GEOMETRY = Geometry.create((40, 36, 30), (1.5, 1.5, 2.0), (-30.0, -25.0, -20.0))


def world(geometry: Geometry) -> np.ndarray:
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij"), axis=-1)
    return geometry.ijk_to_lps(kji[..., ::-1].reshape(-1, 3).astype(float)).reshape(*geometry.shape_kji, 3)


def ball(geometry: Geometry, centre, radius_mm: float) -> np.ndarray:
    return np.linalg.norm(world(geometry) - np.asarray(centre, float), axis=-1) <= radius_mm


def lung_with_nodules(geometry: Geometry, nodules: list[tuple[tuple, float]], seed: int = 0) -> Volume:
    """Lung parenchyma (-850 HU, noise) with soft-edged solid nodules (40 HU) of (centre, radius)."""
    rng = np.random.default_rng(seed)
    voxels = -850.0 + 15.0 * rng.standard_normal(geometry.shape_kji)
    for centre, radius in nodules:
        distance = np.linalg.norm(world(geometry) - np.asarray(centre, float), axis=-1)
        weight = 1.0 / (1.0 + np.exp(-(radius - distance) / 0.6))
        voxels = voxels * (1 - weight) + 40.0 * weight
    return Volume(voxels.astype(np.float32), geometry, "lung")


def labelmap_volume(masks_and_labels, geometry: Geometry) -> Volume:
    labels = np.zeros(geometry.shape_kji, np.float32)
    for mask, label in masks_and_labels:
        labels[mask] = label
    return Volume(labels, geometry, "lesions")


TRACK_NODULES = [((-8.0, 0.0, 0.0), 5.0), ((10.0, 4.0, 4.0), 4.5)]
TRACK_SHIFT_LPS = np.array([4.0, -3.0, 2.0])


def write_tracking_pair(folder) -> dict[str, str]:
    """A baseline with TRACK_NODULES, a follow-up moved by TRACK_SHIFT_LPS (new noise) and the baseline
    labelmap, written to ``folder``; their paths by name (baseline, followup, lesions)."""
    nodules = TRACK_NODULES
    volumes = {
        "baseline": lung_with_nodules(GEOMETRY, nodules),
        "followup": lung_with_nodules(GEOMETRY, [(np.asarray(c) + TRACK_SHIFT_LPS, r) for c, r in nodules], seed=1),
        "lesions": labelmap_volume([(ball(GEOMETRY, c, r), n + 1) for n, (c, r) in enumerate(nodules)], GEOMETRY),
    }
    paths = {}
    for name, volume in volumes.items():
        paths[name] = str(folder / f"{name}.nii.gz")
        write_volume(volume, paths[name])
    return paths


# ---------------------------------------------------------------------------------------------
# Measurements


def test_measure_sphere_volume_and_diameters():
    geometry = Geometry.create((40, 40, 40), (0.5, 0.5, 0.5), (-10.0, -10.0, -10.0))
    mask = ball(geometry, (0.3, -0.2, 0.1), 6.0)
    image = np.where(mask, 30.0, -800.0).astype(np.float32)
    result = measure(mask, image, geometry)
    assert result.volume_ml == pytest.approx(4 / 3 * math.pi * 6.0**3 / 1000, rel=0.03)
    assert result.long_mm == pytest.approx(12.0, abs=0.6)
    assert result.short_mm == pytest.approx(12.0, abs=0.8)
    assert result.mean_hu == pytest.approx(30.0)
    assert result.centre_lps_mm == pytest.approx((0.3, -0.2, 0.1), abs=0.3)


def test_measure_rotated_ellipse_gives_long_and_perpendicular_short_axis():
    geometry = Geometry.create((60, 60, 5), (0.5, 0.5, 2.0), (-15.0, -15.0, -4.0))
    points = world(geometry)
    angle = math.radians(30)
    along = points[..., 0] * math.cos(angle) + points[..., 1] * math.sin(angle)
    across = -points[..., 0] * math.sin(angle) + points[..., 1] * math.cos(angle)
    mask = ((along / 10.0) ** 2 + (across / 4.0) ** 2 <= 1) & (np.abs(points[..., 2]) < 1)
    result = measure(mask, np.zeros(mask.shape, np.float32), geometry)
    assert result.long_mm == pytest.approx(20.0, abs=0.8)
    assert result.short_mm == pytest.approx(8.0, abs=0.8)


# ---------------------------------------------------------------------------------------------
# Inputs


def test_labelmap_inputs_are_checked(tmp_path):
    baseline = lung_with_nodules(GEOMETRY, [((0, 0, 0), 5.0)])
    mask = ball(GEOMETRY, (0, 0, 0), 5.0)
    with pytest.raises(BadInputError, match="not on the baseline grid"):
        other = Geometry.create((40, 36, 31), (1.5, 1.5, 2.0), (-30.0, -25.0, -20.0))
        lesions_from_labelmap(Volume(np.zeros(other.shape_kji, np.float32), other), baseline)
    with pytest.raises(BadInputError, match="empty"):
        lesions_from_labelmap(labelmap_volume([], GEOMETRY), baseline)
    with pytest.raises(BadInputError, match="integers"):
        lesions_from_labelmap(labelmap_volume([(mask, 1.5)], GEOMETRY), baseline)
    with pytest.raises(BadInputError, match="non-negative"):
        lesions_from_labelmap(labelmap_volume([(mask, -2)], GEOMETRY), baseline)
    lesions = lesions_from_labelmap(labelmap_volume([(mask, 7)], GEOMETRY), baseline)
    assert lesions.labels == [7] and lesions.names == ["7"]
    assert lesions.seeds_lps_mm[0] == pytest.approx((0, 0, 0), abs=0.2)
    write_points(PointSet(np.array([[0.0, 0.0, 0.0], [500.0, 0.0, 0.0]]), ["A", "B"]), tmp_path / "points.csv")
    with pytest.raises(BadInputError, match="outside the baseline volume: B"):
        read_lesions(tmp_path / "points.csv", baseline)
    with pytest.raises(BadInputError, match="labelmap"):
        read_lesions(tmp_path / "lesions.png", baseline)


# ---------------------------------------------------------------------------------------------
# Carry and refine


def test_carry_keeps_label_values_and_follows_the_field():
    shift_lps_mm = np.array([3.0, -4.5, 2.0])  # i + 2, j - 3, k + 1 voxels
    masks = [(ball(GEOMETRY, (-8, 0, 0), 4.0), 3), (ball(GEOMETRY, (10, 5, 4), 3.0), 250)]
    labelmap = labelmap_volume(masks, GEOMETRY).voxels.astype(np.int32)
    field = DisplacementField(np.broadcast_to(shift_lps_mm, (*GEOMETRY.shape_kji, 3)).copy(), GEOMETRY)
    carried = carry_labelmap(labelmap, GEOMETRY, [3, 250], field)
    assert set(np.unique(carried)) == {0, 3, 250}
    expected = np.zeros_like(labelmap)
    expected[:-1, 3:, :-2] = labelmap[1:, :-3, 2:]  # follow-up x shows baseline x + shift
    assert np.array_equal(carried, expected)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_refinement_captures_growth_and_shrinkage(factor):
    radius = 5.0
    grown = radius * factor ** (1 / 3)
    baseline = lung_with_nodules(GEOMETRY, [((0, 0, 0), radius)])
    followup = lung_with_nodules(GEOMETRY, [((0, 0, 0), grown)], seed=1)
    base_mask = ball(GEOMETRY, (0, 0, 0), radius)
    threshold = learned_threshold(base_mask, baseline.voxels, GEOMETRY)
    assert -600 < threshold < -250
    refined = refine_lesion(base_mask, followup.voxels, GEOMETRY, threshold, np.zeros(3), radius, 4.0, 3.0)
    truth = ball(GEOMETRY, (0, 0, 0), grown)
    assert dice(base_mask, truth) < 0.85
    assert dice(refined, truth) > 0.9


def test_refinement_grows_from_the_match_not_from_a_misplaced_carried_lesion():
    radius = 5.0
    grown = radius * 1.6 ** (1 / 3)
    baseline = lung_with_nodules(GEOMETRY, [((0, 0, 0), radius)])
    followup = lung_with_nodules(GEOMETRY, [((0, 0, 0), grown)], seed=1)
    base_mask = ball(GEOMETRY, (0, 0, 0), radius)
    carried = ball(GEOMETRY, (3.0, -2.0, 1.5), 3.5)  # what a poor field carries: shifted and shrunk
    threshold = learned_threshold(base_mask, baseline.voxels, GEOMETRY)
    refined = refine_lesion(carried, followup.voxels, GEOMETRY, threshold, np.zeros(3), radius, 4.0, 3.0)
    truth = ball(GEOMETRY, (0, 0, 0), grown)
    assert dice(carried, truth) < 0.6
    assert dice(refined, truth) > 0.9
    nothing = refine_lesion(np.zeros_like(carried), followup.voxels, GEOMETRY, threshold, np.zeros(3), radius,
                            4.0, 3.0)
    assert not nothing.any()


def test_segment_from_seed_finds_the_nodule_and_not_the_neighbour():
    volume = lung_with_nodules(GEOMETRY, [((-8, 0, 0), 5.0), ((12, 0, 0), 4.0)])
    mask = segment_from_seed(volume.voxels, GEOMETRY, np.array([-7.0, 1.0, 0.0]), 20.0)
    assert dice(mask, ball(GEOMETRY, (-8, 0, 0), 5.0)) > 0.9


# ---------------------------------------------------------------------------------------------
# The job, end to end with the weight-free backbone


@pytest.fixture(scope="module")
def moved_pair():
    """Two nodules (one grows 2x, one halves) and a translation of (4, -3, 2) mm between the scans."""
    shift = np.array([4.0, -3.0, 2.0])
    nodules = [((-8.0, 0.0, 0.0), 5.0), ((10.0, 4.0, 4.0), 4.5)]
    factors = [2.0, 0.5]
    baseline = lung_with_nodules(GEOMETRY, nodules)
    grown = [((np.asarray(c) + shift), r * f ** (1 / 3)) for (c, r), f in zip(nodules, factors)]
    followup = lung_with_nodules(GEOMETRY, grown, seed=1)
    labelmap = labelmap_volume([(ball(GEOMETRY, c, r), n + 1) for n, (c, r) in enumerate(nodules)], GEOMETRY)
    return baseline, followup, labelmap, grown, factors


def test_track_lesions_finds_centres_and_volume_change(moved_pair):
    baseline, followup, labelmap, grown, factors = moved_pair
    featurizer = create_featurizer("mind", device="cpu")
    lesions = lesions_from_labelmap(labelmap, baseline)
    result = track_lesions(baseline, followup, lesions, featurizer.extract(baseline), featurizer.extract(followup),
                           LesionOptions(), FAST_FIELD)
    assert [lesion.label for lesion in result.lesions] == [1, 2]
    for lesion, (centre, radius), factor in zip(result.lesions, grown, factors):
        assert lesion.status == "ok"
        assert np.linalg.norm(lesion.centre_lps_mm - centre) < 1.5
        assert lesion.volume_change_pct == pytest.approx(100 * (factor - 1), abs=20)
        assert dice(result.followup_labelmap == lesion.label, ball(GEOMETRY, centre, radius)) > 0.85
        assert 0.5 < lesion.confidence <= 1.0


def test_track_command_writes_the_four_files(tmp_path, moved_pair, capsys):
    baseline, followup, labelmap, _, _ = moved_pair
    write_volume(baseline, tmp_path / "baseline.nii.gz")
    write_volume(followup, tmp_path / "followup.nii.gz")
    write_volume(labelmap, tmp_path / "lesions.nii.gz")
    out = tmp_path / "out"
    fast = ["--grid-spacing-mm", "8", "--search-radius-mm", "12", "--optimise-iterations", "0", "--quiet"]
    code = main(["track", str(tmp_path / "baseline.nii.gz"), str(tmp_path / "followup.nii.gz"), "--lesions",
                 str(tmp_path / "lesions.nii.gz"), "--out", str(out), "--backbone", "mind", "--device", "cpu", *fast])
    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == sorted(FILES.values())
    with (out / "lesions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS
    assert [row["label"] for row in rows] == ["1", "2"] and {row["status"] for row in rows} == {"ok"}
    assert float(rows[0]["volume_change_pct"]) > 50 and float(rows[1]["volume_change_pct"]) < -25
    followup_labels = read_volume(out / "followup_lesions.nii.gz")
    assert followup_labels.geometry.same_grid(followup.geometry)
    assert set(np.unique(followup_labels.voxels)) == {0, 1, 2}
    assert "| 1 (1) | ok |" in (out / "report.md").read_text()
    assert (out / "lesions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = labelmap_volume([(ball(GEOMETRY, (0, 0, 0), 3.0), 0.5)], GEOMETRY)
    write_volume(bad, tmp_path / "bad.nii.gz")
    code = main(["track", str(tmp_path / "baseline.nii.gz"), str(tmp_path / "followup.nii.gz"), "--lesions",
                 str(tmp_path / "bad.nii.gz"), "--out", str(tmp_path / "none"), "--backbone", "mind", *fast])
    assert code == 2 and "integers" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


WIDE = Geometry.create((80, 64, 40), (1.5, 1.5, 2.0), (-60.0, -48.0, -40.0))
WIDE_NODULES = [((-38.0, 0.0, 0.0), 5.0), ((36.0, 10.0, 6.0), 4.5)]
WIDE_SHIFT = np.array([4.0, -3.0, 2.0])


@pytest.fixture(scope="module")
def wide_pair():
    """Two nodules far apart in a scan several times wider than them, moved by WIDE_SHIFT."""
    baseline = lung_with_nodules(WIDE, WIDE_NODULES)
    followup = lung_with_nodules(WIDE, [(np.asarray(c) + WIDE_SHIFT, r) for c, r in WIDE_NODULES], seed=1)
    labelmap = labelmap_volume([(ball(WIDE, c, r), n + 1) for n, (c, r) in enumerate(WIDE_NODULES)], WIDE)
    return baseline, followup, lesions_from_labelmap(labelmap, baseline)


def test_the_field_around_each_lesion_tracks_as_the_whole_field_and_reads_only_near_them(wide_pair):
    baseline, followup, lesions = wide_pair
    featurizer = create_featurizer("mind", device="cpu")
    whole = track_lesions(baseline, followup, lesions, featurizer.extract(baseline), featurizer.extract(followup),
                          LesionOptions(field_margin_mm=0.0), FAST_FIELD)
    baseline_regions, followup_regions = featurizer.extract_regions(baseline), featurizer.extract_regions(followup)
    local = track_lesions(baseline, followup, lesions, baseline_regions, followup_regions, LesionOptions(), FAST_FIELD)
    assert "carry" not in local.seconds and "carry" in whole.seconds  # the local fields carry as they go
    for near, far, (centre, radius) in zip(local.lesions, whole.lesions, WIDE_NODULES):
        truth = ball(WIDE, np.asarray(centre) + WIDE_SHIFT, radius)
        assert near.status == far.status == "ok"
        assert np.linalg.norm(near.centre_lps_mm - far.centre_lps_mm) < 0.5
        carried = dice(local.carried_labelmap == near.label, truth)
        assert carried > 0.9 and carried >= dice(whole.carried_labelmap == far.label, truth) - 0.02
        assert dice(local.followup_labelmap == near.label, truth) == pytest.approx(
            dice(whole.followup_labelmap == far.label, truth), abs=0.02)
    assert not followup_regions.complete  # nothing read the whole follow-up (the lesions' boxes leave some out)


def test_a_lesion_box_the_registration_refuses_is_carried_by_the_whole_field(wide_pair, monkeypatch):
    import MedDIFTLib.lesions.local_fields as local_fields

    baseline, followup, lesions = wide_pair
    featurizer = create_featurizer("mind", device="cpu")
    baseline_features, followup_features = featurizer.extract(baseline), featurizer.extract(followup)
    whole = track_lesions(baseline, followup, lesions, baseline_features, followup_features,
                          LesionOptions(field_margin_mm=0.0), FAST_FIELD)
    registered = []

    def refusing_boxes(fixed_pyramid, *args, **kwargs):
        registered.append(fixed_pyramid.image_geometry)
        if fixed_pyramid.image_geometry != followup.geometry:
            raise BadInputError("only 3 lattice nodes fall inside the mask")
        return register(fixed_pyramid, *args, **kwargs)

    monkeypatch.setattr(local_fields, "register", refusing_boxes)
    local = track_lesions(baseline, followup, lesions, baseline_features, followup_features, LesionOptions(),
                          FAST_FIELD)
    assert sum(geometry == followup.geometry for geometry in registered) == 1  # the whole field, computed once
    np.testing.assert_array_equal(local.carried_labelmap, whole.carried_labelmap)


def test_lesion_statuses_border_and_lost(moved_pair):
    baseline, followup, _, _, _ = moved_pair
    at_border = ball(GEOMETRY, (-30.0, 0.0, 0.0), 4.0)
    gone = ball(GEOMETRY, (10.0, 4.0, 4.0), 4.5)
    labelmap = labelmap_volume([(at_border, 1), (gone, 2)], GEOMETRY)
    empty_followup = Volume(np.where(ball(GEOMETRY, (14, 1, 6), 6.0), -850.0, followup.voxels).astype(np.float32),
                            GEOMETRY)
    featurizer = create_featurizer("mind", device="cpu")
    result = track_lesions(baseline, empty_followup, lesions_from_labelmap(labelmap, baseline),
                           featurizer.extract(baseline), featurizer.extract(empty_followup), LesionOptions(),
                           displacement=DisplacementField(np.zeros((*GEOMETRY.shape_kji, 3), np.float32), GEOMETRY))
    assert "touches_border" in result.lesions[0].flags
    assert "not_found" in result.lesions[1].flags
    assert result.lesions[1].followup.volume_ml == 0


# ---------------------------------------------------------------------------------------------
# Evaluation: generated pairs and metrics


def test_generated_pair_has_consistent_truth():
    pair = make_lesion_pair(phantom_ct(), count=2, seed=3, mean_motion_mm=3.0, radius_mm=(4.0, 6.0))
    assert len(pair.labels) >= 1
    for n, label in enumerate(pair.labels):
        before = (pair.baseline_labelmap == label).sum() * np.prod(pair.baseline.geometry.spacing_mm)
        after = (pair.followup_labelmap == label).sum() * np.prod(pair.followup.geometry.spacing_mm)
        assert after / before == pytest.approx(pair.volume_factors[n], rel=0.35)
        assert 0.5 <= pair.volume_factors[n] <= 2.0
        inside = pair.followup.geometry.lps_to_ijk(pair.followup_centres_lps_mm[n][None])[0]
        k, j, i = np.round(inside[::-1]).astype(int)
        assert pair.followup_labelmap[k, j, i] == label
        assert pair.followup.voxels[k, j, i] > -300
    perfect = summarise(lesion_metrics(pair, pair.followup_labelmap, pair.followup_centres_lps_mm))
    assert perfect["centre_error_mean_mm"] == 0 and perfect["dice_median"] == 1
    assert perfect["hit_rate_radius"] == 1 and perfect["volume_change_error_median_points"] == 0
    empty = summarise(lesion_metrics(pair, np.zeros_like(pair.followup_labelmap),
                                     pair.followup_centres_lps_mm + 20.0))
    assert empty["dice_median"] == 0 and empty["hit_rate_10mm"] == 0


# ---------------------------------------------------------------------------------------------
# Scene glue on slicer-core


@pytest.fixture
def scene():
    slicer_core = pytest.importorskip("slicer_core", reason="slicer-core is not installed")
    return slicer_core.vtkMRMLScene()


def volume_node(scene, voxels_kji, geometry: Geometry, node_class="vtkMRMLScalarVolumeNode", name="volume"):
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    image = vtkImageData()
    image.SetDimensions(voxels_kji.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels_kji).ravel(), deep=True))
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine_ijk_to_lps
    matrix = vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, affine_ras[row, column])
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(matrix)
    return node


def add_slice_views(scene) -> dict:
    """Axial slice views Red and Yellow, each with its composite node (keys ``Red``, ``Red composite``, ...)."""
    import slicer_core

    slicer_core.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    views = {}
    for name in ("Red", "Yellow"):
        views[name] = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        views[name].SetLayoutName(name)
        views[name].SetOrientation("Axial")
        views[f"{name} composite"] = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        views[f"{name} composite"].SetLayoutName(name)
    return views


def test_scene_glue_round_trip_keeps_segments(scene, tmp_path):
    from slicer_core import vtkSlicerSegmentationsModuleLogic

    from MedDIFTLib.slicer import lesion_nodes as glue

    baseline_node = volume_node(scene, np.zeros(GEOMETRY.shape_kji, np.float32), GEOMETRY, name="baseline")
    masks = [ball(GEOMETRY, (-8, 0, 0), 4.0), ball(GEOMETRY, (10, 5, 4), 3.0)]
    labels = labelmap_volume([(masks[0], 1), (masks[1], 2)], GEOMETRY).voxels.astype(np.uint8)
    source = volume_node(scene, labels, GEOMETRY, "vtkMRMLLabelMapVolumeNode", "source")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "baseline lesions")
    assert vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation)
    for index, (name, color) in enumerate([("nodule A", (1.0, 0.0, 0.0)), ("nodule B", (0.0, 0.0, 1.0))]):
        segment = segmentation.GetSegmentation().GetNthSegment(index)
        segment.SetName(name)
        segment.SetColor(*color)

    segments = glue.write_baseline_lesions(scene, segmentation, baseline_node, tmp_path / "lesions.nii.gz")
    assert [(s.label, s.name, s.color) for s in segments] == [(1, "nodule A", (1.0, 0.0, 0.0)),
                                                               (2, "nodule B", (0.0, 0.0, 1.0))]
    assert segments[0].baseline_ras == pytest.approx((8.0, 0.0, 0.0), abs=0.3)  # LPS (-8, 0, 0)
    written = read_volume(tmp_path / "lesions.nii.gz")
    assert written.geometry.same_grid(GEOMETRY)
    assert np.array_equal(written.voxels == 1, masks[0]) and np.array_equal(written.voxels == 2, masks[1])
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 1  # the temporary one is gone

    followup_labels = np.zeros(GEOMETRY.shape_kji, np.float32)
    followup_labels[ball(GEOMETRY, (-6, 0, 0), 5.0)] = 1  # lesion 2 not found
    sitk.WriteImage(sitk.Cast(labelmap_volume([(followup_labels == 1, 1)], GEOMETRY).to_sitk(), sitk.sitkUInt16),
                    str(tmp_path / "followup_lesions.nii.gz"))
    user_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my follow-up")
    user_node.GetSegmentation().AddEmptySegment("old", "old", [0.5, 0.5, 0.5])
    filled = glue.fill_followup_segmentation(scene, tmp_path / "followup_lesions.nii.gz", segments, user_node)
    assert filled is user_node
    segmentation_out = filled.GetSegmentation()
    ids = [segmentation_out.GetNthSegmentID(n) for n in range(segmentation_out.GetNumberOfSegments())]
    assert ids == [s.segment_id for s in segments]
    assert [segmentation_out.GetSegment(i).GetName() for i in ids] == ["nodule A", "nodule B"]
    assert tuple(segmentation_out.GetSegment(ids[1]).GetColor()) == (0.0, 0.0, 1.0)
    again = glue.write_baseline_lesions(scene, filled, baseline_node, tmp_path / "again.nii.gz")
    assert [s.name for s in again] == ["nodule A", "nodule B"]
    exported = read_volume(tmp_path / "again.nii.gz").voxels
    assert np.array_equal(exported == 1, followup_labels == 1) and not (exported == 2).any()


def test_scene_glue_table_and_jump(scene):
    from MedDIFTLib.slicer import lesion_nodes as glue

    segments = [glue.LesionSegment(1, "s1", "nodule A", (1.0, 0.0, 0.0), (8.0, 0.0, 0.0)),
                glue.LesionSegment(2, "s2", "nodule B", (0.0, 0.0, 1.0), None)]
    lesions = [TrackedLesion(1, "nodule A", "ok", [], 0.9, 0.5, 1.0, 100.0, 10.0, 12.6, (-6.0, 2.0, 3.0)),
               TrackedLesion(2, "nodule B", "not_found;low_confidence", ["not_found", "low_confidence"], 0.1, 0.3,
                             0.0, -100.0, 8.0, math.nan, (math.nan,) * 3)]
    rows = glue.lesion_rows(lesions, segments)
    assert rows[0].followup_ras == pytest.approx((6.0, -2.0, 3.0)) and rows[1].followup_ras is None
    assert rows[0].diameter_change_pct == pytest.approx(26.0) and math.isnan(rows[1].diameter_change_pct)
    table = glue.fill_lesion_table(scene, rows)
    assert table.GetNumberOfRows() == 2 and table.GetCellText(1, 1) == "not_found;low_confidence"
    assert [table.GetColumnName(n) for n in range(table.GetNumberOfColumns())] == list(glue.TABLE_COLUMNS)
    assert glue.fill_lesion_table(scene, rows[:1], table) is table and table.GetNumberOfRows() == 1

    views = add_slice_views(scene)
    glue.jump_to_lesion(scene, rows[0])
    assert [views["Red"].GetSliceToRAS().GetElement(axis, 3) for axis in range(3)] == pytest.approx([8.0, 0.0, 0.0])
    assert [views["Yellow"].GetSliceToRAS().GetElement(axis, 3) for axis in range(3)] == pytest.approx([6.0, -2.0, 3.0])


def test_track_lesions_from_points_segments_both_time_points(moved_pair):
    baseline, followup, _, grown, factors = moved_pair
    points = PointSet(np.array([[-7.0, 1.0, 0.0], [10.0, 4.0, 4.0]]), ["A", "B"])
    featurizer = create_featurizer("mind", device="cpu")
    result = track_lesions(baseline, followup, lesions_from_points(points, baseline), featurizer.extract(baseline),
                           featurizer.extract(followup), LesionOptions(), FAST_FIELD)
    assert [(lesion.label, lesion.name) for lesion in result.lesions] == [(1, "A"), (2, "B")]
    assert result.baseline_labelmap.max() == 2
    for lesion, (centre, radius), factor in zip(result.lesions, grown, factors):
        assert lesion.baseline.volume_ml == pytest.approx(4 / 3 * math.pi * (radius / factor ** (1 / 3)) ** 3 / 1000,
                                                          rel=0.25)
        assert np.linalg.norm(lesion.centre_lps_mm - centre) < 1.5
        assert lesion.volume_change_pct == pytest.approx(100 * (factor - 1), abs=25)


# ---------------------------------------------------------------------------------------------
# Refinement the image does not support is flagged (issue 26)


def test_refinement_reports_how_much_of_the_lesion_edge_the_image_shows():
    """A nodule's edge stops the growth (open surface about 0); a box of parenchyma (textured like a lung's:
    correlated over a few mm) has no edge and grows until the sphere stops it, open over much of its surface."""
    from scipy import ndimage

    from MedDIFTLib.lesions.refine import OPEN_SURFACE_LIMIT, fit_lesion

    volume = lung_with_nodules(GEOMETRY, [((0, 0, 0), 5.0)])
    texture = ndimage.gaussian_filter(np.random.default_rng(5).standard_normal(GEOMETRY.shape_kji), 1.5)
    volume = Volume((volume.voxels + 300.0 * texture).astype(np.float32), GEOMETRY)
    nodule = ball(GEOMETRY, (0, 0, 0), 5.0)
    fitted = fit_lesion(nodule, volume.voxels, GEOMETRY, learned_threshold(nodule, volume.voxels, GEOMETRY),
                        np.zeros(3), 5.0, 4.0, 3.0)
    assert fitted.open_surface < 0.05 and dice(fitted.mask, nodule) > 0.9
    box = np.zeros(GEOMETRY.shape_kji, bool)
    box[12:16, 14:20, 24:30] = True  # parenchyma, far from the nodule
    centre = GEOMETRY.ijk_to_lps(np.array([[26.5, 16.5, 13.5]]))[0]
    radius = (3 * box.sum() * np.prod(GEOMETRY.spacing_mm) / (4 * np.pi)) ** (1 / 3)
    grown = fit_lesion(box, volume.voxels, GEOMETRY, learned_threshold(box, volume.voxels, GEOMETRY), centre,
                       radius, 4.0, 3.0)
    assert grown.mask.sum() > 1.5 * box.sum() and grown.open_surface > OPEN_SURFACE_LIMIT


def test_tracking_parenchyma_into_the_same_scan_flags_unsupported_growth(elastix_ct, tmp_path, capsys):
    """The issue's case: ``track F F`` with a small box of lung parenchyma as the lesion reported +108 % and
    status ok; refinement only grew it. It is flagged now; with --no-refine nothing grows and it is ok."""
    ct = tmp_path / "ct.nii.gz"
    write_volume(elastix_ct, ct)
    lesion = np.zeros(elastix_ct.geometry.shape_kji, np.float32)
    lesion[32:35, 45:50, 28:33] = 1  # 3 x 5 x 5 voxels of parenchyma (HU about -900), right lung
    assert np.median(elastix_ct.voxels[lesion > 0]) < -800
    write_volume(Volume(lesion, elastix_ct.geometry), tmp_path / "box.nii.gz")
    fast = ["--grid-spacing-mm", "8", "--optimise-iterations", "0", "--quiet", "--backbone", "mind", "--device", "cpu"]
    rows = {}
    for name, extra in (("refined", []), ("kept", ["--no-refine"])):
        assert main(["track", str(ct), str(ct), "--lesions", str(tmp_path / "box.nii.gz"), "--out",
                     str(tmp_path / name), *fast, *extra]) == 0, capsys.readouterr().err
        with (tmp_path / name / "lesions.csv").open() as handle:
            rows[name] = next(csv.DictReader(handle))
    assert float(rows["refined"]["volume_change_pct"]) > 50
    assert "unsupported_growth" in rows["refined"]["status"].split(";")
    assert rows["kept"]["status"] == "ok" and abs(float(rows["kept"]["volume_change_pct"])) < 1
    assert "not an edge in the image" in (tmp_path / "refined" / "report.md").read_text()
