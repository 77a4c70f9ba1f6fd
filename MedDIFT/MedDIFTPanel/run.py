"""Apply / Cancel, the progress bar, the status line and the log; the timer that polls the worker."""

from __future__ import annotations

import logging
from collections.abc import Callable

import qt
import slicer
from slicer.i18n import tr as _

from MedDIFTLib.core.errors import CancelledError, MedDIFTError, MissingWeightsError

from .section import Section

POLL_INTERVAL_MS = 100


class RunSection(Section):
    """Starts scene runs (full or live) and the other runs of the worker, polls the worker
    from one timer and reports how each ended; a missing-weights error offers the weights and
    runs again once they are in place."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._live = False
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self.ui.progressBar.hide()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

    def update(self, parameterNode, running: bool) -> None:
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the run in progress; nothing is changed in the scene.")
            self.ui.applyButton.enabled = True
            return
        ready = parameterNode is not None and bool(
            parameterNode.fixedVolume and parameterNode.movingVolume
            and (parameterNode.fixedLandmarks or parameterNode.computeTransform))
        self.ui.applyButton.text = _("Apply")
        self.ui.applyButton.toolTip = (
            _("Match the fixed landmarks and compute the selected outputs.") if ready
            else _("Select fixed and moving volumes, and fixed landmarks or the transform output."))
        self.ui.applyButton.enabled = ready

    def cleanup(self) -> None:
        self._pollTimer.stop()

    def onApplyButton(self) -> None:
        if self.panel.logic.runInProgress:
            self.panel.logic.cancelRun()
        elif self.panel.dependencies.ensure(then=self.startSceneRun):
            self.startSceneRun()

    def startSceneRun(self, controlPointIndices=None) -> None:
        """A full scene run, or a live update of some fixed control points; returns at once."""
        panel = self.panel
        self._live = controlPointIndices is not None
        status = _("Running...") if panel.logic.workerRunning else _("Starting the MedDIFT worker...")
        self.start(lambda onDone, onProgress, onLog: panel.logic.startSceneRun(
            panel.logic.sceneRunInputs(panel.parameterNode), panel.runSettings(), onDone=onDone, onProgress=onProgress,
            onLog=onLog, controlPointIndices=controlPointIndices), self.onSceneRunDone, status, quiet=self._live)

    def start(self, begin: Callable, onDone: Callable, status: str, quiet: bool = False) -> None:
        """``begin(onDone, onProgress, onLog)`` starts a run on the logic; bad inputs are reported
        at once (in a dialog unless ``quiet``), else progress shows until ``onDone(outputs, error)``."""
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.panel.showStatus(status)
        try:
            begin(onDone, self.onProgress, self.onWorkerLog)
        except MedDIFTError as error:
            self.ui.progressBar.hide()
            self.report(error, quiet)
            return
        self.pollWorker()
        self.panel.updateGuiFromParameterNode()

    def pollWorker(self) -> None:
        """Poll the worker until nothing runs in it (runs, tracking and cursor matches alike)."""
        self._pollTimer.start()

    def onPollTimer(self) -> None:
        if not self.panel.logic.pollWorker():
            self._pollTimer.stop()

    def onProgress(self, stage: str, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * min(max(fraction, 0.0), 1.0)))
        self.panel.showStatus(f"{stage}: {message}" if message else stage)

    def onWorkerLog(self, level: str, message: str) -> None:
        self.panel.appendLog(f"[worker {level}] {message}")

    def onSceneRunDone(self, outputs, error) -> None:
        live, self._live = self._live, False
        if error is None:
            self.ui.progressBar.hide()
            self.panel.storeCreatedOutputs(outputs)
            self.panel.showSummary(self.panel.logic.describeOutputs(outputs))
        else:
            self.finishWithError(error, quiet=live)
        self.panel.updateGuiFromParameterNode()
        self.panel.live.runEnded()

    def finishWithError(self, error: Exception, quiet: bool = False) -> None:
        """End a run that failed: missing weights are offered (the run starts again once they are in place)."""
        self.ui.progressBar.hide()
        if isinstance(error, MissingWeightsError) and not quiet:
            self.panel.showStatus(str(error))
            self.panel.weights.offer(str(error), then=self.startSceneRun)
        else:
            self.report(error, quiet)

    def report(self, error: Exception, quiet: bool = False) -> None:
        """Show how a run ended: cancelled, a MedDIFT error (in a dialog unless ``quiet``) or a bug."""
        if isinstance(error, CancelledError):
            self.panel.showStatus(_("Cancelled; the scene is unchanged."))
        elif isinstance(error, MedDIFTError):
            self.panel.showStatus(str(error))
            self.panel.appendLog(f"Error: {error}")
            if not quiet:
                slicer.util.errorDisplay(str(error), windowTitle=_("MedDIFT"))
        else:
            logging.error("MedDIFT failed", exc_info=(type(error), error, error.__traceback__))
            self.panel.showStatus(_("Unexpected error: {error}").format(error=error))
            slicer.util.errorDisplay(
                _("Unexpected error: {error}\nSee the Python console for details.").format(error=error),
                windowTitle=_("MedDIFT"))
