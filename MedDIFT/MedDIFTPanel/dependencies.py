"""Installing the worker's Python packages in the background, with consent, progress and Cancel."""

from __future__ import annotations

import platform
from collections.abc import Callable

import qt
import slicer
from slicer.i18n import tr as _

from MedDIFTLib.core.errors import CancelledError
from MedDIFTLib.slicer import installs

from .section import Section

POLL_INTERVAL_MS = 300


class DependenciesSection(Section):
    """Checks the worker's requirements before a run; installs the missing ones with pip in child
    processes (Slicer's own pip is left as it is), then starts the run that asked for them."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._chain = None
        self._then: Callable[[], None] | None = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)
        self._row = qt.QWidget()
        layout = qt.QHBoxLayout(self._row)
        layout.setContentsMargins(0, 0, 0, 0)
        self._progressBar = qt.QProgressBar()
        self._progressBar.setRange(0, 0)
        self._cancelButton = qt.QPushButton(_("Cancel install"))
        self._cancelButton.connect("clicked(bool)", self.onCancel)
        layout.addWidget(self._progressBar)
        layout.addWidget(self._cancelButton)
        self._row.hide()
        panel.layout.addWidget(self._row)

    def cleanup(self) -> None:
        self._timer.stop()
        if self._chain is not None:
            self._chain.cancel()

    def ensure(self, then: Callable[[], None]) -> bool:
        """True when every requirement is installed; else, with the user's consent, install the
        missing ones in the background and call ``then()`` once they are in place."""
        missing = installs.missing_requirements()
        if not missing:
            return True
        if self._chain is not None:
            self.panel.showStatus(_("The Python packages are still being installed."))
            return False
        torchIndex = installs.torch_index_url(platform.system(), installs.driver_cuda_version())
        if not slicer.util.confirmOkCancelDisplay(
            _("MedDIFT runs its networks in a separate Python process that needs these packages:\n\n{packages}\n\n"
              "pip installs them into Slicer's Python in the background: PyTorch from {torchSource}, the others "
              "from PyPI. This downloads up to a few GB. Install now?").format(
                packages="\n".join(missing),
                torchSource=torchIndex or _("PyPI")),
            windowTitle=_("MedDIFT: install Python packages")):
            self.panel.showStatus(_("Python packages were not installed; MedDIFT cannot run without them."))
            return False
        commands = installs.install_commands(self.panel.logic.pythonExecutable(), missing, torchIndex)
        self._then = then
        self._chain = installs.install_chain(commands, self.onInstalled)
        self._row.show()
        self._cancelButton.enabled = True
        self.panel.showStatus(_("Installing Python packages in the background..."))
        self._chain.start()
        self._timer.start()
        return False

    def onTimer(self) -> None:
        chain = self._chain
        if chain is None or not chain.poll():
            self._timer.stop()
            return
        self._cancelButton.enabled = chain.cancellable
        self._cancelButton.toolTip = "" if chain.cancellable else _("pip is installing; it finishes first.")
        if chain.status():
            self.panel.showStatus(chain.status())

    def onCancel(self) -> None:
        if self._chain is not None:
            self._chain.cancel()

    def onInstalled(self, error) -> None:
        chain, self._chain = self._chain, None
        then, self._then = self._then, None
        self._row.hide()
        for line in chain.lines if chain is not None else []:
            self.panel.appendLog(f"[pip] {line}")
        installs.refresh_import_caches()
        if error is None:
            self.panel.showStatus(_("Python packages installed."))
            if then is not None:
                then()
        elif isinstance(error, CancelledError):
            self.panel.showStatus(_("Installation cancelled; the packages pip had installed stay."))
        else:
            self.panel.showStatus(_("Installing the Python packages failed (see the log)."))
            slicer.util.errorDisplay(_("Installing the Python packages failed:\n{error}").format(error=error),
                                     windowTitle=_("MedDIFT"))
