"""QA overlays over the fixed volume, fade and flicker, the moving volume through the transform, pair views."""

from __future__ import annotations

import qt
import slicer
from slicer.i18n import tr as _

from MedDIFTLib.core.errors import BadInputError
from MedDIFTLib.slicer.overlays import KINDS, existing_overlay, show_fade, show_overlay, show_through_transform
from MedDIFTLib.slicer.views import show_volumes_in_pair_views

from .section import Section

FLICKER_INTERVAL_MS = 500


class OverlaysSection(Section):
    """One overlay at a time (confidence, Jacobian, displacement) with its colour legend; the fade
    slider and flicker compare the fixed volume with the moving one through the transform."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._buttons = {"confidence": self.ui.confidenceOverlayButton, "jacobian": self.ui.jacobianOverlayButton,
                         "magnitude": self.ui.magnitudeOverlayButton}
        for kind, button in self._buttons.items():
            button.connect("toggled(bool)", lambda checked, kind=kind: self.onOverlayToggled(kind, checked))
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(FLICKER_INTERVAL_MS)
        self._flickerTimer.connect("timeout()", self.onFlickerTimer)
        self.ui.fadeSlider.connect("valueChanged(int)", self.onFadeChanged)
        self.ui.flickerButton.connect("toggled(bool)", self.onFlickerToggled)
        self.ui.warpMovingButton.connect("toggled(bool)", self.onWarpMovingToggled)
        self.ui.pairViewsButton.connect("clicked(bool)", lambda: self.showPairViews())

    def update(self, parameterNode, running: bool) -> None:
        canWarp = parameterNode is not None and bool(parameterNode.outputTransform and parameterNode.movingVolume)
        self.ui.warpMovingButton.enabled = canWarp
        wasBlocked = self.ui.warpMovingButton.blockSignals(True)
        self.ui.warpMovingButton.checked = canWarp and (
            parameterNode.movingVolume.GetParentTransformNode() is parameterNode.outputTransform)
        self.ui.warpMovingButton.blockSignals(wasBlocked)
        self.ui.fadeSlider.enabled = canWarp
        self.ui.flickerButton.enabled = canWarp
        present = self.overlayNodes()
        for kind, button in self._buttons.items():
            button.enabled = kind in present

    def reset(self) -> None:
        self.ui.flickerButton.checked = False

    def cleanup(self) -> None:
        self._flickerTimer.stop()

    def overlayNodes(self) -> dict:
        """The QA overlay volumes of the fixed volume, by kind."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or not parameterNode.fixedVolume:
            return {}
        found = {name: existing_overlay(self.panel.scene, parameterNode.fixedVolume, kind)
                 for name, kind in KINDS.items()}
        return {name: node for name, node in found.items() if node is not None}

    def onOverlayToggled(self, kind: str, checked: bool) -> None:
        """Show one overlay over the fixed volume (the other buttons go off), with its legend."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or not parameterNode.fixedVolume:
            return
        for other, button in self._buttons.items():
            if other != kind and checked:
                wasBlocked = button.blockSignals(True)
                button.checked = False
                button.blockSignals(wasBlocked)
        node = self.overlayNodes().get(kind) if checked else None
        show_overlay(self.panel.scene, parameterNode.fixedVolume, node)
        colorsLogic = getattr(getattr(slicer.modules, "colors", None), "logic", None)
        if node is not None and colorsLogic is not None:
            colorsLogic().AddDefaultColorLegendDisplayNode(node)

    def onFadeChanged(self, value: int) -> None:
        """Fade the fixed view from the fixed volume (0) to the moving volume through the transform (100)."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or not (parameterNode.movingVolume and parameterNode.outputTransform):
            return
        try:
            show_fade(self.panel.scene, parameterNode.fixedVolume, parameterNode.movingVolume,
                      parameterNode.outputTransform, value / 100.0)
        except BadInputError as error:
            self.ui.flickerButton.checked = False
            self.panel.showStatus(str(error))

    def onFlickerToggled(self, checked: bool) -> None:
        if checked:
            self._flickerTimer.start()
        else:
            self._flickerTimer.stop()

    def onFlickerTimer(self) -> None:
        self.ui.fadeSlider.value = 0 if self.ui.fadeSlider.value >= 50 else 100

    def onWarpMovingToggled(self, checked: bool) -> None:
        """Show the moving volume through the transform (resampled onto the fixed one), or as it is."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None or not parameterNode.movingVolume or not parameterNode.outputTransform:
            return
        moving, transform = parameterNode.movingVolume, parameterNode.outputTransform
        if not checked:
            if moving.GetParentTransformNode() is transform:
                moving.SetAndObserveTransformNodeID(None)
            return
        try:
            show_through_transform(moving, transform)
        except BadInputError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("MedDIFT"))
            self.ui.warpMovingButton.checked = False

    def showPairViews(self, onlyIfNeeded: bool = False) -> None:
        """Side-by-side layout: fixed volume on the left (Red), moving volume on the right (Yellow)."""
        parameterNode = self.panel.parameterNode
        if parameterNode is None:
            return
        layoutManager = slicer.app.layoutManager()
        sideBySide = slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
        if onlyIfNeeded and layoutManager.layout == sideBySide:
            return
        layoutManager.setLayout(sideBySide)
        show_volumes_in_pair_views(self.panel.scene, parameterNode.fixedVolume, parameterNode.movingVolume)
