"""The pairs table: one row per matched pair, ordered by doubt, with accept / reject and "next unreliable"."""

from __future__ import annotations

import math

import qt
from slicer.i18n import tr as _

from MedDIFTLib.slicer.qa import Order, next_unreliable, ordered_rows, set_decision, summary
from MedDIFTLib.slicer.results import ACCEPTED, REJECTED, pair_rows, reviews
from MedDIFTLib.slicer.views import confidence_color

from .section import Section


class ReviewSection(Section):
    """Rows coloured by confidence; a click centres both views on the pair."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._rows = []
        self.ui.pairsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        for label in (_("Landmark order"), _("Lowest confidence first"), _("Largest forward-backward first")):
            self.ui.pairOrderComboBox.addItem(label)
        self.ui.pairOrderComboBox.connect("currentIndexChanged(int)", lambda index: self.refresh())
        self.ui.nextUnreliableButton.connect("clicked(bool)", self.onNextUnreliable)
        self.ui.acceptPairButton.connect("clicked(bool)", lambda: self.onReview(ACCEPTED))
        self.ui.rejectPairButton.connect("clicked(bool)", lambda: self.onReview(REJECTED))
        self.ui.pairsTableWidget.connect("cellClicked(int,int)", self.onPairClicked)

    def update(self, parameterNode, running: bool) -> None:
        self.refresh()

    def reset(self) -> None:
        self._rows = []

    def refresh(self) -> None:
        """Rows (label, confidence, forward-backward mm) in the chosen order; the summary counts them."""
        parameterNode = self.panel.parameterNode
        rows, decisions = [], {}
        if parameterNode is not None and parameterNode.fixedLandmarks and parameterNode.movingLandmarks:
            decisions = reviews(parameterNode.movingLandmarks)
            order = list(Order)[max(self.ui.pairOrderComboBox.currentIndex, 0)]
            rows = ordered_rows(pair_rows(parameterNode.fixedLandmarks, parameterNode.movingLandmarks), order)
        self._rows = rows
        decisionTexts = {ACCEPTED: _("accepted"), REJECTED: _("rejected")}
        table = self.ui.pairsTableWidget
        table.setRowCount(len(rows))
        for rowIndex, row in enumerate(rows):
            color = qt.QColor.fromRgbF(*confidence_color(row.confidence))
            color.setAlphaF(0.35)
            decision = decisions.get(row.label)
            cells = (
                row.label if decision is None else f"{row.label} ({decisionTexts[decision]})",
                "-" if math.isnan(row.confidence) else f"{row.confidence:.2f}",
                "-" if math.isnan(row.forward_backward_mm) else f"{row.forward_backward_mm:.1f}",
            )
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setBackground(qt.QBrush(color))
                if not row.reliable:
                    item.setToolTip(_("Unreliable or missing match"))
                table.setItem(rowIndex, column, item)
        self.ui.reviewSummaryLabel.text = summary(rows, decisions) if rows else ""
        for button in (self.ui.nextUnreliableButton, self.ui.acceptPairButton, self.ui.rejectPairButton):
            button.enabled = bool(rows)

    def onPairClicked(self, rowIndex: int, column: int) -> None:
        from MedDIFTLib.slicer.views import jump_to_pair

        if 0 <= rowIndex < len(self._rows):
            self.panel.overlays.showPairViews(onlyIfNeeded=True)
            jump_to_pair(self.panel.scene, self._rows[rowIndex])

    def onNextUnreliable(self) -> None:
        """Select and show the worst pair that is unreliable and not yet accepted or rejected."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or not parameterNode.movingLandmarks:
            return
        row = next_unreliable(self._rows, reviews(parameterNode.movingLandmarks))
        if row is None:
            self.panel.showStatus(_("No unreliable pair left to review."))
            return
        rowIndex = self._rows.index(row)
        self.ui.pairsTableWidget.selectRow(rowIndex)
        self.onPairClicked(rowIndex, 0)

    def onReview(self, decision: str) -> None:
        """Accept or reject the selected pair (a rejected one is unselected and labelled, never deleted)."""
        parameterNode = self.panel.parameterNode
        rowIndex = self.ui.pairsTableWidget.currentRow()
        if parameterNode is None or not parameterNode.movingLandmarks or not 0 <= rowIndex < len(self._rows):
            return
        set_decision(parameterNode.movingLandmarks, self._rows[rowIndex].label, decision)
        self.refresh()
