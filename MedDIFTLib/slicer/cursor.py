"""The correspondence cursor: where a point of the fixed view lies in the moving view.

With a computed field the answer is the field's: the transform node's "from parent" transform
maps a fixed point to its moving point (ITK convention, RAS in the scene). Without one (no
output transform, or one not computed yet), :class:`CursorMatcher` decides when to ask the
worker to match the cursor point, throttled (at most one request in flight, none closer together
than ``interval_s``, only the newest cursor position kept) and cached on a grid of
``cache_step_mm`` for one context (the volumes and the run settings), so the GUI stays fluid.
The marker is a one-point markups node; the moving view is moved so that its slice passes
through the point. :class:`CursorState` holds all of it for the panel. Positions are RAS mm;
nothing here needs Qt.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..core.errors import BadInputError
from ..core.io.points import RAS_FROM_LPS
from ..core.options import RunSettings
from ..worker.protocol.results import MatchResult
from .nodes import add_markups_node, ensure_markups_display
from .views import MOVING_VIEW, slice_node

CURSOR_NODE_NAME = "MedDIFT cursor"
CURSOR_COLOR = (1.0, 0.9, 0.1)
THROTTLE_INTERVAL_S = 0.25
CACHE_STEP_MM = 1.0
CACHE_ENTRIES = 4096

Ras = tuple[float, float, float]


def has_field(transform_node) -> bool:
    """True when ``transform_node`` holds a transform to map through (a node made by "Create new"
    holds none until a run fills it)."""
    return transform_node is not None and transform_node.GetTransformFromParent() is not None


def map_through_field(transform_node, fixed_ras: Sequence[float], moving_volume=None) -> Ras:
    """The moving point of ``fixed_ras`` through ``transform_node``'s "from parent" transform.

    When ``moving_volume`` is shown through that same transform (resampled onto the fixed
    grid), the moving view shows the fixed frame, so the point is ``fixed_ras`` itself.
    """
    if not has_field(transform_node):
        raise BadInputError("no transform to map the cursor through")
    if moving_volume is not None and moving_volume.GetParentTransformNode() is transform_node:
        return (float(fixed_ras[0]), float(fixed_ras[1]), float(fixed_ras[2]))
    moved = transform_node.GetTransformFromParent().TransformPoint(*(float(v) for v in fixed_ras))
    return (float(moved[0]), float(moved[1]), float(moved[2]))


@dataclass(frozen=True)
class CursorMatch:
    """A matched cursor point: ``moving_ras`` (mm) and its ``confidence`` in [0, 1] (NaN: from the field)."""

    moving_ras: Ras
    confidence: float = math.nan
    reliable: bool = True


def cursor_match_from(matches: MatchResult | None) -> CursorMatch | None:
    """The cursor's match from the worker's one-row match result (None when there is no match)."""
    if matches is None or len(matches) != 1 or not matches.found(0):
        return None
    moving_ras = matches.points_lps_mm[0] * RAS_FROM_LPS
    return CursorMatch(
        (float(moving_ras[0]), float(moving_ras[1]), float(moving_ras[2])),
        float(matches.confidence[0]),
        matches.usable(0),
    )


class CursorMatcher:
    """When to re-match the cursor through the worker, and the matches it already has.

    Call :meth:`request` on each cursor move: it returns a cached match, or None; then
    :meth:`take_pending` gives the point to send now (or None: wait). Report each answer with
    :meth:`answered`. ``now`` is in seconds (any monotonic clock).
    """

    def __init__(self, interval_s: float = THROTTLE_INTERVAL_S, cache_step_mm: float = CACHE_STEP_MM) -> None:
        if interval_s < 0 or cache_step_mm <= 0:
            raise BadInputError("the cursor throttle needs interval_s >= 0 and cache_step_mm > 0")
        self.interval_s = interval_s
        self.cache_step_mm = cache_step_mm
        self._cache: dict[tuple[int, int, int], CursorMatch] = {}
        self._context: Hashable = None
        self._pending: Ras | None = None
        self._in_flight: tuple[int, int, int] | None = None
        self._last_sent_s = -math.inf

    def key(self, fixed_ras: Sequence[float]) -> tuple[int, int, int]:
        return tuple(int(round(float(v) / self.cache_step_mm)) for v in fixed_ras)  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget every match (the volumes or options changed)."""
        self._cache.clear()
        self._pending = None

    def set_context(self, context: Hashable) -> None:
        """What the matches depend on (:func:`match_context`); a new one forgets every match."""
        if context != self._context:
            self.clear()
            self._context = context

    def request(self, fixed_ras: Sequence[float]) -> CursorMatch | None:
        """The cached match of this point, else None (the point is kept as the one to send next)."""
        cached = self._cache.get(self.key(fixed_ras))
        if cached is not None:
            self._pending = None
            return cached
        self._pending = (float(fixed_ras[0]), float(fixed_ras[1]), float(fixed_ras[2]))
        return None

    def take_pending(self, now: float) -> Ras | None:
        """The point to send to the worker now, or None (nothing new, one in flight, or too soon)."""
        if self._pending is None or self._in_flight is not None or now - self._last_sent_s < self.interval_s:
            return None
        point, self._pending = self._pending, None
        self._in_flight = self.key(point)
        self._last_sent_s = now
        return point

    def answered(self, match: CursorMatch | None) -> None:
        """The worker's answer to the point in flight (None: it failed; it is not cached)."""
        key, self._in_flight = self._in_flight, None
        if key is None or match is None:
            return
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = match


def cursor_marker(scene, node=None):
    """The one-point markups node that marks the cursor's match (created, locked, when None)."""
    if node is None:
        node = add_markups_node(scene, scene.GenerateUniqueName(CURSOR_NODE_NAME))
        node.SetLocked(True)
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
    ensure_markups_display(node, CURSOR_COLOR, CURSOR_COLOR)
    return node


def cursor_label(match: CursorMatch) -> str:
    """The marker's label: the confidence when the match has one."""
    if not math.isfinite(match.confidence):
        return "field"
    return f"{match.confidence:.2f}" + ("" if match.reliable else " unreliable")


def show_cursor_match(scene, match: CursorMatch, marker=None, moving_view: str = MOVING_VIEW):
    """Put the marker at the match and move the moving view's slice through it (centred).

    Returns the marker node."""
    marker = cursor_marker(scene, marker)
    was_modifying = marker.StartModify()
    try:
        if marker.GetNumberOfControlPoints() == 0:
            marker.AddControlPointWorld(list(match.moving_ras), cursor_label(match))
        else:
            marker.SetNthControlPointPositionWorld(0, *match.moving_ras)
            marker.SetNthControlPointLabel(0, cursor_label(match))
    finally:
        marker.EndModify(was_modifying)
    slice_node(scene, moving_view).JumpSliceByCentering(*match.moving_ras)
    return marker


def place_pair(fixed_landmarks, moving_landmarks, fixed_ras: Sequence[float], match: CursorMatch) -> str:
    """Add the cursor's pair to the landmarks (same new label on both); returns the label."""
    if fixed_landmarks is None or moving_landmarks is None:
        raise BadInputError("choose the fixed and the moving landmarks to place a pair")
    number = max(fixed_landmarks.GetNumberOfControlPoints(), moving_landmarks.GetNumberOfControlPoints()) + 1
    label = f"C{number}"
    while fixed_landmarks.GetControlPointIndexByLabel(label) >= 0 or moving_landmarks.GetControlPointIndexByLabel(
        label
    ) >= 0:
        number += 1
        label = f"C{number}"
    fixed_landmarks.AddControlPointWorld([float(v) for v in fixed_ras], label)
    index = moving_landmarks.AddControlPointWorld(list(match.moving_ras), label)
    moving_landmarks.SetNthControlPointSelected(index, match.reliable)
    return label


def _volume_key(volume_node) -> tuple:
    """Changes when the node's voxels, geometry or parent transform change."""
    if volume_node is None:
        return (None,)
    image = volume_node.GetImageData()
    parent = volume_node.GetParentTransformNode()
    return (volume_node.GetID(), volume_node.GetMTime(), None if image is None else image.GetMTime(),
            None if parent is None else (parent.GetID(), parent.GetMTime()))


def match_context(fixed_volume, moving_volume, settings: RunSettings) -> Hashable:
    """What a cursor match depends on: both volumes (voxels, geometry, parent transform) and the settings."""
    return (_volume_key(fixed_volume), _volume_key(moving_volume), repr(settings))


class CursorState:
    """The correspondence cursor of one scene: the newest fixed point, its match, the marker node
    and the :class:`CursorMatcher` of worker matches. :meth:`reset` forgets it all (scene closed)."""

    def __init__(self, scene, interval_s: float = THROTTLE_INTERVAL_S) -> None:
        self.scene = scene
        self.matcher = CursorMatcher(interval_s=interval_s)
        self.marker = None
        self.fixed_ras: Ras | None = None
        self.match: CursorMatch | None = None

    def moved(self, fixed_ras: Sequence[float], transform_node, moving_volume, context: Hashable) -> None:
        """The mouse is at ``fixed_ras`` in the fixed view: show its match through the field when
        ``transform_node`` holds one, else a cached worker match (the point is kept to send)."""
        self.fixed_ras = (float(fixed_ras[0]), float(fixed_ras[1]), float(fixed_ras[2]))
        if has_field(transform_node):
            self.show(CursorMatch(map_through_field(transform_node, self.fixed_ras, moving_volume)))
            return
        self.matcher.set_context(context)
        cached = self.matcher.request(self.fixed_ras)
        if cached is not None:
            self.show(cached)

    def answered(self, match: CursorMatch | None) -> None:
        """The worker's answer for the point in flight; the newest point is shown if now cached."""
        self.matcher.answered(match)
        if self.fixed_ras is not None:
            cached = self.matcher.request(self.fixed_ras)
            if cached is not None:
                self.show(cached)

    def show(self, match: CursorMatch) -> None:
        self.match = match
        self.marker = show_cursor_match(self.scene, match, self.marker)

    def hide(self) -> None:
        """Remove the marker from the scene (the cursor was turned off)."""
        if self.marker is not None and self.scene.IsNodePresent(self.marker):
            self.scene.RemoveNode(self.marker)
        self.marker = None

    def reset(self) -> None:
        """Forget the marker, the points and every match (the scene was closed)."""
        self.marker = None
        self.fixed_ras = None
        self.match = None
        self.matcher = CursorMatcher(interval_s=self.matcher.interval_s, cache_step_mm=self.matcher.cache_step_mm)
