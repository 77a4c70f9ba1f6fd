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
from MedDIFTLib.core.io import PointSet  # noqa: E402
from MedDIFTLib.core.io.points import UNRELIABLE_TAG  # noqa: E402
from MedDIFTLib.core.options import MatchOptions, RunSettings, to_json  # noqa: E402
from MedDIFTLib.slicer import jobs, nodes, results, session, views  # noqa: E402
from MedDIFTLib.worker.events import Error, Exit, Log, Progress, Result  # noqa: E402

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
        "features_cached": True,
    }


def test_matches_into_markups_with_missing_and_unreliable(scene):
    result = worker_match_result(
        ["a", "b", "c"],
        [[1.0, 2.0, 3.0], None, [7.0, 8.0, math.nan]],
        [0.91, None, 0.2],
        [True, False, False],
    )
    matches = results.MatchResult.from_worker(result)
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
    first = results.MatchResult.from_worker(
        worker_match_result(["a", "b"], [[1, 2, 3], [4, 5, 6]], [0.9, 0.9], [True, True])
    )
    node = results.write_matches_to_markups(scene, first)
    update = results.MatchResult.from_worker(worker_match_result(["b", "new"], [[0, 0, 1], [2, 2, 2]], [0.1, 0.8],
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
    matches = results.MatchResult.from_worker(result)
    assert not matches.reliable.any()
    assert not results.MatchResult.from_worker({**result, "reliable": [None, True]}).reliable[0]
    node = results.write_matches_to_markups(scene, matches)
    assert not node.GetNthControlPointSelected(0)
    assert node.GetNthControlPointDescription(0).startswith(UNRELIABLE_TAG)
    fixed = add_fiducials(scene, [[1, 2, 3], [4, 5, 6]], ["a", "b"])
    assert [row.reliable for row in results.pair_rows(fixed, node)] == [False, False]
    node.SetAttribute(results.MATCH_SCORES_ATTRIBUTE, '{"a": {"confidence": 0.9}, "b": {"reliable": true}}')
    assert [row.reliable for row in results.pair_rows(fixed, node)] == [False, True]


def test_malformed_match_result_is_an_error():
    with pytest.raises(MedDIFTError, match="2 points for 3 labels"):
        results.MatchResult.from_worker(worker_match_result(["a", "b", "c"], [[0, 0, 0]] * 2, [1] * 3, [True] * 3))
    with pytest.raises(MedDIFTError, match="malformed"):
        results.MatchResult.from_worker({"labels": ["a"]})


def test_pair_rows_and_jump_to_pair(scene):
    fixed = add_fiducials(scene, [[1, 2, 3], [4, 5, 6]], ["a", "b"])
    matches = results.MatchResult.from_worker(
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


# ------------------------------------------------------------------------------------ jobs


class FakeClient:
    """Answers worker requests like the real worker would, writing the register outputs."""

    def __init__(self, translation_lps=(2.0, -3.0, 5.0), fail_on=None):
        self.translation_lps = np.asarray(translation_lps)
        self.fail_on = fail_on
        self.requests = []
        self.running = True
        self.killed = False
        self._pending = []

    def answer(self, request_type, params):
        self.requests.append((request_type, params))
        if request_type == self.fail_on:
            raise BadInputError(f"{request_type} failed on purpose")
        if request_type == "load":
            image = sitk.ReadImage(params["path"])
            return {"volume_id": f"v{len(self.requests)}", "name": "x", "geometry": {"size": image.GetSize()}}
        if request_type == "match":
            points = np.asarray(params["points_lps_mm"]) + self.translation_lps
            count = len(points)
            return worker_match_result(params["labels"], points.tolist(), [0.8] * count, [True] * count)
        if request_type == "register":
            write_translation_field(params["out_transform"], self.translation_lps)
            if "out_warped" in params:
                sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), params["out_warped"])
            return {"transform": params["out_transform"], "jacobian": {"min": 1.0, "max": 1.0}}
        raise AssertionError(request_type)

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


def job_scene(scene):
    fixed = add_volume_node(scene, np.zeros((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), name="fixed")
    moving = add_volume_node(scene, np.ones((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), name="moving")
    landmarks = add_fiducials(scene, [[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], ["p1", "p2"])
    return fixed, moving, landmarks


def test_scene_job_sends_lps_points_and_creates_outputs(scene, tmp_path):
    fixed, moving, landmarks = job_scene(scene)
    inputs = jobs.JobInputs(fixed, moving, landmarks, compute_transform=True, compute_warped=True)
    settings = RunSettings(backbone="mind", device="cpu", match=MatchOptions(search_radius_mm=12.0))
    client = FakeClient()
    folder = jobs.JobFolder(tmp_path)
    stages = []
    outputs = session.run_blocking(client, jobs.SceneJob(scene, inputs, settings, folder).steps(),
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
    again = session.run_blocking(client, jobs.SceneJob(scene, inputs, settings, folder).steps())
    assert [request_type for request_type, _ in client.requests] == ["match", "register"]
    assert again.moving_landmarks is outputs.moving_landmarks and again.transform is outputs.transform
    assert scene.GetNumberOfNodes() == nodes_before


def test_moving_volume_under_the_output_transform_is_registered_on_its_own_grid(scene, tmp_path):
    fixed, moving, landmarks = job_scene(scene)
    write_translation_field(tmp_path / "old.nrrd", (9.0, 9.0, 9.0))
    transform = nodes.load_transform_file(scene, tmp_path / "old.nrrd")
    moving.SetAndObserveTransformNodeID(transform.GetID())
    inputs = jobs.JobInputs(fixed, moving, landmarks, transform=transform, compute_transform=True)
    session.run_blocking(FakeClient(), jobs.SceneJob(scene, inputs, RunSettings(), jobs.JobFolder(tmp_path)).steps())
    moved = transform.GetTransformFromParent().TransformPoint(-1.0, -2.0, 3.0)
    np.testing.assert_allclose(moved, (-3.0, 1.0, 8.0), atol=1e-4)

    fixed.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(BadInputError, match="fixed volume is under the output transform"):
        next(jobs.SceneJob(scene, inputs, RunSettings(), jobs.JobFolder(tmp_path)).steps())


def test_failed_register_changes_nothing_in_the_scene(scene, tmp_path):
    fixed, moving, landmarks = job_scene(scene)
    user_output = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "out")
    user_output.AddControlPointWorld([5.0, 5.0, 5.0], "keep")
    inputs = jobs.JobInputs(fixed, moving, landmarks, moving_landmarks=user_output, compute_transform=True)
    nodes_before = scene.GetNumberOfNodes()
    job = jobs.SceneJob(scene, inputs, RunSettings(), jobs.JobFolder(tmp_path))
    with pytest.raises(BadInputError, match="register failed on purpose"):
        session.run_blocking(FakeClient(fail_on="register"), job.steps())
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
def test_scene_job_rejects_bad_inputs_before_any_request(scene, tmp_path, change, message):
    fixed, moving, landmarks = job_scene(scene)
    inputs = jobs.JobInputs(fixed, moving, landmarks)
    for name, value in change.items():
        setattr(inputs, name, landmarks if value == "fixed_landmarks" else value)
    client = FakeClient()
    with pytest.raises(BadInputError, match=message):
        session.run_blocking(client, jobs.SceneJob(scene, inputs, RunSettings(), jobs.JobFolder(tmp_path)).steps())
    assert client.requests == []


def test_job_runner_polls_to_the_end_and_live_update(scene, tmp_path):
    fixed, moving, landmarks = job_scene(scene)
    folder = jobs.JobFolder(tmp_path)
    inputs = jobs.JobInputs(fixed, moving, landmarks)
    client = FakeClient()
    done, progress = [], []
    runner = session.JobRunner(client, jobs.SceneJob(scene, inputs, RunSettings(), folder).steps(),
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

    fresh = session.run_blocking(client, jobs.SceneJob(scene, jobs.JobInputs(fixed, moving, landmarks),
                                                    RunSettings(), folder).steps([0]))
    assert fresh.moving_landmarks is not outputs.moving_landmarks
    assert nodes.markups_to_points(fresh.moving_landmarks).labels == ["p1"]
    assert fresh.moving_landmarks.GetNodeReference(nodes.REFERENCE_FIXED_LANDMARKS) is landmarks

    landmarks.SetNthControlPointPositionWorld(1, 0.0, 0.0, 0.0)
    inputs.moving_landmarks = outputs.moving_landmarks
    client.requests.clear()
    session.run_blocking(client, jobs.SceneJob(scene, inputs, RunSettings(), folder).steps([1]))
    assert [request_type for request_type, _ in client.requests] == ["match"]
    assert client.requests[0][1]["labels"] == ["p2"]
    np.testing.assert_allclose(control_point_ras(outputs.moving_landmarks, 1), [-2.0, 3.0, 5.0])
    np.testing.assert_allclose(control_point_ras(outputs.moving_landmarks, 0), [1.0 - 2.0, 2.0 + 3.0, 3.0 + 5.0])


def test_job_runner_reports_worker_errors_and_cancel(scene, tmp_path):
    fixed, moving, landmarks = job_scene(scene)
    inputs = jobs.JobInputs(fixed, moving, landmarks)
    done = []
    runner = session.JobRunner(FakeClient(fail_on="match"),
                            jobs.SceneJob(scene, inputs, RunSettings(), jobs.JobFolder(tmp_path)).steps(),
                            on_done=lambda outputs, error: done.append((outputs, error)))
    runner.start()
    while runner.poll():
        pass
    assert done[0][0] is None and isinstance(done[0][1], BadInputError)

    client = FakeClient()
    done.clear()
    runner = session.JobRunner(client, jobs.SceneJob(scene, inputs, RunSettings(), jobs.JobFolder(tmp_path)).steps(),
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

    geometry = Geometry.create((10, 9, 8), (2.0, 2.5, 3.0), (-10.0, 5.0, -4.0), ROTATED_DIRECTION)
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape_kji), indexing="ij")
    displacement = np.stack([np.sin(i / 3.0) * 2.0, np.cos(j / 4.0) * 1.5, (k - 4.0) * 0.3], axis=-1)
    field = field_module.DisplacementField(displacement.astype(np.float32), geometry)
    field_module.write_field(field, tmp_path / "field.nrrd")
    node = nodes.load_transform_file(scene, tmp_path / "field.nrrd")

    fixed_lps = geometry.ijk_to_lps(np.array([[2.3, 4.1, 3.7], [6.0, 1.5, 5.2], [4.4, 6.6, 1.1]]))
    expected_ras = field.transform_points(fixed_lps) * RAS_FROM_LPS
    from_parent = node.GetTransformFromParent()
    slicer_ras = np.array([from_parent.TransformPoint(*point) for point in fixed_lps * RAS_FROM_LPS])
    np.testing.assert_allclose(slicer_ras, expected_ras, atol=1e-3)



# ------------------------------------------------------------------------------------ session


def test_job_runner_reads_typed_events_of_its_own_request_only(scene, tmp_path):
    fixed, moving, landmarks = job_scene(scene)

    class NoisyClient(FakeClient):
        def poll(self):
            events = super().poll()
            return [Progress("someone-else", "other", 0.9), Log(None, "warning", "low memory"),
                    Result("someone-else", {}), *events]

    done, progress, logs = [], [], []
    runner = session.JobRunner(
        NoisyClient(), jobs.SceneJob(scene, jobs.JobInputs(fixed, moving, landmarks), RunSettings(),
                                     jobs.JobFolder(tmp_path)).steps(),
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
    runner = session.JobRunner(
        DyingClient(), jobs.SceneJob(scene, jobs.JobInputs(fixed, moving, landmarks), RunSettings(),
                                     jobs.JobFolder(tmp_path)).steps(),
        on_done=lambda outputs, error: done.append((outputs, error)))
    runner.start()
    assert not runner.poll()
    assert isinstance(done[0][1], MedDIFTError) and "stopped unexpectedly (code -9)" in str(done[0][1])
    assert "last words" in str(done[0][1])


def poll_to_the_end(worker_session):
    """Poll as a GUI timer would (the worker starts in a thread) until the job ends."""
    for _ in range(1000):
        if not worker_session.poll():
            return
        time.sleep(0.005)
    raise AssertionError("the job never ended")


def test_session_starts_the_worker_runs_jobs_and_cleans_up(scene):
    fixed, moving, landmarks = job_scene(scene)
    clients = []

    def new_client():
        clients.append(FakeClient())
        clients[-1].running = False
        return clients[-1]

    worker_session = session.Session(scene, client_factory=new_client)
    inputs = jobs.JobInputs(fixed, moving, landmarks, compute_transform=True)
    done = []
    worker_session.start_job(inputs, RunSettings(), on_done=lambda outputs, error: done.append((outputs, error)))
    assert worker_session.busy
    with pytest.raises(MedDIFTError, match="already running"):
        worker_session.run(inputs, RunSettings())
    poll_to_the_end(worker_session)
    outputs, error = done[0]
    assert error is None and not worker_session.busy and len(clients) == 1
    assert [request_type for request_type, _ in clients[0].requests] == ["load", "load", "match", "register"]

    inputs.moving_landmarks = outputs.moving_landmarks
    landmarks.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
    live = worker_session.run(inputs, RunSettings(), control_point_indices=[0])
    assert live.moving_landmarks is outputs.moving_landmarks and len(clients) == 1
    assert [request_type for request_type, _ in clients[0].requests][4:] == ["match"]

    folder = worker_session.folder.path
    assert folder.is_dir()
    worker_session.shutdown()
    assert not folder.exists() and not clients[0].running


def test_session_reports_bad_inputs_at_once_and_a_failed_start_through_on_done(scene):
    fixed, moving, landmarks = job_scene(scene)

    class NoStart(FakeClient):
        def start(self, timeout=None):
            raise OSError("no such interpreter")

    def new_client():
        client = NoStart()
        client.running = False
        return client

    worker_session = session.Session(scene, client_factory=new_client)
    done = []
    with pytest.raises(BadInputError, match="choose a fixed and a moving volume"):
        worker_session.start_job(jobs.JobInputs(None, moving, landmarks), RunSettings(), on_done=done.append)
    assert not worker_session.busy
    worker_session.start_job(jobs.JobInputs(fixed, moving, landmarks), RunSettings(),
                             on_done=lambda outputs, error: done.append((outputs, error)))
    poll_to_the_end(worker_session)
    assert done[0][0] is None and isinstance(done[0][1], MedDIFTError) and "no such interpreter" in str(done[0][1])
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1
    worker_session.shutdown()


def test_session_cancel_kills_the_worker_and_leaves_the_scene_unchanged(scene):
    fixed, moving, landmarks = job_scene(scene)
    client = FakeClient()
    worker_session = session.Session(scene, client_factory=lambda: client)
    worker_session.run(jobs.JobInputs(fixed, moving, landmarks), RunSettings())  # starts the worker
    nodes_before = scene.GetNumberOfNodes()
    done = []
    worker_session.start_job(jobs.JobInputs(fixed, moving, landmarks, compute_transform=True), RunSettings(),
                             on_done=lambda outputs, error: done.append((outputs, error)))
    worker_session.cancel()
    assert client.killed and isinstance(done[0][1], CancelledError) and not worker_session.busy
    assert not worker_session.poll() and len(done) == 1
    assert scene.GetNumberOfNodes() == nodes_before
    worker_session.shutdown()
