"""Live propagation: placing or moving a fixed landmark re-matches only that landmark."""

from __future__ import annotations

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from MedDIFTLib.slicer.installs import missing_requirements
from MedDIFTLib.slicer.live import MovedPoints

from .section import Section

LIVE_DELAY_MS = 300


class LiveSection(Section, VTKObservationMixin):
    """Observes the fixed landmarks while live propagation is on, and starts a live update of the
    points that moved (after a short pause; never during a drag or while a run is in progress)."""

    def __init__(self, panel) -> None:
        Section.__init__(self, panel)
        VTKObservationMixin.__init__(self)
        self._observed = None
        self._movedPoints = MovedPoints()
        self._pendingIds: set[str] = set()
        self._interacting = False
        self._timer = qt.QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(LIVE_DELAY_MS)
        self._timer.connect("timeout()", self.onTimer)

    def update(self, parameterNode, running: bool) -> None:
        live = parameterNode is not None and parameterNode.livePropagation and parameterNode.fixedLandmarks
        self._observe(parameterNode.fixedLandmarks if live else None)

    def reset(self) -> None:
        self._observe(None)

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()

    def runEnded(self) -> None:
        """A scene run ended: points moved meanwhile are re-matched now."""
        if self._pendingIds and self._observed is not None:
            self._timer.start()

    def _observe(self, markupsNode) -> None:
        if markupsNode is self._observed:
            return
        self.removeObservers()
        self._observed = markupsNode
        self._pendingIds.clear()
        self._movedPoints = MovedPoints()
        if markupsNode is None:
            return
        self._movedPoints.remember(markupsNode)
        markups = slicer.vtkMRMLMarkupsNode
        self.addObserver(markupsNode, markups.PointModifiedEvent, self.onLandmarkModified)
        self.addObserver(markupsNode, markups.PointPositionDefinedEvent, self.onLandmarkModified)
        self.addObserver(markupsNode, markups.PointStartInteractionEvent, self.onInteractionStarted)
        self.addObserver(markupsNode, markups.PointEndInteractionEvent, self.onInteractionEnded)

    @vtk.calldata_type(vtk.VTK_INT)
    def onLandmarkModified(self, caller, event, controlPointIndex=None) -> None:
        """Queue the fixed control points whose position changed.

        VTK calls this without the index for batched edits (hardening a transform, setting all
        positions, undo): ``None`` re-checks every point. Selecting, relabelling or locking a
        point does not move it, so it is not re-matched."""
        if controlPointIndex is not None and not 0 <= controlPointIndex < caller.GetNumberOfControlPoints():
            controlPointIndex = None
        for index in self._movedPoints.moved(caller, controlPointIndex):
            self._pendingIds.add(caller.GetNthControlPointID(index))
        if self._pendingIds and not self._interacting:
            self._timer.start()

    def onInteractionStarted(self, caller, event) -> None:
        self._interacting = True
        self._timer.stop()

    def onInteractionEnded(self, caller, event) -> None:
        self._interacting = False
        self._timer.start()

    def onTimer(self) -> None:
        """Re-match the fixed landmarks placed or moved since the last update (features are cached)."""
        parameterNode = self.panel.parameterNode
        if not self._pendingIds or parameterNode is None or not parameterNode.livePropagation:
            return
        if self.panel.logic.workerBusy or missing_requirements():
            return
        if not (parameterNode.fixedVolume and parameterNode.movingVolume and parameterNode.fixedLandmarks):
            return
        landmarks = parameterNode.fixedLandmarks
        defined = slicer.vtkMRMLMarkupsNode.PositionDefined
        indices = sorted(
            index for index in (landmarks.GetControlPointIndexByID(pointId) for pointId in self._pendingIds)
            if index >= 0 and landmarks.GetNthControlPointPositionStatus(index) == defined)
        self._pendingIds.clear()
        if indices:
            self.panel.run.startSceneRun(controlPointIndices=indices)
