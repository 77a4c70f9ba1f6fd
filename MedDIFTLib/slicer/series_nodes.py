"""Scene glue of a lesion series (a ``track_series`` result): tables, a growth chart, jumps (torch-free).

- :func:`time_points`: the scans in order with their dates (user-given, or read by :func:`dicom_date`
  from Slicer's DICOM database) and days since baseline (when every scan has a date).
- :func:`series_lesions`: one :class:`SeriesLesion` per lesion (its baseline segment and its visits).
- :func:`fill_series_table`: one row per lesion, for each time point its volume, longest diameter and
  status; :func:`fill_time_point_table`: one row per time point, the response (:func:`series_responses`: SLD,
  changes, RECIST category) and one numeric volume column per lesion, which :func:`fill_growth_chart` plots (a plot
  chart node, one plot series node per lesion, volume over days or over the time point).
- :func:`series_cells`: the panel's lesion table (a column per time point, a response row).
- :func:`jump_to_lesion_at`: the baseline view on the lesion's baseline centre, the follow-up view on
  follow-up k's volume at the lesion's centre there.

The result's centres are LPS; the scene is RAS.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import BadInputError
from ..worker.protocol.results import SeriesVisit, TimePointResponse, TrackSeriesResult
from .lesion_nodes import DEFAULT_COLOR, LesionSegment, cell_text, lps_to_ras
from .views import FIXED_VIEW, MOVING_VIEW, centre_views, show_volumes_in_pair_views

DICOM_DATE_TAGS = ("0008,0022", "0008,0020")  # AcquisitionDate, then StudyDate
TIME_POINT_COLUMNS = ("time point", "days", "scan", "date", "SLD (mm)", "change from baseline (%)",
                      "change from nadir (%)", "response")


@dataclass(frozen=True)
class TimePoint:
    """One scan of a series: its index (0 = baseline), name, date (ISO, None when unknown) and days
    since the baseline (None unless every scan has a date)."""

    index: int
    scan: str
    date: str | None
    days: float | None

    @property
    def title(self) -> str:
        """How tables name it: ``T1`` or ``T1 2024-03-01``."""
        return f"T{self.index}" + (f" {self.date}" if self.date else "")


@dataclass(frozen=True)
class SeriesLesion:
    """One lesion through a series: its baseline segment and one visit per time point, in order."""

    segment: LesionSegment
    visits: tuple[SeriesVisit, ...]

    @property
    def volume_column(self) -> str:
        """The name of its volume column in the time-point table (unique by label)."""
        return f"volume L{self.segment.label} (mL)"

    def centre_ras(self, time_point: int) -> tuple[float, float, float] | None:
        """Its centre at ``time_point`` (RAS mm; None when not found)."""
        return lps_to_ras(self.visits[time_point].centre_lps_mm)


def _parse_date(text: str) -> datetime.date:
    text = text.strip()
    try:
        if len(text) == 8 and text.isdigit():  # DICOM DA: YYYYMMDD
            return datetime.datetime.strptime(text, "%Y%m%d").date()
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise BadInputError(f"'{text}' is not a date (YYYY-MM-DD or YYYYMMDD)") from None


def dicom_date(volume_node, database) -> str | None:
    """The acquisition (else study) date of a volume loaded from DICOM, from ``database`` (Slicer's
    ``slicer.dicomDatabase``: ``instanceValue(uid, tag)``) and the node's ``DICOM.instanceUIDs``; None
    for a volume not loaded from DICOM or without a date."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    for tag in DICOM_DATE_TAGS:
        value = (database.instanceValue(uids[0], tag) or "").strip()
        if value:
            return value
    return None


def time_points(scans: Sequence[str], dates: Sequence[str | None] | None = None) -> list[TimePoint]:
    """The scans (baseline first) with their ``dates`` (one per scan, None or "" when unknown; YYYY-MM-DD
    or YYYYMMDD); dates must not go back in time."""
    dates = list(dates) if dates is not None else [None] * len(scans)
    if len(dates) != len(scans):
        raise BadInputError(f"{len(dates)} dates for {len(scans)} scans (baseline first)")
    parsed = [_parse_date(date) if date else None for date in dates]
    known = [date for date in parsed if date is not None]
    if any(later < earlier for earlier, later in zip(known, known[1:])):
        raise BadInputError("the scans' dates must be in scan order (baseline first)")
    every = len(known) == len(parsed)
    return [TimePoint(index, scan, date.isoformat() if date else None,
                      float((date - parsed[0]).days) if every else None)
            for index, (scan, date) in enumerate(zip(scans, parsed))]


def series_lesions(result: TrackSeriesResult, segments: list[LesionSegment]) -> list[SeriesLesion]:
    """The result's lesions (in its order), each with its segment (by label value) and its visits by time point."""
    by_label = {segment.label: segment for segment in segments}
    visits: dict[int, list[SeriesVisit]] = {}
    for visit in result.visits:
        visits.setdefault(visit.label, []).append(visit)
    count = len(result.scans)
    lesions = []
    for label, found in visits.items():
        ordered = tuple(sorted(found, key=lambda visit: visit.time_point))
        if [visit.time_point for visit in ordered] != list(range(count)):
            raise BadInputError(f"lesion {label} of the series result does not have one visit per time point")
        segment = by_label.get(label) or LesionSegment(label, str(label), ordered[0].name, DEFAULT_COLOR, None)
        lesions.append(SeriesLesion(segment, ordered))
    return lesions


def _new_or_cleared_table(scene, table_node, name: str):
    if table_node is None:
        return scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table_node.RemoveAllColumns()
    return table_node


def fill_series_table(scene, lesions: list[SeriesLesion], points: list[TimePoint], table_node=None,
                      name: str = "Lesion series"):
    """A table node (filled in place when given): one row per lesion (name, RECIST target), then for
    each time point its volume (mL), longest axial diameter (mm) and status."""
    table_node = _new_or_cleared_table(scene, table_node, name)
    titles = ["lesion", "target"]
    for point in points:
        titles += [f"{point.title} volume (mL)", f"{point.title} diameter (mm)", f"{point.title} status"]
    for title in titles:
        table_node.AddColumn().SetName(title)
    for lesion in lesions:
        row = table_node.AddEmptyRow()
        cells = [lesion.segment.name, "yes" if lesion.visits[0].target else "no"]
        for visit in lesion.visits:
            cells += [cell_text(visit.volume_ml, 3), cell_text(visit.diameter_long_mm, 1), visit.status]
        for column, text in enumerate(cells):
            table_node.SetCellText(row, column, text)
    return table_node


def _add_column(table_node, name: str, values: Sequence[float] | Sequence[str]) -> None:
    """A numeric (``vtkDoubleArray``) or text (``vtkStringArray``) column, by the type of ``values``."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkStringArray

    column = vtkStringArray() if values and isinstance(values[0], str) else vtkDoubleArray()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    table_node.AddColumn(column)


def series_responses(result: TrackSeriesResult) -> list[TimePointResponse]:
    """The result's responses by time point; raises :class:`BadInputError` unless there is one per scan."""
    responses = sorted(result.responses, key=lambda response: response.time_point)
    if [response.time_point for response in responses] != list(range(len(result.scans))):
        raise BadInputError("the series result does not have one response per time point")
    return responses


def fill_time_point_table(scene, responses: list[TimePointResponse], lesions: list[SeriesLesion],
                          points: list[TimePoint], table_node=None, name: str = "Lesion series by time point"):
    """A table node (filled in place when given): one row per time point with :data:`TIME_POINT_COLUMNS`
    (``days`` NaN without dates; response empty at baseline; ``responses`` from :func:`series_responses`),
    then one volume column (mL) per lesion."""
    table_node = _new_or_cleared_table(scene, table_node, name)
    _add_column(table_node, "time point", [float(point.index) for point in points])
    _add_column(table_node, "days", [math.nan if point.days is None else point.days for point in points])
    _add_column(table_node, "scan", [point.scan for point in points])
    _add_column(table_node, "date", [point.date or "" for point in points])
    _add_column(table_node, "SLD (mm)", [response.sld_mm for response in responses])
    _add_column(table_node, "change from baseline (%)", [r.change_from_baseline_pct for r in responses])
    _add_column(table_node, "change from nadir (%)", [r.change_from_nadir_pct for r in responses])
    _add_column(table_node, "response", [response.category or "" for response in responses])
    for lesion in lesions:
        _add_column(table_node, lesion.volume_column, [visit.volume_ml for visit in lesion.visits])
    table_node.Modified()
    return table_node


def fill_growth_chart(scene, time_point_table, lesions: list[SeriesLesion], by_days: bool, chart_node=None,
                      name: str = "Lesion volumes"):
    """A plot chart node (its series replaced when given): one scatter-line plot series node per lesion,
    in the lesion's colour, its volume column of ``time_point_table`` over ``days`` (``by_days``) or
    ``time point``. Series nodes of an earlier fill of this chart are removed from the scene."""
    if chart_node is None:
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
    old_series = [chart_node.GetNthPlotSeriesNode(n) for n in range(chart_node.GetNumberOfPlotSeriesNodes())]
    chart_node.RemoveAllPlotSeriesNodeIDs()
    for series in old_series:
        if series is not None:
            scene.RemoveNode(series)
    x_column = "days" if by_days else "time point"
    chart_node.SetTitle(name)
    chart_node.SetXAxisTitle("days since baseline" if by_days else "time point (0 = baseline)")
    chart_node.SetYAxisTitle("volume (mL)")
    for lesion in lesions:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(lesion.segment.name))
        series.SetAndObserveTableNodeID(time_point_table.GetID())
        series.SetXColumnName(x_column)
        series.SetYColumnName(lesion.volume_column)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(*lesion.segment.color)
        chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart_node


def _response_text(response: TimePointResponse) -> str:
    """``PR SLD 6.4 mm``: the RECIST category (none at baseline) and the sum of longest diameters."""
    sld = cell_text(response.sld_mm, 1)
    return " ".join(part for part in (response.category or "", f"SLD {sld} mm" if sld else "") if part)


def series_cells(lesions: list[SeriesLesion], responses: Sequence[TimePointResponse] = ()) -> list[list[str]]:
    """The panel's lesion table: per lesion its name then, per time point, its volume (mL) when found, else its
    status; then, with ``responses`` (one per time point), a row of the response category (SLD mm) per time point."""
    rows = []
    for lesion in lesions:
        cells = [lesion.segment.name]
        for visit in lesion.visits:
            volume = cell_text(visit.volume_ml, 3)
            cells.append(volume if visit.status == "ok" and volume else f"{volume} {visit.status}".strip())
        rows.append(cells)
    if responses:
        rows.append(["response"] + [_response_text(response) for response in responses])
    return rows


def jump_to_lesion_at(scene, lesion: SeriesLesion, time_point: int, volumes: Sequence, baseline_view: str = FIXED_VIEW,
                      followup_view: str = MOVING_VIEW) -> None:
    """Show the baseline (``volumes[0]``) in the baseline view and ``volumes[time_point]`` in the follow-up
    view, each centred on the lesion there (a follow-up where it was not found keeps its position)."""
    if not 0 <= time_point < len(lesion.visits) or len(volumes) != len(lesion.visits):
        raise BadInputError(f"time point {time_point} is not one of the {len(lesion.visits)} scans")
    show_volumes_in_pair_views(scene, volumes[0], volumes[time_point], baseline_view, followup_view)
    centre_views(scene, ((baseline_view, lesion.centre_ras(0)), (followup_view, lesion.centre_ras(time_point))))
