"""Lesion tracking: the baseline lesions carried into the follow-up (moving) volume, and their table."""

from __future__ import annotations

import math

import qt
from slicer.i18n import tr as _

from MedDIFTLib.slicer.lesion_nodes import jump_to_lesion

from .section import Section


class LesionsSection(Section):
    """*Track lesions* runs in the background like Apply (its progress and Cancel); the table lists
    each lesion, and a click centres both views on it."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._rows = []
        self._table = None
        self.ui.lesionsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.trackButton.connect("clicked(bool)", self.onTrackButton)
        self.ui.lesionsTableWidget.connect("cellClicked(int,int)", self.onLesionClicked)

    def update(self, parameterNode, running: bool) -> None:
        canTrack = parameterNode is not None and bool(
            parameterNode.fixedVolume and parameterNode.movingVolume and parameterNode.baselineLesions)
        self.ui.trackButton.enabled = canTrack and not running
        self.ui.trackButton.toolTip = (
            _("Find, segment and measure each baseline lesion in the follow-up (moving) volume.") if canTrack
            else _("Select the fixed (baseline) and moving (follow-up) volumes and the baseline lesions."))

    def reset(self) -> None:
        self._table = None
        self.showRows([])

    def onTrackButton(self) -> None:
        panel = self.panel
        if panel.logic.jobRunning or panel.parameterNode is None:
            return
        if not panel.dependencies.ensure(then=self.onTrackButton):
            return
        panel.run.start(lambda onDone, onProgress, onLog: panel.logic.startTrack(
            panel.logic.trackInputs(panel.parameterNode, self._table), panel.runSettings(), onDone=onDone,
            onProgress=onProgress, onLog=onLog), self.onTrackDone, _("Tracking lesions..."))

    def onTrackDone(self, outputs, error) -> None:
        """Select the follow-up segmentation and list the lesions; errors are reported as a run's."""
        if error is not None:
            self.panel.run.finishWithError(error)
            self.panel.updateGuiFromParameterNode()
            return
        self.ui.progressBar.hide()
        if self.panel.parameterNode is not None and self.panel.parameterNode.followupLesions is None:
            self.panel.parameterNode.followupLesions = outputs.followup_lesions
        self._table = outputs.table
        self.showRows(outputs.rows)
        self.panel.showSummary(self.panel.logic.describeTrack(outputs))
        self.panel.updateGuiFromParameterNode()

    def showRows(self, rows) -> None:
        """One row per lesion: name, status, volumes (mL) and their change, confidence."""
        self._rows = list(rows)
        table = self.ui.lesionsTableWidget
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

    def onLesionClicked(self, rowIndex: int, column: int) -> None:
        if 0 <= rowIndex < len(self._rows):
            self.panel.overlays.showPairViews(onlyIfNeeded=True)
            jump_to_lesion(self.panel.scene, self._rows[rowIndex])
