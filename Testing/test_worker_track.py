"""Lesion tracking through the background worker: the ``track`` request parsed, run end to end on a
small synthetic pair (the files of ``meddift track``, progress, the feature cache, cancel), the
``track_series`` request on the 4-scan series of test_lesion_series (its files and typed rows, each
scan's features once, bad input, cancel between pairs), and the Slicer layer's tracking job on
slicer-core's real segmentation nodes through a worker session."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from test_lesion_series import assert_series_outputs, write_series
from test_lesions import (
    GEOMETRY,
    TRACK_NODULES,
    TRACK_SHIFT_LPS,
    ball,
    labelmap_volume,
    volume_node,
    write_tracking_pair,
)

from MedDIFTLib.core.errors import BadInputError, BadRequestError, CancelledError
from MedDIFTLib.core.io import Volume, read_volume, write_volume
from MedDIFTLib.core.options import FieldOptions, LesionOptions, RunSettings, SeriesOptions, parse_options
from MedDIFTLib.lesions.outputs import CSV_COLUMNS, FILES
from MedDIFTLib.lesions.series_outputs import series_output_paths
from MedDIFTLib.worker.client import WorkerClient
from MedDIFTLib.worker.events import Error, Progress, Result
from MedDIFTLib.worker.protocol.requests import TrackRequest, TrackSeriesRequest, encode_request, parse_request
from MedDIFTLib.worker.protocol.results import parse_result

TIMEOUT_S = 120
NODULES, SHIFT_LPS = TRACK_NODULES, TRACK_SHIFT_LPS
FAST_FIELD = {"levels": [{"spacing_mm": 8.0, "search_radius_mm": 12.0}], "optimise_iterations": 0}


# ---------------------------------------------------------------------------------------------
# The request


def test_track_request_parses_ids_paths_and_both_option_sets():
    request = parse_request("track", {
        "baseline_id": "v1", "followup_id": "v2", "lesions": "lesions.nii.gz", "out_dir": "out",
        "options": {"refine": False, "confidence_threshold": 0.3}, "field_options": {"optimise_iterations": 0},
        "backbone": "mind", "device": "cpu"})
    assert isinstance(request, TrackRequest)
    assert (request.baseline_id, request.followup_id, request.lesions, request.out_dir) == (
        "v1", "v2", "lesions.nii.gz", "out")
    assert request.lesion_options == LesionOptions(refine=False, confidence_threshold=0.3)
    assert request.settings.field == FieldOptions(optimise_iterations=0)
    assert (request.settings.backbone, request.settings.device) == ("mind", "cpu")
    defaults = parse_request("track", {"baseline_id": "v1", "followup_id": "v2", "lesions": "l.csv", "out_dir": "o"})
    assert defaults.lesion_options == LesionOptions() and defaults.settings.field == FieldOptions()


@pytest.mark.parametrize("changes, error_class, words", [
    ({"lesions": None}, BadRequestError, "lesions"),
    ({"out_dir": ""}, BadRequestError, "out_dir"),
    ({"followup_id": 3}, BadRequestError, "followup_id"),
    ({"options": {"radius": 1}}, BadRequestError, "radius"),
    ({"options": {"confidence_threshold": 2}}, BadInputError, "confidence_threshold"),
    ({"field_options": {"inverse_spacing_mm": 0}}, BadInputError, "inverse_spacing"),
])
def test_bad_track_fields_name_the_field(changes, error_class, words):
    fields = {"baseline_id": "v1", "followup_id": "v2", "lesions": "l.nii.gz", "out_dir": "o", **changes}
    with pytest.raises(BadInputError) as raised:
        parse_request("track", fields)
    assert type(raised.value) is error_class and words in str(raised.value)


# ---------------------------------------------------------------------------------------------
# The worker, end to end


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The tracking pair of test_lesions.write_tracking_pair (two nodules, moved by TRACK_SHIFT_LPS)."""
    return write_tracking_pair(tmp_path_factory.mktemp("track_pair"))


@pytest.fixture(scope="module")
def worker(files):
    client = WorkerClient()
    client.start(timeout=TIMEOUT_S)
    ids = {"baseline_id": client.call("load", path=files["baseline"], timeout=TIMEOUT_S)["volume_id"],
           "followup_id": client.call("load", path=files["followup"], timeout=TIMEOUT_S)["volume_id"]}
    yield client, ids
    assert client.stop() == 0, client.stderr_tail()


def _track(ids: dict, lesions: str, out_dir, **extra) -> dict:
    return {**ids, "lesions": lesions, "out_dir": str(out_dir), "backbone": "mind", "device": "cpu",
            "field_options": FAST_FIELD, **extra}


def test_track_writes_the_files_of_meddift_track_and_reuses_the_features(worker, files, tmp_path):
    client, ids = worker
    stages = []
    result = client.call("track", progress=lambda stage, fraction, message: stages.append((stage, fraction)),
                         timeout=TIMEOUT_S, **_track(ids, files["lesions"], tmp_path / "out"))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(FILES.values())
    assert result["files"] == {key: str(tmp_path / "out" / name) for key, name in FILES.items()}
    assert [lesion["label"] for lesion in result["lesions"]] == [1, 2]
    for lesion, (centre, _) in zip(result["lesions"], NODULES):
        assert lesion["status"] == "ok" and lesion["flags"] == []
        assert np.linalg.norm(np.asarray(lesion["centre_lps_mm"]) - (np.asarray(centre) + SHIFT_LPS)) < 1.5
    with (tmp_path / "out" / "lesions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS and [row["status"] for row in rows] == ["ok", "ok"]
    for lesion, row in zip(parse_result("track", result).lesions, rows, strict=True):
        assert lesion.label == int(row["label"])
        for name in ("confidence", "volume_change_pct", "diameter_baseline_mm", "diameter_followup_mm"):
            assert getattr(lesion, name) == pytest.approx(float(row[name]), abs=0.051), name
    followup_labels = read_volume(tmp_path / "out" / "followup_lesions.nii.gz")
    assert followup_labels.geometry.same_grid(GEOMETRY) and set(np.unique(followup_labels.voxels)) == {0, 1, 2}
    assert result["features_cached"] is False and {"features", "match", "track"} <= {s for s, _ in stages}
    fractions = [fraction for stage, fraction in stages if stage == "track"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0

    points = tmp_path / "points.csv"
    points.write_text("label,l,p,s\nA,-7.0,1.0,0.0\nB,10.0,4.0,4.0\n", encoding="utf-8")
    again = client.call("track", timeout=TIMEOUT_S, **_track(ids, str(points), tmp_path / "from_points",
                                                             options={"refine": False}))
    assert again["features_cached"] is True
    assert [(lesion["label"], lesion["name"]) for lesion in again["lesions"]] == [(1, "A"), (2, "B")]


def test_track_refuses_bad_lesions_before_any_output_and_serves_on(worker, files, tmp_path):
    client, ids = worker
    bad = labelmap_volume([(ball(GEOMETRY, (0, 0, 0), 3.0), 0.5)], GEOMETRY)
    write_volume(bad, tmp_path / "bad.nii.gz")
    with pytest.raises(BadInputError, match="integers"):
        client.call("track", timeout=TIMEOUT_S, **_track(ids, str(tmp_path / "bad.nii.gz"), tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    with pytest.raises(BadInputError, match="baseline_id"):
        client.call("track", timeout=TIMEOUT_S, **_track({**ids, "baseline_id": "nope"}, files["lesions"],
                                                         tmp_path / "none"))
    assert client.call("probe", timeout=TIMEOUT_S)["volumes"]


def test_cancel_stops_a_track_job_and_writes_nothing(worker, files, tmp_path):
    client, ids = worker
    slow = {"levels": [{"spacing_mm": 3.0, "search_radius_mm": 12.0}], "optimise_iterations": 200}
    request_id = client.send("track", **_track(ids, files["lesions"], tmp_path / "out", field_options=slow))
    client.cancel(request_id)
    final = next(event for event in client.events(request_id, TIMEOUT_S) if isinstance(event, (Result, Error)))
    assert isinstance(final, Error) and final.kind == CancelledError.kind
    assert not (tmp_path / "out" / "lesions.csv").exists()


# ---------------------------------------------------------------------------------------------
# A series of scans


def test_track_series_request_takes_one_or_more_followups_and_the_series_options():
    fields = {"baseline_id": "v1", "followup_ids": ["v2", "v3"], "lesions": "l.nii.gz", "out_dir": "o",
              "series_options": {"route": "direct", "max_targets": 2}, "field_options": {"optimise_iterations": 0}}
    request = parse_request("track_series", fields)
    assert isinstance(request, TrackSeriesRequest) and request.followup_ids == ("v2", "v3")
    assert request.series_options == SeriesOptions(route="direct", max_targets=2)
    assert request.settings.field == FieldOptions(optimise_iterations=0) and request.lesion_options == LesionOptions()
    assert parse_request("track_series", {**fields, "followup_ids": ["v2"]}).followup_ids == ("v2",)
    for followups in ([], "v2", ["v2", ""], ["v2", 3], None):
        with pytest.raises(BadRequestError, match="'followup_ids' must be a list of one or more volume ids"):
            parse_request("track_series", {**fields, "followup_ids": followups})
    with pytest.raises(BadInputError, match="route"):
        parse_request("track_series", {**fields, "series_options": {"route": "sideways"}})


@pytest.fixture(scope="module")
def series(worker, tmp_path_factory) -> tuple[TrackSeriesRequest, str]:
    """The 4-scan series loaded into the worker, as a chained track_series request (out_dir to set)."""
    client, _ = worker
    scans, lesions = write_series(tmp_path_factory.mktemp("series"))
    ids = [client.call("load", path=path, timeout=TIMEOUT_S)["volume_id"] for path in scans]
    settings = RunSettings(backbone="mind", device="cpu", field=parse_options(FieldOptions, FAST_FIELD))
    return TrackSeriesRequest(ids[0], tuple(ids[1:]), lesions, "", LesionOptions(), SeriesOptions(route="chained"),
                              settings), scans


def test_a_series_through_the_worker_writes_the_series_files_and_typed_rows(worker, series, tmp_path):
    client, _ = worker
    request, scans = series
    out = tmp_path / "series"
    result = client.run(dataclasses.replace(request, out_dir=str(out)), timeout=TIMEOUT_S)
    rows, responses = assert_series_outputs(out, "chained")
    assert result.files == {key: str(path) for key, path in series_output_paths(out, 3).items()}
    assert result.scans == [f"scan{t}.nii.gz" for t in range(4)] and result.route == "chained"
    assert [(visit.label, visit.time_point) for visit in result.visits] == [(int(row["label"]), int(row["time_point"]))
                                                                            for row in rows]
    for visit, row in zip(result.visits, rows, strict=True):
        assert (visit.scan, visit.status, visit.route, int(visit.target)) == (row["scan"], row["status"],
                                                                              row["route"], int(row["target"]))
        assert visit.volume_ml == pytest.approx(float(row["volume_ml"]), abs=1e-4)
        assert visit.centre_lps_mm == pytest.approx([float(row[axis]) for axis in "lps"], abs=1e-3)
    assert [response.category for response in result.responses] == [None, "PR", "PR", "PD"]
    assert [response.sld_mm for response in result.responses] == pytest.approx(
        [float(row["sld_mm"]) for row in responses], abs=0.01)
    # each scan's features extracted once, and kept in the worker's cache for the next job
    assert result.features_cached is False
    cached = [entry["volume"] for entry in client.call("probe", timeout=TIMEOUT_S)["cache"]["entries"]]
    assert sorted(name for name in cached if name.startswith("scan")) == [f"scan{t}.nii.gz" for t in range(4)]


def test_a_bad_series_is_refused_before_any_output_and_a_cancel_stops_it_between_pairs(worker, series, tmp_path):
    client, _ = worker
    request, _ = series
    out = tmp_path / "out"
    unknown = dataclasses.replace(request, followup_ids=(*request.followup_ids[:2], "v99"), out_dir=str(out))
    with pytest.raises(BadRequestError, match=r"followup_ids\[2\]: unknown volume id 'v99'"):
        client.run(unknown, timeout=TIMEOUT_S)
    mri = client.call("load", path=write_mri(tmp_path), timeout=TIMEOUT_S)["volume_id"]
    with pytest.raises(BadInputError, match="another modality"):
        client.run(dataclasses.replace(request, followup_ids=(request.followup_ids[0], mri), out_dir=str(out)),
                   timeout=TIMEOUT_S)
    with pytest.raises(BadRequestError, match="'followup_ids' must be a list of one or more"):
        client.call("track_series", timeout=TIMEOUT_S, baseline_id=request.baseline_id, followup_ids=[],
                    lesions=request.lesions, out_dir=str(out))
    assert not out.exists()

    request_type, fields = encode_request(dataclasses.replace(request, out_dir=str(out)))
    job = client.send(request_type, **fields)
    events = client.events(job, TIMEOUT_S)
    for event in events:  # follow-up 1 done: the job is in its second pair
        if isinstance(event, Progress) and event.fraction > 0.4:
            client.cancel(job)
            break
    final = list(events)[-1]
    assert isinstance(final, Error) and final.kind == CancelledError.kind
    assert not out.exists() or not any(out.iterdir())


def write_mri(folder) -> str:
    """A volume of the series' grid that is not a CT in HU, written to ``folder``; its path."""
    path = str(folder / "mri.nii.gz")
    write_volume(Volume(np.full(GEOMETRY.shape_kji, 300.0, np.float32), GEOMETRY, "mri"), path)
    return path


# ---------------------------------------------------------------------------------------------
# The Slicer job on slicer-core's segmentation nodes


def test_slicer_track_job_fills_the_followup_segmentation_in_place_and_the_table(files):
    slicer_core = pytest.importorskip("slicer_core", reason="slicer-core is not installed")
    from MedDIFTLib.slicer import lesion_nodes as glue
    from MedDIFTLib.slicer.session import WorkerSession
    from MedDIFTLib.slicer.track_run import TrackInputs

    scene = slicer_core.vtkMRMLScene()
    baseline = read_volume(files["baseline"])
    followup = read_volume(files["followup"])
    baseline_node = volume_node(scene, baseline.voxels, GEOMETRY, name="baseline")
    followup_node = volume_node(scene, followup.voxels, GEOMETRY, name="follow-up")
    labels = read_volume(files["lesions"]).voxels.astype(np.uint8)
    source = volume_node(scene, labels, GEOMETRY, "vtkMRMLLabelMapVolumeNode", "source")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
    assert slicer_core.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation)
    scene.RemoveNode(source)
    for index, name in enumerate(("nodule A", "nodule B")):
        segmentation.GetSegmentation().GetNthSegment(index).SetName(name)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my follow-up")
    output.GetSegmentation().AddEmptySegment("old", "old", [0.5, 0.5, 0.5])

    settings = RunSettings(backbone="mind", device="cpu", field=parse_options(FieldOptions, FAST_FIELD))
    session = WorkerSession(scene)
    try:
        inputs = TrackInputs(baseline_node, followup_node, segmentation, followup_lesions=output)
        with pytest.raises(BadInputError, match="another node"):
            session.run_track(TrackInputs(baseline_node, followup_node, segmentation, segmentation), settings)
        stages = []
        outputs = session.run_track(inputs, settings, progress=lambda stage, fraction, message: stages.append(stage),
                                    timeout_s=TIMEOUT_S)
    finally:
        session.shutdown()
    assert outputs.followup_lesions is output and "track" in stages
    tracked = output.GetSegmentation()
    ids = [tracked.GetNthSegmentID(n) for n in range(tracked.GetNumberOfSegments())]
    assert ids == [segment.segment_id for segment in outputs.segments]
    assert [tracked.GetSegment(segment_id).GetName() for segment_id in ids] == ["nodule A", "nodule B"]
    assert [row.status for row in outputs.rows] == ["ok", "ok"]
    assert outputs.rows[0].followup_ras == pytest.approx(tuple(((np.asarray(NODULES[0][0]) + SHIFT_LPS)
                                                                 * [-1, -1, 1]).tolist()), abs=1.5)
    assert outputs.table.GetNumberOfRows() == 2 and outputs.table.GetCellText(0, 0) == "nodule A"
    again = glue.write_baseline_lesions(scene, output, followup_node, files["followup"] + ".check.nii.gz")
    exported = read_volume(files["followup"] + ".check.nii.gz").voxels
    expected = ball(GEOMETRY, np.asarray(NODULES[0][0]) + SHIFT_LPS, NODULES[0][1])
    assert [segment.name for segment in again] == ["nodule A", "nodule B"]
    assert (exported == 1)[expected].mean() > 0.8
