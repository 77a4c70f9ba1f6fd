"""MedDIFT: find where points of one CT lie in another, training-free, from pretrained features.

The Slicer module (GUI and wiring). The work runs in a background worker process
(``PythonSlicer -m MedDIFTLib.worker``); torch and monai are never imported in Slicer's process.
The scene glue and the worker session live in ``MedDIFTLib.slicer``, which is tested without Slicer.
"""

import enum
import importlib.util
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _importMedDIFTLib() -> None:
    """Make ``MedDIFTLib`` importable. An installed extension has it beside this file, on Slicer's
    module path; a source checkout has it one folder up, and that package is loaded by its path,
    so nothing else of the checkout (Testing/, benchmarks/, scripts/) becomes importable."""
    if "MedDIFTLib" in sys.modules or importlib.util.find_spec("MedDIFTLib") is not None:
        return
    packageDir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "MedDIFTLib")
    initFile = os.path.join(packageDir, "__init__.py")
    if not os.path.isfile(initFile):
        return
    spec = importlib.util.spec_from_file_location("MedDIFTLib", initFile, submodule_search_locations=[packageDir])
    package = importlib.util.module_from_spec(spec)
    sys.modules["MedDIFTLib"] = package
    spec.loader.exec_module(package)


_importMedDIFTLib()

# Torch-free and numpy-free: the panel's defaults come from the library's one source of options.
from MedDIFTLib.core.options import FieldOptions, MatchOptions, RunSettings  # noqa: E402

MATCH_DEFAULTS = MatchOptions()
FIELD_DEFAULTS = FieldOptions()
RUN_DEFAULTS = RunSettings()

WEIGHTS_DIRECTORY_SETTING = "MedDIFT/WeightsDirectory"
COMPUTE_ON_SETTING = "MedDIFT/ComputeOn"  # "local" or "server"
SERVER_URL_SETTING = "MedDIFT/ServerURL"
WEIGHTS_CONFIG = "ddpm-ct"  # the diffusion configuration whose files `meddift weights download` fetches by default
TORCH_REQUIREMENT = ">=2.2"
# Installs the torch build that matches the GPU (what the PyTorch extension uses), run in a child process.
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.7"
# (module imported by the worker, pip requirement); torch is installed by light-the-torch.
PYTHON_REQUIREMENTS = (
    ("numpy", "numpy>=1.24"),
    ("scipy", "scipy>=1.10"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("monai", "monai>=1.4,<1.7"),
    ("einops", "einops>=0.7"),
    ("tqdm", "tqdm>=4.60"),
    ("psutil", "psutil>=5.9"),
    ("dask", "dask[distributed]>=2024.8"),
)
POLL_INTERVAL_MS = 100
LIVE_DELAY_MS = 300
WEIGHTS_POLL_INTERVAL_MS = 500
CURSOR_INTERVAL_MS = 250
FLICKER_INTERVAL_MS = 500
PLACE_PAIR_KEY = "P"


#
# MedDIFT
#


class MedDIFT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDIFT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDIFT contributors"]
        self.parent.helpText = _("""
Finds where landmarks of a fixed CT lie in a moving CT, without training, by matching pretrained
network features (MAISI diffusion UNet activations, or weight-free MIND-SSC descriptors) with
cosine similarity. Optionally computes a dense displacement field (a transform that resamples
the moving volume onto the fixed one). Every match carries a confidence; unreliable matches are
kept, flagged and coloured.
""")
        self.parent.acknowledgementText = _("""
Method: MedDIFT (arXiv 2512.05571). Diffusion features from the MONAI MAISI models (NVIDIA, MONAI).
""")


#
# Parameter node
#


class Backbone(enum.Enum):
    """Feature extractor; the value is the worker's backbone name."""

    WEIGHT_FREE = "mind"
    DIFFUSION = "maisi"

    def label(self) -> str:
        return {Backbone.WEIGHT_FREE: _("Weight-free (MIND-SSC)"), Backbone.DIFFUSION: _("Diffusion (MAISI)")}[self]


class Device(enum.Enum):
    """Where the worker runs the network; the value is the worker's device name."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {Device.AUTO: _("Automatic"), Device.CPU: _("CPU"), Device.GPU: _("GPU (CUDA)")}[self]


class SearchMode(enum.Enum):
    """Where a point is searched: near its fixed position, or in the whole moving volume."""

    LOCAL = "local"
    GLOBAL = "global"

    def label(self) -> str:
        return {SearchMode.LOCAL: _("Local (sphere)"), SearchMode.GLOBAL: _("Global (whole volume)")}[self]


class BodyRegion(enum.Enum):
    """Body region the diffusion UNet is conditioned on; the value is the backbone's region name."""

    HEAD = "head"
    CHEST = "chest"
    ABDOMEN = "abdomen"
    PELVIS = "pelvis"

    def label(self) -> str:
        return {
            BodyRegion.HEAD: _("Head"),
            BodyRegion.CHEST: _("Chest"),
            BodyRegion.ABDOMEN: _("Abdomen"),
            BodyRegion.PELVIS: _("Pelvis"),
        }[self]


@parameterNodeWrapper
class MedDIFTParameterNode:
    """Inputs, outputs (created on Apply when None) and options; distances in mm."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    computeTransform: bool = True
    outputTransform: vtkMRMLTransformNode
    computeWarped: bool = False
    warpedVolume: vtkMRMLScalarVolumeNode
    computeOverlays: bool = False
    backbone: Backbone = Backbone(RUN_DEFAULTS.backbone)
    device: Device = Device(RUN_DEFAULTS.device)
    searchRadiusMm: Annotated[float, WithinRange(1.0, 100.0)] = MATCH_DEFAULTS.search_radius_mm
    livePropagation: bool = False
    searchMode: SearchMode = SearchMode(MATCH_DEFAULTS.mode)
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = MATCH_DEFAULTS.confidence_threshold
    coarseToFine: bool = MATCH_DEFAULTS.coarse_to_fine
    exactSimilarity: bool = MATCH_DEFAULTS.exact
    registrationIterations: Annotated[int, WithinRange(0, 500)] = FIELD_DEFAULTS.optimise_iterations
    diffusionTimestep: Annotated[int, WithinRange(0, 999)] = 20
    bodyRegion: BodyRegion = BodyRegion.CHEST
    baselineLesions: vtkMRMLSegmentationNode
    followupLesions: vtkMRMLSegmentationNode


#
# MedDIFTWidget
#


class MedDIFTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._liveTimer = None
        self._observedLandmarks = None
        self._pendingLiveIds = set()
        self._landmarksInteracting = False
        self._runningLiveJob = None
        self._pairRows = []
        self._movedPoints = None
        self._weightsTransfer = None
        self._weightsTimer = None
        self._pendingWeightTransfers = []
        self._cursorTimer = None
        self._cursorMatcher = None
        self._cursorMarker = None
        self._cursorFixedRas = None
        self._cursorMatch = None
        self._crosshairNode = None
        self._placeShortcut = None
        self._flickerTimer = None
        self._lesionRows = []
        self._lesionTable = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDIFT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDIFTLogic()

        self.ui.progressBar.hide()
        placeWidget = self.ui.fixedLandmarksPlaceWidget
        placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.pairsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.weightsDirectoryPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsDirectoryPathLineEdit.currentPath = MedDIFTLogic.weightsDirectory()
        self.ui.weightsDirectoryPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsDirectoryChanged)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self._liveTimer = qt.QTimer()
        self._liveTimer.setSingleShot(True)
        self._liveTimer.setInterval(LIVE_DELAY_MS)
        self._liveTimer.connect("timeout()", self.onLiveTimer)
        self._weightsTimer = qt.QTimer()
        self._weightsTimer.setInterval(WEIGHTS_POLL_INTERVAL_MS)
        self._weightsTimer.connect("timeout()", self.onWeightsTimer)
        self._cursorTimer = qt.QTimer()
        self._cursorTimer.setInterval(CURSOR_INTERVAL_MS)
        self._cursorTimer.connect("timeout()", self.onCursorTimer)
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(FLICKER_INTERVAL_MS)
        self._flickerTimer.connect("timeout()", self.onFlickerTimer)
        self._placeShortcut = qt.QShortcut(qt.QKeySequence(PLACE_PAIR_KEY), slicer.util.mainWindow())
        self._placeShortcut.setEnabled(False)
        self._placeShortcut.connect("activated()", self.onPlaceCursorPair)

        self.ui.weightsProgressBar.hide()
        self.ui.weightsCancelButton.hide()
        self.ui.weightsCancelButton.connect("clicked(bool)", self.onWeightsCancel)
        for label in (_("Landmark order"), _("Lowest confidence first"), _("Largest forward-backward first")):
            self.ui.pairOrderComboBox.addItem(label)
        self.ui.pairOrderComboBox.connect("currentIndexChanged(int)", self.refreshPairsTable)
        self.ui.nextUnreliableButton.connect("clicked(bool)", self.onNextUnreliable)
        self.ui.acceptPairButton.connect("clicked(bool)", lambda: self.onReviewPair("accepted"))
        self.ui.rejectPairButton.connect("clicked(bool)", lambda: self.onReviewPair("rejected"))
        self.ui.cursorButton.connect("toggled(bool)", self.onCursorToggled)
        for button, kind in (
            (self.ui.confidenceOverlayButton, "confidence"),
            (self.ui.jacobianOverlayButton, "jacobian"),
            (self.ui.magnitudeOverlayButton, "magnitude"),
        ):
            button.connect("toggled(bool)", lambda checked, kind=kind: self.onOverlayToggled(kind, checked))
        self.ui.fadeSlider.connect("valueChanged(int)", self.onFadeChanged)
        self.ui.flickerButton.connect("toggled(bool)", self.onFlickerToggled)
        self.refreshWeightsStatus()
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

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.pairsTableWidget.connect("cellClicked(int,int)", self.onPairClicked)
        self.ui.pairViewsButton.connect("clicked(bool)", self.onPairViewsButton)
        self.ui.warpMovingButton.connect("toggled(bool)", self.onWarpMovingToggled)
        self.ui.lesionsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.trackButton.connect("clicked(bool)", self.onTrackButton)
        self.ui.lesionsTableWidget.connect("cellClicked(int,int)", self.onLesionClicked)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._pollTimer is not None:
            for timer in (self._pollTimer, self._liveTimer, self._weightsTimer, self._cursorTimer, self._flickerTimer):
                timer.stop()
        if self._weightsTransfer is not None:
            self._weightsTransfer.cancel()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.isRunning:
            self.logic.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self.updateGuiFromParameterNode()

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        parameterNode = self._parameterNode
        running = self.logic.isRunning
        if parameterNode is None:
            self.ui.applyButton.enabled = running
            self._observeFixedLandmarks(None)
            return
        self.ui.outputTransformSelector.enabled = parameterNode.computeTransform
        self.ui.warpedVolumeSelector.enabled = parameterNode.computeWarped
        self.ui.computeWarpedCheckBox.enabled = parameterNode.computeTransform
        self.ui.fixedLandmarksPlaceWidget.setCurrentNode(parameterNode.fixedLandmarks)
        diffusion = parameterNode.backbone == Backbone.DIFFUSION
        for diffusionWidget in (
            self.ui.weightsDirectoryPathLineEdit,
            self.ui.diffusionTimestepSpinBox,
            self.ui.bodyRegionComboBox,
        ):
            diffusionWidget.enabled = diffusion
        ready = parameterNode.fixedVolume and parameterNode.movingVolume and (
            parameterNode.fixedLandmarks or parameterNode.computeTransform
        )
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running job; nothing is changed in the scene.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = (
                _("Match the fixed landmarks and compute the selected outputs.")
                if ready
                else _("Select fixed and moving volumes, and fixed landmarks or the transform output.")
            )
            self.ui.applyButton.enabled = bool(ready)
        canWarp = bool(parameterNode.outputTransform and parameterNode.movingVolume)
        self.ui.warpMovingButton.enabled = canWarp
        wasBlocked = self.ui.warpMovingButton.blockSignals(True)
        self.ui.warpMovingButton.checked = canWarp and (
            parameterNode.movingVolume.GetParentTransformNode() is parameterNode.outputTransform
        )
        self.ui.warpMovingButton.blockSignals(wasBlocked)
        self.ui.fadeSlider.enabled = canWarp
        self.ui.flickerButton.enabled = canWarp
        self.ui.cursorButton.enabled = bool(parameterNode.fixedVolume and parameterNode.movingVolume)
        overlayNodes = self.overlayNodes()
        for button, kind in self._overlayButtons():
            button.enabled = kind in overlayNodes
        canTrack = bool(parameterNode.fixedVolume and parameterNode.movingVolume and parameterNode.baselineLesions)
        self.ui.trackButton.enabled = canTrack and not running
        self.ui.trackButton.toolTip = (
            _("Find, segment and measure each baseline lesion in the follow-up (moving) volume.")
            if canTrack
            else _("Select the fixed (baseline) and moving (follow-up) volumes and the baseline lesions.")
        )
        live = parameterNode.livePropagation and parameterNode.fixedLandmarks is not None
        self._observeFixedLandmarks(parameterNode.fixedLandmarks if live else None)
        self.refreshPairsTable()

    # ------------------------------------------------------------------ running

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancelJob()
            return
        if not self.ensureDependencies():
            return
        self.startJob()

    def startJob(self, controlPointIndices=None) -> None:
        """Start a full run, or a live update of some fixed control points; returns at once."""
        from MedDIFTLib.core.errors import MedDIFTError

        parameterNode = self._parameterNode
        self._runningLiveJob = controlPointIndices is not None
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.showStatus(_("Running...") if self.logic.workerRunning else _("Starting the MedDIFT worker..."))
        try:
            self.logic.startJob(
                MedDIFTLogic.jobInputs(parameterNode),
                MedDIFTLogic.runSettings(parameterNode),
                onDone=self.onJobDone,
                onProgress=self.onJobProgress,
                onLog=self.onWorkerLog,
                controlPointIndices=controlPointIndices,
            )
        except MedDIFTError as error:
            self._runningLiveJob = None
            self.ui.progressBar.hide()
            self.showStatus(str(error))
            if controlPointIndices is None:
                slicer.util.errorDisplay(str(error), windowTitle=_("MedDIFT"))
            return
        if self.logic.isRunning:
            self._pollTimer.start()
        self.updateGuiFromParameterNode()

    def onPollTimer(self) -> None:
        self.logic.pollJob()
        if not self.logic.isRunning:
            self._pollTimer.stop()

    def onJobProgress(self, stage: str, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * min(max(fraction, 0.0), 1.0)))
        self.showStatus(f"{stage}: {message}" if message else stage)

    def onWorkerLog(self, level: str, message: str) -> None:
        self.appendLog(f"[worker {level}] {message}")

    def onJobDone(self, outputs, error) -> None:
        from MedDIFTLib.core.errors import CancelledError, MedDIFTError, MissingWeightsError

        live = self._runningLiveJob
        self._runningLiveJob = None
        self.ui.progressBar.hide()
        if error is None:
            self.storeCreatedOutputs(outputs)
            if self._cursorMatcher is not None and not live:
                self._cursorMatcher.clear()
            summary = MedDIFTLogic.describeOutputs(outputs)
            self.showStatus(summary)
            self.appendLog(summary)
        elif isinstance(error, CancelledError):
            self.showStatus(_("Cancelled; the scene is unchanged."))
        elif isinstance(error, MissingWeightsError) and not live:
            self.showStatus(str(error))
            if self.offerWeights(str(error)):
                self.startJob()
        elif isinstance(error, MedDIFTError):
            self.showStatus(str(error))
            self.appendLog(f"Error: {error}")
            if not live:
                slicer.util.errorDisplay(str(error), windowTitle=_("MedDIFT"))
        else:
            logging.error("MedDIFT failed", exc_info=(type(error), error, error.__traceback__))
            self.showStatus(_("Unexpected error: {error}").format(error=error))
            slicer.util.errorDisplay(
                _("Unexpected error: {error}\nSee the Python console for details.").format(error=error),
                windowTitle=_("MedDIFT"),
            )
        self.updateGuiFromParameterNode()
        if self._pendingLiveIds and self._parameterNode and self._parameterNode.livePropagation:
            self._liveTimer.start()

    def onTrackButton(self) -> None:
        """Track the baseline lesions into the follow-up in the background (progress and Cancel as Apply's)."""
        from MedDIFTLib.core.errors import MedDIFTError

        if self.logic.isRunning or self._parameterNode is None or not self.ensureDependencies():
            return
        parameterNode = self._parameterNode
        self._runningLiveJob = None
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.showStatus(_("Tracking lesions..."))
        try:
            self.logic.startTrack(
                MedDIFTLogic.trackInputs(parameterNode, self._lesionTable),
                MedDIFTLogic.runSettings(parameterNode),
                onDone=self.onTrackDone,
                onProgress=self.onJobProgress,
                onLog=self.onWorkerLog,
            )
        except MedDIFTError as error:
            self.ui.progressBar.hide()
            self.showStatus(str(error))
            slicer.util.errorDisplay(str(error), windowTitle=_("MedDIFT"))
            return
        if self.logic.isRunning:
            self._pollTimer.start()
        self.updateGuiFromParameterNode()

    def onTrackDone(self, outputs, error) -> None:
        """Select the follow-up segmentation, list the lesions; errors are reported as a run's."""
        if error is not None:
            self.onJobDone(None, error)
            return
        self.ui.progressBar.hide()
        if self._parameterNode is not None and self._parameterNode.followupLesions is None:
            self._parameterNode.followupLesions = outputs.followup_lesions
        self._lesionTable = outputs.table
        self.refreshLesionsTable(outputs.rows)
        summary = MedDIFTLogic.describeTrack(outputs)
        self.showStatus(summary)
        self.appendLog(summary)
        self.updateGuiFromParameterNode()

    def refreshLesionsTable(self, rows) -> None:
        """One row per lesion: name, status, volumes (mL) and their change, confidence."""
        self._lesionRows = list(rows)
        table = self.ui.lesionsTableWidget
        table.setRowCount(len(self._lesionRows))
        for rowIndex, row in enumerate(self._lesionRows):
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
        from MedDIFTLib.slicer.lesions import jump_to_lesion

        if not 0 <= rowIndex < len(self._lesionRows):
            return
        if slicer.app.layoutManager().layout != slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView:
            self.showPairViews()
        jump_to_lesion(slicer.mrmlScene, self._lesionRows[rowIndex])

    def storeCreatedOutputs(self, outputs) -> None:
        """Select the output nodes a run created, so the next run fills them instead of adding more."""
        parameterNode = self._parameterNode
        if parameterNode is None:
            return
        if outputs.moving_landmarks is not None and parameterNode.movingLandmarks is None:
            parameterNode.movingLandmarks = outputs.moving_landmarks
        if outputs.transform is not None and parameterNode.outputTransform is None:
            parameterNode.outputTransform = outputs.transform
        if outputs.warped_volume is not None and parameterNode.warpedVolume is None:
            parameterNode.warpedVolume = outputs.warped_volume

    def showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(f"{qt.QTime.currentTime().toString('hh:mm:ss')}  {text}")

    # ------------------------------------------------------------------ dependencies and weights

    def ensureDependencies(self) -> bool:
        """Install missing Python packages on first use, with the user's consent."""
        missing = MedDIFTLogic.missingPythonPackages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "MedDIFT runs its networks in a separate Python process that needs these packages:\n\n{packages}\n\n"
                "PyTorch is installed by the PyTorch extension (matching your GPU); the others with pip. "
                "This downloads up to a few GB and may take several minutes. Install now?"
            ).format(packages="\n".join(missing)),
            windowTitle=_("MedDIFT: install Python packages"),
        ):
            self.showStatus(_("Python packages were not installed; MedDIFT cannot run without them."))
            return False
        try:
            with slicer.util.WaitCursor():
                self.logic.installPythonPackages(missing)
        except Exception as error:
            logging.error("Installing MedDIFT dependencies failed", exc_info=True)
            slicer.util.errorDisplay(
                _(
                    "Installing the Python packages failed:\n{error}\n\n"
                    "Restart Slicer and press Apply again. If it keeps failing, install the PyTorch extension "
                    "from the Extensions Manager, check the internet connection, and see the Python console."
                ).format(error=error),
                windowTitle=_("MedDIFT"),
            )
            return False
        still_missing = MedDIFTLogic.missingPythonPackages()
        if still_missing:
            slicer.util.errorDisplay(
                _("These packages are still missing: {packages}. Restart Slicer and press Apply again.").format(
                    packages=", ".join(still_missing)
                ),
                windowTitle=_("MedDIFT"),
            )
            return False
        return True

    def offerWeights(self, reason: str) -> bool:
        """Ask how to get the diffusion weights: download (with consent) or copy from files. The
        transfer runs in a background process; True when one was started (the job restarts after it)."""
        from MedDIFTLib.slicer import weights_job

        folder = MedDIFTLogic.weightsDirectory()
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("MedDIFT: diffusion weights"))
        box.setIcon(qt.QMessageBox.Question)
        box.setText(
            _(
                "The diffusion features need the pretrained MAISI weights (large files published by NVIDIA/MONAI "
                "under the NVIDIA Open Model License):\n{reason}\n\nDownload them now, or "
                "load files you already have? They are stored in:\n{folder}\n(change this under Advanced)."
            ).format(reason=reason, folder=folder)
        )
        downloadButton = box.addButton(_("Download"), qt.QMessageBox.AcceptRole)
        fileButton = box.addButton(_("Load from file..."), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        python = MedDIFTLogic.pythonExecutable()
        if clicked == downloadButton:
            commands = [weights_job.download_command(python, folder)]
        elif clicked == fileButton:
            paths = qt.QFileDialog.getOpenFileNames(
                slicer.util.mainWindow(),
                _("Choose the MAISI checkpoint files"),
                "",
                _("PyTorch checkpoints (*.pt *.pth *.ckpt);;All files (*)"),
            )
            commands = [weights_job.import_command(python, path, folder) for path in paths]
        else:
            commands = []
        if not commands:
            return False
        self._pendingWeightTransfers = commands[1:]
        self.startWeightsTransfer(commands[0], folder)
        return True

    def startWeightsTransfer(self, command, folder: str) -> None:
        """Run one ``meddift weights`` command in the background; the GUI stays responsive."""
        self.ui.weightsProgressBar.setRange(0, 0)
        self.ui.weightsProgressBar.show()
        self.ui.weightsCancelButton.show()
        self.ui.advancedCollapsibleButton.collapsed = False
        self.showStatus(_("Getting the diffusion weights in the background..."))
        self._weightsTransfer = self.logic.startWeightsTransfer(command, folder, self.onWeightsTransferDone)
        if self._weightsTransfer.running:
            self._weightsTimer.start()

    def onWeightsTimer(self) -> None:
        from MedDIFTLib.slicer.weights_job import format_progress

        transfer = self._weightsTransfer
        if transfer is None or not transfer.poll():
            self._weightsTimer.stop()
            return
        progress = transfer.progress
        if math.isfinite(progress.fraction):
            self.ui.weightsProgressBar.setRange(0, 100)
            self.ui.weightsProgressBar.value = int(round(100 * progress.fraction))
        self.ui.weightsStatusLabel.text = format_progress(progress) or _("starting...")

    def onWeightsCancel(self) -> None:
        self._pendingWeightTransfers = []
        if self._weightsTransfer is not None:
            self._weightsTransfer.cancel()

    def onWeightsTransferDone(self, error) -> None:
        from MedDIFTLib.core.errors import CancelledError

        transfer, self._weightsTransfer = self._weightsTransfer, None
        for line in transfer.output_lines() if transfer is not None else []:
            self.appendLog(f"[weights] {line}")
        if error is None and self._pendingWeightTransfers:
            command, self._pendingWeightTransfers = self._pendingWeightTransfers[0], self._pendingWeightTransfers[1:]
            self.startWeightsTransfer(command, transfer.weights_dir)
            return
        self._weightsTimer.stop()
        self.ui.weightsProgressBar.hide()
        self.ui.weightsCancelButton.hide()
        self.refreshWeightsStatus()
        if error is None:
            self.showStatus(_("Weights ready; running again."))
            self.startJob()
        elif isinstance(error, CancelledError):
            self.showStatus(_("Weights transfer cancelled; nothing partial was kept."))
        else:
            self.showStatus(str(error).splitlines()[0])
            slicer.util.errorDisplay(_("Could not get the weights:\n{error}").format(error=error),
                                     windowTitle=_("MedDIFT"))

    def refreshWeightsStatus(self) -> None:
        """Which weight files of the diffusion backbone are in the weights folder."""
        self.ui.weightsStatusLabel.text = "; ".join(
            f"{name}: {_('present') if present else _('missing')}"
            for name, present in MedDIFTLogic.weightsPresence(MedDIFTLogic.weightsDirectory())
        )

    def onComputeOnChanged(self, *args) -> None:
        """Use the local worker or the server; a change takes effect with the next job (a running one is stopped)."""
        remote = self.ui.computeOnComboBox.currentIndex == 1
        url = self.ui.serverUrlLineEdit.text.strip()
        settings = qt.QSettings()
        settings.setValue(COMPUTE_ON_SETTING, "server" if remote else "local")
        settings.setValue(SERVER_URL_SETTING, url)
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.serverTestButton):
            widget.enabled = remote
        self.logic.setServer(url if remote and url else None, self.ui.serverTokenLineEdit.text or None)

    def onTestServer(self, *args) -> None:
        """Show the server's version and device, or why it cannot be reached (opens no session)."""
        from MedDIFTLib.core.errors import MedDIFTError
        from MedDIFTLib.slicer.session import describe_server

        url = self.ui.serverUrlLineEdit.text.strip()
        if not url:
            self.ui.serverStatusLabel.text = _("Enter the server's address first.")
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot reach the server."), waitCursor=True):
            try:
                self.ui.serverStatusLabel.text = describe_server(url, self.ui.serverTokenLineEdit.text or None)
            except MedDIFTError as error:
                self.ui.serverStatusLabel.text = str(error)

    def onWeightsDirectoryChanged(self, path: str) -> None:
        if path:
            qt.QSettings().setValue(WEIGHTS_DIRECTORY_SETTING, path)
            self.refreshWeightsStatus()

    # ------------------------------------------------------------------ live propagation

    def _observeFixedLandmarks(self, markupsNode) -> None:
        if markupsNode is self._observedLandmarks:
            return
        if self._observedLandmarks is not None:
            for event, method in self._landmarkObservations():
                self.removeObserver(self._observedLandmarks, event, method)
        self._observedLandmarks = markupsNode
        self._pendingLiveIds.clear()
        if markupsNode is not None:
            from MedDIFTLib.slicer.live import MovedPoints

            self._movedPoints = MovedPoints()
            self._movedPoints.remember(markupsNode)
            for event, method in self._landmarkObservations():
                self.addObserver(markupsNode, event, method)

    def _landmarkObservations(self):
        markups = slicer.vtkMRMLMarkupsNode
        return (
            (markups.PointModifiedEvent, self.onLandmarkModified),
            (markups.PointPositionDefinedEvent, self.onLandmarkModified),
            (markups.PointStartInteractionEvent, self.onLandmarkInteractionStarted),
            (markups.PointEndInteractionEvent, self.onLandmarkInteractionEnded),
        )

    @vtk.calldata_type(vtk.VTK_INT)
    def onLandmarkModified(self, caller, event, controlPointIndex=None) -> None:
        """Queue the fixed control points whose position changed for a live re-match.

        VTK calls this without the index for batched edits (hardening a transform, setting all
        positions, undo): ``None`` re-checks every point. Selecting, relabelling or locking a
        point does not move it, so it is not re-matched."""
        if self._movedPoints is None:
            return
        if controlPointIndex is not None and not 0 <= controlPointIndex < caller.GetNumberOfControlPoints():
            controlPointIndex = None
        for index in self._movedPoints.moved(caller, controlPointIndex):
            self._pendingLiveIds.add(caller.GetNthControlPointID(index))
        if self._pendingLiveIds and not self._landmarksInteracting:
            self._liveTimer.start()

    def onLandmarkInteractionStarted(self, caller, event) -> None:
        self._landmarksInteracting = True
        self._liveTimer.stop()

    def onLandmarkInteractionEnded(self, caller, event) -> None:
        self._landmarksInteracting = False
        self._liveTimer.start()

    def onLiveTimer(self) -> None:
        """Re-match the fixed landmarks placed or moved since the last update (features are cached)."""
        parameterNode = self._parameterNode
        if not self._pendingLiveIds or parameterNode is None or not parameterNode.livePropagation:
            return
        if self.logic.isRunning or MedDIFTLogic.missingPythonPackages():
            return
        if not (parameterNode.fixedVolume and parameterNode.movingVolume and parameterNode.fixedLandmarks):
            return
        landmarks = parameterNode.fixedLandmarks
        indices = sorted(
            index
            for index in (landmarks.GetControlPointIndexByID(pointId) for pointId in self._pendingLiveIds)
            if index >= 0
            and landmarks.GetNthControlPointPositionStatus(index) == slicer.vtkMRMLMarkupsNode.PositionDefined
        )
        self._pendingLiveIds.clear()
        if indices:
            self.startJob(controlPointIndices=indices)

    # ------------------------------------------------------------------ visual QA

    def refreshPairsTable(self, *args) -> None:
        """One row per matched pair (label, confidence, forward-backward mm), coloured by confidence,
        in the chosen order; rejected and accepted pairs are marked; the summary line counts them."""
        from MedDIFTLib.slicer.qa import Order, ordered_rows, summary
        from MedDIFTLib.slicer.results import pair_rows, reviews
        from MedDIFTLib.slicer.views import confidence_color

        parameterNode = self._parameterNode
        table = self.ui.pairsTableWidget
        rows, decisions = [], {}
        if parameterNode is not None and parameterNode.fixedLandmarks and parameterNode.movingLandmarks:
            decisions = reviews(parameterNode.movingLandmarks)
            order = list(Order)[max(self.ui.pairOrderComboBox.currentIndex, 0)]
            rows = ordered_rows(pair_rows(parameterNode.fixedLandmarks, parameterNode.movingLandmarks), order)
        self._pairRows = rows
        decisionTexts = {"accepted": _("accepted"), "rejected": _("rejected")}
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

    def onNextUnreliable(self) -> None:
        """Select and show the worst pair that is unreliable and not yet accepted or rejected."""
        from MedDIFTLib.slicer.qa import next_unreliable
        from MedDIFTLib.slicer.results import reviews

        parameterNode = self._parameterNode
        if parameterNode is None or not parameterNode.movingLandmarks:
            return
        row = next_unreliable(self._pairRows, reviews(parameterNode.movingLandmarks))
        if row is None:
            self.showStatus(_("No unreliable pair left to review."))
            return
        rowIndex = self._pairRows.index(row)
        self.ui.pairsTableWidget.selectRow(rowIndex)
        self.onPairClicked(rowIndex, 0)

    def onReviewPair(self, decision: str) -> None:
        """Accept or reject the selected pair (a rejected one is unselected and labelled, never deleted)."""
        from MedDIFTLib.slicer.qa import set_decision

        parameterNode = self._parameterNode
        rowIndex = self.ui.pairsTableWidget.currentRow()
        if parameterNode is None or not parameterNode.movingLandmarks or not 0 <= rowIndex < len(self._pairRows):
            return
        set_decision(parameterNode.movingLandmarks, self._pairRows[rowIndex].label, decision)
        self.refreshPairsTable()

    # ------------------------------------------------------------------ correspondence cursor

    def onCursorToggled(self, checked: bool) -> None:
        """While on, the moving view follows the mouse in the fixed view; P places the pair."""
        from MedDIFTLib.slicer.cursor import CursorMatcher

        if self._crosshairNode is not None:
            self.removeObserver(self._crosshairNode, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent,
                                self.onCursorMoved)
            self._crosshairNode = None
        self._cursorTimer.stop()
        self._placeShortcut.setEnabled(checked)
        if not checked:
            if self._cursorMarker is not None:
                slicer.mrmlScene.RemoveNode(self._cursorMarker)
                self._cursorMarker = None
            return
        if self._cursorMatcher is None:
            self._cursorMatcher = CursorMatcher(interval_s=CURSOR_INTERVAL_MS / 1000.0)
        self.showPairViews()
        self._crosshairNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        self.addObserver(self._crosshairNode, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent,
                         self.onCursorMoved)
        self._cursorTimer.start()

    def onCursorMoved(self, caller, event) -> None:
        """Map the mouse position in the fixed view to the moving view (through the field, else by matching)."""
        from MedDIFTLib.slicer.cursor import CursorMatch, map_through_field, show_cursor_match
        from MedDIFTLib.slicer.views import FIXED_VIEW

        parameterNode = self._parameterNode
        if parameterNode is None or not (parameterNode.fixedVolume and parameterNode.movingVolume):
            return
        xyz = [0.0, 0.0, 0.0]
        sliceNode = caller.GetCursorPositionXYZ(xyz)
        if sliceNode is None or sliceNode.GetLayoutName() != FIXED_VIEW:
            return
        fixedRas = [0.0, 0.0, 0.0]
        caller.GetCursorPositionRAS(fixedRas)
        self._cursorFixedRas = tuple(fixedRas)
        if parameterNode.outputTransform is not None:
            match = CursorMatch(map_through_field(parameterNode.outputTransform, fixedRas, parameterNode.movingVolume))
        else:
            match = self._cursorMatcher.request(fixedRas)
        if match is not None:
            self._cursorMatch = match
            self._cursorMarker = show_cursor_match(slicer.mrmlScene, match, self._cursorMarker)

    def onCursorTimer(self) -> None:
        """Send the newest cursor point to the worker when none is in flight (throttled)."""
        from MedDIFTLib.core.errors import MedDIFTError

        parameterNode = self._parameterNode
        if parameterNode is None or self.logic.isRunning or MedDIFTLogic.missingPythonPackages():
            return
        point = self._cursorMatcher.take_pending(time.monotonic())
        if point is None:
            return
        try:
            self.logic.session.start_cursor_match(MedDIFTLogic.jobInputs(parameterNode),
                                                  MedDIFTLogic.runSettings(parameterNode), point, self.onCursorMatched)
        except MedDIFTError as error:
            self._cursorMatcher.answered(None)
            self.showStatus(str(error))
            return
        self._pollTimer.start()

    def onCursorMatched(self, outputs, error) -> None:
        from MedDIFTLib.slicer.cursor import cursor_match_from, show_cursor_match

        match = cursor_match_from(outputs.matches) if error is None else None
        self._cursorMatcher.answered(match)
        if error is not None:
            self.showStatus(str(error))
        if self.ui.cursorButton.checked and self._cursorFixedRas is not None:
            cached = self._cursorMatcher.request(self._cursorFixedRas)
            if cached is not None:
                self._cursorMatch = cached
                self._cursorMarker = show_cursor_match(slicer.mrmlScene, cached, self._cursorMarker)

    def onPlaceCursorPair(self) -> None:
        """Add the cursor's pair (fixed point and its match) to the landmarks, under one new label."""
        from MedDIFTLib.slicer.cursor import place_pair

        parameterNode = self._parameterNode
        if parameterNode is None or self._cursorFixedRas is None or self._cursorMatch is None:
            return
        if parameterNode.fixedLandmarks is None:
            parameterNode.fixedLandmarks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        if parameterNode.movingLandmarks is None:
            parameterNode.movingLandmarks = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", f"{parameterNode.fixedLandmarks.GetName()} in moving"
            )
        label = place_pair(parameterNode.fixedLandmarks, parameterNode.movingLandmarks, self._cursorFixedRas,
                           self._cursorMatch)
        self.showStatus(_("Placed the pair {label}.").format(label=label))

    # ------------------------------------------------------------------ overlays, fade and flicker

    def _overlayButtons(self):
        return (
            (self.ui.confidenceOverlayButton, "confidence"),
            (self.ui.jacobianOverlayButton, "jacobian"),
            (self.ui.magnitudeOverlayButton, "magnitude"),
        )

    def overlayNodes(self) -> dict:
        """The QA overlay volumes of the fixed volume, by kind."""
        from MedDIFTLib.slicer.overlays import KINDS, existing_overlay

        parameterNode = self._parameterNode
        if parameterNode is None or not parameterNode.fixedVolume:
            return {}
        found = {name: existing_overlay(slicer.mrmlScene, parameterNode.fixedVolume, kind)
                 for name, kind in KINDS.items()}
        return {name: node for name, node in found.items() if node is not None}

    def onOverlayToggled(self, kind: str, checked: bool) -> None:
        """Show one overlay over the fixed volume (the other overlay buttons go off), with its legend."""
        from MedDIFTLib.slicer.overlays import show_overlay

        parameterNode = self._parameterNode
        if parameterNode is None or not parameterNode.fixedVolume:
            return
        for button, other in self._overlayButtons():
            if other != kind and checked:
                wasBlocked = button.blockSignals(True)
                button.checked = False
                button.blockSignals(wasBlocked)
        node = self.overlayNodes().get(kind) if checked else None
        show_overlay(slicer.mrmlScene, parameterNode.fixedVolume, node)
        colorsLogic = getattr(getattr(slicer.modules, "colors", None), "logic", None)
        if node is not None and colorsLogic is not None:
            colorsLogic().AddDefaultColorLegendDisplayNode(node)

    def onFadeChanged(self, value: int) -> None:
        """Fade in the fixed view from the fixed volume (0) to the moving volume through the transform (100)."""
        from MedDIFTLib.slicer.overlays import show_fade

        parameterNode = self._parameterNode
        if parameterNode is None or not (parameterNode.movingVolume and parameterNode.outputTransform):
            return
        show_fade(slicer.mrmlScene, parameterNode.fixedVolume, parameterNode.movingVolume,
                  parameterNode.outputTransform, value / 100.0)

    def onFlickerToggled(self, checked: bool) -> None:
        if checked:
            self._flickerTimer.start()
        else:
            self._flickerTimer.stop()

    def onFlickerTimer(self) -> None:
        self.ui.fadeSlider.value = 0 if self.ui.fadeSlider.value >= 50 else 100

    def onPairViewsButton(self) -> None:
        self.showPairViews()

    def showPairViews(self) -> None:
        """Side-by-side layout: fixed volume on the left (Red), moving volume on the right (Yellow)."""
        from MedDIFTLib.slicer.views import show_volumes_in_pair_views

        parameterNode = self._parameterNode
        if parameterNode is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        show_volumes_in_pair_views(slicer.mrmlScene, parameterNode.fixedVolume, parameterNode.movingVolume)

    def onPairClicked(self, rowIndex: int, column: int) -> None:
        from MedDIFTLib.slicer.views import jump_to_pair

        if not 0 <= rowIndex < len(self._pairRows):
            return
        layoutManager = slicer.app.layoutManager()
        if layoutManager.layout != slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView:
            self.showPairViews()
        jump_to_pair(slicer.mrmlScene, self._pairRows[rowIndex])

    def onWarpMovingToggled(self, checked: bool) -> None:
        """Show the moving volume through the transform (resampled onto the fixed one), or as it is."""
        parameterNode = self._parameterNode
        if parameterNode is None or not parameterNode.movingVolume or not parameterNode.outputTransform:
            return
        moving, transform = parameterNode.movingVolume, parameterNode.outputTransform
        parent = moving.GetParentTransformNode()
        if checked:
            if parent is not None and parent is not transform:
                slicer.util.errorDisplay(
                    _(
                        "The moving volume is already under the transform '{parent}'. Place '{parent}' under "
                        "'{transform}' in the Transforms module to see the result."
                    ).format(parent=parent.GetName(), transform=transform.GetName()),
                    windowTitle=_("MedDIFT"),
                )
                self.ui.warpMovingButton.checked = False
                return
            moving.SetAndObserveTransformNodeID(transform.GetID())
        elif parent is transform:
            moving.SetAndObserveTransformNodeID(None)


#
# MedDIFTLogic
#


class MedDIFTLogic(ScriptedLoadableModuleLogic):
    """Runs MedDIFT jobs through a ``MedDIFTLib.slicer.session.Session``: a background worker
    process that stays alive between runs (features stay cached). Non-blocking: :meth:`startJob`
    then :meth:`pollJob` from a timer. Blocking: :meth:`run`, for scripts and tests."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._server = (None, None)

    def getParameterNode(self):
        return MedDIFTParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ settings

    @staticmethod
    def weightsDirectory() -> str:
        """Folder of the diffusion weights: setting ``MedDIFT/WeightsDirectory``, by default the
        folder the ``meddift`` command line uses too."""
        from MedDIFTLib.weights import default_weights_dir

        return str(qt.QSettings().value(WEIGHTS_DIRECTORY_SETTING, str(default_weights_dir())))

    @staticmethod
    def runSettings(parameterNode) -> RunSettings:
        """Typed worker options from the parameter node (raises BadInputError for out-of-range values)."""
        backboneOptions = {}
        if parameterNode.backbone == Backbone.DIFFUSION:
            backboneOptions = {
                "weights_dir": MedDIFTLogic.weightsDirectory(),
                "timestep": int(parameterNode.diffusionTimestep),
                "top_region": parameterNode.bodyRegion.value,
                "bottom_region": parameterNode.bodyRegion.value,
            }
        return RunSettings(
            backbone=parameterNode.backbone.value,
            backbone_options=backboneOptions,
            device=parameterNode.device.value,
            match=MatchOptions(
                search_radius_mm=float(parameterNode.searchRadiusMm),
                mode=parameterNode.searchMode.value,
                confidence_threshold=float(parameterNode.confidenceThreshold),
                coarse_to_fine=bool(parameterNode.coarseToFine),
                exact=bool(parameterNode.exactSimilarity),
            ),
            field=FieldOptions(optimise_iterations=int(parameterNode.registrationIterations)),
        )

    @staticmethod
    def jobInputs(parameterNode):
        """Scene nodes of a run from the parameter node."""
        from MedDIFTLib.slicer.jobs import JobInputs

        return JobInputs(
            fixed_volume=parameterNode.fixedVolume,
            moving_volume=parameterNode.movingVolume,
            fixed_landmarks=parameterNode.fixedLandmarks,
            moving_landmarks=parameterNode.movingLandmarks,
            transform=parameterNode.outputTransform,
            warped_volume=parameterNode.warpedVolume,
            compute_landmarks=parameterNode.fixedLandmarks is not None,
            compute_transform=parameterNode.computeTransform,
            compute_warped=parameterNode.computeTransform and parameterNode.computeWarped,
            compute_overlays=parameterNode.computeOverlays,
        )

    @staticmethod
    def trackInputs(parameterNode, table=None):
        """Scene nodes of a lesion tracking run: baseline = fixed volume, follow-up = moving volume."""
        from MedDIFTLib.slicer.track_job import TrackInputs

        return TrackInputs(
            baseline_volume=parameterNode.fixedVolume,
            followup_volume=parameterNode.movingVolume,
            baseline_lesions=parameterNode.baselineLesions,
            followup_lesions=parameterNode.followupLesions,
            table=table,
        )

    @staticmethod
    def describeTrack(outputs) -> str:
        """One line about a finished tracking run: lesions tracked, flagged ones, time."""
        flagged = sum(row.status != "ok" for row in outputs.rows)
        seconds = ((outputs.summary or {}).get("seconds") or {}).get("total", float("nan"))
        return _("{total} lesions tracked, {flagged} flagged ({seconds:.1f} s)").format(
            total=len(outputs.rows), flagged=flagged, seconds=seconds
        )

    @staticmethod
    def describeOutputs(outputs) -> str:
        """One line about a finished run: matches, unreliable ones, time, Jacobian of the field."""
        parts = []
        matches = outputs.matches
        if matches is not None:
            found = sum(matches.found(row) for row in range(len(matches)))
            unreliable = int((~matches.reliable).sum())
            cached = _(", features cached") if matches.features_cached else ""
            parts.append(
                _("{found} of {total} landmarks matched, {unreliable} unreliable ({seconds:.1f} s{cached})").format(
                    found=found, total=len(matches), unreliable=unreliable, seconds=matches.seconds, cached=cached
                )
            )
        jacobian = (outputs.register_summary or {}).get("jacobian") or {}
        if jacobian:
            parts.append(
                _("transform Jacobian {low:.2f} to {high:.2f}, {folding:.3%} folding").format(
                    low=jacobian.get("min", float("nan")),
                    high=jacobian.get("max", float("nan")),
                    folding=jacobian.get("fraction_folding", float("nan")),
                )
            )
        return "; ".join(parts) if parts else _("Done.")

    # ------------------------------------------------------------------ dependencies and weights

    @staticmethod
    def missingPythonPackages() -> list:
        """Requirements the worker needs that are not installed (checked without importing them)."""
        missing = [f"torch{TORCH_REQUIREMENT}"] if importlib.util.find_spec("torch") is None else []
        missing += [
            requirement for module, requirement in PYTHON_REQUIREMENTS if importlib.util.find_spec(module) is None
        ]
        return missing

    @staticmethod
    def installPythonPackages(requirements) -> None:
        """Install the missing packages, each in a child process, so Slicer's process stays torch-free.

        torch comes from light-the-torch (the build that matches the GPU, as the PyTorch extension
        picks it, without torchvision); the rest with pip. Blocks until done (a wait cursor shows)."""
        from MedDIFTLib.core.errors import MedDIFTError

        others = [requirement for requirement in requirements if not requirement.startswith("torch")]
        if len(others) != len(requirements):
            slicer.util.pip_install(LIGHT_THE_TORCH_REQUIREMENT)
            process = slicer.util.launchConsoleProcess(
                [MedDIFTLogic.pythonExecutable(), "-m", "light_the_torch", "install", f"torch{TORCH_REQUIREMENT}"]
            )
            try:
                slicer.util.logProcessOutput(process)
            except subprocess.CalledProcessError:
                raise MedDIFTError(_("PyTorch was not installed (see the Python console).")) from None
        if others:
            slicer.util.pip_install(others)
        importlib.invalidate_caches()

    @staticmethod
    def weightsPresence(folder: str):
        """``(file name, present)`` for each weight file of the diffusion backbone, found without loading it."""
        from MedDIFTLib.weights import files_for_config, find_weight_file

        return [(entry.name, find_weight_file(entry.all_names, folder) is not None)
                for entry in files_for_config(WEIGHTS_CONFIG)]

    def startWeightsTransfer(self, command, folder: str, onDone):
        """Start ``command`` (``meddift weights download|import``) in a background process writing
        into ``folder``; returns the :class:`MedDIFTLib.slicer.weights_job.WeightsTransfer` to poll."""
        from MedDIFTLib.core.environment import child_environment
        from MedDIFTLib.slicer.weights_job import WeightsTransfer

        transfer = WeightsTransfer(command, folder, onDone, environment=child_environment())
        transfer.start()
        return transfer

    # ------------------------------------------------------------------ worker

    @staticmethod
    def pythonExecutable() -> str:
        return shutil.which("PythonSlicer") or sys.executable

    @property
    def session(self):
        """The worker session (started on first use) of Slicer's scene."""
        if self._session is None:
            from MedDIFTLib.slicer.session import Session

            serverUrl, token = self._server
            self._session = Session(slicer.mrmlScene, python_executable=self.pythonExecutable(),
                                    server_url=serverUrl, token=token)
        return self._session

    def setServer(self, serverUrl, token=None) -> None:
        """Run jobs on the ``meddift serve`` server at ``serverUrl`` (None: the local worker).

        A change stops the current worker or session (and a running job); the next job starts the new one."""
        if (serverUrl, token) != self._server:
            self.shutdown()
            self._server = (serverUrl, token)

    @property
    def workerRunning(self) -> bool:
        return self._session is not None and self._session.worker_running

    @property
    def isRunning(self) -> bool:
        return self._session is not None and self._session.busy

    def startJob(self, inputs, settings, onDone, onProgress=None, onLog=None, controlPointIndices=None) -> None:
        """Check the inputs, then run the job in the background (starting the worker if needed).

        ``onDone(outputs, error)`` is called from :meth:`pollJob` (or :meth:`cancelJob`) when the
        job ends. ``controlPointIndices``: re-match only these fixed control points (live
        propagation). Raises MedDIFTError at once for bad inputs or when a job is already running.
        """
        self.session.start_job(inputs, settings, onDone, on_progress=onProgress, on_log=onLog,
                               control_point_indices=controlPointIndices)

    def startTrack(self, inputs, settings, onDone, onProgress=None, onLog=None) -> None:
        """Track lesions in the background (``inputs``: a ``MedDIFTLib.slicer.track_job.TrackInputs``);
        ``onDone(outputs, error)`` gets a ``TrackOutputs``. Raises MedDIFTError at once for bad inputs."""
        self.session.start_track(inputs, settings, onDone, on_progress=onProgress, on_log=onLog)

    def runTrack(self, inputs, settings=None, progress=None, timeout=None):
        """Track lesions and wait (scripts and tests); returns ``MedDIFTLib.slicer.track_job.TrackOutputs``."""
        return self.session.run_track(inputs, settings or RunSettings(), progress=progress, timeout_s=timeout)

    def pollJob(self) -> bool:
        """Advance the running job (call from a GUI timer); False once it has ended."""
        return self._session is not None and self._session.poll()

    def cancelJob(self) -> None:
        """Kill the worker's process tree; the job ends with CancelledError and the scene is unchanged."""
        if self._session is not None:
            self._session.cancel()

    def run(self, inputs, settings=None, controlPointIndices=None, progress=None, timeout=None):
        """Run a job and wait for it (scripts and tests); returns ``MedDIFTLib.slicer.jobs.JobOutputs``.

        ``inputs``: a ``MedDIFTLib.slicer.jobs.JobInputs``; ``settings``: a
        ``MedDIFTLib.core.options.RunSettings`` (default: the library's defaults).
        ``controlPointIndices``: update only the partners of these fixed control points.
        ``progress(stage, fraction, message)`` receives progress; ``timeout`` bounds the wait for
        each worker event (s). Raises MedDIFTError on failure, leaving the scene unchanged.
        """
        return self.session.run(inputs, settings or RunSettings(), control_point_indices=controlPointIndices,
                                progress=progress, timeout_s=timeout)

    def shutdown(self) -> None:
        """Stop the worker and delete the job files."""
        if self._session is not None:
            self._session.shutdown()
            self._session = None


#
# MedDIFTTest
#


class MedDIFTTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: the logic on synthetic volumes with the weight-free backbone (real worker)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MatchShiftedVolume()
        self.setUp()
        self.test_VisualQA()
        self.setUp()
        self.test_TrackLesions()
        self.setUp()
        self.test_WeightsTransferInBackground()

    def _syntheticPair(self, shiftVoxelsKji):
        """A smooth random CT-like volume (2 mm voxels) and a copy shifted by whole voxels."""
        import numpy as np

        rng = np.random.default_rng(7)
        noise = rng.normal(size=(32, 32, 32))
        kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
        smooth = noise
        for axis in range(3):
            smooth = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="same"), axis, smooth)
        fixedArray = (smooth / smooth.std() * 300.0).astype(np.float32)
        movingArray = np.roll(fixedArray, shiftVoxelsKji, axis=(0, 1, 2))
        ijkToRas = np.diag([2.0, 2.0, 2.0, 1.0])
        fixed = slicer.util.addVolumeFromArray(fixedArray, ijkToRas, name="fixed")
        moving = slicer.util.addVolumeFromArray(movingArray, ijkToRas, name="moving")
        return fixed, moving

    def test_MatchShiftedVolume(self):
        import numpy as np

        from MedDIFTLib.slicer.jobs import JobInputs

        self.delayDisplay("Checking Python packages")
        logic = MedDIFTLogic()
        missing = logic.missingPythonPackages()
        if missing:
            logic.installPythonPackages(missing)
        self.assertEqual(logic.missingPythonPackages(), [])

        shiftKji = (2, -1, 3)
        fixed, moving = self._syntheticPair(shiftKji)
        expectedShiftRas = np.array([shiftKji[2], shiftKji[1], shiftKji[0]]) * 2.0
        landmarks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        for label, ijk in (("a", (12, 16, 14)), ("b", (20, 14, 18)), ("c", (16, 20, 12))):
            landmarks.AddControlPointWorld([2.0 * value for value in ijk], label)

        self.delayDisplay("Matching with the weight-free backbone")
        settings = RunSettings(
            backbone="mind",
            device="cpu",
            match=MatchOptions(search_radius_mm=12.0),
            field=FieldOptions(optimise_iterations=0),
        )
        try:
            outputs = logic.run(JobInputs(fixed, moving, landmarks, compute_transform=True), settings, timeout=600)
            movingLandmarks = outputs.moving_landmarks
            self.assertEqual(
                [movingLandmarks.GetNthControlPointLabel(i) for i in range(3)], ["a", "b", "c"]
            )
            for index in range(3):
                fixedRas, movingRas = [0.0] * 3, [0.0] * 3
                landmarks.GetNthControlPointPositionWorld(index, fixedRas)
                movingLandmarks.GetNthControlPointPositionWorld(index, movingRas)
                np.testing.assert_allclose(np.subtract(movingRas, fixedRas), expectedShiftRas, atol=1.0)
                mapped = outputs.transform.GetTransformFromParent().TransformPoint(fixedRas)
                np.testing.assert_allclose(mapped, movingRas, atol=1.5)

            self.delayDisplay("Live update of one landmark")
            landmarks.SetNthControlPointPositionWorld(1, 30.0, 34.0, 26.0)
            logic.run(JobInputs(fixed, moving, landmarks, movingLandmarks), settings, controlPointIndices=[1],
                      timeout=600)
            movingRas = [0.0] * 3
            movingLandmarks.GetNthControlPointPositionWorld(1, movingRas)
            np.testing.assert_allclose(np.subtract(movingRas, [30.0, 34.0, 26.0]), expectedShiftRas, atol=1.0)
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def test_VisualQA(self):
        """Each QA part of the panel: overlays, cursor through the field, review of pairs, moved points."""
        import numpy as np

        from MedDIFTLib.slicer import cursor, live, nodes, qa, results
        from MedDIFTLib.slicer.jobs import JobInputs

        shiftKji = (2, -1, 3)
        fixed, moving = self._syntheticPair(shiftKji)
        expectedShiftRas = np.array([shiftKji[2], shiftKji[1], shiftKji[0]]) * 2.0
        landmarks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        for label, ijk in (("a", (12, 16, 14)), ("b", (20, 14, 18))):
            landmarks.AddControlPointWorld([2.0 * value for value in ijk], label)
        settings = RunSettings(backbone="mind", device="cpu", match=MatchOptions(search_radius_mm=12.0),
                               field=FieldOptions(optimise_iterations=0))
        logic = MedDIFTLogic()
        try:
            self.delayDisplay("QA overlays on the fixed grid")
            outputs = logic.run(JobInputs(fixed, moving, landmarks, compute_transform=True, compute_overlays=True),
                                settings, timeout=600)
            self.assertEqual(sorted(outputs.overlays), ["confidence", "jacobian", "magnitude"])
            for node in outputs.overlays.values():
                self.assertTrue(nodes.volume_geometry(node).same_grid(nodes.volume_geometry(fixed)))
                self.assertIsNotNone(node.GetDisplayNode().GetColorNodeID())
            self.assertGreater(outputs.overlay_summary["jacobian"]["min"], 0.0)
            self.assertAlmostEqual(outputs.overlay_summary["magnitude"]["mean"],
                                   float(np.linalg.norm(expectedShiftRas)), delta=2.0)

            self.delayDisplay("Correspondence cursor through the field")
            fixedRas = [24.0, 32.0, 28.0]
            movingRas = cursor.map_through_field(outputs.transform, fixedRas)
            np.testing.assert_allclose(np.subtract(movingRas, fixedRas), expectedShiftRas, atol=1.5)

            self.delayDisplay("Landmark review")
            movingLandmarks = outputs.moving_landmarks
            qa.set_decision(movingLandmarks, "b", results.REJECTED)
            rows = results.pair_rows(landmarks, movingLandmarks)
            self.assertIn("1 rejected", qa.summary(rows, results.reviews(movingLandmarks)))
            self.assertEqual(movingLandmarks.GetNumberOfControlPoints(), 2)
            self.assertFalse(movingLandmarks.GetNthControlPointSelected(1))

            self.delayDisplay("Live propagation re-matches moved points only")
            moved = live.MovedPoints()
            moved.remember(landmarks)
            landmarks.SetNthControlPointSelected(0, False)
            self.assertEqual(moved.moved(landmarks), [])
            landmarks.SetNthControlPointPositionWorld(1, 30.0, 34.0, 26.0)
            self.assertEqual(moved.moved(landmarks), [1])
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def test_TrackLesions(self):
        """Lesion tracking: a baseline segmentation into an existing follow-up segmentation node and a table."""
        import numpy as np

        from MedDIFTLib.slicer.track_job import TrackInputs

        shiftKji = (2, -1, 3)
        fixed, moving = self._syntheticPair(shiftKji)
        expectedShiftRas = np.array([shiftKji[2], shiftKji[1], shiftKji[0]]) * 2.0
        kji = np.indices((32, 32, 32))
        nodule = ((kji - np.array([16, 16, 14])[:, None, None, None]) ** 2).sum(axis=0) <= 9
        fixedArray = slicer.util.arrayFromVolume(fixed)
        fixedArray[nodule] = 1000.0
        slicer.util.arrayFromVolumeModified(fixed)
        slicer.util.arrayFromVolume(moving)[:] = np.roll(fixedArray, shiftKji, axis=(0, 1, 2))
        slicer.util.arrayFromVolumeModified(moving)
        labels = nodule.astype(np.uint8)
        labelmap = slicer.util.addVolumeFromArray(labels, np.diag([2.0, 2.0, 2.0, 1.0]), name="lesion",
                                                  nodeClassName="vtkMRMLLabelMapVolumeNode")
        baselineLesions = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, baselineLesions)
        followupLesions = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules follow-up")
        settings = RunSettings(backbone="mind", device="cpu", field=FieldOptions(optimise_iterations=0))
        logic = MedDIFTLogic()
        try:
            self.delayDisplay("Lesion tracking into the follow-up")
            outputs = logic.runTrack(TrackInputs(fixed, moving, baselineLesions, followupLesions), settings,
                                     timeout=600)
            self.assertIs(outputs.followup_lesions, followupLesions)
            self.assertEqual(followupLesions.GetSegmentation().GetNumberOfSegments(), 1)
            self.assertEqual(outputs.table.GetNumberOfRows(), 1)
            row = outputs.rows[0]
            np.testing.assert_allclose(np.subtract(row.followup_ras, row.segment.baseline_ras), expectedShiftRas,
                                       atol=1.5)
            self.assertGreater(row.volume_followup_ml, 0.5 * row.volume_baseline_ml)
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def test_WeightsTransferInBackground(self):
        """The weights dialog's background process: it returns at once, reports, and ends cleanly."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="MedDIFT-weights-test-")
        outcomes = []
        try:
            self.delayDisplay("Weights transfer in a background process")
            transfer = MedDIFTLogic().startWeightsTransfer(
                [MedDIFTLogic.pythonExecutable(), "-c", "print('download: 100% done')"], folder, outcomes.append
            )
            self.assertTrue(transfer.wait(timeout_s=120.0))
            self.assertEqual(outcomes, [None])
            self.assertIn("download: 100% done", transfer.output_lines())
            self.assertEqual(os.listdir(folder), [])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
