"""Live propagation: which fixed control points moved since they were last matched.

A markups node fires ``PointModifiedEvent`` also when a point is only selected, relabelled or
locked, and with no index at all for batched edits (hardening a transform, setting all
positions, undo). :class:`MovedPoints` remembers the world position (RAS mm) of each defined
control point by its control point ID (which a new label does not change) and answers which
ones changed, so only those are re-matched.
"""

from __future__ import annotations

import math

from .nodes import defined_control_point_indices

POSITION_TOLERANCE_MM = 1e-3


class MovedPoints:
    """Positions (RAS mm, by control point ID) of the control points of one markups node as last matched."""

    def __init__(self, tolerance_mm: float = POSITION_TOLERANCE_MM) -> None:
        self.tolerance_mm = tolerance_mm
        self._positions: dict[str, tuple[float, float, float]] = {}

    def remember(self, markups_node) -> None:
        """Take the node's current positions as matched (after a full run, or when live starts)."""
        self._positions = self._current(markups_node)

    @staticmethod
    def _current(markups_node) -> dict[str, tuple[float, float, float]]:
        positions = {}
        position = [0.0, 0.0, 0.0]
        if markups_node is None:
            return positions
        for index in defined_control_point_indices(markups_node):
            markups_node.GetNthControlPointPositionWorld(index, position)
            positions[markups_node.GetNthControlPointID(index)] = (position[0], position[1], position[2])
        return positions

    def moved(self, markups_node, index: int | None = None) -> list[int]:
        """Indices of defined control points whose position differs from the remembered one (or
        that are new); a relabelled point has not moved. ``index`` restricts the check to that point (None:
        check all). The answer's positions become the remembered ones."""
        if markups_node is None:
            return []
        candidates = defined_control_point_indices(markups_node)
        if index is not None:
            candidates = [candidate for candidate in candidates if candidate == index]
        changed = []
        position = [0.0, 0.0, 0.0]
        for candidate in candidates:
            markups_node.GetNthControlPointPositionWorld(candidate, position)
            point_id = markups_node.GetNthControlPointID(candidate)
            before = self._positions.get(point_id)
            if before is None or math.dist(before, position) > self.tolerance_mm:
                changed.append(candidate)
                self._positions[point_id] = (position[0], position[1], position[2])
        return changed
