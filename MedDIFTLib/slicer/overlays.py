"""QA overlays in the scene: confidence, Jacobian determinant and displacement magnitude as volume
nodes on the fixed grid, each with its colour table, shown over the fixed volume.

The worker writes the overlays (``overlays`` request); they are read into detached nodes and
then put into the scene, like every other output. Colour tables are built here (so they exist
in a bare scene too): confidence red (0) to yellow to green (1); Jacobian determinant red where
the field folds (det <= 0), blue where it compresses, white where it keeps volume (1), orange
where it expands; magnitude dark to bright (mm). Fade and flicker compare the fixed volume with
the moving volume shown through the transform, in one slice view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import BadInputError, MedDIFTError
from .nodes import REFERENCE_FIXED_VOLUME, fill_volume_node, read_volume_file, set_input_references
from .views import FIXED_VIEW, confidence_color, node_by_layout_name

COLORS = 256
OVERLAY_OPACITY = 0.5
KIND_ATTRIBUTE = "MedDIFT.overlay"


@dataclass(frozen=True)
class OverlayKind:
    """One overlay: ``name`` (the worker's), ``title`` (node name), display range ``low``..``high``
    (``high`` None: the volume's maximum) in the overlay's unit."""

    name: str
    title: str
    low: float
    high: float | None


CONFIDENCE = OverlayKind("confidence", "confidence", 0.0, 1.0)
JACOBIAN = OverlayKind("jacobian", "Jacobian determinant", -0.1, 2.0)
MAGNITUDE = OverlayKind("magnitude", "displacement (mm)", 0.0, None)
KINDS = {kind.name: kind for kind in (CONFIDENCE, JACOBIAN, MAGNITUDE)}


def _ramp(stops: list[tuple[float, tuple[float, float, float]]]) -> np.ndarray:
    """``COLORS`` RGB rows interpolated between ``(position in [0, 1], rgb)`` stops."""
    positions = np.linspace(0.0, 1.0, COLORS)
    at = [stop for stop, _ in stops]
    return np.stack([np.interp(positions, at, [rgb[channel] for _, rgb in stops]) for channel in range(3)], axis=1)


def color_rows(kind: OverlayKind) -> np.ndarray:
    """``(COLORS, 3)`` RGB in [0, 1] over the display range of ``kind``."""
    if kind is CONFIDENCE:
        return np.array([confidence_color(value) for value in np.linspace(0.0, 1.0, COLORS)])
    if kind is JACOBIAN:
        rows = _ramp([(0.0, (0.2, 0.3, 1.0)), ((1.0 - kind.low) / (kind.high - kind.low), (1.0, 1.0, 1.0)),
                      (1.0, (1.0, 0.55, 0.0))])
        folding = np.linspace(kind.low, kind.high, COLORS) <= 0.0
        rows[folding] = (1.0, 0.0, 0.0)
        return rows
    return _ramp([(0.0, (0.0, 0.0, 0.3)), (0.5, (0.8, 0.1, 0.6)), (1.0, (1.0, 1.0, 0.4))])


def color_table(scene, kind: OverlayKind):
    """The scene's colour table of ``kind`` (created once, named ``MedDIFT <title>``)."""
    name = f"MedDIFT {kind.title}"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(COLORS)
    table.SetHideFromEditors(False)
    for index, (red, green, blue) in enumerate(color_rows(kind)):
        table.SetColor(index, f"{index}", float(red), float(green), float(blue), 1.0)
    table.SetAttribute(KIND_ATTRIBUTE, kind.name)
    return table


def read_overlay(scene, path, kind: OverlayKind):
    """A detached volume node (not in the scene) holding an overlay file."""
    return read_volume_file(scene, path, f"{kind.title} overlay")


def existing_overlay(scene, fixed_volume, kind: OverlayKind):
    """The overlay node of ``kind`` made earlier for ``fixed_volume`` (filled again on a new run), or None."""
    found = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    try:
        for index in range(found.GetNumberOfItems()):
            node = found.GetItemAsObject(index)
            if overlay_kind(node) is kind and node.GetNodeReferenceID(REFERENCE_FIXED_VOLUME) == fixed_volume.GetID():
                return node
    finally:
        found.UnRegister(None)
    return None


def put_overlay(scene, loaded, kind: OverlayKind, fixed_volume, moving_volume=None, node=None):
    """Put a detached overlay node's voxels into ``node`` (a new one when None) with its colour
    table and display range; references record the volumes it was made from."""
    fixed_name = fixed_volume.GetName() or fixed_volume.GetID()
    node = fill_volume_node(scene, loaded, node, f"{fixed_name} {kind.title}")
    node.SetAttribute(KIND_ATTRIBUTE, kind.name)
    set_input_references(node, fixed_volume, moving_volume)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_table(scene, kind).GetID())
    display.SetAutoWindowLevel(False)
    high = kind.high
    if high is None:
        high = max(float(node.GetImageData().GetScalarRange()[1]), 1e-3)
    display.SetWindowLevelMinMax(kind.low, high)
    return node


def overlay_kind(node) -> OverlayKind | None:
    """The kind of an overlay node made by :func:`load_overlay`, else None."""
    return None if node is None else KINDS.get(node.GetAttribute(KIND_ATTRIBUTE) or "")


def _composite(scene, view: str):
    composite = node_by_layout_name(scene, "vtkMRMLSliceCompositeNode", view)
    if composite is None:
        raise MedDIFTError(f"the scene has no slice view named {view}")
    return composite


def show_overlay(scene, fixed_volume, overlay_node, view: str = FIXED_VIEW, opacity: float = OVERLAY_OPACITY) -> None:
    """The fixed volume as background and the overlay (None: none) as foreground of ``view``."""
    composite = _composite(scene, view)
    composite.SetBackgroundVolumeID(fixed_volume.GetID())
    composite.SetForegroundVolumeID(None if overlay_node is None else overlay_node.GetID())
    composite.SetForegroundOpacity(opacity if overlay_node is not None else 0.0)


def show_through_transform(moving_volume, transform_node) -> None:
    """Put ``moving_volume`` under ``transform_node``, so it is shown resampled onto the fixed volume.

    A volume already under another transform is refused (that transform is the user's: it is never
    replaced); the message says how to combine the two."""
    parent = moving_volume.GetParentTransformNode()
    if parent is transform_node:
        return
    if parent is not None:
        raise BadInputError(
            f"the moving volume is already under the transform '{parent.GetName()}'; place '{parent.GetName()}' "
            f"under '{transform_node.GetName()}' in the Transforms module to see the result"
        )
    moving_volume.SetAndObserveTransformNodeID(transform_node.GetID())


def show_fade(scene, fixed_volume, moving_volume, transform_node, fade: float, view: str = FIXED_VIEW) -> None:
    """Fade between the fixed volume (0) and the moving volume through the transform (1) in ``view``.

    The moving volume is put under ``transform_node`` (:func:`show_through_transform`, which refuses
    to replace another parent transform); flicker is a fade that jumps between 0 and 1."""
    show_through_transform(moving_volume, transform_node)
    composite = _composite(scene, view)
    composite.SetBackgroundVolumeID(fixed_volume.GetID())
    composite.SetForegroundVolumeID(moving_volume.GetID())
    composite.SetForegroundOpacity(min(max(float(fade), 0.0), 1.0))
