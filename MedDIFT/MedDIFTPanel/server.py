"""Compute on this computer (a worker process) or on a ``meddift serve`` server."""

from __future__ import annotations

import qt
import slicer
from slicer.i18n import tr as _

from MedDIFTLib.core.errors import MedDIFTError
from MedDIFTLib.slicer.session import describe_server

from .section import Section

COMPUTE_ON_SETTING = "MedDIFT/ComputeOn"  # "local" or "server"
SERVER_URL_SETTING = "MedDIFT/ServerURL"


class ServerSection(Section):
    """Where runs go; the address is a setting of this computer, the token is never saved."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self.ui.computeOnComboBox.addItem(_("This computer"), "local")
        self.ui.computeOnComboBox.addItem(_("Server (meddift serve)"), "server")
        settings = qt.QSettings()
        self.ui.computeOnComboBox.currentIndex = 1 if settings.value(COMPUTE_ON_SETTING, "local") == "server" else 0
        self.ui.serverUrlLineEdit.text = str(settings.value(SERVER_URL_SETTING, ""))
        self.ui.computeOnComboBox.connect("currentIndexChanged(int)", self.onComputeOnChanged)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onComputeOnChanged)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onComputeOnChanged)
        self.ui.serverTestButton.connect("clicked(bool)", self.onTestServer)
        self.onComputeOnChanged()

    def onComputeOnChanged(self, *args) -> None:
        """A change takes effect with the next run (one in progress is stopped)."""
        remote = self.ui.computeOnComboBox.currentIndex == 1
        url = self.ui.serverUrlLineEdit.text.strip()
        settings = qt.QSettings()
        settings.setValue(COMPUTE_ON_SETTING, "server" if remote else "local")
        settings.setValue(SERVER_URL_SETTING, url)
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.serverTestButton):
            widget.enabled = remote
        self.panel.logic.setServer(url if remote and url else None, self.ui.serverTokenLineEdit.text or None)

    def onTestServer(self, *args) -> None:
        """Show the server's version and device, or why it cannot be reached (opens no session)."""
        url = self.ui.serverUrlLineEdit.text.strip()
        if not url:
            self.ui.serverStatusLabel.text = _("Enter the server's address first.")
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot reach the server."), waitCursor=True):
            try:
                self.ui.serverStatusLabel.text = describe_server(url, self.ui.serverTokenLineEdit.text or None)
            except MedDIFTError as error:
                self.ui.serverStatusLabel.text = str(error)
