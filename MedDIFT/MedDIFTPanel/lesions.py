"""Lesion tracking: the baseline lesions carried into the follow-up (moving) volume, or through a series of
follow-ups, and their table."""

from __future__ import annotations

import math

import qt
import slicer
from slicer.i18n import tr as _

from MedDIFTLib.slicer.lesion_nodes import jump_to_lesion
from MedDIFTLib.slicer.series_nodes import jump_to_lesion_at, series_cells, series_responses
from MedDIFTLib.slicer.series_run import SeriesScans

from .section import Section


class LesionsSection(Section):
    """*Track lesions* runs in the background like Apply (its progress and Cancel); the table lists
    each lesion, and a click centres both views on it. With further follow-ups (after the moving volume,
    in scan order, each with an optional date) it tracks the series: the table gets a column per time
    point and a response row, the growth chart is shown in a plot view, and a click on a time point's
    cell shows the lesion in that scan."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._rows = []
        self._table = None
        self._scans = SeriesScans()
        self._scanNodes = []  # the scans listed in seriesScansListWidget, in scan order
        self._series = None  # the last series run's SeriesOutputs
        self._seriesVolumes = []  # and its volumes, baseline first
        self._pendingVolumes = []  # the volumes of the series run in progress
        table = self.ui.lesionsTableWidget
        self._pairHeaders = [table.horizontalHeaderItem(column).text() for column in range(table.columnCount)]
        table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.trackButton.connect("clicked(bool)", self.onTrackButton)
        table.connect("cellClicked(int,int)", self.onLesionClicked)
        self.ui.addFollowupButton.connect("clicked(bool)", self.onAddFollowup)
        self.ui.removeFollowupButton.connect("clicked(bool)", self.onRemoveFollowup)
        self.ui.moveFollowupUpButton.connect("clicked(bool)", lambda: self.onMoveFollowup(-1))
        self.ui.moveFollowupDownButton.connect("clicked(bool)", lambda: self.onMoveFollowup(1))
        self.ui.seriesScansListWidget.connect("currentRowChanged(int)", self.onScanSelected)
        self.ui.scanDateLineEdit.connect("editingFinished()", self.onScanDateEdited)

    def update(self, parameterNode, running: bool) -> None:
        canTrack = parameterNode is not None and bool(
            parameterNode.fixedVolume and parameterNode.movingVolume and parameterNode.baselineLesions)
        self.ui.trackButton.enabled = canTrack and not running
        self._scans.forget_missing(self.panel.scene)
        series = bool(self._scans.followup_ids)
        self.ui.trackButton.text = _("Track lesions through the series") if series else _("Track lesions")
        if not canTrack:
            tip = _("Select the fixed (baseline) and moving (follow-up) volumes and the baseline lesions.")
        elif series:
            tip = _("Find, segment and measure each baseline lesion in every follow-up, in scan order.")
        else:
            tip = _("Find, segment and measure each baseline lesion in the follow-up (moving) volume.")
        self.ui.trackButton.toolTip = tip
        self.showScans(parameterNode)
        for widget in (self.ui.addFollowupButton, self.ui.removeFollowupButton, self.ui.moveFollowupUpButton,
                       self.ui.moveFollowupDownButton):
            widget.enabled = not running

    def reset(self) -> None:
        self._table = None
        self._scans.clear()
        self._scanNodes = []
        self._series = None
        self._seriesVolumes = []
        self._pendingVolumes = []
        self.ui.seriesScansListWidget.clear()
        self.ui.scanDateLineEdit.text = ""
        self.showRows([])

    # ------------------------------------------------------------------ the scans of a series

    def showScans(self, parameterNode) -> None:
        """List the baseline, the first follow-up and the further follow-ups, each with its date."""
        baseline = parameterNode.fixedVolume if parameterNode is not None else None
        first = parameterNode.movingVolume if parameterNode is not None else None
        self._scanNodes = [baseline, first, *self._scans.followups(self.panel.scene)]
        database = getattr(slicer, "dicomDatabase", None)
        listWidget = self.ui.seriesScansListWidget
        current = listWidget.currentRow
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        for index, node in enumerate(self._scanNodes):
            role = _("baseline") if index == 0 else _("follow-up {index}").format(index=index)
            name = node.GetName() if node is not None else _("(none: select it above)")
            date = self._scans.date(node, database)
            listWidget.addItem(f"T{index} {role}: {name}" + (f"  {date}" if date else ""))
        listWidget.setCurrentRow(min(current, len(self._scanNodes) - 1))
        listWidget.blockSignals(wasBlocked)
        self.onScanSelected(listWidget.currentRow)

    def onScanSelected(self, row: int) -> None:
        """Show the selected scan's date; only further follow-ups (from T2) can be removed or moved."""
        node = self._scanNodes[row] if 0 <= row < len(self._scanNodes) else None
        self.ui.scanDateLineEdit.enabled = node is not None
        self.ui.scanDateLineEdit.text = self._scans.date(node, getattr(slicer, "dicomDatabase", None))
        further = row - 2
        count = len(self._scans.followup_ids)
        running = self.panel.logic.runInProgress
        self.ui.removeFollowupButton.enabled = 0 <= further < count and not running
        self.ui.moveFollowupUpButton.enabled = 0 < further < count and not running
        self.ui.moveFollowupDownButton.enabled = 0 <= further < count - 1 and not running

    def onScanDateEdited(self) -> None:
        row = self.ui.seriesScansListWidget.currentRow
        if 0 <= row < len(self._scanNodes) and self._scanNodes[row] is not None:
            self._scans.set_date(self._scanNodes[row], self.ui.scanDateLineEdit.text)
            self.showScans(self.panel.parameterNode)

    def onAddFollowup(self) -> None:
        node = self.ui.seriesFollowupSelector.currentNode()
        parameterNode = self.panel.parameterNode
        if node is None or parameterNode is None:
            return
        if node in (parameterNode.fixedVolume, parameterNode.movingVolume) or not self._scans.add(node):
            self.panel.showStatus(_("{name} is already one of the scans.").format(name=node.GetName()))
            return
        self.panel.updateGuiFromParameterNode()
        self.ui.seriesScansListWidget.setCurrentRow(len(self._scanNodes) - 1)

    def onRemoveFollowup(self) -> None:
        self._scans.remove(self.ui.seriesScansListWidget.currentRow - 2)
        self.panel.updateGuiFromParameterNode()

    def onMoveFollowup(self, step: int) -> None:
        moved = self._scans.move(self.ui.seriesScansListWidget.currentRow - 2, step)
        self.panel.updateGuiFromParameterNode()
        self.ui.seriesScansListWidget.setCurrentRow(moved + 2)

    # ------------------------------------------------------------------ runs

    def onTrackButton(self) -> None:
        panel = self.panel
        if panel.logic.runInProgress or panel.parameterNode is None:
            return
        if not panel.dependencies.ensure(then=self.onTrackButton):
            return
        self._scans.forget_missing(panel.scene)
        if self._scans.followup_ids:
            self.startSeries()
            return
        panel.run.start(lambda onDone, onProgress, onLog: panel.logic.startTrack(
            panel.logic.trackInputs(panel.parameterNode, self._table), panel.runSettings(), onDone=onDone,
            onProgress=onProgress, onLog=onLog), self.onTrackDone, _("Tracking lesions..."))

    def startSeries(self) -> None:
        """Track the baseline lesions through the moving volume and the further follow-ups."""
        panel = self.panel

        def begin(onDone, onProgress, onLog):
            inputs = panel.logic.seriesInputs(panel.parameterNode, self._scans, self._series)
            panel.logic.startSeries(inputs, panel.runSettings(), onDone=onDone, onProgress=onProgress, onLog=onLog)
            self._pendingVolumes = [inputs.baseline_volume, *inputs.followup_volumes]

        panel.run.start(begin, self.onSeriesDone, _("Tracking lesions through the series..."))

    def _failed(self, error) -> bool:
        """Report a tracking run's error as a run's and refresh the panel; whether there was one."""
        if error is None:
            return False
        self.panel.run.finishWithError(error)
        self.panel.updateGuiFromParameterNode()
        return True

    def onTrackDone(self, outputs, error) -> None:
        """Select the follow-up segmentation and list the lesions; errors are reported as a run's."""
        if self._failed(error):
            return
        self.ui.progressBar.hide()
        if self.panel.parameterNode is not None and self.panel.parameterNode.followupLesions is None:
            self.panel.parameterNode.followupLesions = outputs.followup_lesions
        self._table = outputs.table
        self.showRows(outputs.rows)
        self.panel.showSummary(self.panel.logic.describeTrack(outputs))
        self.panel.updateGuiFromParameterNode()

    def onSeriesDone(self, outputs, error) -> None:
        """List the lesions with a column per time point and show the growth chart in a plot view."""
        if self._failed(error):
            return
        self.ui.progressBar.hide()
        self.showSeries(outputs, self._pendingVolumes)
        slicer.modules.plots.logic().ShowChartInLayout(outputs.chart)
        self.panel.showSummary(self.panel.logic.describeSeries(outputs))
        self.panel.updateGuiFromParameterNode()

    # ------------------------------------------------------------------ the table

    def showRows(self, rows) -> None:
        """One row per lesion: name, status, volumes (mL) and their change, confidence."""
        self._series, self._seriesVolumes = None, []
        self._rows = list(rows)
        table = self.ui.lesionsTableWidget
        table.setColumnCount(len(self._pairHeaders))
        table.setHorizontalHeaderLabels(self._pairHeaders)
        table.setRowCount(len(self._rows))
        for rowIndex, row in enumerate(self._rows):
            cells = (
                row.segment.name,
                row.status,
                "-" if math.isnan(row.volume_baseline_ml) else f"{row.volume_baseline_ml:.3f}",
                "-" if math.isnan(row.volume_followup_ml) else f"{row.volume_followup_ml:.3f}",
                "-" if math.isnan(row.volume_change_pct) else f"{row.volume_change_pct:+.0f}",
                "-" if math.isnan(row.confidence) else f"{row.confidence:.2f}",
            )
            for column, text in enumerate(cells):
                table.setItem(rowIndex, column, qt.QTableWidgetItem(text))

    def showSeries(self, outputs, volumes) -> None:
        """One row per lesion, its volume (mL) or status per time point, then the response per time point."""
        self._rows = []
        self._series, self._seriesVolumes = outputs, list(volumes)
        rows = series_cells(outputs.lesions, series_responses(outputs.summary))
        table = self.ui.lesionsTableWidget
        table.setColumnCount(1 + len(outputs.time_points))
        table.setHorizontalHeaderLabels([_("Lesion")] + [f"{point.title} (mL)" for point in outputs.time_points])
        table.setRowCount(len(rows))
        for rowIndex, cells in enumerate(rows):
            for column, text in enumerate(cells):
                table.setItem(rowIndex, column, qt.QTableWidgetItem(text))

    def onLesionClicked(self, rowIndex: int, column: int) -> None:
        if self._series is not None:
            self.onSeriesCellClicked(rowIndex, column)
        elif 0 <= rowIndex < len(self._rows):
            self.panel.overlays.showPairViews(onlyIfNeeded=True)
            jump_to_lesion(self.panel.scene, self._rows[rowIndex])

    def onSeriesCellClicked(self, rowIndex: int, column: int) -> None:
        """The baseline view on the lesion at baseline, the follow-up view on it in the clicked time point's scan
        (the name column: the baseline); the layout, with the growth chart, is kept."""
        lesions = self._series.lesions
        if not 0 <= rowIndex < len(lesions):
            return
        if not all(volume is not None and self.panel.scene.IsNodePresent(volume) for volume in self._seriesVolumes):
            self.panel.showStatus(_("A scan of this series is no longer in the scene."))
            return
        jump_to_lesion_at(self.panel.scene, lesions[rowIndex], max(column - 1, 0), self._seriesVolumes)
