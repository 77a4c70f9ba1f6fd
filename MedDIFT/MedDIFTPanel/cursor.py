"""The correspondence cursor: the moving view follows the mouse in the fixed view; P places the pair."""

from __future__ import annotations

import time

import qt
import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from MedDIFTLib.core.errors import MedDIFTError
from MedDIFTLib.slicer.cursor import CursorState, cursor_match_from, match_context, place_pair
from MedDIFTLib.slicer.installs import missing_requirements
from MedDIFTLib.slicer.nodes import add_markups_node
from MedDIFTLib.slicer.views import FIXED_VIEW

from .section import Section

CURSOR_INTERVAL_MS = 250
PLACE_PAIR_KEY = "P"


class CursorSection(Section, VTKObservationMixin):
    """While on: the crosshair's position in the fixed view is mapped through the field, or matched
    by the worker (throttled, cached per volumes and settings); the marker shows the match."""

    def __init__(self, panel) -> None:
        Section.__init__(self, panel)
        VTKObservationMixin.__init__(self)
        self.state = CursorState(panel.scene, interval_s=CURSOR_INTERVAL_MS / 1000.0)
        self._crosshair = None
        self._timer = qt.QTimer()
        self._timer.setInterval(CURSOR_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self._placeShortcut = qt.QShortcut(qt.QKeySequence(PLACE_PAIR_KEY), slicer.util.mainWindow())
        self._placeShortcut.setEnabled(False)
        self._placeShortcut.connect("activated()", self.onPlacePair)
        self.ui.cursorButton.connect("toggled(bool)", self.onToggled)

    def update(self, parameterNode, running: bool) -> None:
        self.ui.cursorButton.enabled = parameterNode is not None and bool(
            parameterNode.fixedVolume and parameterNode.movingVolume)

    def reset(self) -> None:
        self.state.reset()

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()

    def onToggled(self, checked: bool) -> None:
        """On: side-by-side views, follow the crosshair, P places the pair. Off: the marker goes."""
        self.removeObservers()
        self._crosshair = None
        self._timer.stop()
        self._placeShortcut.setEnabled(checked)
        if not checked:
            self.state.hide()
            return
        self.panel.overlays.showPairViews()
        self._crosshair = self.panel.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        self.addObserver(self._crosshair, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent, self.onMoved)
        self._timer.start()

    def onMoved(self, caller, event) -> None:
        parameterNode = self.panel.parameterNode
        if parameterNode is None or not (parameterNode.fixedVolume and parameterNode.movingVolume):
            return
        sliceNode = caller.GetCursorPositionXYZ([0.0, 0.0, 0.0])
        if sliceNode is None or sliceNode.GetLayoutName() != FIXED_VIEW:
            return
        fixedRas = [0.0, 0.0, 0.0]
        caller.GetCursorPositionRAS(fixedRas)
        context = match_context(parameterNode.fixedVolume, parameterNode.movingVolume, self.panel.runSettings())
        self.state.moved(fixedRas, parameterNode.outputTransform, parameterNode.movingVolume, context)

    def onTimer(self) -> None:
        """Send the newest cursor point to the worker when nothing runs in it (throttled)."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or self.panel.logic.workerBusy or missing_requirements():
            return
        point = self.state.matcher.take_pending(time.monotonic())
        if point is None:
            return
        try:
            self.panel.logic.startCursorMatch(self.panel.logic.sceneRunInputs(parameterNode), self.panel.runSettings(),
                                              point, self.onMatched)
        except MedDIFTError as error:
            self.state.answered(None)
            self.panel.showStatus(str(error))
            return
        self.panel.run.pollWorker()

    def onMatched(self, outputs, error) -> None:
        self.state.answered(cursor_match_from(outputs.matches) if error is None else None)
        if error is not None:
            self.panel.showStatus(str(error))

    def onPlacePair(self) -> None:
        """Add the cursor's pair (fixed point and its match) to the landmarks, under one new label."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or self.state.fixed_ras is None or self.state.match is None:
            return
        scene = self.panel.scene
        if parameterNode.fixedLandmarks is None:
            parameterNode.fixedLandmarks = add_markups_node(scene, scene.GenerateUniqueName("F"))
        if parameterNode.movingLandmarks is None:
            parameterNode.movingLandmarks = add_markups_node(
                scene, scene.GenerateUniqueName(f"{parameterNode.fixedLandmarks.GetName()} in moving"))
        label = place_pair(parameterNode.fixedLandmarks, parameterNode.movingLandmarks, self.state.fixed_ras,
                           self.state.match)
        self.panel.showStatus(_("Placed the pair {label}.").format(label=label))
