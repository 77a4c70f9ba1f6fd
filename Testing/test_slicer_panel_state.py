"""The panel's state without Qt, against slicer-core's real MRML: the correspondence cursor, the
markups nodes MedDIFT adds, fade and flicker, the worker session shared by runs and cursor
matches, the weights transfers queued after a missing-weights error and lesion tracking's scene
bookkeeping (issue 27's broken flows, each pinned here)."""

from __future__ import annotations

import numpy as np
import pytest

slicer_core = pytest.importorskip("slicer_core", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from test_mrml import FakeClient, _slice_views, add_fiducials, add_volume_node, pair_scene  # noqa: E402

from MedDIFTLib.core.errors import BadInputError, CancelledError, MedDIFTError  # noqa: E402
from MedDIFTLib.core.options import MatchOptions, RunSettings  # noqa: E402
from MedDIFTLib.slicer import cursor, nodes, overlays, scene_run, session  # noqa: E402


@pytest.fixture
def scene():
    return slicer_core.vtkMRMLScene()


# ------------------------------------------------------------------------------------ cursor


def test_cursor_with_a_transform_node_not_yet_computed_asks_the_worker(scene):
    """"Create new" on the Output transform selector makes a bare vtkMRMLTransformNode (no transform)."""
    _slice_views(scene)
    fixed, moving, _ = pair_scene(scene)
    bare = scene.AddNewNodeByClass("vtkMRMLTransformNode", "new transform")
    assert not cursor.has_field(bare) and not cursor.has_field(None)
    state = cursor.CursorState(scene)
    state.moved((1.0, 2.0, 3.0), bare, moving, cursor.match_context(fixed, moving, RunSettings()))
    assert state.marker is None, "nothing to show until the worker answers"
    assert state.matcher.take_pending(now=0.0) == (1.0, 2.0, 3.0)
    state.answered(cursor.CursorMatch((4.0, 5.0, 6.0), 0.9))
    assert state.match.moving_ras == (4.0, 5.0, 6.0) and scene.IsNodePresent(state.marker)


def test_cursor_matches_are_forgotten_when_the_volumes_or_settings_change(scene):
    fixed, moving, _ = pair_scene(scene)
    state = cursor.CursorState(scene)
    _slice_views(scene)
    context = cursor.match_context(fixed, moving, RunSettings())
    state.moved((1.0, 2.0, 3.0), None, moving, context)
    state.matcher.take_pending(now=0.0)
    state.answered(cursor.CursorMatch((4.0, 5.0, 6.0), 0.9))
    state.moved((1.0, 2.0, 3.0), None, moving, context)
    assert state.matcher.take_pending(now=10.0) is None, "same context: the cached match is shown"

    wider = cursor.match_context(fixed, moving, RunSettings(match=MatchOptions(search_radius_mm=40.0)))
    state.moved((1.0, 2.0, 3.0), None, moving, wider)
    assert state.matcher.take_pending(now=20.0) == (1.0, 2.0, 3.0), "other settings: matched again"
    state.answered(cursor.CursorMatch((4.0, 5.0, 6.0), 0.9))

    other_moving = add_volume_node(scene, np.ones((4, 5, 6), np.float32), (1, 1, 1), (0, 0, 0), name="other")
    state.moved((1.0, 2.0, 3.0), None, other_moving, cursor.match_context(fixed, other_moving, RunSettings()))
    assert state.matcher.take_pending(now=30.0) == (1.0, 2.0, 3.0), "another moving volume: matched again"


def test_cursor_reset_after_close_scene_forgets_the_marker_and_the_matches(scene):
    _slice_views(scene)
    fixed, moving, _ = pair_scene(scene)
    context = cursor.match_context(fixed, moving, RunSettings())
    state = cursor.CursorState(scene)
    state.moved((1.0, 2.0, 3.0), None, moving, context)
    state.matcher.take_pending(now=0.0)
    state.answered(cursor.CursorMatch((4.0, 5.0, 6.0), 0.9))
    assert state.marker is not None
    scene.Clear(0)
    state.reset()
    assert (state.marker, state.match, state.fixed_ras) == (None, None, None)
    _slice_views(scene)
    fixed, moving, _ = pair_scene(scene)
    state.moved((1.0, 2.0, 3.0), None, moving, context)
    assert state.matcher.take_pending(now=1.0) == (1.0, 2.0, 3.0), "no match survives the scene"
    state.answered(cursor.CursorMatch((7.0, 8.0, 9.0), 0.9))
    assert scene.IsNodePresent(state.marker), "a new marker, in the new scene"
    state.hide()
    assert state.marker is None
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1, "only the landmarks"


# ------------------------------------------------------------------------------------ markups nodes


def markups_logic(scene):
    """Slicer's markups logic on ``scene``: it makes each added markups node the active place list."""
    application = slicer_core.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    logic = slicer_core.vtkSlicerMarkupsLogic()
    logic.SetMRMLApplicationLogic(application)
    logic.SetMRMLScene(scene)
    return application, logic


def test_nodes_medDIFT_adds_do_not_become_the_active_place_list(scene):
    keep_alive = markups_logic(scene)  # noqa: F841
    selection = scene.GetNodeByID(nodes.SELECTION_NODE_ID)
    placing = add_fiducials(scene, [[0.0, 0.0, 0.0]], ["a"], name="user's list")
    assert selection.GetActivePlaceNodeID() == placing.GetID(), "Slicer's logic makes an added list active"
    _slice_views(scene)
    marker = cursor.show_cursor_match(scene, cursor.CursorMatch((1.0, 2.0, 3.0), 0.5))
    assert scene.IsNodePresent(marker) and marker.GetDisplayNode() is not None
    from MedDIFTLib.core.io import PointSet

    created = nodes.points_to_markups(scene, PointSet(np.zeros((1, 3)), ["a"], [""]))
    assert created.GetID() != placing.GetID()
    assert selection.GetActivePlaceNodeID() == placing.GetID(), "the user's place list stays active"


# ------------------------------------------------------------------------------------ fade and flicker


def test_fade_refuses_to_replace_the_moving_volumes_own_transform(scene):
    _slice_views(scene)
    fixed, moving, _ = pair_scene(scene)
    users = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user's")
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "output")
    moving.SetAndObserveTransformNodeID(users.GetID())
    with pytest.raises(BadInputError, match="already under the transform 'user's'"):
        overlays.show_fade(scene, fixed, moving, output, 0.5)
    assert moving.GetParentTransformNode() is users
    moving.SetAndObserveTransformNodeID(None)
    overlays.show_fade(scene, fixed, moving, output, 0.5)
    assert moving.GetParentTransformNode() is output


# ------------------------------------------------------------------------------------ one worker, runs and cursor


def poll_until_idle(worker_session) -> None:
    for _ in range(10_000):
        if not worker_session.poll():
            return
    raise AssertionError("the session never went idle")


def test_apply_during_a_cursor_match_waits_for_it_and_keeps_the_worker(scene):
    """A run started while the cursor's match is in flight neither cancels it nor kills the worker."""
    fixed, moving, landmarks = pair_scene(scene)
    client = FakeClient()
    worker_session = session.WorkerSession(scene, client_factory=lambda: client)
    inputs = scene_run.RunInputs(fixed, moving, landmarks)
    cursor_answers, run_answers = [], []
    try:
        worker_session.start_cursor_match(inputs, RunSettings(), (1.0, 2.0, 3.0),
                                          lambda outputs, error: cursor_answers.append(error))
        assert worker_session.worker_busy and not worker_session.run_in_progress
        worker_session.start_scene_run(inputs, RunSettings(),
                                       lambda outputs, error: run_answers.append((outputs, error)))
        assert worker_session.run_in_progress, "the panel shows Cancel for the waiting run"
        with pytest.raises(MedDIFTError, match="already in progress"):
            worker_session.start_scene_run(inputs, RunSettings(), lambda outputs, error: None)
        poll_until_idle(worker_session)
    finally:
        worker_session.shutdown()
    assert cursor_answers == [None], "the cursor match ends normally"
    outputs, error = run_answers[0]
    assert error is None and outputs.moving_landmarks.GetNumberOfControlPoints() == 2
    assert not client.killed


def test_cancel_of_a_run_waiting_for_the_cursor_drops_it_only(scene):
    fixed, moving, landmarks = pair_scene(scene)
    client = FakeClient()
    worker_session = session.WorkerSession(scene, client_factory=lambda: client)
    inputs = scene_run.RunInputs(fixed, moving, landmarks)
    cursor_answers, run_answers = [], []
    try:
        worker_session.start_cursor_match(inputs, RunSettings(), (1.0, 2.0, 3.0),
                                          lambda outputs, error: cursor_answers.append(error))
        worker_session.start_scene_run(inputs, RunSettings(), lambda outputs, error: run_answers.append(error))
        worker_session.cancel()
        assert isinstance(run_answers[0], CancelledError) and not worker_session.run_in_progress
        poll_until_idle(worker_session)
    finally:
        worker_session.shutdown()
    assert cursor_answers == [None] and not client.killed
    assert [request for request, _ in client.requests].count("match") == 1, "the dropped run sent nothing"


# ------------------------------------------------------------------------------------ lesion tracking in the scene


def test_tracking_leaks_no_image_and_leaves_no_colour_table(scene, tmp_path):
    import SimpleITK as sitk
    from test_lesions import GEOMETRY, ball, labelmap_volume, volume_node

    from MedDIFTLib.slicer import lesion_nodes as glue

    baseline = volume_node(scene, np.zeros(GEOMETRY.shape_kji, np.float32), GEOMETRY, name="baseline")
    labels = labelmap_volume([(ball(GEOMETRY, (-8, 0, 0), 4.0), 1)], GEOMETRY).voxels.astype(np.uint8)
    source = volume_node(scene, labels, GEOMETRY, "vtkMRMLLabelMapVolumeNode", "source")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
    assert slicer_core.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation)
    color_tables = scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems()
    segments = glue.write_baseline_lesions(scene, segmentation, baseline, tmp_path / "lesions.nii.gz")
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == color_tables, "no nodules_ColorTable"

    sitk.WriteImage(sitk.Cast(labelmap_volume([(labels == 1, 1)], GEOMETRY).to_sitk(), sitk.sitkUInt16),
                    str(tmp_path / "followup_lesions.nii.gz"))
    filled = glue.fill_followup_segmentation(scene, tmp_path / "followup_lesions.nii.gz", segments)
    segment = filled.GetSegmentation().GetNthSegment(0)
    image = segment.GetRepresentation(slicer_core.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    assert image.GetReferenceCount() == 2, "held by the segment and by this test only: nothing leaked"


# ------------------------------------------------------------------------------------ backbones in the panel


def test_panel_backbones_are_the_registrys_with_its_options_and_defaults():
    """The torch-free catalogue the panel reads names registered backbones, their weights need, and
    options each featurizer takes, with the featurizer's own defaults."""
    pytest.importorskip("torch")
    import inspect

    from MedDIFTLib.core.backbones import BODY_REGIONS, PANEL_BACKBONES, backbone_options
    from MedDIFTLib.features.maisi.config import BODY_REGIONS as MAISI_REGIONS
    from MedDIFTLib.features.registry import BACKBONES

    assert BODY_REGIONS == MAISI_REGIONS
    for backbone in PANEL_BACKBONES:
        spec = BACKBONES[backbone.name]
        assert spec.requires_weights == backbone.requires_weights, backbone.name
        parameters = inspect.signature(spec.featurizer_class()).parameters
        for option in backbone.options:
            assert parameters[option.name].default == option.default, (backbone.name, option.name)
    assert backbone_options("mind", {}, "/weights") == {}
    with pytest.raises(BadInputError, match="timestep"):
        backbone_options("maisi", {"timestep": 5000})
    assert backbone_options("maisi", {"top_region": "abdomen"}, "/weights") == {
        "timestep": 20, "top_region": "abdomen", "bottom_region": "chest", "weights_dir": "/weights"}
