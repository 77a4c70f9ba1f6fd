"""Scene glue (MedDIFTLib.slicer) against Slicer's real MRML from the ``slicer-core`` wheel.

Each test builds a fresh ``vtkMRMLScene``. RAS = LPS with x and y negated.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer_core = pytest.importorskip("slicer_core", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from MedDIFTLib.core.errors import BadInputError, CancelledError, MedDIFTError  # noqa: E402
from MedDIFTLib.core.geometry import Geometry  # noqa: E402
from MedDIFTLib.core.io import PointSet  # noqa: E402
from MedDIFTLib.core.io.points import UNRELIABLE_TAG  # noqa: E402
from MedDIFTLib.core.options import MatchOptions, RunSettings, to_json  # noqa: E402
from MedDIFTLib.slicer import cursor, live, nodes, overlays, qa, results, scene_run, session, views  # noqa: E402
from MedDIFTLib.slicer.track_run import TrackInputs  # noqa: E402
from MedDIFTLib.worker.client import WorkerClient  # noqa: E402
from MedDIFTLib.worker.events import Error, Exit, Log, Progress, Result  # noqa: E402
from MedDIFTLib.worker.protocol.results import (  # noqa: E402
    LoadResult,
    MatchResult,
    RegisterResult,
    encode_result,
    parse_result,
)

RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])
ROTATED_DIRECTION = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture
def scene():
    return slicer_core.vtkMRMLScene()


def write_translation_field(path, translation_lps_mm, origin_lps_mm=(-5.0, 4.0, 10.0), spacing_mm=(2.0, 3.0, 4.0)):
    """A constant displacement field (ITK convention, LPS) on a small rotated grid."""
    vectors = np.broadcast_to(np.asarray(translation_lps_mm, float), (6, 7, 8, 3)).copy()
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetSpacing(spacing_mm)
    image.SetOrigin(origin_lps_mm)
    image.SetDirection(tuple(ROTATED_DIRECTION.ravel()))
    sitk.WriteImage(image, str(path))
    return image


def add_volume_node(scene, voxels_kji, spacing_mm, origin_lps_mm, direction=None, name="volume"):
    """A scalar volume node built directly from an array and an LPS geometry."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    image_data = vtkImageData()
    image_data.SetDimensions(voxels_kji.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels_kji).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = (np.eye(3) if direction is None else np.asarray(direction)) * np.asarray(spacing_mm)[None, :]
    affine_lps[:3, 3] = origin_lps_mm
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    matrix = vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, affine_ras[row, column])
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image_data)
    node.SetIJKToRASMatrix(matrix)
    return node


def add_fiducials(scene, positions_ras, labels, name="F"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for position, label in zip(positions_ras, labels):
        node.AddControlPointWorld([float(v) for v in position], label)
    return node


def add_translation(scene, translation_ras):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    for axis in range(3):
        matrix.SetElement(axis, 3, translation_ras[axis])
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(matrix)
    return node


def control_point_ras(node, index):
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return np.array(position)


# ------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("suffix", [".nrrd", ".h5"])
def test_translation_field_becomes_from_parent_transform_in_ras(scene, tmp_path, suffix):
    translation_lps = np.array([2.0, -3.0, 5.0])
    field_path = tmp_path / f"field{suffix}"
    if suffix == ".h5":
        image = write_translation_field(tmp_path / "field.nrrd", translation_lps)
        sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64)), str(field_path))
    else:
        write_translation_field(field_path, translation_lps)
    node = nodes.load_transform_file(scene, field_path, name="T")

    fixed_point_lps = np.array([-8.0, 6.0, 20.0])  # inside the field's grid
    from_parent = node.GetTransformFromParent()
    moved_ras = np.array(from_parent.TransformPoint(*(fixed_point_lps * RAS_FROM_LPS)))
    np.testing.assert_allclose(moved_ras, (fixed_point_lps + translation_lps) * RAS_FROM_LPS, atol=1e-4)
    back_ras = np.array(node.GetTransformToParent().TransformPoint(*moved_ras))
    np.testing.assert_allclose(back_ras, fixed_point_lps * RAS_FROM_LPS, atol=1e-3)
    assert scene.GetNodeByID(node.GetID()) is node
    assert node.IsA("vtkMRMLGridTransformNode")


def test_transform_fills_the_users_node_in_place(scene, tmp_path):
    write_translation_field(tmp_path / "field.nrrd", (1.0, 2.0, 3.0))
    user_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mine")
    nodes_before = scene.GetNumberOfNodes()
    returned = nodes.load_transform_file(scene, tmp_path / "field.nrrd", user_node)
    assert returned is user_node
    assert scene.GetNumberOfNodes() == nodes_before
    assert user_node.GetName() == "mine"
    moved = user_node.GetTransformFromParent().TransformPoint(8.0, -6.0, 20.0)
    np.testing.assert_allclose(moved, (8.0 - 1.0, -6.0 - 2.0, 23.0), atol=1e-4)


def test_missing_field_file_leaves_the_scene_unchanged(scene, tmp_path):
    user_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(MedDIFTError, match="was not written"):
        nodes.load_transform_file(scene, tmp_path / "absent.nrrd", user_node)
    (tmp_path / "broken.nrrd").write_text("not a field")
    with pytest.raises(MedDIFTError, match="could not read"):
        nodes.load_transform_file(scene, tmp_path / "broken.nrrd")
    assert scene.GetNumberOfNodes() == nodes_before
    assert user_node.IsLinear()


# ------------------------------------------------------------------------------------ volumes


def test_volume_node_exports_with_lps_geometry(scene, tmp_path):
    voxels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    node = add_volume_node(scene, voxels, (1.5, 2.0, 3.0), (10.0, 20.0, 30.0), ROTATED_DIRECTION)
    geometry = nodes.write_volume_node(node, tmp_path / "out.nrrd")
    image = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), voxels)
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(image.GetOrigin(), (10.0, 20.0, 30.0))
    np.testing.assert_allclose(image.GetSpacing(), (1.5, 2.0, 3.0))
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), ROTATED_DIRECTION, atol=1e-12)
    assert geometry.shape_ijk == (6, 5, 4)


def test_volume_file_round_trip_through_storage_node(scene, tmp_path):
    voxels = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    image = sitk.GetImageFromArray(voxels)
    image.SetOrigin((-3.0, 7.0, 1.0))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetDirection(tuple(ROTATED_DIRECTION.ravel()))
    sitk.WriteImage(image, str(tmp_path / "in.nrrd"))
    user_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    assert nodes.load_volume_file(scene, tmp_path / "in.nrrd", user_node) is user_node
    geometry = nodes.volume_geometry(user_node)
    np.testing.assert_allclose(geometry.origin_lps_mm, (-3.0, 7.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(geometry.spacing_mm, (0.8, 0.9, 2.5), atol=1e-6)
    nodes.write_volume_node(user_node, tmp_path / "out.mha")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.mha"))), voxels)


def test_volume_parent_transforms(scene, tmp_path):
    node = add_volume_node(scene, np.zeros((3, 3, 3), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    node.SetAndObserveTransformNodeID(add_translation(scene, (4.0, 5.0, 6.0)).GetID())
    np.testing.assert_allclose(nodes.volume_geometry(node).origin_lps_mm, (-4.0, -5.0, 6.0))
    np.testing.assert_allclose(nodes.volume_geometry(node, include_parent_transform=False).origin_lps_mm, (0, 0, 0))

    write_translation_field(tmp_path / "field.nrrd", (1.0, 0.0, 0.0))
    grid = nodes.load_transform_file(scene, tmp_path / "field.nrrd")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(BadInputError, match="non-linear transform"):
        nodes.volume_geometry(node)


def test_vector_volume_is_rejected(scene):
    node = add_volume_node(scene, np.zeros((3, 3, 3), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    node.GetImageData().AllocateScalars(10, 3)  # VTK_FLOAT, 3 components
    with pytest.raises(BadInputError, match="3 components"):
        nodes.volume_geometry(node)


# ------------------------------------------------------------------------------------ markups


def test_markups_round_trip_labels_and_positions(scene):
    positions_ras = np.array([[1.0, 2.0, 3.0], [-4.5, 6.25, 7.0], [10.0, -11.0, 12.5]])
    fixed = add_fiducials(scene, positions_ras, ["apex", "carina", "L3"])
    fixed.SetAndObserveTransformNodeID(add_translation(scene, (1.0, 0.0, -2.0)).GetID())

    points = nodes.markups_to_points(fixed)
    assert points.labels == ["apex", "carina", "L3"]
    expected_lps = (positions_ras + [1.0, 0.0, -2.0]) * RAS_FROM_LPS
    np.testing.assert_allclose(points.points_lps_mm, expected_lps)

    copy = nodes.points_to_markups(scene, points, name="copy")
    assert [copy.GetNthControlPointLabel(i) for i in range(3)] == ["apex", "carina", "L3"]
    np.testing.assert_allclose([control_point_ras(copy, i) for i in range(3)], expected_lps * RAS_FROM_LPS)
    again = nodes.markups_to_points(copy)
    np.testing.assert_allclose(again.points_lps_mm, points.points_lps_mm)
    assert again.labels == points.labels


def test_points_to_markups_flags_unreliable_points(scene):
    points = PointSet([[1, 2, 3], [4, 5, 6]], ["a", "b"], ["", "note"], unreliable=np.array([False, True]))
    node = nodes.points_to_markups(scene, points)
    assert node.GetNthControlPointSelected(0) and not node.GetNthControlPointSelected(1)
    assert node.GetNthControlPointDescription(1) == f"{UNRELIABLE_TAG} note"


def test_markups_skip_unplaced_points_and_reject_duplicate_labels(scene):
    fixed = add_fiducials(scene, [[0, 0, 0], [1, 1, 1], [2, 2, 2]], ["a", "b", "c"])
    fixed.SetNthControlPointPositionMissing(1)
    points = nodes.markups_to_points(fixed)
    assert points.labels == ["a", "c"]
    assert nodes.markups_to_points(fixed, indices=[2]).labels == ["c"]

    fixed.SetNthControlPointLabel(2, "a")
    with pytest.raises(BadInputError, match="repeat the labels a"):
        nodes.markups_to_points(fixed)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(BadInputError, match="no placed control points"):
        nodes.markups_to_points(empty)


def worker_match_result(labels, points_lps, confidence, reliable, forward_backward=None):
    count = len(labels)
    return {
        "labels": labels,
        "points_lps_mm": points_lps,
        "similarity": [0.9] * count,
        "confidence": confidence,
        "forward_backward_mm": forward_backward or [0.5] * count,
        "reliable": reliable,
        "seconds": 1.5,
        "match_seconds": 1.0,
        "features_cached": True,
    }


def test_matches_into_markups_with_missing_and_unreliable(scene):
    result = worker_match_result(
        ["a", "b", "c"],
        [[1.0, 2.0, 3.0], None, [7.0, 8.0, math.nan]],
        [0.91, None, 0.2],
        [True, False, False],
    )
    matches = parse_result("match", result)
    assert [matches.found(row) for row in range(3)] == [True, False, False]

    user_node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "moving")
    user_node.AddControlPointWorld([9.0, 9.0, 9.0], "stale")
    node = results.write_matches_to_markups(scene, matches, user_node)
    assert node is user_node
    assert node.GetNumberOfControlPoints() == 3
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == ["a", "b", "c"]
    np.testing.assert_allclose(control_point_ras(node, 0), [-1.0, -2.0, 3.0])
    assert node.GetNthControlPointSelected(0)
    assert node.GetNthControlPointDescription(0) == "confidence 0.91; forward-backward 0.50 mm"
    missing = node.PositionMissing
    assert node.GetNthControlPointPositionStatus(1) == missing
    assert node.GetNthControlPointPositionStatus(2) == missing
    assert node.GetNthControlPointDescription(1) == "MedDIFT: no match"
    assert not node.GetNthControlPointSelected(1)
    display = node.GetDisplayNode()
    np.testing.assert_allclose(display.GetSelectedColor(), nodes.RELIABLE_COLOR)
    np.testing.assert_allclose(display.GetColor(), nodes.UNRELIABLE_COLOR)


def test_live_update_changes_only_the_matched_label(scene):
    first = parse_result("match",
        worker_match_result(["a", "b"], [[1, 2, 3], [4, 5, 6]], [0.9, 0.9], [True, True])
    )
    node = results.write_matches_to_markups(scene, first)
    update = parse_result("match", worker_match_result(["b", "new"], [[0, 0, 1], [2, 2, 2]], [0.1, 0.8],
                                                              [False, True]))
    results.write_matches_to_markups(scene, update, node, replace_all=False)
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == ["a", "b", "new"]
    np.testing.assert_allclose(control_point_ras(node, 0), [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(control_point_ras(node, 1), [0.0, 0.0, 1.0])
    assert not node.GetNthControlPointSelected(1)
    assert node.GetNthControlPointDescription(1).startswith(UNRELIABLE_TAG)


def test_a_match_without_a_reliable_flag_is_unreliable(scene):
    result = worker_match_result(["a", "b"], [[1, 2, 3], [4, 5, 6]], [0.9, 0.9], [True, True])
    del result["reliable"]
    matches = parse_result("match", result)
    assert not matches.reliable.any()
    assert not parse_result("match", {**result, "reliable": [None, True]}).reliable[0]
    node = results.write_matches_to_markups(scene, matches)
    assert not node.GetNthControlPointSelected(0)
    assert node.GetNthControlPointDescription(0).startswith(UNRELIABLE_TAG)
    fixed = add_fiducials(scene, [[1, 2, 3], [4, 5, 6]], ["a", "b"])
    assert [row.reliable for row in results.pair_rows(fixed, node)] == [False, False]
    node.SetAttribute(results.MATCH_SCORES_ATTRIBUTE, '{"a": {"confidence": 0.9}, "b": {"reliable": true}}')
    assert [row.reliable for row in results.pair_rows(fixed, node)] == [False, True]


def test_malformed_match_result_is_an_error():
    with pytest.raises(MedDIFTError, match="2 points for 3 labels"):
        parse_result("match", worker_match_result(["a", "b", "c"], [[0, 0, 0]] * 2, [1] * 3, [True] * 3))
    with pytest.raises(MedDIFTError, match="malformed"):
        parse_result("match", {"labels": ["a"]})


def test_pair_rows_and_jump_to_pair(scene):
    fixed = add_fiducials(scene, [[1, 2, 3], [4, 5, 6]], ["a", "b"])
    matches = parse_result("match",
        worker_match_result(["a", "b"], [[-10.0, -20.0, 30.0], None], [0.75, None], [True, False], [1.25, None])
    )
    moving = results.write_matches_to_markups(scene, matches)
    rows = results.pair_rows(fixed, moving)
    assert [row.label for row in rows] == ["a", "b"]
    assert rows[0].confidence == pytest.approx(0.75)
    assert rows[0].forward_backward_mm == pytest.approx(1.25)
    assert rows[0].reliable and not rows[1].reliable
    assert rows[0].moving_ras == pytest.approx((10.0, 20.0, 30.0))
    assert rows[1].moving_ras is None and math.isnan(rows[1].confidence)

    view_nodes = {}
    slicer_core.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name in ("Red", "Yellow"):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        view_nodes[name] = (slice_node, composite)
    fixed_volume = add_volume_node(scene, np.zeros((2, 2, 2), np.float32), (1, 1, 1), (0, 0, 0), name="fixed")
    moving_volume = add_volume_node(scene, np.zeros((2, 2, 2), np.float32), (1, 1, 1), (0, 0, 0), name="moving")
    view_nodes["Red"][0].SetOrientation("Sagittal")
    view_nodes["Yellow"][0].SetOrientation("Axial")
    views.show_volumes_in_pair_views(scene, fixed_volume, moving_volume)
    assert view_nodes["Yellow"][0].GetOrientation() == "Sagittal"
    assert view_nodes["Red"][1].GetBackgroundVolumeID() == fixed_volume.GetID()
    assert view_nodes["Yellow"][1].GetBackgroundVolumeID() == moving_volume.GetID()
    views.jump_to_pair(scene, rows[0])
    for name, expected in (("Red", (1, 2, 3)), ("Yellow", (10, 20, 30))):
        slice_to_ras = view_nodes[name][0].GetSliceToRAS()
        np.testing.assert_allclose([slice_to_ras.GetElement(axis, 3) for axis in range(3)], expected)


def test_confidence_colors_go_from_red_to_green():
    assert views.confidence_color(0.0) == pytest.approx(nodes.UNRELIABLE_COLOR)
    assert views.confidence_color(1.0) == pytest.approx(nodes.RELIABLE_COLOR)
    assert views.confidence_color(math.nan) == (0.6, 0.6, 0.6)


# ------------------------------------------------------------------------------------ scene runs


class FakeClient:
    """Answers worker requests like the real worker would, writing the register outputs."""

    def __init__(self, translation_lps=(2.0, -3.0, 5.0), fail_on=None):
        self.translation_lps = np.asarray(translation_lps)
        self.fail_on = fail_on
        self.requests = []
        self.running = True
        self.killed = False
        self.paths = {}
        self._pending = []

    def answer(self, request_type, params):
        self.requests.append((request_type, params))
        if request_type == self.fail_on:
            raise BadInputError(f"{request_type} failed on purpose")
        if request_type == "load":
            image = sitk.ReadImage(params["path"])
            self.paths[f"v{len(self.requests)}"] = params["path"]
            geometry = Geometry.create(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
            return encode_result(LoadResult(f"v{len(self.requests)}", "x", geometry))
        if request_type == "overlays":
            fixed = sitk.ReadImage(self.paths[params["fixed_id"]])
            summary = {}
            for kind, value in (("confidence", 0.75), ("jacobian", 1.0), ("magnitude", 6.0)):
                if f"out_{kind}" in params:
                    overlay = sitk.Image(fixed.GetSize(), sitk.sitkFloat32) + value
                    overlay.CopyInformation(fixed)
                    sitk.WriteImage(overlay, params[f"out_{kind}"])
                    summary[kind] = {"path": params[f"out_{kind}"], "min": value, "max": value, "mean": value}
            return summary
        if request_type == "match":
            points = np.asarray(params["points_lps_mm"]) + self.translation_lps
            count = len(points)
            return worker_match_result(params["labels"], points.tolist(), [0.8] * count, [True] * count)
        if request_type == "register":
            write_translation_field(params["out_transform"], self.translation_lps)
            if "out_warped" in params:
                sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), params["out_warped"])
            return encode_result(RegisterResult(params["out_transform"], None, params.get("out_warped"),
                                                {"min": 1.0, "max": 1.0}, {"mean": 6.2, "max": 6.2}, {"total": 0.1}))
        raise AssertionError(request_type)

    run = WorkerClient.run
    submit = WorkerClient.submit

    def call(self, request_type, progress=None, timeout=None, **params):
        if progress is not None:
            progress(request_type, 0.5, "halfway")
        return self.answer(request_type, params)

    def send(self, request_type, **params):
        request_id = f"r{len(self.requests) + 1}"
        try:
            event = Result(request_id, self.answer(request_type, params))
        except MedDIFTError as error:
            event = Error(request_id, error.kind, str(error))
        self._pending += [Progress(request_id, request_type, 0.5), event]
        return request_id

    def poll(self):
        events, self._pending = self._pending[:1], self._pending[1:]
        return events

    def kill(self):
        self.killed = True
        self.running = False

    def start(self, timeout=None):
        self.running = True

    def stop(self, timeout=None):
        self.running = False

    def stderr_tail(self, max_lines=50):
        return "last words"


def pair_scene(scene):
    fixed = add_volume_node(scene, np.zeros((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), name="fixed")
    moving = add_volume_node(scene, np.ones((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), name="moving")
    landmarks = add_fiducials(scene, [[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], ["p1", "p2"])
    return fixed, moving, landmarks


def test_scene_run_sends_lps_points_and_creates_outputs(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)
    inputs = scene_run.RunInputs(fixed, moving, landmarks, compute_transform=True, compute_warped=True)
    settings = RunSettings(backbone="mind", device="cpu", match=MatchOptions(search_radius_mm=12.0))
    client = FakeClient()
    folder = scene_run.WorkerFiles(tmp_path)
    stages = []
    outputs = session.run_blocking(client, scene_run.SceneRun(scene, inputs, settings, folder).steps(),
                                progress=lambda stage, fraction, message: stages.append(stage))

    types = [request_type for request_type, _ in client.requests]
    assert types == ["load", "load", "match", "register"]
    assert stages == types
    match_params = client.requests[2][1]
    np.testing.assert_allclose(match_params["points_lps_mm"], [[-1.0, -2.0, 3.0], [1.0, -0.5, 2.0]])
    assert match_params["labels"] == ["p1", "p2"]
    assert match_params["options"] == to_json(settings.match)
    assert match_params["options"]["search_radius_mm"] == 12.0
    assert client.requests[3][1]["options"] == to_json(settings.field)
    assert match_params["backbone"] == "mind" and match_params["device"] == "cpu"
    run_keys = {"fixed_id", "moving_id", "backbone", "backbone_options", "device", "options"}
    assert set(match_params) == run_keys | {"points_lps_mm", "labels"}, "no priors key, as before"
    assert set(client.requests[3][1]) == run_keys | {"out_transform", "out_warped"}, "no null outputs or mask"

    moving_points = nodes.markups_to_points(outputs.moving_landmarks)
    assert moving_points.labels == ["p1", "p2"]
    np.testing.assert_allclose(moving_points.points_lps_mm,
                               np.asarray(match_params["points_lps_mm"]) + client.translation_lps)
    assert outputs.moving_landmarks.GetNodeReference(nodes.REFERENCE_FIXED_VOLUME) is fixed
    assert outputs.moving_landmarks.GetNodeReference(nodes.REFERENCE_FIXED_LANDMARKS) is landmarks
    assert outputs.transform.GetNodeReference(nodes.REFERENCE_MOVING_VOLUME) is moving
    # The field carries each fixed landmark onto its predicted moving point.
    for row in range(2):
        fixed_ras = control_point_ras(landmarks, row)
        mapped = outputs.transform.GetTransformFromParent().TransformPoint(*fixed_ras)
        np.testing.assert_allclose(mapped, control_point_ras(outputs.moving_landmarks, row), atol=1e-4)
    assert outputs.warped_volume.GetImageData().GetDimensions() == (4, 4, 4)
    assert sorted(path.name.split("-")[0] for path in tmp_path.iterdir()) == ["volume", "volume"]

    # A second run reuses the loaded volumes and fills the same output nodes.
    inputs.moving_landmarks, inputs.transform, inputs.warped_volume = (
        outputs.moving_landmarks, outputs.transform, outputs.warped_volume)
    nodes_before = scene.GetNumberOfNodes()
    client.requests.clear()
    again = session.run_blocking(client, scene_run.SceneRun(scene, inputs, settings, folder).steps())
    assert [request_type for request_type, _ in client.requests] == ["match", "register"]
    assert again.moving_landmarks is outputs.moving_landmarks and again.transform is outputs.transform
    assert scene.GetNumberOfNodes() == nodes_before


def test_moving_volume_under_the_output_transform_is_registered_on_its_own_grid(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)
    write_translation_field(tmp_path / "old.nrrd", (9.0, 9.0, 9.0))
    transform = nodes.load_transform_file(scene, tmp_path / "old.nrrd")
    moving.SetAndObserveTransformNodeID(transform.GetID())
    inputs = scene_run.RunInputs(fixed, moving, landmarks, transform=transform, compute_transform=True)
    run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
    session.run_blocking(FakeClient(), run.steps())
    moved = transform.GetTransformFromParent().TransformPoint(-1.0, -2.0, 3.0)
    np.testing.assert_allclose(moved, (-3.0, 1.0, 8.0), atol=1e-4)

    fixed.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(BadInputError, match="fixed volume is under the output transform"):
        next(scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path)).steps())


def test_failed_register_changes_nothing_in_the_scene(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)
    user_output = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "out")
    user_output.AddControlPointWorld([5.0, 5.0, 5.0], "keep")
    inputs = scene_run.RunInputs(fixed, moving, landmarks, moving_landmarks=user_output, compute_transform=True)
    nodes_before = scene.GetNumberOfNodes()
    pair_run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
    with pytest.raises(BadInputError, match="register failed on purpose"):
        session.run_blocking(FakeClient(fail_on="register"), pair_run.steps())
    assert scene.GetNumberOfNodes() == nodes_before
    assert user_output.GetNumberOfControlPoints() == 1
    assert user_output.GetNthControlPointLabel(0) == "keep"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fixed_landmarks": None}, "choose the fixed landmarks"),
        ({"compute_landmarks": False}, "nothing to compute"),
        ({"compute_warped": True}, "warped volume needs the transform"),
        ({"moving_landmarks": "fixed_landmarks"}, "another node than the fixed landmarks"),
        ({"transform": "fixed_landmarks", "compute_transform": True}, "is not a vtkMRMLTransformNode"),
    ],
)
def test_scene_run_rejects_bad_inputs_before_any_request(scene, tmp_path, change, message):
    fixed, moving, landmarks = pair_scene(scene)
    inputs = scene_run.RunInputs(fixed, moving, landmarks)
    for name, value in change.items():
        setattr(inputs, name, landmarks if value == "fixed_landmarks" else value)
    client = FakeClient()
    with pytest.raises(BadInputError, match=message):
        run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
        session.run_blocking(client, run.steps())
    assert client.requests == []


def test_run_driver_polls_to_the_end_and_live_update(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)
    folder = scene_run.WorkerFiles(tmp_path)
    inputs = scene_run.RunInputs(fixed, moving, landmarks)
    client = FakeClient()
    done, progress = [], []
    runner = session.RunDriver(client, scene_run.SceneRun(scene, inputs, RunSettings(), folder).steps(),
                            on_done=lambda outputs, error: done.append((outputs, error)),
                            on_progress=lambda stage, fraction, message: progress.append(stage))
    runner.start()
    polls = 0
    while runner.poll():
        polls += 1
        assert polls < 20
    outputs, error = done[0]
    assert error is None and len(done) == 1
    assert progress == ["load", "load", "match"]

    fresh = session.run_blocking(client, scene_run.SceneRun(scene, scene_run.RunInputs(fixed, moving, landmarks),
                                                         RunSettings(), folder).steps([0]))
    assert fresh.moving_landmarks is not outputs.moving_landmarks
    assert nodes.markups_to_points(fresh.moving_landmarks).labels == ["p1"]
    assert fresh.moving_landmarks.GetNodeReference(nodes.REFERENCE_FIXED_LANDMARKS) is landmarks

    landmarks.SetNthControlPointPositionWorld(1, 0.0, 0.0, 0.0)
    inputs.moving_landmarks = outputs.moving_landmarks
    client.requests.clear()
    session.run_blocking(client, scene_run.SceneRun(scene, inputs, RunSettings(), folder).steps([1]))
    assert [request_type for request_type, _ in client.requests] == ["match"]
    assert client.requests[0][1]["labels"] == ["p2"]
    np.testing.assert_allclose(control_point_ras(outputs.moving_landmarks, 1), [-2.0, 3.0, 5.0])
    np.testing.assert_allclose(control_point_ras(outputs.moving_landmarks, 0), [1.0 - 2.0, 2.0 + 3.0, 3.0 + 5.0])


def test_run_driver_reports_worker_errors_and_cancel(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)
    inputs = scene_run.RunInputs(fixed, moving, landmarks)
    done = []
    runner = session.RunDriver(FakeClient(fail_on="match"),
                            scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path)).steps(),
                            on_done=lambda outputs, error: done.append((outputs, error)))
    runner.start()
    while runner.poll():
        pass
    assert done[0][0] is None and isinstance(done[0][1], BadInputError)

    client = FakeClient()
    done.clear()
    run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
    runner = session.RunDriver(client, run.steps(),
                               on_done=lambda outputs, error: done.append((outputs, error)))
    runner.start()
    runner.cancel()
    assert client.killed and isinstance(done[0][1], CancelledError)
    assert not runner.poll() and len(done) == 1
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1


# ------------------------------------------------------------------------------------ the library's field writer


def test_field_written_by_the_library_moves_points_in_slicer_as_in_medDIFT(scene, tmp_path):
    field_module = pytest.importorskip("MedDIFTLib.field")
    from MedDIFTLib.core.geometry import Geometry
    from MedDIFTLib.grid.displacement_field import DisplacementField

    geometry = Geometry.create((10, 9, 8), (2.0, 2.5, 3.0), (-10.0, 5.0, -4.0), ROTATED_DIRECTION)
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape_kji), indexing="ij")
    displacement = np.stack([np.sin(i / 3.0) * 2.0, np.cos(j / 4.0) * 1.5, (k - 4.0) * 0.3], axis=-1)
    field = DisplacementField(displacement.astype(np.float32), geometry)
    field_module.write_field(field, tmp_path / "field.nrrd")
    node = nodes.load_transform_file(scene, tmp_path / "field.nrrd")

    fixed_lps = geometry.ijk_to_lps(np.array([[2.3, 4.1, 3.7], [6.0, 1.5, 5.2], [4.4, 6.6, 1.1]]))
    expected_ras = field.transform_points(fixed_lps) * RAS_FROM_LPS
    from_parent = node.GetTransformFromParent()
    slicer_ras = np.array([from_parent.TransformPoint(*point) for point in fixed_lps * RAS_FROM_LPS])
    np.testing.assert_allclose(slicer_ras, expected_ras, atol=1e-3)



# ------------------------------------------------------------------------------------ session


def test_run_driver_reads_typed_events_of_its_own_request_only(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)

    class NoisyClient(FakeClient):
        def poll(self):
            events = super().poll()
            return [Progress("someone-else", "other", 0.9), Log(None, "warning", "low memory"),
                    Result("someone-else", {}), *events]

    done, progress, logs = [], [], []
    runner = session.RunDriver(
        NoisyClient(), scene_run.SceneRun(scene, scene_run.RunInputs(fixed, moving, landmarks), RunSettings(),
                                          scene_run.WorkerFiles(tmp_path)).steps(),
        on_done=lambda outputs, error: done.append((outputs, error)),
        on_progress=lambda stage, fraction, message: progress.append(stage),
        on_log=lambda level, message: logs.append(level))
    runner.start()
    while runner.poll():
        pass
    assert done[0][1] is None and done[0][0].matches.labels == ["p1", "p2"]
    assert progress == ["load", "load", "match"]
    assert set(logs) == {"warning"}

    class DyingClient(FakeClient):
        def poll(self):
            return [Exit(-9)]

    done.clear()
    runner = session.RunDriver(
        DyingClient(), scene_run.SceneRun(scene, scene_run.RunInputs(fixed, moving, landmarks), RunSettings(),
                                          scene_run.WorkerFiles(tmp_path)).steps(),
        on_done=lambda outputs, error: done.append((outputs, error)))
    runner.start()
    assert not runner.poll()
    assert isinstance(done[0][1], MedDIFTError) and "stopped unexpectedly (code -9)" in str(done[0][1])
    assert "last words" in str(done[0][1])


def poll_to_the_end(worker_session):
    """Poll as a GUI timer would (the worker starts in a thread) until the run ends."""
    for _ in range(1000):
        if not worker_session.poll():
            return
        time.sleep(0.005)
    raise AssertionError("the run never ended")


def test_session_starts_the_worker_runs_scene_runs_and_cleans_up(scene):
    fixed, moving, landmarks = pair_scene(scene)
    clients = []

    def new_client():
        clients.append(FakeClient())
        clients[-1].running = False
        return clients[-1]

    worker_session = session.WorkerSession(scene, client_factory=new_client)
    inputs = scene_run.RunInputs(fixed, moving, landmarks, compute_transform=True)
    done = []
    worker_session.start_scene_run(inputs, RunSettings(), on_done=lambda outputs, error: done.append((outputs, error)))
    assert worker_session.worker_busy
    with pytest.raises(MedDIFTError, match="already in progress"):
        worker_session.run_scene(inputs, RunSettings())
    poll_to_the_end(worker_session)
    outputs, error = done[0]
    assert error is None and not worker_session.worker_busy and len(clients) == 1
    assert [request_type for request_type, _ in clients[0].requests] == ["load", "load", "match", "register"]

    inputs.moving_landmarks = outputs.moving_landmarks
    landmarks.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
    live = worker_session.run_scene(inputs, RunSettings(), control_point_indices=[0])
    assert live.moving_landmarks is outputs.moving_landmarks and len(clients) == 1
    assert [request_type for request_type, _ in clients[0].requests][4:] == ["match"]

    folder = worker_session.folder.path
    assert folder.is_dir()
    worker_session.shutdown()
    assert not folder.exists() and not clients[0].running


def test_session_reports_bad_inputs_at_once_and_a_failed_start_through_on_done(scene):
    fixed, moving, landmarks = pair_scene(scene)

    class NoStart(FakeClient):
        def start(self, timeout=None):
            raise OSError("no such interpreter")

    def new_client():
        client = NoStart()
        client.running = False
        return client

    worker_session = session.WorkerSession(scene, client_factory=new_client)
    done = []
    with pytest.raises(BadInputError, match="choose a fixed and a moving volume"):
        worker_session.start_scene_run(scene_run.RunInputs(None, moving, landmarks), RunSettings(), on_done=done.append)
    assert not worker_session.worker_busy
    worker_session.start_scene_run(scene_run.RunInputs(fixed, moving, landmarks), RunSettings(),
                             on_done=lambda outputs, error: done.append((outputs, error)))
    poll_to_the_end(worker_session)
    assert done[0][0] is None and isinstance(done[0][1], MedDIFTError) and "no such interpreter" in str(done[0][1])
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1
    worker_session.shutdown()


def test_session_cancel_kills_the_worker_and_leaves_the_scene_unchanged(scene):
    fixed, moving, landmarks = pair_scene(scene)
    client = FakeClient()
    worker_session = session.WorkerSession(scene, client_factory=lambda: client)
    worker_session.run_scene(scene_run.RunInputs(fixed, moving, landmarks), RunSettings())  # starts the worker
    nodes_before = scene.GetNumberOfNodes()
    done = []
    worker_session.start_scene_run(scene_run.RunInputs(fixed, moving, landmarks, compute_transform=True), RunSettings(),
                             on_done=lambda outputs, error: done.append((outputs, error)))
    worker_session.cancel()
    assert client.killed and isinstance(done[0][1], CancelledError) and not worker_session.worker_busy
    assert not worker_session.poll() and len(done) == 1
    assert scene.GetNumberOfNodes() == nodes_before
    worker_session.shutdown()


# ------------------------------------------------------------------------------------ visual QA


def test_live_propagation_rematches_only_moved_points(scene):
    fixed = add_fiducials(scene, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], ["a", "b", "c"])
    moved = live.MovedPoints()
    moved.remember(fixed)
    assert moved.moved(fixed) == []
    fixed.SetNthControlPointSelected(1, False)
    fixed.SetNthControlPointLocked(2, True)
    fixed.SetNthControlPointDescription(0, "described")
    fixed.SetNthControlPointLabel(2, "renamed")
    assert moved.moved(fixed) == [], "selecting, locking, describing or relabelling a point does not re-match it"
    fixed.SetNthControlPointPositionWorld(1, 4.0, 5.0, 16.0)
    assert moved.moved(fixed, index=0) == []
    assert moved.moved(fixed, index=1) == [1]
    assert moved.moved(fixed, index=1) == [], "a re-matched position is remembered"
    from vtkmodules.vtkCommonCore import vtkPoints

    batch = vtkPoints()
    for position in ([1.0, 2.0, 3.0], [4.0, 5.0, 16.0], [0.0, 0.0, 0.0]):
        batch.InsertNextPoint(position)
    fixed.SetControlPointPositionsWorld(batch)  # a batched edit: VTK reports no index
    assert moved.moved(fixed, index=None) == [2], "without an index every point is checked"


def _qa_matches(scene):
    fixed = add_fiducials(scene, [[0.0, 0.0, float(z)] for z in range(4)], ["a", "b", "c", "d"])
    matches = MatchResult(
        labels=["a", "b", "c", "d"],
        points_lps_mm=np.array([[0.0, 0.0, float(z)] for z in range(4)]),
        similarity=np.full(4, 0.5),
        confidence=np.array([0.9, 0.2, np.nan, 0.4]),
        forward_backward_mm=np.array([0.5, 7.0, np.nan, 2.0]),
        reliable=np.array([True, False, False, False]),
    )
    moving = results.write_matches_to_markups(scene, matches)
    return fixed, moving, matches


def test_qa_table_orders_by_doubt_and_finds_the_next_unreliable_pair(scene):
    fixed, moving, _ = _qa_matches(scene)
    rows = results.pair_rows(fixed, moving)
    assert [row.label for row in qa.ordered_rows(rows, qa.Order.LANDMARKS)] == ["a", "b", "c", "d"]
    assert [row.label for row in qa.ordered_rows(rows, qa.Order.CONFIDENCE)] == ["c", "b", "d", "a"]
    assert [row.label for row in qa.ordered_rows(rows, qa.Order.FORWARD_BACKWARD)] == ["c", "b", "d", "a"]
    assert qa.next_unreliable(rows, {}).label == "c"
    assert qa.next_unreliable(rows, {"c": results.REJECTED}).label == "b"
    assert qa.next_unreliable(rows, {"b": "accepted", "c": "rejected", "d": "accepted"}) is None
    assert qa.summary(rows, {}) == "4 pairs: 1 reliable, 3 unreliable; 0 accepted, 0 rejected, 3 to review"


def test_accept_and_reject_label_and_unselect_but_never_delete(scene):
    fixed, moving, matches = _qa_matches(scene)
    qa.set_decision(moving, "b", results.ACCEPTED)
    qa.set_decision(moving, "a", results.REJECTED)
    index_a, index_b = moving.GetControlPointIndexByLabel("a"), moving.GetControlPointIndexByLabel("b")
    assert moving.GetNumberOfControlPoints() == 4
    assert not moving.GetNthControlPointSelected(index_a)
    assert moving.GetNthControlPointDescription(index_a).startswith(qa.REJECTED_TAG)
    assert moving.GetNthControlPointSelected(index_b)
    decisions = results.reviews(moving)
    assert decisions == {"a": "rejected", "b": "accepted"}
    rows = results.pair_rows(fixed, moving)
    assert qa.summary(rows, decisions) == "4 pairs: 1 reliable, 3 unreliable; 1 accepted, 1 rejected, 2 to review"
    qa.set_decision(moving, "a", None)
    assert moving.GetNthControlPointSelected(index_a), "cleared: back to the match's own flag (reliable)"
    assert not moving.GetNthControlPointDescription(index_a).startswith(qa.REJECTED_TAG)
    qa.set_decision(moving, "a", results.REJECTED)
    results.write_matches_to_markups(scene, matches, moving, replace_all=False)
    assert results.reviews(moving) == {}, "a re-matched pair is new: its decision is cleared"
    with pytest.raises(BadInputError, match="no point labelled"):
        qa.set_decision(moving, "zz", results.ACCEPTED)
    with pytest.raises(BadInputError):
        qa.set_decision(moving, "a", "maybe")


def _slice_views(scene):
    for name in (views.FIXED_VIEW, views.MOVING_VIEW):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation("Axial")
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)


def test_cursor_through_a_translation_field_lands_on_the_translated_point(scene, tmp_path):
    _slice_views(scene)
    translation_lps = np.array([2.0, -3.0, 5.0])
    write_translation_field(tmp_path / "field.nrrd", translation_lps)
    transform = nodes.load_transform_file(scene, tmp_path / "field.nrrd")
    fixed_lps = np.array([-8.0, 6.0, 20.0])
    moving_ras = cursor.map_through_field(transform, fixed_lps * RAS_FROM_LPS)
    np.testing.assert_allclose(moving_ras, (fixed_lps + translation_lps) * RAS_FROM_LPS, atol=0.1)

    marker = cursor.show_cursor_match(scene, cursor.CursorMatch(moving_ras))
    np.testing.assert_allclose(control_point_ras(marker, 0), moving_ras, atol=1e-6)
    assert marker.GetLocked() and marker.GetNthControlPointLabel(0) == "field"
    moving_slice = views.slice_node(scene, views.MOVING_VIEW)
    slice_to_ras = moving_slice.GetSliceToRAS()
    np.testing.assert_allclose([slice_to_ras.GetElement(axis, 3) for axis in range(3)], moving_ras, atol=1e-6)
    assert cursor.show_cursor_match(scene, cursor.CursorMatch((1.0, 2.0, 3.0), 0.3, False), marker) is marker
    assert marker.GetNumberOfControlPoints() == 1 and marker.GetNthControlPointLabel(0) == "0.30 unreliable"

    moving = add_volume_node(scene, np.zeros((3, 3, 3), np.float32), (1, 1, 1), (0, 0, 0))
    moving.SetAndObserveTransformNodeID(transform.GetID())
    assert cursor.map_through_field(transform, (1.0, 2.0, 3.0), moving) == (1.0, 2.0, 3.0), (
        "shown through the field, the moving view is in the fixed frame"
    )


def test_cursor_rematch_is_throttled_and_cached():
    matcher = cursor.CursorMatcher(interval_s=0.25, cache_step_mm=1.0)
    assert matcher.request((10.0, 0.0, 0.0)) is None
    assert matcher.take_pending(now=0.0) == (10.0, 0.0, 0.0)
    assert matcher.request((11.0, 0.0, 0.0)) is None
    assert matcher.request((12.0, 0.0, 0.0)) is None
    assert matcher.take_pending(now=1.0) is None, "one request in flight at a time"
    matcher.answered(cursor.CursorMatch((13.0, 0.0, 0.0), 0.8))
    assert matcher.take_pending(now=0.1) is None, "not sooner than the interval"
    assert matcher.take_pending(now=0.3) == (12.0, 0.0, 0.0), "only the newest position is sent"
    matcher.answered(None)
    assert matcher.request((10.2, 0.1, -0.3)).moving_ras == (13.0, 0.0, 0.0), "cached on the 1 mm grid"
    assert matcher.take_pending(now=5.0) is None
    assert matcher.request((12.0, 0.0, 0.0)) is None, "a failed answer is not cached"
    matcher.clear()
    assert matcher.request((10.0, 0.0, 0.0)) is None


def test_cursor_places_a_labelled_pair(scene):
    fixed = add_fiducials(scene, [[0.0, 0.0, 0.0]], ["C1"])
    moving = add_fiducials(scene, [[1.0, 0.0, 0.0]], ["C1"], name="M")
    label = cursor.place_pair(fixed, moving, (5.0, 6.0, 7.0), cursor.CursorMatch((6.0, 6.0, 7.0), 0.2, False))
    assert label == "C2"
    np.testing.assert_allclose(control_point_ras(fixed, 1), (5.0, 6.0, 7.0))
    np.testing.assert_allclose(control_point_ras(moving, 1), (6.0, 6.0, 7.0))
    assert not moving.GetNthControlPointSelected(1)


def test_overlays_are_volumes_on_the_fixed_grid_with_colour_tables(scene, tmp_path):
    _slice_views(scene)
    fixed = add_volume_node(scene, np.zeros((4, 5, 6), np.float32), (1.5, 2.0, 2.5), (3.0, -4.0, 5.0),
                            ROTATED_DIRECTION, name="fixed")
    moving = add_volume_node(scene, np.ones((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), name="moving")
    landmarks = add_fiducials(scene, [[1.0, 2.0, 3.0]], ["p1"])
    client = FakeClient()
    inputs = scene_run.RunInputs(fixed, moving, landmarks, compute_transform=True, compute_overlays=True)
    pair_run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
    outputs = session.run_blocking(client, pair_run.steps())
    overlay_request = dict(client.requests)["overlays"]
    assert overlay_request["transform"].endswith(".nrrd")
    assert sorted(outputs.overlays) == ["confidence", "jacobian", "magnitude"]
    fixed_geometry = nodes.volume_geometry(fixed)
    for name, node in outputs.overlays.items():
        geometry = nodes.volume_geometry(node)
        assert geometry.shape_ijk == fixed_geometry.shape_ijk, name
        assert geometry.same_grid(fixed_geometry), name
        assert overlays.overlay_kind(node) is overlays.KINDS[name]
        table = scene.GetNodeByID(node.GetDisplayNode().GetColorNodeID())
        assert table.GetNumberOfColors() == overlays.COLORS
        assert node.GetNodeReferenceID(nodes.REFERENCE_FIXED_VOLUME) == fixed.GetID()
    from vtkmodules.util import numpy_support

    values = numpy_support.vtk_to_numpy(outputs.overlays["magnitude"].GetImageData().GetPointData().GetScalars())
    np.testing.assert_allclose(values, 6.0)
    assert not [path for path in tmp_path.iterdir() if not path.name.startswith("volume")], "job files removed"

    jacobian_rows = overlays.color_rows(overlays.JACOBIAN)
    assert tuple(jacobian_rows[0]) == (1.0, 0.0, 0.0), "folding is red"
    one = int(round((1.0 - overlays.JACOBIAN.low) / (overlays.JACOBIAN.high - overlays.JACOBIAN.low) * 255))
    np.testing.assert_allclose(jacobian_rows[one], (1.0, 1.0, 1.0), atol=0.02)
    confidence_rows = overlays.color_rows(overlays.CONFIDENCE)
    assert confidence_rows[0][0] > confidence_rows[0][1] and confidence_rows[-1][1] > confidence_rows[-1][0]

    run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
    again = session.run_blocking(client, run.steps())
    assert again.overlays["jacobian"] is outputs.overlays["jacobian"], "a new run fills the same overlay nodes"

    overlays.show_overlay(scene, fixed, outputs.overlays["jacobian"])
    composite = views.node_by_layout_name(scene, "vtkMRMLSliceCompositeNode", views.FIXED_VIEW)
    assert composite.GetBackgroundVolumeID() == fixed.GetID()
    assert composite.GetForegroundVolumeID() == outputs.overlays["jacobian"].GetID()
    overlays.show_fade(scene, fixed, moving, outputs.transform, 0.7)
    assert composite.GetForegroundVolumeID() == moving.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    assert moving.GetParentTransformNode() is outputs.transform


def test_overlays_without_a_transform_give_confidence_only(scene, tmp_path):
    fixed, moving, landmarks = pair_scene(scene)
    client = FakeClient()
    inputs = scene_run.RunInputs(fixed, moving, landmarks, compute_overlays=True)
    pair_run = scene_run.SceneRun(scene, inputs, RunSettings(), scene_run.WorkerFiles(tmp_path))
    outputs = session.run_blocking(client, pair_run.steps())
    assert list(outputs.overlays) == ["confidence"]
    assert "transform" not in dict(client.requests)["overlays"], "no field: the key is left out"


def test_session_cursor_match_runs_in_the_background_and_leaves_the_scene_alone(scene):
    fixed, moving, landmarks = pair_scene(scene)
    client = FakeClient(translation_lps=(1.0, 2.0, 3.0))
    worker_session = session.WorkerSession(scene, client_factory=lambda: client)
    answers = []
    nodes_before = scene.GetNumberOfNodes()
    try:
        worker_session.start_cursor_match(scene_run.RunInputs(fixed, moving), RunSettings(), (4.0, 5.0, 6.0),
                                          lambda outputs, error: answers.append((outputs, error)))
        deadline = time.monotonic() + 30.0
        while worker_session.poll() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker_session.shutdown()
    outputs, error = answers[0]
    assert error is None and outputs.moving_landmarks is None
    match = cursor.cursor_match_from(outputs.matches)
    np.testing.assert_allclose(match.moving_ras, (4.0 - 1.0, 5.0 - 2.0, 6.0 + 3.0), atol=1e-9)
    assert match.confidence == pytest.approx(0.8) and match.reliable
    assert scene.GetNumberOfNodes() == nodes_before
    assert [request for request, _ in client.requests].count("match") == 1
    assert cursor.cursor_match_from(None) is None


def test_session_on_a_server_uses_the_remote_client_and_refuses_lesion_points(scene):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fixed, moving, landmarks = pair_scene(scene)
    remote = session.WorkerSession(scene, server_url=f"http://127.0.0.1:{port}", token="secret", start_timeout_s=5.0)
    try:
        with pytest.raises(BadInputError, match="lesion points .* are tracked on this computer only"):
            remote.run_track(TrackInputs(fixed, moving, landmarks), RunSettings())
        nodes_before = scene.GetNumberOfNodes()
        with pytest.raises(MedDIFTError) as refused:
            remote.run_scene(scene_run.RunInputs(fixed, moving, landmarks), RunSettings())
        assert f"127.0.0.1:{port}" in str(refused.value), "the server was asked, not a local worker"
        assert scene.GetNumberOfNodes() == nodes_before
    finally:
        remote.shutdown()
