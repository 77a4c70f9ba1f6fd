"""MedDIFT: find where points of one CT lie in another, training-free, from pretrained features.

The Slicer module in the scripted-module template's shape: the module, its parameter node, the
widget (which builds one section per feature area from ``MedDIFTPanel``), a thin logic and the
self-test. The work runs in a background worker process (``PythonSlicer -m MedDIFTLib.worker``);
torch and monai are never imported in Slicer's process. The scene logic without Qt lives in
``MedDIFTLib.slicer`` and is tested without Slicer. This file stays importable on Python 3.9
(Slicer 5.6 and 5.8) so that those versions show why MedDIFT cannot run there.
"""

import enum
import importlib.util
import os
import platform
import shutil
import sys
from typing import Annotated

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

MINIMUM_PYTHON = (3, 10)
MINIMUM_SLICER = "5.10"
WEIGHTS_DIRECTORY_SETTING = "MedDIFT/WeightsDirectory"


def unsupportedReason() -> str:
    """Why MedDIFT cannot run in this Slicer, or "" when it can."""
    if sys.version_info[:2] >= MINIMUM_PYTHON:
        return ""
    return _(
        "MedDIFT needs 3D Slicer {slicer} or later (Python {python} or later); this Slicer runs Python "
        "{current}. Please install 3D Slicer {slicer} or later."
    ).format(slicer=MINIMUM_SLICER, python=".".join(map(str, MINIMUM_PYTHON)), current=platform.python_version())


UNSUPPORTED_REASON = unsupportedReason()


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
        self.parent.helpText = UNSUPPORTED_REASON or _("""
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


if not UNSUPPORTED_REASON:
    _importMedDIFTLib()
    # Torch-free and numpy-free: the panel's defaults come from the library's one source of options.
    from MedDIFTLib.core.options import FieldOptions, MatchOptions, RunSettings

    MATCH_DEFAULTS = MatchOptions()
    FIELD_DEFAULTS = FieldOptions()
    RUN_DEFAULTS = RunSettings()

    @parameterNodeWrapper
    class MedDIFTParameterNode:
        """Inputs, outputs (created on Apply when None) and options; distances in mm. ``backbone`` and
        ``backboneOptions`` (JSON: backbone -> option -> value) are set by the panel's backbone section."""

        fixedVolume: vtkMRMLScalarVolumeNode
        movingVolume: vtkMRMLScalarVolumeNode
        fixedLandmarks: vtkMRMLMarkupsFiducialNode
        movingLandmarks: vtkMRMLMarkupsFiducialNode
        computeTransform: bool = True
        outputTransform: vtkMRMLTransformNode
        computeWarped: bool = False
        warpedVolume: vtkMRMLScalarVolumeNode
        computeOverlays: bool = False
        backbone: str = RUN_DEFAULTS.backbone
        backboneOptions: str = "{}"
        device: Device = Device(RUN_DEFAULTS.device)
        searchRadiusMm: Annotated[float, WithinRange(1.0, 100.0)] = MATCH_DEFAULTS.search_radius_mm
        livePropagation: bool = False
        searchMode: SearchMode = SearchMode(MATCH_DEFAULTS.mode)
        confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = MATCH_DEFAULTS.confidence_threshold
        coarseToFine: bool = MATCH_DEFAULTS.coarse_to_fine
        exactSimilarity: bool = MATCH_DEFAULTS.exact
        registrationIterations: Annotated[int, WithinRange(0, 500)] = FIELD_DEFAULTS.optimise_iterations
        baselineLesions: vtkMRMLSegmentationNode
        followupLesions: vtkMRMLSegmentationNode


#
# MedDIFTWidget
#


class MedDIFTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: one section per feature area (``MedDIFTPanel``), all refreshed from the parameter node."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.sections = []
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED_REASON:
            message = qt.QLabel(UNSUPPORTED_REASON)
            message.wordWrap = True
            self.layout.addWidget(message)
            self.layout.addStretch(1)
            return
        from MedDIFTPanel.backbone import BackboneSection
        from MedDIFTPanel.cursor import CursorSection
        from MedDIFTPanel.dependencies import DependenciesSection
        from MedDIFTPanel.lesions import LesionsSection
        from MedDIFTPanel.live import LiveSection
        from MedDIFTPanel.overlays import OverlaysSection
        from MedDIFTPanel.review import ReviewSection
        from MedDIFTPanel.run import RunSection
        from MedDIFTPanel.server import ServerSection
        from MedDIFTPanel.weights import WeightsSection

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDIFT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDIFTLogic()
        placeWidget = self.ui.fixedLandmarksPlaceWidget
        placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

        self.backbone = BackboneSection(self)
        self.dependencies = DependenciesSection(self)
        self.weights = WeightsSection(self)
        self.server = ServerSection(self)
        self.run = RunSection(self)
        self.live = LiveSection(self)
        self.review = ReviewSection(self)
        self.cursor = CursorSection(self)
        self.overlays = OverlaysSection(self)
        self.lesions = LesionsSection(self)
        self.sections = [self.backbone, self.dependencies, self.weights, self.server, self.run, self.live,
                         self.review, self.cursor, self.overlays, self.lesions]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    @property
    def scene(self):
        return slicer.mrmlScene

    @property
    def parameterNode(self):
        return self._parameterNode

    def cleanup(self) -> None:
        self.removeObservers()
        for section in self.sections:
            section.cleanup()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        if not UNSUPPORTED_REASON:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.runInProgress:
            self.logic.cancelRun()
        self.setParameterNode(None)
        for section in self.sections:
            section.reset()

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
        if parameterNode is not None:
            self.ui.outputTransformSelector.enabled = parameterNode.computeTransform
            self.ui.warpedVolumeSelector.enabled = parameterNode.computeWarped
            self.ui.computeWarpedCheckBox.enabled = parameterNode.computeTransform
            self.ui.fixedLandmarksPlaceWidget.setCurrentNode(parameterNode.fixedLandmarks)
        running = self.logic.runInProgress
        for section in self.sections:
            section.update(parameterNode, running)

    def runSettings(self):
        """The run's ``RunSettings`` from the parameter node (BadInputError for out-of-range values)."""
        return MedDIFTLogic.runSettings(self._parameterNode)

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

    def showSummary(self, text: str) -> None:
        """A finished run's one line, in the status line and the log."""
        self.showStatus(text)
        self.appendLog(text)

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(f"{qt.QTime.currentTime().toString('hh:mm:ss')}  {text}")


#
# MedDIFTLogic
#


class MedDIFTLogic(ScriptedLoadableModuleLogic):
    """Runs MedDIFT's scene, tracking and series runs through a ``MedDIFTLib.slicer.session.WorkerSession``:
    a background worker process that stays alive between runs (features stay cached). Non-blocking:
    :meth:`startSceneRun` (or :meth:`startTrack`, :meth:`startSeries`) then :meth:`pollWorker` from a
    timer. Blocking: :meth:`run` (or :meth:`runTrack`, :meth:`runSeries`), for scripts and tests."""

    def __init__(self) -> None:
        if UNSUPPORTED_REASON:
            raise RuntimeError(UNSUPPORTED_REASON)
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._server = (None, None)

    def getParameterNode(self):
        return MedDIFTParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ settings and inputs

    @staticmethod
    def weightsDirectory() -> str:
        """Setting ``MedDIFT/WeightsDirectory``, by default the folder the ``meddift`` command line uses."""
        from MedDIFTLib.weights import default_weights_dir

        return str(qt.QSettings().value(WEIGHTS_DIRECTORY_SETTING, str(default_weights_dir())))

    @staticmethod
    def setWeightsDirectory(path: str) -> None:
        qt.QSettings().setValue(WEIGHTS_DIRECTORY_SETTING, path)

    @staticmethod
    def backboneOptionValues(parameterNode) -> dict:
        """The panel's backbone option values (backbone name -> option -> value); {} when unreadable."""
        import json

        try:
            values = json.loads(parameterNode.backboneOptions)
        except ValueError:
            return {}
        return values if isinstance(values, dict) else {}

    @staticmethod
    def runSettings(parameterNode):
        """Typed worker options from the parameter node (raises BadInputError for out-of-range values);
        the backbone's options come from the backbone catalogue (``MedDIFTLib.core.backbones``)."""
        from MedDIFTLib.core.backbones import backbone_options

        values = MedDIFTLogic.backboneOptionValues(parameterNode).get(parameterNode.backbone, {})
        return RunSettings(
            backbone=parameterNode.backbone,
            backbone_options=backbone_options(parameterNode.backbone, values, MedDIFTLogic.weightsDirectory()),
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
    def sceneRunInputs(parameterNode):
        """Scene nodes of a run from the parameter node."""
        from MedDIFTLib.slicer.scene_run import RunInputs

        return RunInputs(
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
        from MedDIFTLib.slicer.track_run import TrackInputs

        return TrackInputs(
            baseline_volume=parameterNode.fixedVolume,
            followup_volume=parameterNode.movingVolume,
            baseline_lesions=parameterNode.baselineLesions,
            followup_lesions=parameterNode.followupLesions,
            table=table,
        )

    @staticmethod
    def seriesInputs(parameterNode, scans, previous=None):
        """Scene nodes of a series run: baseline = fixed volume, then the moving volume and the further follow-ups
        of ``scans`` (a ``MedDIFTLib.slicer.series_run.SeriesScans``) with their dates (typed, else from Slicer's
        DICOM database); the tables and chart of ``previous`` (a ``SeriesOutputs``) are filled again."""
        return scans.inputs(slicer.mrmlScene, parameterNode.fixedVolume, parameterNode.movingVolume,
                            parameterNode.baselineLesions, getattr(slicer, "dicomDatabase", None), previous)

    @staticmethod
    def describeSeries(outputs) -> str:
        """One line about a finished series run: lesions, time points, the last response, time."""
        responses = outputs.summary.responses if outputs.summary else []
        last = max(responses, key=lambda response: response.time_point).category if responses else None
        seconds = outputs.summary.seconds.get("total", float("nan")) if outputs.summary else float("nan")
        return _("{total} lesions tracked through {scans} scans, last response {response} ({seconds:.1f} s)").format(
            total=len(outputs.lesions), scans=len(outputs.time_points), response=last or "-", seconds=seconds
        )

    @staticmethod
    def describeTrack(outputs) -> str:
        """One line about a finished tracking run: lesions tracked, flagged ones, time."""
        flagged = sum(row.status != "ok" for row in outputs.rows)
        seconds = outputs.summary.seconds.get("total", float("nan")) if outputs.summary else float("nan")
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
        jacobian = outputs.register_summary.jacobian if outputs.register_summary else {}
        if jacobian:
            parts.append(
                _("transform Jacobian {low:.2f} to {high:.2f}, {folding:.3%} folding").format(
                    low=jacobian.get("min", float("nan")),
                    high=jacobian.get("max", float("nan")),
                    folding=jacobian.get("fraction_folding", float("nan")),
                )
            )
        return "; ".join(parts) if parts else _("Done.")

    # ------------------------------------------------------------------ worker

    @staticmethod
    def pythonExecutable() -> str:
        return shutil.which("PythonSlicer") or sys.executable

    @property
    def session(self):
        """The worker session (started on first use) of Slicer's scene."""
        if self._session is None:
            from MedDIFTLib.slicer.session import WorkerSession

            serverUrl, token = self._server
            self._session = WorkerSession(slicer.mrmlScene, python_executable=self.pythonExecutable(),
                                    server_url=serverUrl, token=token)
        return self._session

    def setServer(self, serverUrl, token=None) -> None:
        """Run on the ``meddift serve`` server at ``serverUrl`` (None: the local worker).

        A change stops the current worker or session (and a run in progress); the next run starts the new one."""
        if (serverUrl, token) != self._server:
            self.shutdown()
            self._server = (serverUrl, token)

    @property
    def workerRunning(self) -> bool:
        return self._session is not None and self._session.worker_running

    @property
    def workerBusy(self) -> bool:
        """True while anything runs in the worker: a run or a cursor match."""
        return self._session is not None and self._session.worker_busy

    @property
    def runInProgress(self) -> bool:
        """True while a scene, tracking or series run is in progress (or waits for a cursor match to end);
        Apply then reads Cancel."""
        return self._session is not None and self._session.run_in_progress

    def startSceneRun(self, inputs, settings, onDone, onProgress=None, onLog=None, controlPointIndices=None) -> None:
        """Check the inputs, then run the scene run (landmarks, transform, warped volume, overlays) in the
        background (starting the worker if needed).

        ``onDone(outputs, error)`` is called from :meth:`pollWorker` (or :meth:`cancelRun`) when the
        run ends. ``controlPointIndices``: re-match only these fixed control points (live
        propagation). Raises MedDIFTError at once for bad inputs or when a run is already in progress.
        """
        self.session.start_scene_run(inputs, settings, onDone, on_progress=onProgress, on_log=onLog,
                                     control_point_indices=controlPointIndices)

    def startTrack(self, inputs, settings, onDone, onProgress=None, onLog=None) -> None:
        """Track lesions in the background (``inputs``: a ``MedDIFTLib.slicer.track_run.TrackInputs``);
        ``onDone(outputs, error)`` gets a ``TrackOutputs``. Raises MedDIFTError at once for bad inputs."""
        self.session.start_track(inputs, settings, onDone, on_progress=onProgress, on_log=onLog)

    def startSeries(self, inputs, settings, onDone, onProgress=None, onLog=None) -> None:
        """Track lesions through a series in the background (``inputs``: a
        ``MedDIFTLib.slicer.series_run.SeriesInputs``); ``onDone(outputs, error)`` gets a ``SeriesOutputs``.
        Raises MedDIFTError at once for bad inputs."""
        self.session.start_series(inputs, settings, onDone, on_progress=onProgress, on_log=onLog)

    def startCursorMatch(self, inputs, settings, fixedRas, onDone) -> None:
        """Match one fixed point (RAS mm) in the background for the correspondence cursor."""
        self.session.start_cursor_match(inputs, settings, fixedRas, onDone)

    def runTrack(self, inputs, settings=None, progress=None, timeout=None):
        """Track lesions and wait (scripts and tests); returns ``MedDIFTLib.slicer.track_run.TrackOutputs``."""
        return self.session.run_track(inputs, settings or RunSettings(), progress=progress, timeout_s=timeout)

    def runSeries(self, inputs, settings=None, progress=None, timeout=None):
        """Track lesions through a series and wait (scripts and tests); returns a ``SeriesOutputs``."""
        return self.session.run_series(inputs, settings or RunSettings(), progress=progress, timeout_s=timeout)

    def pollWorker(self) -> bool:
        """Advance what runs in the worker (call from a GUI timer); False once nothing does."""
        return self._session is not None and self._session.poll()

    def cancelRun(self) -> None:
        """Stop the run in progress; the scene is unchanged (a cursor match in flight ends normally)."""
        if self._session is not None:
            self._session.cancel()

    def run(self, inputs, settings=None, controlPointIndices=None, progress=None, timeout=None):
        """Run the scene run and wait for it (scripts and tests); returns ``MedDIFTLib.slicer.scene_run.RunOutputs``.

        ``inputs``: a ``MedDIFTLib.slicer.scene_run.RunInputs``; ``settings``: a
        ``MedDIFTLib.core.options.RunSettings`` (default: the library's defaults).
        ``controlPointIndices``: update only the partners of these fixed control points.
        ``progress(stage, fraction, message)`` receives progress; ``timeout`` bounds the wait for
        each worker event (s). Raises MedDIFTError on failure, leaving the scene unchanged.
        """
        return self.session.run_scene(inputs, settings or RunSettings(), control_point_indices=controlPointIndices,
                                      progress=progress, timeout_s=timeout)

    def shutdown(self) -> None:
        """Stop the worker and delete its files."""
        if self._session is not None:
            self._session.shutdown()
            self._session = None


#
# MedDIFTTest
#


class MedDIFTTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: every panel feature on synthetic volumes with the weight-free backbone (real worker);
    the steps are in ``MedDIFTPanel.selftest``."""

    def setUp(self):
        if UNSUPPORTED_REASON:
            self.skipTest(UNSUPPORTED_REASON)
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_PackagesAndBackboneOptions, self.test_MatchShiftedVolume, self.test_VisualQA,
                     self.test_TrackLesions, self.test_TrackLesionSeries, self.test_WeightsTransfersInBackground):
            self.setUp()
            test()

    def _steps(self):
        from MedDIFTPanel.selftest import SelfTestSteps

        return SelfTestSteps(self, MedDIFTLogic)

    def test_PackagesAndBackboneOptions(self):
        self._steps().packagesAndBackboneOptions()

    def test_MatchShiftedVolume(self):
        self._steps().matchShiftedVolume()

    def test_VisualQA(self):
        self._steps().visualQA()

    def test_TrackLesions(self):
        self._steps().trackLesions()

    def test_TrackLesionSeries(self):
        self._steps().trackLesionSeries()

    def test_WeightsTransfersInBackground(self):
        self._steps().weightsTransfersInBackground()
