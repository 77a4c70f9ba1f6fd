"""Lesion tracking over a series of scene volumes, as worker steps like :func:`~.track_run.track_steps` (torch-free).

:func:`series_steps` checks its inputs at once, then: the baseline and every follow-up volume node
(in scan order) are loaded into the worker, the baseline lesions are written as the ``--lesions`` file,
the worker's ``track_series`` request writes the files of ``meddift track`` over a series, and only then
is the scene filled: one follow-up segmentation node per follow-up (on its volume, same segment IDs,
names and colours), the lesion table (a column per time point), the time-point table (response, one
volume column per lesion) and the growth chart (:mod:`.series_nodes`). A failed or cancelled run adds nothing.

Dates are the user's strings (one per scan, baseline first; None or "" when unknown); in Slicer,
:func:`~.series_nodes.dicom_date` reads them from the DICOM database for volumes loaded from DICOM.
:class:`SeriesScans` is the panel's list of further follow-ups and typed dates, and makes the :class:`SeriesInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import BadInputError
from ..core.options import LesionOptions, RunSettings, SeriesOptions
from ..worker.protocol.requests import TrackSeriesRequest
from ..worker.protocol.results import TrackSeriesResult
from .lesion_nodes import LesionSegment, fill_followup_segmentation
from .nodes import node_label, set_input_references
from .scene_run import Steps, WorkerFiles, request_settings
from .series_nodes import (
    SeriesLesion,
    TimePoint,
    dicom_date,
    fill_growth_chart,
    fill_series_table,
    fill_time_point_table,
    series_lesions,
    series_responses,
    time_points,
)
from .track_run import check_baseline_lesions, check_table_node, write_lesions_file


@dataclass
class SeriesInputs:
    """Scene nodes of one series run: the baseline volume, the follow-up volumes in scan order, the
    baseline lesions (segmentation or markups node), the scans' dates (baseline first; None: unknown)
    and the output nodes to fill in place (None: created)."""

    baseline_volume: Any
    followup_volumes: list[Any]
    baseline_lesions: Any
    dates: list[str | None] | None = None
    table: Any = None
    time_point_table: Any = None
    chart: Any = None


@dataclass
class SeriesOutputs:
    """What a run put into the scene: a follow-up segmentation per follow-up, the two tables and the
    chart; the lesions (with their visits), the time points, the typed result and the job's files."""

    followup_lesions: list[Any] = field(default_factory=list)
    table: Any = None
    time_point_table: Any = None
    chart: Any = None
    lesions: list[SeriesLesion] = field(default_factory=list)
    time_points: list[TimePoint] = field(default_factory=list)
    segments: list[LesionSegment] = field(default_factory=list)
    summary: TrackSeriesResult | None = None
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class SeriesScans:
    """The panel's further follow-ups (volume node IDs in scan order, after the first follow-up) and the
    dates typed for scans (by node ID); a scan without a typed date takes its DICOM date when it has one."""

    followup_ids: list[str] = field(default_factory=list)
    dates: dict[str, str] = field(default_factory=dict)

    def add(self, node) -> bool:
        """Append ``node`` as the last follow-up; False (nothing added) for None or a node already listed."""
        if node is None or node.GetID() in self.followup_ids:
            return False
        self.followup_ids.append(node.GetID())
        return True

    def remove(self, index: int) -> None:
        if 0 <= index < len(self.followup_ids):
            del self.followup_ids[index]

    def move(self, index: int, step: int) -> int:
        """Move follow-up ``index`` by ``step`` places (clamped); returns its new index."""
        if not 0 <= index < len(self.followup_ids):
            return index
        target = min(max(index + step, 0), len(self.followup_ids) - 1)
        self.followup_ids.insert(target, self.followup_ids.pop(index))
        return target

    def forget_missing(self, scene) -> None:
        """Drop the follow-ups and dates of nodes no longer in ``scene``."""
        self.followup_ids = [node_id for node_id in self.followup_ids if scene.GetNodeByID(node_id) is not None]
        self.dates = {node_id: date for node_id, date in self.dates.items() if scene.GetNodeByID(node_id) is not None}

    def clear(self) -> None:
        self.followup_ids.clear()
        self.dates.clear()

    def followups(self, scene) -> list[Any]:
        """The further follow-up nodes still in ``scene``, in scan order."""
        nodes = [scene.GetNodeByID(node_id) for node_id in self.followup_ids]
        return [node for node in nodes if node is not None]

    def set_date(self, node, text: str) -> None:
        """The date typed for ``node`` ("" forgets it: the DICOM date, if any, is used again)."""
        if node is None:
            return
        if text.strip():
            self.dates[node.GetID()] = text.strip()
        else:
            self.dates.pop(node.GetID(), None)

    def date(self, node, database=None) -> str:
        """The date typed for ``node``, else its DICOM date from ``database`` (Slicer's ``slicer.dicomDatabase``;
        None: none), else ""."""
        if node is None:
            return ""
        typed = self.dates.get(node.GetID())
        if typed:
            return typed
        return (dicom_date(node, database) if database is not None else None) or ""

    def inputs(self, scene, baseline, first_followup, lesions, database=None, previous: SeriesOutputs | None = None
               ) -> SeriesInputs:
        """The series run of ``baseline``, ``first_followup`` and the further follow-ups, with their dates (None
        when no scan has one), filling the tables and chart of ``previous`` when they are still in ``scene``."""
        volumes = [baseline, first_followup, *self.followups(scene)]
        dates = [self.date(volume, database) or None for volume in volumes]

        def kept(node):
            return node if node is not None and scene.IsNodePresent(node) else None

        return SeriesInputs(baseline, volumes[1:], lesions, dates if any(dates) else None,
                            table=kept(previous.table) if previous else None,
                            time_point_table=kept(previous.time_point_table) if previous else None,
                            chart=kept(previous.chart) if previous else None)


def _check(inputs: SeriesInputs) -> None:
    volumes = [inputs.baseline_volume, *inputs.followup_volumes]
    if inputs.baseline_volume is None or not inputs.followup_volumes or any(v is None for v in volumes):
        raise BadInputError("choose the baseline volume and one or more follow-up volumes, in scan order")
    if len({id(volume) for volume in volumes}) != len(volumes):
        raise BadInputError("the baseline and follow-up volumes must all be different nodes")
    check_baseline_lesions(inputs.baseline_lesions)
    check_table_node(inputs.table)
    check_table_node(inputs.time_point_table)
    if inputs.chart is not None and not inputs.chart.IsA("vtkMRMLPlotChartNode"):
        raise BadInputError(f"{node_label(inputs.chart)} is not a plot chart node")
    time_points([volume.GetName() or "" for volume in volumes], inputs.dates)  # refuses bad dates now


def series_steps(scene, inputs: SeriesInputs, settings: RunSettings, folder: WorkerFiles,
                 options: LesionOptions | None = None, series_options: SeriesOptions | None = None) -> Steps:
    """Check ``inputs`` now (raising :class:`BadInputError`), then return the run's steps; drive them
    with :func:`~.session.run_blocking` or a session. ``settings.field`` is the registration."""
    if not isinstance(settings, RunSettings):
        raise BadInputError(f"run settings must be a RunSettings, got {type(settings).__name__}")
    _check(inputs)
    return _series(scene, inputs, settings, folder, options or LesionOptions(), series_options or SeriesOptions())


def _series(scene, inputs: SeriesInputs, settings: RunSettings, folder: WorkerFiles, options: LesionOptions,
            series_options: SeriesOptions) -> Steps:
    baseline_id = yield from folder.volume_id(inputs.baseline_volume)
    followup_ids = []
    for volume in inputs.followup_volumes:
        followup_ids.append((yield from folder.volume_id(volume)))
    lesions_path, segments = write_lesions_file(scene, inputs.baseline_lesions, inputs.baseline_volume, folder)
    summary = yield TrackSeriesRequest(
        baseline_id=baseline_id,
        followup_ids=tuple(followup_ids),
        lesions=str(lesions_path),
        out_dir=str(folder.new_path("series", "")),
        lesion_options=options,
        series_options=series_options,
        settings=request_settings(settings, field=settings.field),
    )
    lesions_path.unlink(missing_ok=True)
    volumes = [inputs.baseline_volume, *inputs.followup_volumes]
    points = time_points([volume.GetName() or summary.scans[n] for n, volume in enumerate(volumes)], inputs.dates)
    lesions = series_lesions(summary, segments)
    responses = series_responses(summary)
    lesions_name = inputs.baseline_lesions.GetName()
    followup_lesions = []
    for k, volume in enumerate(inputs.followup_volumes, start=1):
        node = fill_followup_segmentation(scene, summary.files[f"labelmap_{k}"], segments, None, volume,
                                          name=f"{lesions_name} T{k} {volume.GetName()}")
        set_input_references(node, inputs.baseline_volume, volume)
        followup_lesions.append(node)
    table = fill_series_table(scene, lesions, points, inputs.table, name=f"{lesions_name} series")
    time_point_table = fill_time_point_table(scene, responses, lesions, points, inputs.time_point_table,
                                             name=f"{lesions_name} by time point")
    chart = fill_growth_chart(scene, time_point_table, lesions, points[0].days is not None, inputs.chart,
                              name=f"{lesions_name} volumes")
    return SeriesOutputs(followup_lesions, table, time_point_table, chart, lesions, points, segments, summary,
                         summary.output_files)
