"""The module's self-test steps (``MedDIFTTest`` in MedDIFT.py runs them in Slicer): every panel
feature on synthetic volumes with the weight-free backbone and the real worker."""

import os
import platform
import shutil

import slicer

from MedDIFTLib.core.options import FieldOptions, MatchOptions, RunSettings


class SelfTestSteps:
    """The steps, asserting through ``test`` (a unittest.TestCase with ``delayDisplay``) on the
    module's logic class ``Logic``."""

    def __init__(self, test, Logic) -> None:
        self.test = test
        self.Logic = Logic

    def delayDisplay(self, message: str) -> None:
        self.test.delayDisplay(message)

    @staticmethod
    def _settings(**options):
        """Run settings with the catalogue's weight-free backbone on the CPU."""
        from MedDIFTLib.core.backbones import PANEL_BACKBONES

        weightFree = next(backbone.name for backbone in PANEL_BACKBONES if not backbone.requires_weights)
        return RunSettings(backbone=weightFree, device="cpu", field=FieldOptions(optimise_iterations=0), **options)

    def _syntheticPair(self, shiftVoxelsKji=(2, -1, 3)):
        """A smooth random CT-like volume (2 mm voxels), a copy shifted by whole voxels, and the shift in RAS mm."""
        import numpy as np

        rng = np.random.default_rng(7)
        smooth = rng.normal(size=(32, 32, 32))
        kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
        for axis in range(3):
            smooth = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="same"), axis, smooth)
        fixedArray = (smooth / smooth.std() * 300.0).astype(np.float32)
        ijkToRas = np.diag([2.0, 2.0, 2.0, 1.0])
        fixed = slicer.util.addVolumeFromArray(fixedArray, ijkToRas, name="fixed")
        moving = slicer.util.addVolumeFromArray(np.roll(fixedArray, shiftVoxelsKji, axis=(0, 1, 2)), ijkToRas,
                                                name="moving")
        return fixed, moving, np.array(shiftVoxelsKji[::-1]) * 2.0

    @staticmethod
    def _landmarks(ijks):
        landmarks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
        for label, ijk in zip("abc", ijks):
            landmarks.AddControlPointWorld([2.0 * value for value in ijk], label)
        return landmarks

    def packagesAndBackboneOptions(self):
        """The requirement list, the install commands (PyTorch's index, pip untouched) and every
        backbone's panel options in the run settings."""
        from MedDIFTLib.core.backbones import PANEL_BACKBONES
        from MedDIFTLib.slicer import installs

        self.delayDisplay("Python packages of the worker")
        self.test.assertEqual(installs.missing_requirements(), [], "install them with Apply first")
        index = installs.torch_index_url(platform.system(), installs.driver_cuda_version())
        commands = installs.install_commands(self.Logic.pythonExecutable(), installs.read_requirements(), index)
        requirements = [arg for command in commands for arg in command[6:] if not arg.startswith("--")]
        self.test.assertFalse([arg for arg in requirements if arg.startswith("pip")], "Slicer's pip is left alone")
        self.delayDisplay("Backbone options from the catalogue")
        parameterNode = self.Logic().getParameterNode()
        for backbone in PANEL_BACKBONES:
            parameterNode.backbone = backbone.name
            settings = self.Logic.runSettings(parameterNode)
            self.test.assertEqual(settings.backbone, backbone.name)
            self.test.assertEqual({k: v for k, v in settings.backbone_options.items() if k != "weights_dir"},
                             {option.name: option.default for option in backbone.options})
        self.delayDisplay("Test passed")

    def matchShiftedVolume(self):
        import numpy as np

        from MedDIFTLib.slicer.scene_run import RunInputs

        fixed, moving, shiftRas = self._syntheticPair()
        landmarks = self._landmarks([(12, 16, 14), (20, 14, 18), (16, 20, 12)])
        settings = self._settings(match=MatchOptions(search_radius_mm=12.0))
        logic = self.Logic()
        try:
            self.delayDisplay("Matching with the weight-free backbone")
            outputs = logic.run(RunInputs(fixed, moving, landmarks, compute_transform=True), settings, timeout=600)
            movingLandmarks = outputs.moving_landmarks
            self.test.assertEqual([movingLandmarks.GetNthControlPointLabel(i) for i in range(3)], ["a", "b", "c"])
            for index in range(3):
                fixedRas, movingRas = [0.0] * 3, [0.0] * 3
                landmarks.GetNthControlPointPositionWorld(index, fixedRas)
                movingLandmarks.GetNthControlPointPositionWorld(index, movingRas)
                np.testing.assert_allclose(np.subtract(movingRas, fixedRas), shiftRas, atol=1.0)
                mapped = outputs.transform.GetTransformFromParent().TransformPoint(fixedRas)
                np.testing.assert_allclose(mapped, movingRas, atol=1.5)

            self.delayDisplay("Live update of one landmark")
            landmarks.SetNthControlPointPositionWorld(1, 30.0, 34.0, 26.0)
            logic.run(RunInputs(fixed, moving, landmarks, movingLandmarks), settings, controlPointIndices=[1],
                      timeout=600)
            movingRas = [0.0] * 3
            movingLandmarks.GetNthControlPointPositionWorld(1, movingRas)
            np.testing.assert_allclose(np.subtract(movingRas, [30.0, 34.0, 26.0]), shiftRas, atol=1.0)
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def visualQA(self):
        """Overlays, the cursor (field and worker), a run started during a cursor match, review, live."""
        import time

        import numpy as np

        from MedDIFTLib.slicer import cursor, live, nodes, qa, results
        from MedDIFTLib.slicer.scene_run import RunInputs

        fixed, moving, shiftRas = self._syntheticPair()
        landmarks = self._landmarks([(12, 16, 14), (20, 14, 18)])
        settings = self._settings(match=MatchOptions(search_radius_mm=12.0))
        logic = self.Logic()
        try:
            self.delayDisplay("QA overlays on the fixed grid")
            outputs = logic.run(RunInputs(fixed, moving, landmarks, compute_transform=True, compute_overlays=True),
                                settings, timeout=600)
            self.test.assertEqual(sorted(outputs.overlays), ["confidence", "jacobian", "magnitude"])
            for node in outputs.overlays.values():
                self.test.assertTrue(nodes.volume_geometry(node).same_grid(nodes.volume_geometry(fixed)))
                self.test.assertIsNotNone(node.GetDisplayNode().GetColorNodeID())
            self.test.assertGreater(outputs.overlay_summary.overlays["jacobian"].min, 0.0)
            self.test.assertAlmostEqual(outputs.overlay_summary.overlays["magnitude"].mean,
                                        float(np.linalg.norm(shiftRas)), delta=2.0)

            self.delayDisplay("Correspondence cursor through the field, then by the worker during a run")
            fixedRas = [24.0, 32.0, 28.0]
            movingRas = cursor.map_through_field(outputs.transform, fixedRas)
            np.testing.assert_allclose(np.subtract(movingRas, fixedRas), shiftRas, atol=1.5)
            answers = []
            logic.startCursorMatch(RunInputs(fixed, moving), settings, fixedRas,
                                   lambda out, error: answers.append(cursor.cursor_match_from(out.matches)))
            logic.startSceneRun(RunInputs(fixed, moving, landmarks, outputs.moving_landmarks), settings,
                           lambda out, error: answers.append(error))
            deadline = time.monotonic() + 600
            while logic.pollWorker() and time.monotonic() < deadline:
                time.sleep(0.05)
            np.testing.assert_allclose(np.subtract(answers[0].moving_ras, fixedRas), shiftRas, atol=1.5)
            self.test.assertIsNone(answers[1], "the run waited for the cursor match and succeeded")

            self.delayDisplay("Landmark review")
            movingLandmarks = outputs.moving_landmarks
            qa.set_decision(movingLandmarks, "b", results.REJECTED)
            rows = results.pair_rows(landmarks, movingLandmarks)
            self.test.assertIn("1 rejected", qa.summary(rows, results.reviews(movingLandmarks)))
            self.test.assertEqual(movingLandmarks.GetNumberOfControlPoints(), 2)
            self.test.assertFalse(movingLandmarks.GetNthControlPointSelected(1))

            self.delayDisplay("Live propagation re-matches moved points only")
            moved = live.MovedPoints()
            moved.remember(landmarks)
            landmarks.SetNthControlPointSelected(0, False)
            landmarks.SetNthControlPointLabel(0, "renamed")
            self.test.assertEqual(moved.moved(landmarks), [])
            landmarks.SetNthControlPointPositionWorld(1, 30.0, 34.0, 26.0)
            self.test.assertEqual(moved.moved(landmarks), [1])
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def _nodulePair(self):
        """The synthetic pair with a bright nodule (in the moving volume too, shifted) and the baseline
        segmentation of the nodule: (fixed, moving, shift in RAS mm, segmentation node)."""
        import numpy as np

        fixed, moving, shiftRas = self._syntheticPair()
        kji = np.indices((32, 32, 32))
        nodule = ((kji - np.array([16, 16, 14])[:, None, None, None]) ** 2).sum(axis=0) <= 9
        fixedArray = slicer.util.arrayFromVolume(fixed)
        fixedArray[nodule] = 1000.0
        slicer.util.arrayFromVolumeModified(fixed)
        slicer.util.arrayFromVolume(moving)[:] = np.roll(fixedArray, (2, -1, 3), axis=(0, 1, 2))
        slicer.util.arrayFromVolumeModified(moving)
        labelmap = slicer.util.addVolumeFromArray(nodule.astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]),
                                                  name="lesion", nodeClassName="vtkMRMLLabelMapVolumeNode")
        baselineLesions = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, baselineLesions)
        return fixed, moving, shiftRas, baselineLesions

    def trackLesions(self):
        """Lesion tracking: a baseline segmentation into an existing follow-up segmentation node and a table."""
        import numpy as np

        from MedDIFTLib.slicer.track_run import TrackInputs

        fixed, moving, shiftRas, baselineLesions = self._nodulePair()
        followupLesions = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules follow-up")
        colorTables = slicer.mrmlScene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems()
        logic = self.Logic()
        try:
            self.delayDisplay("Lesion tracking into the follow-up")
            outputs = logic.runTrack(TrackInputs(fixed, moving, baselineLesions, followupLesions), self._settings(),
                                     timeout=600)
            self.test.assertIs(outputs.followup_lesions, followupLesions)
            self.test.assertEqual(followupLesions.GetSegmentation().GetNumberOfSegments(), 1)
            self.test.assertEqual(outputs.table.GetNumberOfRows(), 1)
            row = outputs.rows[0]
            np.testing.assert_allclose(np.subtract(row.followup_ras, row.segment.baseline_ras), shiftRas, atol=1.5)
            self.test.assertGreater(row.volume_followup_ml, 0.5 * row.volume_baseline_ml)
            self.test.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems(),
                             colorTables)
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def trackLesionSeries(self):
        """A 3-scan series (the nodule pair, then the follow-up shifted once more) through the panel's scan list:
        follow-up segmentations, the tables, the growth chart over days, the lesion at each time point."""
        import numpy as np

        from MedDIFTLib.slicer.series_nodes import series_cells
        from MedDIFTLib.slicer.series_run import SeriesScans

        fixed, moving, shiftRas, baselineLesions = self._nodulePair()
        later = slicer.util.addVolumeFromArray(np.roll(slicer.util.arrayFromVolume(moving), (2, -1, 3), axis=(0, 1, 2)),
                                               np.diag([2.0, 2.0, 2.0, 1.0]), name="later")
        scans = SeriesScans()
        self.test.assertTrue(scans.add(later))
        for node, date in ((fixed, "2024-01-01"), (moving, "2024-04-01"), (later, "20240701")):
            scans.set_date(node, date)
        parameterNode = self.Logic().getParameterNode()
        parameterNode.fixedVolume, parameterNode.movingVolume = fixed, moving
        parameterNode.baselineLesions = baselineLesions
        inputs = self.Logic.seriesInputs(parameterNode, scans)
        self.test.assertEqual(inputs.followup_volumes, [moving, later])
        logic = self.Logic()
        try:
            self.delayDisplay("Lesion tracking through a series of three scans")
            outputs = logic.runSeries(inputs, self._settings(), timeout=600)
            self.test.assertEqual(len(outputs.followup_lesions), 2)
            self.test.assertEqual(outputs.table.GetNumberOfRows(), 1)
            self.test.assertEqual(outputs.time_point_table.GetNumberOfRows(), 3)
            self.test.assertEqual(outputs.chart.GetNumberOfPlotSeriesNodes(), 1)
            self.test.assertEqual([point.days for point in outputs.time_points], [0.0, 91.0, 182.0])
            lesion = outputs.lesions[0]
            for timePoint in (1, 2):
                np.testing.assert_allclose(np.subtract(lesion.centre_ras(timePoint), lesion.centre_ras(0)),
                                           timePoint * shiftRas, atol=1.5)
            self.test.assertEqual(len(series_cells(outputs.lesions, outputs.summary.responses)), 2)
            again = logic.runSeries(self.Logic.seriesInputs(parameterNode, scans, outputs), self._settings(),
                                    timeout=600)
            self.test.assertIs(again.chart, outputs.chart, "a second run fills the same chart")
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")

    def weightsTransfersInBackground(self):
        """Two weights transfers one after another: both run, and the run waiting for them is told once, at
        the end."""
        import tempfile
        import time

        from MedDIFTLib.slicer.weights_transfer import weights_chain

        folder = tempfile.mkdtemp(prefix="MedDIFT-weights-test-")
        outcomes = []
        python = self.Logic.pythonExecutable()
        try:
            self.delayDisplay("Weights transfers in background processes")
            chain = weights_chain([[python, "-c", "print('first')"], [python, "-c", "print('second')"]], folder,
                                  outcomes.append)
            chain.start()
            self.test.assertEqual(outcomes, [])
            deadline = time.monotonic() + 120
            while chain.poll() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.test.assertEqual((outcomes, chain.lines), ([None], ["first", "second"]))
            self.test.assertEqual(os.listdir(folder), [])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
