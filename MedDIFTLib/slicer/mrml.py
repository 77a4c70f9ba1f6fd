"""Scene glue between Slicer's MRML scene and MedDIFT jobs.

The only MedDIFTLib module that touches MRML. Every function takes the scene and the nodes as
arguments (never the ``slicer.mrmlScene`` global) and creates nodes through the scene
(``AddNewNodeByClass`` / ``CreateNodeByClass``), so this module imports without Slicer and
works the same against the ``slicer-core`` wheel and inside the Slicer application.

Conventions at this boundary: the scene is RAS mm, MedDIFTLib is LPS mm (x and y negate).
A displacement field follows the ITK convention (on the fixed grid, fixed point x maps to
x + u(x) in the moving image) and lands in a transform node as its "from parent" transform.
Output nodes are filled in place when the user selected one, and created only when none is
selected; user nodes are never deleted or replaced. A job applies its results to the scene
only after every worker request has succeeded, so a failed or cancelled run changes nothing.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import BadInputError, CancelledError, MedDIFTError
from ..core.geometry import Geometry
from ..core.io.atomic import atomic_output
from ..core.io.points import RAS_FROM_LPS, UNRELIABLE_TAG, PointSet
from ..worker.client import error_from_event

REFERENCE_FIXED_VOLUME = "MedDIFT.fixedVolume"
REFERENCE_MOVING_VOLUME = "MedDIFT.movingVolume"
REFERENCE_FIXED_LANDMARKS = "MedDIFT.fixedLandmarks"
MATCH_SCORES_ATTRIBUTE = "MedDIFT.matchScores"  # JSON: label -> confidence, forward-backward mm, reliable
RELIABLE_COLOR = (0.20, 0.85, 0.30)
UNRELIABLE_COLOR = (1.00, 0.30, 0.20)
FIXED_VIEW = "Red"
MOVING_VIEW = "Yellow"
_POSITION_DEFINED = 2  # vtkMRMLMarkupsNode::PositionDefined
_ORTHONORMAL_TOLERANCE = 1e-4


def _matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _node_label(node) -> str:
    return f"'{node.GetName()}'" if node is not None else "(none)"


# ---------------------------------------------------------------------------------------------
# Volumes


def volume_geometry(volume_node, include_parent_transform: bool = True) -> Geometry:
    """The LPS geometry of a scalar volume node, in world coordinates.

    A linear parent transform is included unless ``include_parent_transform`` is false; a
    non-linear one, a sheared grid or a multi-component image is rejected with a message.
    """
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None:
        raise BadInputError(f"volume {_node_label(volume_node)} holds no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise BadInputError(
            f"volume {_node_label(volume_node)} has {image_data.GetNumberOfScalarComponents()} components per "
            "voxel; choose a scalar (single-component) volume"
        )
    ijk_to_ras = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    affine_ras = _matrix_to_numpy(ijk_to_ras)
    parent = volume_node.GetParentTransformNode()
    if include_parent_transform and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise BadInputError(
                f"volume {_node_label(volume_node)} is under the non-linear transform {_node_label(parent)}; "
                "harden or remove that transform first"
            )
        to_world = vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        affine_ras = _matrix_to_numpy(to_world) @ affine_ras
    affine_lps = np.diag([*RAS_FROM_LPS, 1.0]) @ affine_ras
    linear = affine_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(spacing > 0):
        raise BadInputError(f"volume {_node_label(volume_node)} has a zero voxel spacing")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise BadInputError(
            f"volume {_node_label(volume_node)} has a sheared voxel grid (after its parent transform); "
            "resample it onto an orthogonal grid first"
        )
    return Geometry.create(image_data.GetDimensions(), spacing, affine_lps[:3, 3], direction)


def volume_node_signature(volume_node, include_parent_transform: bool = True) -> tuple:
    """A key that changes when the node's voxels or world geometry change (for job-file reuse)."""
    geometry = volume_geometry(volume_node, include_parent_transform)
    return (volume_node.GetID(), volume_node.GetImageData().GetMTime(), geometry)


def write_volume_node(volume_node, path: str | Path, include_parent_transform: bool = True) -> Geometry:
    """Write a scalar volume node to ``path`` (format by extension) in LPS, atomically.

    Voxel values keep their type; the geometry is the world geometry of
    :func:`volume_geometry`. Returns that geometry.
    """
    import SimpleITK as sitk
    from vtkmodules.util import numpy_support

    geometry = volume_geometry(volume_node, include_parent_transform)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(geometry.shape_kji)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(geometry.spacing_mm)
    image.SetOrigin(geometry.origin_lps_mm)
    image.SetDirection(geometry.direction)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), False)
    return geometry


def _read_into_detached_node(scene, node_class: str, storage_class: str, path: Path, what: str):
    """Read ``path`` into a new node that is not in the scene (so a failure changes nothing)."""
    if not path.is_file():
        raise MedDIFTError(f"the {what} file {path} was not written")
    node = scene.CreateNodeByClass(node_class)
    node.UnRegister(None)
    storage = scene.CreateNodeByClass(storage_class)
    storage.UnRegister(None)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise MedDIFTError(f"Slicer could not read the {what} file {path}")
    return node


def _read_volume(scene, path: Path, what: str = "volume"):
    return _read_into_detached_node(scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", path, what)


def _fill_volume_node(scene, loaded, volume_node, name: str):
    """Put a detached node's voxels and geometry into ``volume_node``, or into a new node when None."""
    if volume_node is None:
        volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    volume_node.SetAndObserveImageData(loaded.GetImageData())
    volume_node.CopyOrientation(loaded)
    if volume_node.GetDisplayNode() is None:
        volume_node.CreateDefaultDisplayNodes()
    return volume_node


def load_volume_file(scene, path: str | Path, volume_node=None, name: str = "MedDIFT volume"):
    """Load a volume file into ``volume_node`` (filled in place), or into a new node when it is None."""
    return _fill_volume_node(scene, _read_volume(scene, Path(path)), volume_node, name)


def _read_displacement_field(scene, path: Path):
    """A detached transform node holding the field, interpolated trilinearly as ITK and MedDIFT do
    (Slicer's reader picks cubic interpolation, which moves points off the matches by up to
    a few hundredths of a mm)."""
    loaded = _read_into_detached_node(
        scene, "vtkMRMLTransformNode", "vtkMRMLTransformStorageNode", path, "displacement field"
    )
    grid = loaded.GetTransformFromParent()
    if grid is not None and hasattr(grid, "SetInterpolationModeToLinear"):
        grid.SetInterpolationModeToLinear()
    return loaded


def _fill_transform_node(scene, loaded, transform_node, name: str):
    """Make a detached node's transform the "from parent" of ``transform_node`` (a new grid
    transform node when None)."""
    if transform_node is None:
        transform_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    elif not transform_node.IsA("vtkMRMLTransformNode"):
        raise BadInputError(f"{_node_label(transform_node)} is not a transform node")
    transform_node.SetAndObserveTransformFromParent(loaded.GetTransformFromParent())
    return transform_node


def load_transform_file(scene, path: str | Path, transform_node=None, name: str = "MedDIFT transform"):
    """Load a displacement-field file (ITK convention, LPS) as the "from parent" transform of a node.

    ``transform_node`` (any vtkMRMLTransformNode) is filled in place; a new grid transform
    node is created when it is None. A volume placed under the node is resampled from the
    moving onto the fixed image grid.
    """
    return _fill_transform_node(scene, _read_displacement_field(scene, Path(path)), transform_node, name)


def set_input_references(output_node, fixed_volume=None, moving_volume=None, fixed_landmarks=None) -> None:
    """Record on an output node which inputs produced it (node references ``MedDIFT.*``)."""
    for role, node in (
        (REFERENCE_FIXED_VOLUME, fixed_volume),
        (REFERENCE_MOVING_VOLUME, moving_volume),
        (REFERENCE_FIXED_LANDMARKS, fixed_landmarks),
    ):
        output_node.SetNodeReferenceID(role, node.GetID() if node is not None else None)


# ---------------------------------------------------------------------------------------------
# Markups


def defined_control_point_indices(markups_node) -> list[int]:
    """Indices of the control points that have a position (placed, not missing or previewed)."""
    return [
        index
        for index in range(markups_node.GetNumberOfControlPoints())
        if markups_node.GetNthControlPointPositionStatus(index) == _POSITION_DEFINED
    ]


def _control_point_label(markups_node, index: int) -> str:
    return markups_node.GetNthControlPointLabel(index) or str(index + 1)


def markups_to_points(markups_node, indices: Sequence[int] | None = None) -> PointSet:
    """Control points (world RAS, parent transforms included) as LPS points with their labels.

    Only defined control points are taken (``indices`` restricts them further). Labels must be
    unique, because they pair each fixed landmark with its match; an unlabelled point gets its
    1-based index.
    """
    if markups_node is None:
        raise BadInputError("no landmarks node given")
    defined = defined_control_point_indices(markups_node)
    if indices is not None:
        wanted = set(indices)
        defined = [index for index in defined if index in wanted]
    if not defined:
        raise BadInputError(f"landmarks {_node_label(markups_node)} hold no placed control points")
    all_labels = [
        _control_point_label(markups_node, index) for index in defined_control_point_indices(markups_node)
    ]
    duplicates = sorted({label for label in all_labels if all_labels.count(label) > 1})
    if duplicates:
        raise BadInputError(
            f"landmarks {_node_label(markups_node)} repeat the labels {', '.join(duplicates)}; "
            "give every landmark its own label so that each match can be paired with it"
        )
    positions_ras = np.zeros((len(defined), 3))
    position = [0.0, 0.0, 0.0]
    for row, index in enumerate(defined):
        markups_node.GetNthControlPointPositionWorld(index, position)
        positions_ras[row] = position
    labels = [_control_point_label(markups_node, index) for index in defined]
    descriptions = [markups_node.GetNthControlPointDescription(index) for index in defined]
    return PointSet(positions_ras * RAS_FROM_LPS, labels, descriptions)


def _ensure_markups_display(markups_node) -> None:
    """Reliable matches (selected points) in green, unreliable ones (unselected) in red."""
    if markups_node.GetDisplayNode() is None:
        markups_node.CreateDefaultDisplayNodes()
    display_node = markups_node.GetDisplayNode()
    if display_node is not None:
        display_node.SetSelectedColor(*RELIABLE_COLOR)
        display_node.SetColor(*UNRELIABLE_COLOR)


def points_to_markups(scene, points: PointSet, markups_node=None, name: str = "MedDIFT points"):
    """Write LPS points into a markups node as RAS control points with the same labels.

    The node's control points are replaced; points flagged unreliable are unselected and
    their descriptions start with ``UNRELIABLE``. A new node is created when none is given.
    """
    if markups_node is None:
        markups_node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    _ensure_markups_display(markups_node)
    was_modifying = markups_node.StartModify()
    try:
        markups_node.RemoveAllControlPoints()
        for row, label in enumerate(points.labels):
            index = markups_node.AddControlPointWorld([float(v) for v in points.points_lps_mm[row] * RAS_FROM_LPS],
                                                      label)
            description = points.descriptions[row]
            if points.unreliable[row] and not description.startswith(UNRELIABLE_TAG):
                description = f"{UNRELIABLE_TAG} {description}".strip()
            markups_node.SetNthControlPointDescription(index, description)
            markups_node.SetNthControlPointSelected(index, not bool(points.unreliable[row]))
    finally:
        markups_node.EndModify(was_modifying)
    return markups_node


# ---------------------------------------------------------------------------------------------
# Match results


def _float_array(values: Sequence, count: int, name: str) -> np.ndarray:
    if len(values) != count:
        raise MedDIFTError(f"the worker returned {len(values)} {name} values for {count} points")
    return np.array([math.nan if value is None else float(value) for value in values], float)


@dataclass(frozen=True)
class MatchResult:
    """The worker's matches, one row per fixed label; a row without a finite point is missing.

    ``points_lps_mm`` (N, 3) in LPS mm, ``confidence`` in [0, 1], ``forward_backward_mm`` in mm,
    ``reliable`` per row.
    """

    labels: list[str]
    points_lps_mm: np.ndarray
    similarity: np.ndarray
    confidence: np.ndarray
    forward_backward_mm: np.ndarray
    reliable: np.ndarray
    seconds: float = math.nan
    features_cached: bool = False

    @staticmethod
    def from_worker(result: dict[str, Any]) -> MatchResult:
        """Parse a worker ``match`` result; JSON ``null`` or NaN marks a missing value."""
        try:
            labels = [str(label) for label in result["labels"]]
            count = len(labels)
            rows = result["points_lps_mm"]
            if len(rows) != count:
                raise MedDIFTError(f"the worker returned {len(rows)} points for {count} labels")
            points = np.array(
                [[math.nan] * 3 if row is None else [math.nan if v is None else float(v) for v in row] for row in rows],
                float,
            ).reshape(count, 3)
            reliable = result.get("reliable", [True] * count)
            if len(reliable) != count:
                raise MedDIFTError(f"the worker returned {len(reliable)} reliability flags for {count} points")
            return MatchResult(
                labels=labels,
                points_lps_mm=points,
                similarity=_float_array(result.get("similarity", [None] * count), count, "similarity"),
                confidence=_float_array(result.get("confidence", [None] * count), count, "confidence"),
                forward_backward_mm=_float_array(
                    result.get("forward_backward_mm", [None] * count), count, "forward-backward"
                ),
                reliable=np.array([bool(flag) for flag in reliable], bool),
                seconds=float(result.get("seconds", math.nan)),
                features_cached=bool(result.get("features_cached", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise MedDIFTError(f"the worker returned a malformed match result ({error!r})") from None

    def __len__(self) -> int:
        return len(self.labels)

    def found(self, row: int) -> bool:
        return bool(np.isfinite(self.points_lps_mm[row]).all())

    def description(self, row: int) -> str:
        """Text for the control point: confidence and forward-backward distance, flagged if unreliable."""
        if not self.found(row):
            return "MedDIFT: no match"
        parts = []
        if np.isfinite(self.confidence[row]):
            parts.append(f"confidence {self.confidence[row]:.2f}")
        if np.isfinite(self.forward_backward_mm[row]):
            parts.append(f"forward-backward {self.forward_backward_mm[row]:.1f} mm")
        text = "MedDIFT " + ", ".join(parts) if parts else "MedDIFT match"
        return text if self.reliable[row] else f"{UNRELIABLE_TAG} {text}"


def _set_match(markups_node, index: int, matches: MatchResult, row: int) -> None:
    if matches.found(row):
        position_ras = [float(v) for v in matches.points_lps_mm[row] * RAS_FROM_LPS]
        markups_node.SetNthControlPointPositionWorld(index, *position_ras)
        markups_node.SetNthControlPointSelected(index, bool(matches.reliable[row]))
    else:
        markups_node.SetNthControlPointPositionMissing(index)
        markups_node.SetNthControlPointSelected(index, False)
    markups_node.SetNthControlPointDescription(index, matches.description(row))


def _match_scores(markups_node) -> dict[str, dict[str, Any]]:
    try:
        scores = json.loads(markups_node.GetAttribute(MATCH_SCORES_ATTRIBUTE) or "{}")
    except ValueError:
        return {}
    return scores if isinstance(scores, dict) else {}


def write_matches_to_markups(scene, matches: MatchResult, markups_node=None, name: str = "MedDIFT matches",
                             replace_all: bool = True):
    """Put matched moving points into a markups node (RAS), paired with the fixed ones by label.

    ``replace_all``: the node then holds exactly the matches, in their order; otherwise only
    the points with these labels are updated (added when absent), as in live propagation.
    A match without a point becomes a control point with the "missing" status. Confidence
    and forward-backward distance go into the description (and, exactly, into the node
    attribute ``MedDIFT.matchScores``); unreliable matches are unselected (drawn in the
    unreliable colour) and their description starts with ``UNRELIABLE``.
    """
    if markups_node is None:
        markups_node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    _ensure_markups_display(markups_node)
    scores = {} if replace_all else _match_scores(markups_node)
    was_modifying = markups_node.StartModify()
    try:
        if replace_all:
            markups_node.RemoveAllControlPoints()
        for row, label in enumerate(matches.labels):
            index = -1 if replace_all else markups_node.GetControlPointIndexByLabel(label)
            if index < 0:
                index = markups_node.AddControlPointWorld([0.0, 0.0, 0.0], label)
            _set_match(markups_node, index, matches, row)
            scores[label] = {
                "confidence": _json_number(matches.confidence[row]),
                "forward_backward_mm": _json_number(matches.forward_backward_mm[row]),
                "reliable": bool(matches.reliable[row]) and matches.found(row),
            }
        markups_node.SetAttribute(MATCH_SCORES_ATTRIBUTE, json.dumps(scores))
    finally:
        markups_node.EndModify(was_modifying)
    return markups_node


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class PairRow:
    """One row of the pairs table: positions in RAS mm (None when that side has no point)."""

    label: str
    confidence: float
    forward_backward_mm: float
    reliable: bool
    fixed_ras: tuple[float, float, float] | None
    moving_ras: tuple[float, float, float] | None


def _position_ras_by_label(markups_node) -> dict[str, tuple[float, float, float]]:
    positions: dict[str, tuple[float, float, float]] = {}
    if markups_node is None:
        return positions
    position = [0.0, 0.0, 0.0]
    for index in defined_control_point_indices(markups_node):
        markups_node.GetNthControlPointPositionWorld(index, position)
        positions[_control_point_label(markups_node, index)] = (position[0], position[1], position[2])
    return positions


def pair_rows(fixed_landmarks, moving_landmarks) -> list[PairRow]:
    """Pairs of fixed and matched landmarks (by label, in the fixed order) with their scores.

    Scores come from the moving node's ``MedDIFT.matchScores`` attribute written by
    :func:`write_matches_to_markups`, so the table can be rebuilt from a saved scene.
    """
    if moving_landmarks is None:
        return []
    scores = _match_scores(moving_landmarks)
    moving_positions = _position_ras_by_label(moving_landmarks)
    rows = []
    for label, fixed_ras in _position_ras_by_label(fixed_landmarks).items():
        if moving_landmarks.GetControlPointIndexByLabel(label) < 0:
            continue
        score = scores.get(label, {})
        confidence, forward_backward = score.get("confidence"), score.get("forward_backward_mm")
        rows.append(
            PairRow(
                label=label,
                confidence=math.nan if confidence is None else float(confidence),
                forward_backward_mm=math.nan if forward_backward is None else float(forward_backward),
                reliable=bool(score.get("reliable", False)) and label in moving_positions,
                fixed_ras=fixed_ras,
                moving_ras=moving_positions.get(label),
            )
        )
    return rows


def confidence_color(confidence: float) -> tuple[float, float, float]:
    """RGB in [0, 1] from red (0) through yellow (0.5) to green (1); grey when unknown."""
    if not math.isfinite(confidence):
        return (0.6, 0.6, 0.6)
    value = min(max(confidence, 0.0), 1.0)
    low, high = np.array(UNRELIABLE_COLOR), np.array(RELIABLE_COLOR)
    middle = np.array([1.0, 0.85, 0.2])
    color = low + (middle - low) * value * 2 if value < 0.5 else middle + (high - middle) * (value - 0.5) * 2
    return (float(color[0]), float(color[1]), float(color[2]))


# ---------------------------------------------------------------------------------------------
# Views


def _node_by_layout_name(scene, node_class: str, layout_name: str):
    nodes = scene.GetNodesByClass(node_class)
    try:
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if node.GetLayoutName() == layout_name:
                return node
    finally:
        nodes.UnRegister(None)
    return None


def show_volumes_in_pair_views(scene, fixed_volume, moving_volume, fixed_view: str = FIXED_VIEW,
                               moving_view: str = MOVING_VIEW) -> None:
    """Show the fixed volume in one slice view and the moving one in the other (backgrounds).

    The moving view takes the orientation of the fixed view, so a pair is seen the same way.
    """
    for view, volume in ((fixed_view, fixed_volume), (moving_view, moving_volume)):
        composite = _node_by_layout_name(scene, "vtkMRMLSliceCompositeNode", view)
        if composite is None:
            raise MedDIFTError(f"the scene has no slice view named {view}")
        composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
        composite.SetForegroundVolumeID(None)
    fixed_slice = _node_by_layout_name(scene, "vtkMRMLSliceNode", fixed_view)
    moving_slice = _node_by_layout_name(scene, "vtkMRMLSliceNode", moving_view)
    if fixed_slice is not None and moving_slice is not None:
        orientation = fixed_slice.GetOrientationString()
        if moving_slice.HasSliceOrientationPreset(orientation):
            moving_slice.SetOrientation(orientation)


def jump_to_pair(scene, row: PairRow, fixed_view: str = FIXED_VIEW, moving_view: str = MOVING_VIEW) -> None:
    """Centre the fixed view on the fixed landmark and the moving view on its match (RAS mm)."""
    for view, position in ((fixed_view, row.fixed_ras), (moving_view, row.moving_ras)):
        if position is None:
            continue
        slice_node = _node_by_layout_name(scene, "vtkMRMLSliceNode", view)
        if slice_node is None:
            raise MedDIFTError(f"the scene has no slice view named {view}")
        slice_node.JumpSliceByCentering(*position)


# ---------------------------------------------------------------------------------------------
# Jobs: worker requests from scene inputs, results back into the scene


@dataclass(frozen=True)
class WorkerRequest:
    """One request of the worker protocol: ``type`` and its parameters."""

    type: str
    params: dict[str, Any]


@dataclass
class RunSettings:
    """How to run: backbone name and options, device (``auto``, ``cpu``, ``cuda``), options of
    the ``match`` and ``register`` requests (distances in mm)."""

    backbone: str = "mind"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    match_options: dict[str, Any] = field(default_factory=dict)
    register_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobInputs:
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


@dataclass
class JobOutputs:
    """What a run put into the scene, and the worker's numbers behind it."""

    moving_landmarks: Any = None
    transform: Any = None
    warped_volume: Any = None
    matches: MatchResult | None = None
    register_summary: dict[str, Any] | None = None


class JobFolder:
    """The files of one worker session: exported volumes and per-run outputs, in ``path``.

    Volume nodes are written once and loaded once per worker process (node signature ->
    job file and worker volume id); an unchanged node is reused. Call :meth:`clear` when
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

    def volume_id(self, volume_node, include_parent_transform: bool = True) -> Generator[WorkerRequest, dict, str]:
        """Steps that give the worker volume id of ``volume_node`` (writing and loading it if new)."""
        signature = volume_node_signature(volume_node, include_parent_transform)
        node_id = volume_node.GetID()
        cached = self._loaded.get(node_id)
        if cached is not None and cached[0] == signature:
            return cached[2]
        path = cached[1] if cached is not None else self.new_path("volume")
        write_volume_node(volume_node, path, include_parent_transform)
        result = yield WorkerRequest("load", {"path": str(path)})
        try:
            volume_id = str(result["volume_id"])
        except (KeyError, TypeError):
            raise MedDIFTError("the worker returned a malformed load result") from None
        self._loaded[node_id] = (signature, path, volume_id)
        return volume_id


def _check_inputs(inputs: JobInputs) -> None:
    if inputs.fixed_volume is None or inputs.moving_volume is None:
        raise BadInputError("choose a fixed and a moving volume")
    for node, node_class, role in (
        (inputs.moving_landmarks, "vtkMRMLMarkupsFiducialNode", "output landmarks"),
        (inputs.transform, "vtkMRMLTransformNode", "output transform"),
        (inputs.warped_volume, "vtkMRMLScalarVolumeNode", "warped volume"),
    ):
        if node is not None and not node.IsA(node_class):
            raise BadInputError(f"the {role} {_node_label(node)} is not a {node_class}")
    if not (inputs.compute_landmarks or inputs.compute_transform):
        raise BadInputError("nothing to compute: ask for moving landmarks, a transform or both")
    if inputs.compute_landmarks and inputs.fixed_landmarks is None:
        raise BadInputError("choose the fixed landmarks to match")
    if inputs.compute_warped and not inputs.compute_transform:
        raise BadInputError("a warped volume needs the transform to be computed")
    if inputs.moving_landmarks is not None and inputs.moving_landmarks is inputs.fixed_landmarks:
        raise BadInputError("the output landmarks must be another node than the fixed landmarks")
    if inputs.warped_volume is not None and inputs.warped_volume in (inputs.fixed_volume, inputs.moving_volume):
        raise BadInputError("the warped volume must be another node than the fixed and moving volumes")
    if inputs.transform is not None and inputs.fixed_volume.GetParentTransformNode() is inputs.transform:
        raise BadInputError("the fixed volume is under the output transform; remove it from that transform first")


def _moving_follows_output_transform(inputs: JobInputs) -> bool:
    """True when the moving volume was put under the output transform (to view the result).

    Its own grid is then what is registered: the transform about to be replaced is ignored.
    """
    return inputs.transform is not None and inputs.moving_volume.GetParentTransformNode() is inputs.transform


def _volume_name(node) -> str:
    return node.GetName() or node.GetID()


class SceneJob:
    """One run as a sequence of worker requests; results reach the scene only at the end.

    :meth:`steps` is a generator: it yields :class:`WorkerRequest` objects, receives each
    request's result dict, and returns the :class:`JobOutputs`. Drive it with
    :func:`run_blocking` or a :class:`JobRunner`.
    """

    def __init__(self, scene, inputs: JobInputs, settings: RunSettings, folder: JobFolder) -> None:
        self.scene = scene
        self.inputs = inputs
        self.settings = settings
        self.folder = folder

    def _common_params(self, fixed_id: str, moving_id: str) -> dict[str, Any]:
        return {
            "fixed_id": fixed_id,
            "moving_id": moving_id,
            "backbone": self.settings.backbone,
            "backbone_options": dict(self.settings.backbone_options),
            "device": self.settings.device,
        }

    def _volume_ids(self) -> Generator[WorkerRequest, dict, tuple[str, str]]:
        inputs = self.inputs
        fixed_id = yield from self.folder.volume_id(inputs.fixed_volume)
        moving_id = yield from self.folder.volume_id(
            inputs.moving_volume, include_parent_transform=not _moving_follows_output_transform(inputs)
        )
        return fixed_id, moving_id

    def _match_request(self, fixed_id: str, moving_id: str, points: PointSet) -> WorkerRequest:
        params = self._common_params(fixed_id, moving_id)
        params.update(
            points_lps_mm=points.points_lps_mm.tolist(),
            labels=list(points.labels),
            options=dict(self.settings.match_options),
        )
        return WorkerRequest("match", params)

    def validate(self, control_point_indices: Sequence[int] | None = None) -> PointSet | None:
        """Check the inputs before any request (so errors come at once); returns the fixed points.

        ``control_point_indices`` checks a live update of those fixed control points instead of
        a full run.
        """
        inputs = self.inputs
        if control_point_indices is None:
            _check_inputs(inputs)
            return markups_to_points(inputs.fixed_landmarks) if inputs.compute_landmarks else None
        if inputs.fixed_volume is None or inputs.moving_volume is None or inputs.fixed_landmarks is None:
            raise BadInputError("live matching needs the fixed and moving volumes and the fixed landmarks")
        if inputs.moving_landmarks is not None and inputs.moving_landmarks is inputs.fixed_landmarks:
            raise BadInputError("the output landmarks must be another node than the fixed landmarks")
        return markups_to_points(inputs.fixed_landmarks, indices=control_point_indices)

    def _moving_landmarks_name(self) -> str:
        return f"{self.inputs.fixed_landmarks.GetName()} in {_volume_name(self.inputs.moving_volume)}"

    def steps(self) -> Generator[WorkerRequest, dict, JobOutputs]:
        """All requests of a full run, then the scene update."""
        inputs = self.inputs
        fixed_points = self.validate()
        fixed_id, moving_id = yield from self._volume_ids()
        matches = None
        if fixed_points is not None:
            matches = MatchResult.from_worker((yield self._match_request(fixed_id, moving_id, fixed_points)))
        summary = None
        transform_path = warped_path = None
        if inputs.compute_transform:
            transform_path = self.folder.new_path("transform")
            params = self._common_params(fixed_id, moving_id)
            params.update(out_transform=str(transform_path), options=dict(self.settings.register_options))
            if inputs.compute_warped:
                warped_path = self.folder.new_path("warped")
                params["out_warped"] = str(warped_path)
            summary = yield WorkerRequest("register", params)
        try:
            return self._apply(matches, summary, transform_path, warped_path)
        finally:
            for path in (transform_path, warped_path):
                if path is not None and path.exists():
                    path.unlink()

    def _apply(self, matches: MatchResult | None, summary: dict | None, transform_path: Path | None,
               warped_path: Path | None) -> JobOutputs:
        inputs = self.inputs
        scene = self.scene
        fixed_name, moving_name = _volume_name(inputs.fixed_volume), _volume_name(inputs.moving_volume)
        transform_loaded = warped_loaded = None
        if transform_path is not None:
            transform_loaded = _read_displacement_field(scene, transform_path)
        if warped_path is not None:
            warped_loaded = _read_volume(scene, warped_path, "warped volume")
        outputs = JobOutputs(matches=matches, register_summary=summary)
        if matches is not None:
            outputs.moving_landmarks = write_matches_to_markups(
                scene, matches, inputs.moving_landmarks, name=self._moving_landmarks_name()
            )
            set_input_references(outputs.moving_landmarks, inputs.fixed_volume, inputs.moving_volume,
                                 inputs.fixed_landmarks)
        if transform_loaded is not None:
            outputs.transform = _fill_transform_node(
                scene, transform_loaded, inputs.transform, f"{moving_name} to {fixed_name}"
            )
            set_input_references(outputs.transform, inputs.fixed_volume, inputs.moving_volume)
        if warped_loaded is not None:
            outputs.warped_volume = _fill_volume_node(
                scene, warped_loaded, inputs.warped_volume, f"{moving_name} warped"
            )
            set_input_references(outputs.warped_volume, inputs.fixed_volume, inputs.moving_volume)
        return outputs

    def point_steps(self, control_point_indices: Sequence[int]) -> Generator[WorkerRequest, dict, JobOutputs]:
        """Re-match some fixed control points and update only their partners in the output landmarks.

        Volumes already loaded by the worker are not sent again, and the worker's feature cache
        makes this a matter of the search alone (live propagation).
        """
        inputs = self.inputs
        points = self.validate(control_point_indices)
        fixed_id, moving_id = yield from self._volume_ids()
        matches = MatchResult.from_worker((yield self._match_request(fixed_id, moving_id, points)))
        moving_landmarks = write_matches_to_markups(
            self.scene, matches, inputs.moving_landmarks, name=self._moving_landmarks_name(), replace_all=False
        )
        set_input_references(moving_landmarks, inputs.fixed_volume, inputs.moving_volume, inputs.fixed_landmarks)
        return JobOutputs(moving_landmarks=moving_landmarks, matches=matches)


ProgressCallback = Callable[[str, float, str], None]


def run_blocking(client, steps: Generator[WorkerRequest, dict, JobOutputs],
                 progress: ProgressCallback | None = None, timeout: float | None = None) -> JobOutputs:
    """Drive a job to its end with blocking ``client.call`` requests (scripts and tests)."""
    try:
        request = next(steps)
        while True:
            result = client.call(request.type, progress=progress, timeout=timeout, **request.params)
            request = steps.send(result)
    except StopIteration as finished:
        return finished.value


class JobRunner:
    """Drive a job without blocking: :meth:`poll` (from a GUI timer) reads the worker's events.

    ``on_progress(stage, fraction, message)`` and ``on_log(level, message)`` report as events
    come; ``on_done(outputs, error)`` is called once, with the outputs or the exception (a
    :class:`CancelledError` after :meth:`cancel`; an error that is no :class:`MedDIFTError`
    is a bug and arrives as it was raised).
    """

    def __init__(self, client, steps: Generator[WorkerRequest, dict, JobOutputs],
                 on_done: Callable[[JobOutputs | None, Exception | None], None],
                 on_progress: ProgressCallback | None = None,
                 on_log: Callable[[str, str], None] | None = None) -> None:
        self._client = client
        self._steps = steps
        self._on_done = on_done
        self._on_progress = on_progress
        self._on_log = on_log
        self._request_id: str | None = None
        self.finished = False

    def start(self) -> None:
        """Send the first request (or finish at once when the job needs none)."""
        self._advance(lambda: next(self._steps))

    def _advance(self, step: Callable[[], WorkerRequest]) -> None:
        try:
            request = step()
            self._request_id = self._client.send(request.type, **request.params)
        except StopIteration as finished:
            self._finish(finished.value, None)
        except Exception as error:
            self._finish(None, error)

    def _finish(self, outputs: JobOutputs | None, error: Exception | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._steps.close()
        self._on_done(outputs, error)

    def poll(self) -> bool:
        """Handle the events that arrived; True while the job is still running."""
        if self.finished:
            return False
        for event in self._client.poll():
            if self.finished:
                break
            kind = event.get("event")
            if kind == "log" and self._on_log is not None:
                self._on_log(str(event.get("level", "info")), str(event.get("message", "")))
            if kind == "exit":
                tail = self._client.stderr_tail(8).strip()
                self._finish(None, MedDIFTError(
                    f"the MedDIFT worker stopped unexpectedly (code {event.get('returncode')})"
                    + (f"; its last words:\n{tail}" if tail else "")
                ))
                break
            if event.get("id") != self._request_id or self._request_id is None:
                continue
            if kind == "progress" and self._on_progress is not None:
                self._on_progress(str(event.get("stage", "")), float(event.get("fraction") or 0.0),
                                  str(event.get("message", "")))
            elif kind == "result":
                result = event.get("result") or {}
                self._advance(lambda result=result: self._steps.send(result))
            elif kind == "error":
                self._finish(None, error_from_event(event))
        return not self.finished

    def cancel(self) -> None:
        """Stop now: the worker's whole process tree is killed and nothing reaches the scene."""
        if self.finished:
            return
        self._client.kill()
        self._finish(None, CancelledError("cancelled by the user"))
