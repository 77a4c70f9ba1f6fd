"""Slice views for visual QA: the fixed and moving volumes side by side, jumps to a pair, confidence colours.

Views are found by their layout name (``Red``, ``Yellow``, ...) among the scene's slice and
slice-composite nodes; positions are RAS mm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from ..core.errors import MedDIFTError
from .nodes import RELIABLE_COLOR, UNRELIABLE_COLOR
from .results import PairRow

FIXED_VIEW = "Red"
MOVING_VIEW = "Yellow"
UNKNOWN_CONFIDENCE_COLOR = (0.6, 0.6, 0.6)
_MIDDLE_CONFIDENCE_COLOR = (1.0, 0.85, 0.2)


def node_by_layout_name(scene, node_class: str, layout_name: str):
    nodes = scene.GetNodesByClass(node_class)
    try:
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if node.GetLayoutName() == layout_name:
                return node
    finally:
        nodes.UnRegister(None)
    return None


def slice_node(scene, view: str):
    slice_node = node_by_layout_name(scene, "vtkMRMLSliceNode", view)
    if slice_node is None:
        raise MedDIFTError(f"the scene has no slice view named {view}")
    return slice_node


def show_volumes_in_pair_views(scene, fixed_volume, moving_volume, fixed_view: str = FIXED_VIEW,
                               moving_view: str = MOVING_VIEW) -> None:
    """Show the fixed volume in one slice view and the moving one in the other (backgrounds).

    The moving view takes the orientation of the fixed view, so a pair is seen the same way.
    """
    for view, volume in ((fixed_view, fixed_volume), (moving_view, moving_volume)):
        composite = node_by_layout_name(scene, "vtkMRMLSliceCompositeNode", view)
        if composite is None:
            raise MedDIFTError(f"the scene has no slice view named {view}")
        composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
        composite.SetForegroundVolumeID(None)
    orientation = slice_node(scene, fixed_view).GetOrientation()
    moving_slice = slice_node(scene, moving_view)
    if moving_slice.HasSliceOrientationPreset(orientation):
        moving_slice.SetOrientation(orientation)


def jump_to_pair(scene, row: PairRow, fixed_view: str = FIXED_VIEW, moving_view: str = MOVING_VIEW) -> None:
    """Centre the fixed view on the fixed landmark and the moving view on its match (RAS mm)."""
    centre_views(scene, ((fixed_view, row.fixed_ras), (moving_view, row.moving_ras)))


def centre_views(scene, positions: Iterable[tuple[str, Sequence[float] | None]]) -> None:
    """Centre each named slice view on its position (RAS mm); a view whose position is None stays."""
    for view, position in positions:
        if position is not None:
            slice_node(scene, view).JumpSliceByCentering(*position)


def confidence_color(confidence: float) -> tuple[float, float, float]:
    """RGB in [0, 1] from red (0) through yellow (0.5) to green (1); grey when unknown."""
    if not math.isfinite(confidence):
        return UNKNOWN_CONFIDENCE_COLOR
    value = min(max(confidence, 0.0), 1.0)
    low, middle, high = (np.array(color) for color in (UNRELIABLE_COLOR, _MIDDLE_CONFIDENCE_COLOR, RELIABLE_COLOR))
    color = low + (middle - low) * value * 2 if value < 0.5 else middle + (high - middle) * (value - 0.5) * 2
    return (float(color[0]), float(color[1]), float(color[2]))
