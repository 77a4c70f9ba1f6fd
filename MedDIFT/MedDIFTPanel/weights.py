"""The pretrained weights: their folder, which files are present, and getting them in the background."""

from __future__ import annotations

import math
from collections.abc import Callable

import ctk
import qt
import slicer
from slicer.i18n import tr as _

from MedDIFTLib.core.environment import child_environment
from MedDIFTLib.core.errors import CancelledError
from MedDIFTLib.slicer import weights_transfer

from .section import Section

POLL_INTERVAL_MS = 500


class WeightsSection(Section):
    """The weights folder (a setting of this computer), the presence of the chosen backbone's files
    and the download / import dialog; transfers run one after another in child processes."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._chain = None
        self._then: Callable[[], None] | None = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.weightsProgressBar.hide()
        self.ui.weightsCancelButton.hide()
        self.ui.weightsCancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.weightsDirectoryPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsDirectoryPathLineEdit.currentPath = panel.logic.weightsDirectory()
        self.ui.weightsDirectoryPathLineEdit.connect("currentPathChanged(QString)", self.onDirectoryChanged)

    def update(self, parameterNode, running: bool) -> None:
        backbone = self.panel.backbone.current()
        self.ui.weightsDirectoryPathLineEdit.enabled = backbone.requires_weights
        self.refreshStatus()

    def cleanup(self) -> None:
        self._timer.stop()
        if self._chain is not None:
            self._chain.cancel()

    def refreshStatus(self) -> None:
        """Which weight files of the chosen backbone are in the weights folder (found without loading them)."""
        from MedDIFTLib.weights import files_for_config, find_weight_file

        config = self.panel.backbone.current().weights_config
        if config is None:
            self.ui.weightsStatusLabel.text = _("none needed")
            return
        folder = self.panel.logic.weightsDirectory()
        self.ui.weightsStatusLabel.text = "; ".join(
            f"{entry.name}: {_('present') if find_weight_file(entry.all_names, folder) else _('missing')}"
            for entry in files_for_config(config))

    def onDirectoryChanged(self, path: str) -> None:
        if path:
            self.panel.logic.setWeightsDirectory(path)
            self.refreshStatus()

    def offer(self, reason: str, then: Callable[[], None]) -> None:
        """Ask how to get the weights (download with consent, or files the user has); ``then()`` is
        called once every chosen transfer has succeeded, never before."""
        folder = self.panel.logic.weightsDirectory()
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("MedDIFT: pretrained weights"))
        box.setIcon(qt.QMessageBox.Question)
        box.setText(_(
            "These features need pretrained weights (large files, published under their own license):\n{reason}\n\n"
            "Download them now, or load files you already have? They are stored in:\n{folder}\n"
            "(change this under Advanced).").format(reason=reason, folder=folder))
        downloadButton = box.addButton(_("Download"), qt.QMessageBox.AcceptRole)
        fileButton = box.addButton(_("Load from file..."), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        python = self.panel.logic.pythonExecutable()
        if box.clickedButton() == downloadButton:
            commands = [weights_transfer.download_command(python, folder)]
        elif box.clickedButton() == fileButton:
            paths = qt.QFileDialog.getOpenFileNames(
                slicer.util.mainWindow(), _("Choose the checkpoint files"), "",
                _("PyTorch checkpoints (*.pt *.pth *.ckpt);;All files (*)"))
            commands = [weights_transfer.import_command(python, path, folder) for path in paths]
        else:
            commands = []
        if not commands or self._chain is not None:
            return
        self._then = then
        self._chain = weights_transfer.weights_chain(commands, folder, self.onTransfersDone, child_environment())
        self.ui.weightsProgressBar.setRange(0, 0)
        self.ui.weightsProgressBar.show()
        self.ui.weightsCancelButton.show()
        self.ui.advancedCollapsibleButton.collapsed = False
        self.panel.showStatus(_("Getting the weights in the background..."))
        self._chain.start()
        self._timer.start()

    def onTimer(self) -> None:
        chain = self._chain
        if chain is None or not chain.poll():
            self._timer.stop()
            return
        progress = chain.current.progress
        if math.isfinite(progress.fraction):
            self.ui.weightsProgressBar.setRange(0, 100)
            self.ui.weightsProgressBar.value = int(round(100 * progress.fraction))
        self.ui.weightsStatusLabel.text = weights_transfer.format_progress(progress) or _("starting...")

    def onCancel(self) -> None:
        if self._chain is not None:
            self._chain.cancel()

    def onTransfersDone(self, error) -> None:
        chain, self._chain = self._chain, None
        then, self._then = self._then, None
        for line in chain.lines if chain is not None else []:
            self.panel.appendLog(f"[weights] {line}")
        self.ui.weightsProgressBar.hide()
        self.ui.weightsCancelButton.hide()
        self.refreshStatus()
        if error is None:
            self.panel.showStatus(_("Weights ready; running again."))
            if then is not None:
                then()
        elif isinstance(error, CancelledError):
            self.panel.showStatus(_("Weights transfer cancelled; nothing partial was kept."))
        else:
            self.panel.showStatus(str(error).splitlines()[0])
            slicer.util.errorDisplay(_("Could not get the weights:\n{error}").format(error=error),
                                     windowTitle=_("MedDIFT"))
