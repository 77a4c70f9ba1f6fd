"""A lesion series in the Slicer scene (issue 29), on slicer-core's MRML: the series run's requests, the
follow-up segmentations on their volumes, the lesion table (a column per time point), the time-point
table (response and volumes), the growth chart's plot series and their table columns, and the jump to a
lesion at a time point. The worker is faked: its ``track_series`` result and labelmaps are made up here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_lesions import GEOMETRY, add_slice_views, ball, labelmap_volume, volume_node

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.core.io import write_volume
from MedDIFTLib.core.options import RunSettings, SeriesOptions
from MedDIFTLib.worker.protocol.requests import LoadRequest, TrackSeriesRequest
from MedDIFTLib.worker.protocol.results import LoadResult, SeriesVisit, TimePointResponse, TrackSeriesResult

slicer_core = pytest.importorskip("slicer_core", reason="slicer-core is not installed")

from MedDIFTLib.slicer import series_nodes  # noqa: E402
from MedDIFTLib.slicer.scene_run import WorkerFiles  # noqa: E402
from MedDIFTLib.slicer.series_run import SeriesInputs, series_steps  # noqa: E402
from MedDIFTLib.slicer.session import run_blocking  # noqa: E402

NAN3 = (math.nan,) * 3
# lesion 1 at LPS (-8, 0, 0) shrinks then grows; lesion 2 at (10, 5, 4) is gone from T1 on
CENTRES_LPS = {1: [(-8.0, 0.0, 0.0), (-7.0, 1.0, 0.0), (-6.0, 2.0, 1.0)], 2: [(10.0, 5.0, 4.0), NAN3, NAN3]}
VOLUMES_ML = {1: [0.27, 0.20, 0.52], 2: [0.11, 0.0, 0.0]}
DIAMETERS_MM = {1: [8.0, 6.4, 10.5], 2: [6.0, math.nan, math.nan]}
STATUSES = {1: ["ok", "ok", "ok"], 2: ["ok", "not_found", "not_found"]}
SCANS = ["baseline", "month 3", "month 6"]


def visit(label: int, time_point: int) -> SeriesVisit:
    return SeriesVisit(label, f"lesion {label}", time_point, SCANS[time_point], STATUSES[label][time_point], [],
                       label == 1, "" if time_point == 0 else "direct", CENTRES_LPS[label][time_point], 0.9, 0.5,
                       VOLUMES_ML[label][time_point], 0.0, DIAMETERS_MM[label][time_point], 3.0, 30.0, math.nan)


def fake_result(out_dir) -> TrackSeriesResult:
    """The result of a 2-follow-up series, and its follow-up labelmaps written in ``out_dir``."""
    files = {}
    for k in (1, 2):
        labels = labelmap_volume([(ball(GEOMETRY, CENTRES_LPS[1][k], 3.0 + k), 1)], GEOMETRY)
        files[f"labelmap_{k}"] = str(out_dir / f"followup_{k}_lesions.nii.gz")
        write_volume(labels, files[f"labelmap_{k}"])
    responses = [TimePointResponse(0, SCANS[0], 8.0, 0.0, 8.0, 0.0, None),
                 TimePointResponse(1, SCANS[1], 6.4, -20.0, 8.0, -20.0, "SD"),
                 TimePointResponse(2, SCANS[2], 10.5, 31.25, 6.4, 64.0, "PD")]
    visits = [visit(label, k) for label in (2, 1) for k in (2, 0, 1)]  # any order: sorted by the glue
    return TrackSeriesResult(files, SCANS, visits, responses, "auto")


class FakeWorker:
    """Answers a series run's typed requests: volume ids for loads, :func:`fake_result` for the series."""

    def __init__(self):
        self.requests = []

    def run(self, request, progress=None, timeout_s=None):
        self.requests.append(request)
        if isinstance(request, LoadRequest):
            return LoadResult(f"v{len(self.requests)}", request.path, GEOMETRY)
        assert isinstance(request, TrackSeriesRequest)
        Path(request.out_dir).mkdir(parents=True)
        return fake_result(Path(request.out_dir))


@pytest.fixture
def scene():
    return slicer_core.vtkMRMLScene()


def series_scene(scene):
    volumes = [volume_node(scene, np.full(GEOMETRY.shape_kji, n, np.float32), GEOMETRY, name=name)
               for n, name in enumerate(SCANS)]
    labels = labelmap_volume([(ball(GEOMETRY, CENTRES_LPS[1][0], 4.0), 1), (ball(GEOMETRY, CENTRES_LPS[2][0], 3.0), 2)],
                             GEOMETRY).voxels.astype(np.uint8)
    source = volume_node(scene, labels, GEOMETRY, "vtkMRMLLabelMapVolumeNode", "source")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
    assert slicer_core.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation)
    scene.RemoveNode(source)
    for index, (name, color) in enumerate([("nodule A", (1.0, 0.0, 0.0)), ("nodule B", (0.0, 0.0, 1.0))]):
        segmentation.GetSegmentation().GetNthSegment(index).SetName(name)
        segmentation.GetSegmentation().GetNthSegment(index).SetColor(*color)
    return volumes, segmentation


def slice_centre(slice_node):
    return [slice_node.GetSliceToRAS().GetElement(axis, 3) for axis in range(3)]


def column_names(table):
    return [table.GetColumnName(n) for n in range(table.GetNumberOfColumns())]


def test_series_run_fills_segmentations_tables_chart_and_jumps(scene, tmp_path):
    volumes, segmentation = series_scene(scene)
    worker = FakeWorker()
    inputs = SeriesInputs(volumes[0], volumes[1:], segmentation, dates=["20240105", "2024-04-04", None])
    series_options = SeriesOptions(route="direct")
    outputs = run_blocking(worker, series_steps(scene, inputs, RunSettings(backbone="mind", device="cpu"),
                                                WorkerFiles(tmp_path), series_options=series_options))

    loads = [request for request in worker.requests if isinstance(request, LoadRequest)]
    series_request = worker.requests[-1]
    assert len(loads) == 3 and len(worker.requests) == 4
    assert series_request.baseline_id == "v1" and series_request.followup_ids == ("v2", "v3")
    assert series_request.series_options == series_options
    assert series_request.lesions.endswith(".nii.gz") and not any(tmp_path.glob("lesions-*"))  # removed after

    # one follow-up segmentation per follow-up, on its volume, with the baseline segments' IDs, names, colours
    assert len(outputs.followup_lesions) == 2
    for k, node in enumerate(outputs.followup_lesions, start=1):
        assert node.IsA("vtkMRMLSegmentationNode") and node.GetName() == f"nodules T{k} {SCANS[k]}"
        assert node.GetNodeReference("MedDIFT.movingVolume") is volumes[k]
        tracked = node.GetSegmentation()
        ids = [tracked.GetNthSegmentID(n) for n in range(tracked.GetNumberOfSegments())]
        assert ids == [segment.segment_id for segment in outputs.segments]
        assert [tracked.GetSegment(i).GetName() for i in ids] == ["nodule A", "nodule B"]
        assert tuple(tracked.GetSegment(ids[1]).GetColor()) == (0.0, 0.0, 1.0)

    # dates: not all given, so no days; titles carry the dates that are known
    assert [(p.index, p.scan, p.date, p.days) for p in outputs.time_points] == [
        (0, "baseline", "2024-01-05", None), (1, "month 3", "2024-04-04", None), (2, "month 6", None, None)]
    table = outputs.table
    assert column_names(table) == ["lesion", "target",
                                   "T0 2024-01-05 volume (mL)", "T0 2024-01-05 diameter (mm)", "T0 2024-01-05 status",
                                   "T1 2024-04-04 volume (mL)", "T1 2024-04-04 diameter (mm)", "T1 2024-04-04 status",
                                   "T2 volume (mL)", "T2 diameter (mm)", "T2 status"]
    assert table.GetNumberOfRows() == 2
    assert [table.GetCellText(0, n) for n in range(11)] == ["nodule B", "no", "0.110", "6.0", "ok", "0.000", "",
                                                            "not_found", "0.000", "", "not_found"]
    assert [table.GetCellText(1, n) for n in (0, 1, 2, 5, 8, 9)] == ["nodule A", "yes", "0.270", "0.200", "0.520",
                                                                       "10.5"]

    by_time = outputs.time_point_table
    assert column_names(by_time) == [*series_nodes.TIME_POINT_COLUMNS, "volume L2 (mL)", "volume L1 (mL)"]
    assert by_time.GetNumberOfRows() == 3
    assert [by_time.GetCellText(k, 7) for k in range(3)] == ["", "SD", "PD"]
    data = by_time.GetTable()
    assert [data.GetValueByName(k, "SLD (mm)").ToDouble() for k in range(3)] == [8.0, 6.4, 10.5]
    assert [data.GetValueByName(k, "volume L1 (mL)").ToDouble() for k in range(3)] == [0.27, 0.20, 0.52]
    assert all(math.isnan(data.GetValueByName(k, "days").ToDouble()) for k in range(3))

    chart = outputs.chart
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(n) for n in range(2)]
    assert [s.GetName() for s in series] == ["nodule B", "nodule A"]
    assert all(s.GetTableNode() is by_time and s.GetXColumnName() == "time point" for s in series)
    assert [s.GetYColumnName() for s in series] == ["volume L2 (mL)", "volume L1 (mL)"]
    assert tuple(series[1].GetColor()) == (1.0, 0.0, 0.0)
    assert series[0].GetPlotType() == series[0].PlotTypeScatter

    views = add_slice_views(scene)
    nodule_a = outputs.lesions[1]
    series_nodes.jump_to_lesion_at(scene, nodule_a, 2, volumes)
    assert views["Yellow composite"].GetBackgroundVolumeID() == volumes[2].GetID()
    assert views["Red composite"].GetBackgroundVolumeID() == volumes[0].GetID()
    assert slice_centre(views["Red"]) == pytest.approx([8.0, 0.0, 0.0])
    assert slice_centre(views["Yellow"]) == pytest.approx([6.0, -2.0, 1.0])
    series_nodes.jump_to_lesion_at(scene, outputs.lesions[0], 1, volumes)  # nodule B gone at T1: Yellow stays
    assert views["Yellow composite"].GetBackgroundVolumeID() == volumes[1].GetID()
    assert slice_centre(views["Yellow"]) == pytest.approx([6.0, -2.0, 1.0])
    assert slice_centre(views["Red"]) == pytest.approx([-10.0, -5.0, 4.0])
    with pytest.raises(BadInputError, match="time point 3"):
        series_nodes.jump_to_lesion_at(scene, nodule_a, 3, volumes)


def test_a_rerun_with_dates_fills_the_same_nodes_and_plots_over_days(scene, tmp_path):
    volumes, segmentation = series_scene(scene)
    settings = RunSettings(backbone="mind", device="cpu")
    folder = WorkerFiles(tmp_path)
    first = run_blocking(FakeWorker(), series_steps(scene, SeriesInputs(volumes[0], volumes[1:], segmentation),
                                                    settings, folder))
    assert first.chart.GetXAxisTitle() == "time point (0 = baseline)"
    inputs = SeriesInputs(volumes[0], volumes[1:], segmentation, ["2024-01-05", "2024-04-04", "2024-07-03"],
                          first.table, first.time_point_table, first.chart)
    plot_series_before = scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems()
    again = run_blocking(FakeWorker(), series_steps(scene, inputs, settings, folder))
    assert (again.table, again.time_point_table, again.chart) == (first.table, first.time_point_table, first.chart)
    assert scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == plot_series_before == 2
    assert again.table.GetNumberOfRows() == 2 and again.time_point_table.GetNumberOfRows() == 3
    assert [p.days for p in again.time_points] == [0.0, 90.0, 180.0]
    data = again.time_point_table.GetTable()
    assert [data.GetValueByName(k, "days").ToDouble() for k in range(3)] == [0.0, 90.0, 180.0]
    assert again.chart.GetNthPlotSeriesNode(0).GetXColumnName() == "days"
    assert again.chart.GetXAxisTitle() == "days since baseline"


@pytest.mark.parametrize(("change", "message"), [
    (lambda v, s: SeriesInputs(v[0], [], s), "one or more follow-up"),
    (lambda v, s: SeriesInputs(v[0], [v[1], v[1]], s), "all be different"),
    (lambda v, s: SeriesInputs(v[0], v[1:], None), "baseline lesions"),
    (lambda v, s: SeriesInputs(v[0], v[1:], s, ["2024-05-01", "2024-04-01", None]), "scan order"),
    (lambda v, s: SeriesInputs(v[0], v[1:], s, ["2024-05-01", None]), "2 dates for 3 scans"),
    (lambda v, s: SeriesInputs(v[0], v[1:], s, ["May 2024", None, None]), "not a date"),
    (lambda v, s: SeriesInputs(v[0], v[1:], s, chart=v[1]), "not a plot chart"),
])
def test_series_run_rejects_bad_inputs_before_any_request(scene, tmp_path, change, message):
    volumes, segmentation = series_scene(scene)
    with pytest.raises(BadInputError, match=message):
        series_steps(scene, change(volumes, segmentation), RunSettings(), WorkerFiles(tmp_path))


class FakeDicomDatabase:
    def __init__(self, values):
        self.values = values

    def instanceValue(self, uid, tag):  # noqa: N802 (ctkDICOMDatabase's name)
        return self.values.get((uid, tag), "")


def test_dicom_date_prefers_the_acquisition_date_of_the_first_instance(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    database = FakeDicomDatabase({("1.2.3", "0008,0020"): "20240101", ("1.2.3", "0008,0022"): "20240102",
                                  ("4.5", "0008,0020"): "20230101"})
    assert series_nodes.dicom_date(node, database) is None  # not loaded from DICOM
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    assert series_nodes.dicom_date(node, database) == "20240102"
    node.SetAttribute("DICOM.instanceUIDs", "4.5")
    assert series_nodes.dicom_date(node, database) == "20230101"


def test_a_real_series_through_the_worker_session(scene, tmp_path):
    """Baseline and two follow-ups of test_lesion_series's series through the worker process: lesion 1
    shrinks (PR, PR), lesion 2 is gone from T1 on; the scene gets what the worker measured."""
    from test_lesion_series import truth, write_series
    from test_worker_track import FAST_FIELD, TIMEOUT_S

    from MedDIFTLib.core.io import read_volume
    from MedDIFTLib.core.options import FieldOptions, parse_options
    from MedDIFTLib.slicer.lesion_nodes import write_baseline_lesions
    from MedDIFTLib.slicer.session import WorkerSession

    scans, lesions_path = write_series(tmp_path)
    volumes = [volume_node(scene, read_volume(path).voxels, GEOMETRY, name=f"scan{t}")
               for t, path in enumerate(scans[:3])]
    source = volume_node(scene, read_volume(lesions_path).voxels.astype(np.uint8), GEOMETRY,
                         "vtkMRMLLabelMapVolumeNode", "source")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
    assert slicer_core.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, segmentation)
    scene.RemoveNode(source)
    settings = RunSettings(backbone="mind", device="cpu", field=parse_options(FieldOptions, FAST_FIELD))
    session = WorkerSession(scene)
    try:
        outputs = session.run_series(SeriesInputs(volumes[0], volumes[1:], segmentation), settings,
                                     series_options=SeriesOptions(route="chained"), timeout_s=TIMEOUT_S)
    finally:
        session.shutdown()
    assert [point.scan for point in outputs.time_points] == ["scan0", "scan1", "scan2"]  # node names
    assert [outputs.time_point_table.GetCellText(k, 7) for k in range(3)] == ["", "PR", "PR"]
    assert outputs.table.GetNumberOfRows() == 3 and outputs.chart.GetNumberOfPlotSeriesNodes() == 3
    statuses = [outputs.table.GetCellText(1, 3 * k + 4) for k in range(3)]
    assert statuses[0] == "ok" and all(status.startswith("not_found") for status in statuses[1:])
    first = outputs.lesions[0]
    for k in (1, 2):
        centre, _ = truth(k, 0)
        assert first.centre_ras(k) == pytest.approx(tuple(centre * [-1, -1, 1]), abs=1.5)
    assert outputs.followup_lesions[1].GetSegmentation().GetNumberOfSegments() == 3
    write_baseline_lesions(scene, outputs.followup_lesions[1], volumes[2], tmp_path / "check.nii.gz")
    exported = read_volume(tmp_path / "check.nii.gz").voxels  # the worker's folder went with the session
    assert (exported == 1)[ball(GEOMETRY, *truth(2, 0))].mean() > 0.8 and not (exported == 2).any()


def test_panel_scans_keep_scan_order_and_dates_and_make_the_inputs(scene, tmp_path):
    """The panel's further follow-ups: added once, moved, removed, forgotten with their node; typed dates win
    over DICOM dates; the inputs fill the previous run's tables and chart while they are in the scene."""
    from MedDIFTLib.slicer.series_run import SeriesScans

    volumes, segmentation = series_scene(scene)
    extra = [volume_node(scene, np.zeros(GEOMETRY.shape_kji, np.float32), GEOMETRY, name=f"extra {n}")
             for n in range(2)]
    scans = SeriesScans()
    assert not scans.add(None)
    for node in (volumes[2], *extra):
        assert scans.add(node)
    assert not scans.add(extra[0]), "listed once"
    assert scans.move(2, -5) == 0 and scans.move(0, 1) == 1 and scans.move(7, 1) == 7
    assert scans.followups(scene) == [volumes[2], extra[1], extra[0]]
    scans.remove(2)
    scene.RemoveNode(extra[1])
    scans.set_date(volumes[2], "2024-07-01")
    scans.set_date(extra[1], "2024-08-01")
    scans.forget_missing(scene)
    assert scans.followup_ids == [volumes[2].GetID()] and list(scans.dates) == [volumes[2].GetID()]

    database = FakeDicomDatabase({("1.2.3", "0008,0022"): "20240102", ("1.2.4", "0008,0022"): "20240402"})
    volumes[0].SetAttribute("DICOM.instanceUIDs", "1.2.3")
    volumes[1].SetAttribute("DICOM.instanceUIDs", "1.2.4")
    scans.set_date(volumes[1], "2024-04-01")
    assert [scans.date(volume, database) for volume in volumes] == ["20240102", "2024-04-01", "2024-07-01"]
    assert scans.date(volumes[0]) == "", "no database: no DICOM date"
    scans.set_date(volumes[1], " ")
    assert scans.date(volumes[1], database) == "20240402", "an emptied date falls back to DICOM"

    inputs = scans.inputs(scene, volumes[0], volumes[1], segmentation, database)
    assert inputs.followup_volumes == volumes[1:] and inputs.dates == ["20240102", "20240402", "2024-07-01"]
    assert (inputs.table, inputs.time_point_table, inputs.chart) == (None, None, None)
    assert SeriesScans().inputs(scene, volumes[0], volumes[1], segmentation).dates is None

    outputs = run_blocking(FakeWorker(), series_steps(scene, inputs, RunSettings(), WorkerFiles(tmp_path)))
    scene.RemoveNode(outputs.time_point_table)
    again = scans.inputs(scene, volumes[0], volumes[1], segmentation, database, outputs)
    assert again.table is outputs.table and again.chart is outputs.chart and again.time_point_table is None

    cells = series_nodes.series_cells(outputs.lesions, series_nodes.series_responses(outputs.summary))
    assert cells[0] == ["nodule B", "0.110", "0.000 not_found", "0.000 not_found"]
    assert cells[1] == ["nodule A", "0.270", "0.200", "0.520"]
    assert cells[2] == ["response", "SLD 8.0 mm", "SD SLD 6.4 mm", "PD SLD 10.5 mm"]
