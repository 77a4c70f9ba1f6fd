"""One run as a sequence of worker requests built from scene nodes; results reach the scene only at the end.

A :class:`SceneRun` checks its inputs when its steps are asked for (so bad inputs fail at
once, before any request), then yields typed requests of the worker protocol
(:mod:`MedDIFTLib.worker.protocol`; the driver submits them to the worker client) and
receives each request's typed result (what ``parse_result`` makes of its payload). Only after
every request has succeeded are the outputs written into the scene, so a failed or cancelled run
changes nothing. Points travel in LPS mm; options are the typed
:class:`~MedDIFTLib.core.options.RunSettings`.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import BadInputError
from ..core.io import PointSet
from ..core.io.points import RAS_FROM_LPS
from ..core.options import FieldLevel, RunSettings
from ..worker.protocol.requests import LoadRequest, MatchRequest, OverlaysRequest, RegisterRequest, Request
from ..worker.protocol.results import LoadResult, MatchResult, OverlaysResult, RegisterResult, WorkerResult
from .nodes import (
    fill_transform_node,
    fill_volume_node,
    markups_to_points,
    node_label,
    read_displacement_field,
    read_volume_file,
    set_input_references,
    volume_node_signature,
    write_volume_node,
)
from .overlays import KINDS, existing_overlay, put_overlay, read_overlay
from .results import write_matches_to_markups

Steps = Generator[Request, WorkerResult, "RunOutputs"]


@dataclass
class RunInputs:
    """Scene nodes of one run. Output nodes left None are created; flags say what to compute."""

    fixed_volume: Any
    moving_volume: Any
    fixed_landmarks: Any = None
    moving_landmarks: Any = None
    transform: Any = None
    warped_volume: Any = None
    compute_landmarks: bool = True
    compute_transform: bool = False
    compute_warped: bool = False
    compute_overlays: bool = False


@dataclass
class RunOutputs:
    """What a run put into the scene, and the worker's numbers behind it. ``overlays``: QA
    overlay volume nodes by kind (``confidence``; with the transform also ``jacobian`` and
    ``magnitude``), with the worker's ``overlay_summary`` (min, max, mean per kind)."""

    moving_landmarks: Any = None
    transform: Any = None
    warped_volume: Any = None
    overlays: dict[str, Any] = field(default_factory=dict)
    overlay_summary: OverlaysResult | None = None
    matches: MatchResult | None = None
    register_summary: RegisterResult | None = None


class WorkerFiles:
    """The files of one worker session: exported volumes and per-run outputs, in ``path``.

    Volume nodes are written once and loaded once per worker process (node signature ->
    file and worker volume id); an unchanged node is reused. Call :meth:`clear` when
    the worker restarts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._loaded: dict[str, tuple[tuple, Path, str]] = {}
        self._file_numbers = itertools.count(1)

    def clear(self) -> None:
        self._loaded.clear()

    def new_path(self, stem: str, suffix: str = ".nrrd") -> Path:
        """A file name in the folder that no earlier call returned."""
        return self.path / f"{stem}-{next(self._file_numbers)}{suffix}"

    def volume_id(self, volume_node, include_parent_transform: bool = True) -> Generator[Request, LoadResult, str]:
        """Steps that give the worker volume id of ``volume_node`` (writing and loading it if new)."""
        signature = volume_node_signature(volume_node, include_parent_transform)
        node_id = volume_node.GetID()
        cached = self._loaded.get(node_id)
        if cached is not None and cached[0] == signature:
            return cached[2]
        path = cached[1] if cached is not None else self.new_path("volume")
        write_volume_node(volume_node, path, include_parent_transform)
        volume_id = (yield LoadRequest(str(path))).volume_id
        self._loaded[node_id] = (signature, path, volume_id)
        return volume_id


def request_settings(settings: RunSettings, **part: Any) -> RunSettings:
    """``settings``' backbone, backbone options and device, with only the options ``part`` (``match`` or
    ``field``) that a request carries; the worker takes the defaults for the rest."""
    return RunSettings(settings.backbone, dict(settings.backbone_options), settings.device, **part)


def _check_full_run(inputs: RunInputs) -> None:
    if inputs.fixed_volume is None or inputs.moving_volume is None:
        raise BadInputError("choose a fixed and a moving volume")
    for node, node_class, role in (
        (inputs.moving_landmarks, "vtkMRMLMarkupsFiducialNode", "output landmarks"),
        (inputs.transform, "vtkMRMLTransformNode", "output transform"),
        (inputs.warped_volume, "vtkMRMLScalarVolumeNode", "warped volume"),
    ):
        if node is not None and not node.IsA(node_class):
            raise BadInputError(f"the {role} {node_label(node)} is not a {node_class}")
    if not (inputs.compute_landmarks or inputs.compute_transform):
        raise BadInputError("nothing to compute: ask for moving landmarks, a transform or both")
    if inputs.compute_landmarks and inputs.fixed_landmarks is None:
        raise BadInputError("choose the fixed landmarks to match")
    if inputs.compute_warped and not inputs.compute_transform:
        raise BadInputError("a warped volume needs the transform to be computed")
    _check_output_landmarks(inputs)
    if inputs.warped_volume is not None and inputs.warped_volume in (inputs.fixed_volume, inputs.moving_volume):
        raise BadInputError("the warped volume must be another node than the fixed and moving volumes")
    if inputs.transform is not None and inputs.fixed_volume.GetParentTransformNode() is inputs.transform:
        raise BadInputError("the fixed volume is under the output transform; remove it from that transform first")


def _check_output_landmarks(inputs: RunInputs) -> None:
    if inputs.moving_landmarks is not None and inputs.moving_landmarks is inputs.fixed_landmarks:
        raise BadInputError("the output landmarks must be another node than the fixed landmarks")


def _moving_follows_output_transform(inputs: RunInputs) -> bool:
    """True when the moving volume was put under the output transform (to view the result).

    Its own grid is then what is registered: the transform about to be replaced is ignored.
    """
    return inputs.transform is not None and inputs.moving_volume.GetParentTransformNode() is inputs.transform


def _volume_name(node) -> str:
    return node.GetName() or node.GetID()


class SceneRun:
    """One run over scene nodes; drive :meth:`steps` with a session's runner or :func:`run_blocking`."""

    def __init__(self, scene, inputs: RunInputs, settings: RunSettings, folder: WorkerFiles) -> None:
        if not isinstance(settings, RunSettings):
            raise BadInputError(f"run settings must be a RunSettings, got {type(settings).__name__}")
        self.scene = scene
        self.inputs = inputs
        self.settings = settings
        self.folder = folder

    def steps(self, control_point_indices: Sequence[int] | None = None) -> Steps:
        """Check the inputs now, then return the run's steps.

        ``control_point_indices``: a live update that re-matches only those fixed control
        points and updates only their partners in the output landmarks (volumes already loaded
        are not sent again, and the worker's feature cache leaves only the search to do).
        Raises :class:`BadInputError` for unusable inputs, before any request.
        """
        inputs = self.inputs
        if control_point_indices is None:
            _check_full_run(inputs)
            points = markups_to_points(inputs.fixed_landmarks) if inputs.compute_landmarks else None
            return self._full_run(points)
        if inputs.fixed_volume is None or inputs.moving_volume is None or inputs.fixed_landmarks is None:
            raise BadInputError("live matching needs the fixed and moving volumes and the fixed landmarks")
        _check_output_landmarks(inputs)
        return self._point_update(markups_to_points(inputs.fixed_landmarks, indices=control_point_indices))

    def cursor_steps(self, fixed_ras: Sequence[float]) -> Steps:
        """Match one fixed point (RAS mm) for the correspondence cursor; nothing is written into
        the scene (the outputs hold only ``matches``)."""
        if self.inputs.fixed_volume is None or self.inputs.moving_volume is None:
            raise BadInputError("the cursor needs the fixed and moving volumes")
        point_lps = np.asarray(fixed_ras, float).reshape(1, 3) * RAS_FROM_LPS
        return self._cursor_match(PointSet(point_lps, ["cursor"], [""]))

    def _cursor_match(self, point: PointSet) -> Steps:
        fixed_id, moving_id = yield from self._volume_ids()
        matches = yield from self._match(fixed_id, moving_id, point)
        return RunOutputs(matches=matches)

    def _volume_ids(self) -> Generator[Request, LoadResult, tuple[str, str]]:
        inputs = self.inputs
        fixed_id = yield from self.folder.volume_id(inputs.fixed_volume)
        moving_id = yield from self.folder.volume_id(
            inputs.moving_volume, include_parent_transform=not _moving_follows_output_transform(inputs)
        )
        return fixed_id, moving_id

    def _match(self, fixed_id: str, moving_id: str, points: PointSet) -> Generator[Request, MatchResult, MatchResult]:
        request = MatchRequest(fixed_id=fixed_id, moving_id=moving_id, points_lps_mm=points.points_lps_mm,
                               labels=list(points.labels), priors_lps_mm=None,
                               settings=request_settings(self.settings, match=self.settings.match))
        return (yield request)

    def _moving_landmarks_name(self) -> str:
        return f"{self.inputs.fixed_landmarks.GetName()} in {_volume_name(self.inputs.moving_volume)}"

    def _full_run(self, fixed_points: PointSet | None) -> Steps:
        inputs = self.inputs
        fixed_id, moving_id = yield from self._volume_ids()
        matches = None
        if fixed_points is not None:
            matches = yield from self._match(fixed_id, moving_id, fixed_points)
        summary = None
        transform_path = warped_path = None
        if inputs.compute_transform:
            transform_path = self.folder.new_path("transform")
            if inputs.compute_warped:
                warped_path = self.folder.new_path("warped")
            summary = yield RegisterRequest(
                fixed_id=fixed_id, moving_id=moving_id, out_transform=str(transform_path), out_inverse=None,
                out_warped=None if warped_path is None else str(warped_path), mask_id=None,
                settings=request_settings(self.settings, field=self.settings.field),
            )
        overlay_paths: dict[str, Path] = {}
        overlay_summary = None
        try:
            if inputs.compute_overlays:
                overlay_paths = {
                    name: self.folder.new_path(name)
                    for name in KINDS
                    if name == "confidence" or transform_path is not None
                }
                paths = {name: str(path) for name, path in overlay_paths.items()}
                overlay_summary = yield OverlaysRequest(
                    fixed_id=fixed_id, moving_id=moving_id,
                    transform=None if transform_path is None else str(transform_path),
                    out_confidence=paths["confidence"], out_jacobian=paths.get("jacobian"),
                    out_magnitude=paths.get("magnitude"), lattice=FieldLevel(),
                    settings=request_settings(self.settings),
                )
            loaded = {name: read_overlay(self.scene, path, KINDS[name]) for name, path in overlay_paths.items()}
            outputs = self._apply(matches, summary, transform_path, warped_path)
            outputs.overlay_summary = overlay_summary
            for name, overlay in loaded.items():
                kind = KINDS[name]
                outputs.overlays[name] = put_overlay(
                    self.scene, overlay, kind, inputs.fixed_volume, inputs.moving_volume,
                    existing_overlay(self.scene, inputs.fixed_volume, kind),
                )
            return outputs
        finally:
            for path in (transform_path, warped_path, *overlay_paths.values()):
                if path is not None and path.exists():
                    path.unlink()

    def _apply(self, matches: MatchResult | None, summary: RegisterResult | None, transform_path: Path | None,
               warped_path: Path | None) -> RunOutputs:
        """Write every output into the scene; files are read into detached nodes first."""
        inputs = self.inputs
        scene = self.scene
        fixed_name, moving_name = _volume_name(inputs.fixed_volume), _volume_name(inputs.moving_volume)
        transform_loaded = None if transform_path is None else read_displacement_field(scene, transform_path)
        warped_loaded = None if warped_path is None else read_volume_file(scene, warped_path, "warped volume")
        outputs = RunOutputs(matches=matches, register_summary=summary)
        if matches is not None:
            outputs.moving_landmarks = write_matches_to_markups(
                scene, matches, inputs.moving_landmarks, name=self._moving_landmarks_name()
            )
            set_input_references(outputs.moving_landmarks, inputs.fixed_volume, inputs.moving_volume,
                                 inputs.fixed_landmarks)
        if transform_loaded is not None:
            outputs.transform = fill_transform_node(
                scene, transform_loaded, inputs.transform, f"{moving_name} to {fixed_name}"
            )
            set_input_references(outputs.transform, inputs.fixed_volume, inputs.moving_volume)
        if warped_loaded is not None:
            outputs.warped_volume = fill_volume_node(
                scene, warped_loaded, inputs.warped_volume, f"{moving_name} warped"
            )
            set_input_references(outputs.warped_volume, inputs.fixed_volume, inputs.moving_volume)
        return outputs

    def _point_update(self, points: PointSet) -> Steps:
        inputs = self.inputs
        fixed_id, moving_id = yield from self._volume_ids()
        matches = yield from self._match(fixed_id, moving_id, points)
        moving_landmarks = write_matches_to_markups(
            self.scene, matches, inputs.moving_landmarks, name=self._moving_landmarks_name(), replace_all=False
        )
        set_input_references(moving_landmarks, inputs.fixed_volume, inputs.moving_volume, inputs.fixed_landmarks)
        return RunOutputs(moving_landmarks=moving_landmarks, matches=matches)
