"""Node I/O at the MRML boundary: volume, transform and markups nodes to and from LPS data and files.

Every function takes the scene and the nodes as arguments (never the ``slicer.mrmlScene``
global) and creates nodes through the scene (``AddNewNodeByClass`` / ``CreateNodeByClass``),
so it works the same against the ``slicer-core`` wheel and inside the Slicer application.

The scene is RAS mm, MedDIFTLib is LPS mm (x and y negate). A displacement field follows the
ITK convention (on the fixed grid, fixed point x maps to x + u(x) in the moving image) and
lands in a transform node as its "from parent" transform. Output nodes are filled in place
when given and created only when None; user nodes are never deleted or replaced. A file is
read into a detached node first, so a failed read changes nothing in the scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError, MedDIFTError
from ..core.geometry import Geometry
from ..core.io import PointSet, atomic_output, sitk_image
from ..core.io.points import RAS_FROM_LPS, UNRELIABLE_TAG

REFERENCE_FIXED_VOLUME = "MedDIFT.fixedVolume"
REFERENCE_MOVING_VOLUME = "MedDIFT.movingVolume"
REFERENCE_FIXED_LANDMARKS = "MedDIFT.fixedLandmarks"
RELIABLE_COLOR = (0.20, 0.85, 0.30)
UNRELIABLE_COLOR = (1.00, 0.30, 0.20)
POSITION_DEFINED = 2  # vtkMRMLMarkupsNode::PositionDefined
_ORTHONORMAL_TOLERANCE = 1e-4


def node_label(node) -> str:
    """The node's name quoted for a message, or ``(none)``."""
    return f"'{node.GetName()}'" if node is not None else "(none)"


def _matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


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
        raise BadInputError(f"volume {node_label(volume_node)} holds no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise BadInputError(
            f"volume {node_label(volume_node)} has {image_data.GetNumberOfScalarComponents()} components per "
            "voxel; choose a scalar (single-component) volume"
        )
    ijk_to_ras = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    affine_ras = _matrix_to_numpy(ijk_to_ras)
    parent = volume_node.GetParentTransformNode()
    if include_parent_transform and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise BadInputError(
                f"volume {node_label(volume_node)} is under the non-linear transform {node_label(parent)}; "
                "harden or remove that transform first"
            )
        to_world = vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        affine_ras = _matrix_to_numpy(to_world) @ affine_ras
    affine_lps = np.diag([*RAS_FROM_LPS, 1.0]) @ affine_ras
    linear = affine_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(spacing > 0):
        raise BadInputError(f"volume {node_label(volume_node)} has a zero voxel spacing")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise BadInputError(
            f"volume {node_label(volume_node)} has a sheared voxel grid (after its parent transform); "
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
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk_image(voxels, geometry), str(tmp), False)
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


def read_volume_file(scene, path: str | Path, what: str = "volume"):
    """A detached scalar volume node (not in the scene) holding the file's voxels and geometry."""
    return _read_into_detached_node(
        scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", Path(path), what
    )


def fill_volume_node(scene, loaded, volume_node, name: str):
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
    return fill_volume_node(scene, read_volume_file(scene, path), volume_node, name)


# ---------------------------------------------------------------------------------------------
# Transforms


def read_displacement_field(scene, path: str | Path):
    """A detached transform node holding the field, interpolated trilinearly as ITK and MedDIFT do
    (Slicer's reader picks cubic interpolation, which moves points off the matches)."""
    loaded = _read_into_detached_node(
        scene, "vtkMRMLTransformNode", "vtkMRMLTransformStorageNode", Path(path), "displacement field"
    )
    grid = loaded.GetTransformFromParent()
    if grid is not None and hasattr(grid, "SetInterpolationModeToLinear"):
        grid.SetInterpolationModeToLinear()
    return loaded


def fill_transform_node(scene, loaded, transform_node, name: str):
    """Make a detached node's transform the "from parent" of ``transform_node`` (a new grid
    transform node when None)."""
    if transform_node is None:
        transform_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    elif not transform_node.IsA("vtkMRMLTransformNode"):
        raise BadInputError(f"{node_label(transform_node)} is not a transform node")
    transform_node.SetAndObserveTransformFromParent(loaded.GetTransformFromParent())
    return transform_node


def load_transform_file(scene, path: str | Path, transform_node=None, name: str = "MedDIFT transform"):
    """Load a displacement-field file (ITK convention, LPS) as the "from parent" transform of a node.

    ``transform_node`` (any vtkMRMLTransformNode) is filled in place; a new grid transform
    node is created when it is None. A volume placed under the node is resampled from the
    moving onto the fixed image grid.
    """
    return fill_transform_node(scene, read_displacement_field(scene, path), transform_node, name)


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
        if markups_node.GetNthControlPointPositionStatus(index) == POSITION_DEFINED
    ]


def control_point_label(markups_node, index: int) -> str:
    """The control point's label, or its 1-based index when it has none."""
    return markups_node.GetNthControlPointLabel(index) or str(index + 1)


def positions_ras_by_label(markups_node) -> dict[str, tuple[float, float, float]]:
    """World RAS positions (mm) of the defined control points, by label."""
    positions: dict[str, tuple[float, float, float]] = {}
    if markups_node is None:
        return positions
    position = [0.0, 0.0, 0.0]
    for index in defined_control_point_indices(markups_node):
        markups_node.GetNthControlPointPositionWorld(index, position)
        positions[control_point_label(markups_node, index)] = (position[0], position[1], position[2])
    return positions


def markups_to_points(markups_node, indices: Sequence[int] | None = None) -> PointSet:
    """Control points (world RAS, parent transforms included) as LPS points with their labels.

    Only defined control points are taken (``indices`` restricts them further). Labels must be
    unique, because they pair each fixed landmark with its match; an unlabelled point gets its
    1-based index.
    """
    if markups_node is None:
        raise BadInputError("no landmarks node given")
    defined = defined_control_point_indices(markups_node)
    all_labels = [control_point_label(markups_node, index) for index in defined]
    duplicates = sorted({label for label in all_labels if all_labels.count(label) > 1})
    if indices is not None:
        wanted = set(indices)
        defined = [index for index in defined if index in wanted]
    if not defined:
        raise BadInputError(f"landmarks {node_label(markups_node)} hold no placed control points")
    if duplicates:
        raise BadInputError(
            f"landmarks {node_label(markups_node)} repeat the labels {', '.join(duplicates)}; "
            "give every landmark its own label so that each match can be paired with it"
        )
    positions_ras = np.zeros((len(defined), 3))
    position = [0.0, 0.0, 0.0]
    for row, index in enumerate(defined):
        markups_node.GetNthControlPointPositionWorld(index, position)
        positions_ras[row] = position
    labels = [control_point_label(markups_node, index) for index in defined]
    descriptions = [markups_node.GetNthControlPointDescription(index) for index in defined]
    return PointSet(positions_ras * RAS_FROM_LPS, labels, descriptions)


SELECTION_NODE_ID = "vtkMRMLSelectionNodeSingleton"


def add_markups_node(scene, name: str, node_class: str = "vtkMRMLMarkupsFiducialNode"):
    """A new markups node in the scene that does not become the active place list.

    Slicer's markups logic makes every markups node added to the scene the list that mouse clicks
    place points into; a node made here (matches, the cursor marker) must not take over a place
    mode the user has started, so the selection node's active place node is put back.
    """
    selection = scene.GetNodeByID(SELECTION_NODE_ID)
    active = None if selection is None else (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID())
    node = scene.AddNewNodeByClass(node_class, name)
    if selection is not None and (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID()) != active:
        selection.SetReferenceActivePlaceNodeClassName(active[0])
        selection.SetActivePlaceNodeID(active[1])
    return node


def ensure_markups_display(
    markups_node, selected_color: tuple = RELIABLE_COLOR, color: tuple = UNRELIABLE_COLOR
) -> None:
    """Give the node a display node; selected points in ``selected_color`` (by default reliable matches
    in green), the others in ``color`` (unreliable ones in red)."""
    if markups_node.GetDisplayNode() is None:
        markups_node.CreateDefaultDisplayNodes()
    display_node = markups_node.GetDisplayNode()
    if display_node is not None:
        display_node.SetSelectedColor(*selected_color)
        display_node.SetColor(*color)


def points_to_markups(scene, points: PointSet, markups_node=None, name: str = "MedDIFT points"):
    """Write LPS points into a markups node as RAS control points with the same labels.

    The node's control points are replaced; points flagged unreliable are unselected and
    their descriptions start with ``UNRELIABLE``. A new node is created when none is given.
    """
    if markups_node is None:
        markups_node = add_markups_node(scene, scene.GenerateUniqueName(name))
    ensure_markups_display(markups_node)
    was_modifying = markups_node.StartModify()
    try:
        markups_node.RemoveAllControlPoints()
        for row, label in enumerate(points.labels):
            position_ras = [float(v) for v in points.points_lps_mm[row] * RAS_FROM_LPS]
            index = markups_node.AddControlPointWorld(position_ras, label)
            description = points.descriptions[row]
            if points.unreliable[row] and not description.startswith(UNRELIABLE_TAG):
                description = f"{UNRELIABLE_TAG} {description}".strip()
            markups_node.SetNthControlPointDescription(index, description)
            markups_node.SetNthControlPointSelected(index, not bool(points.unreliable[row]))
    finally:
        markups_node.EndModify(was_modifying)
    return markups_node
