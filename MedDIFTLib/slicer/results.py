"""Worker results in the scene: match results parsed once, written into markups, read back as table rows.

Positions in the worker's results are LPS mm; in the scene RAS mm (x and y negate). A match
counts as reliable only when the worker says so: a missing or null ``reliable`` flag is
unreliable (fail closed), and so is a match without a point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import MedDIFTError
from ..core.io.points import RAS_FROM_LPS
from ..core.match_text import describe_match
from .nodes import add_markups_node, ensure_markups_display, positions_ras_by_label

MATCH_SCORES_ATTRIBUTE = "MedDIFT.matchScores"  # JSON: label -> confidence, forward-backward mm, reliable
REVIEW_ATTRIBUTE = "MedDIFT.review"  # JSON: label -> ACCEPTED | REJECTED (see .qa)
ACCEPTED = "accepted"
REJECTED = "rejected"


def _float_array(values: Sequence, count: int, name: str) -> np.ndarray:
    if len(values) != count:
        raise MedDIFTError(f"the worker returned {len(values)} {name} values for {count} points")
    return np.array([math.nan if value is None else float(value) for value in values], float)


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class MatchResult:
    """The worker's matches, one row per fixed label; a row without a finite point is missing.

    ``points_lps_mm`` (N, 3) in LPS mm, ``confidence`` in [0, 1], ``forward_backward_mm`` in mm,
    ``reliable`` per row, ``seconds`` the worker's time for the request.
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
        """Parse a worker ``match`` result; JSON ``null`` or NaN marks a missing value, and a
        missing ``reliable`` flag marks the match unreliable."""
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
            reliable = result.get("reliable") or [False] * count
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
                reliable=np.array([flag is True for flag in reliable], bool),
                seconds=float(result.get("seconds", math.nan)),
                features_cached=bool(result.get("features_cached", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise MedDIFTError(f"the worker returned a malformed match result ({error!r})") from None

    def __len__(self) -> int:
        return len(self.labels)

    def found(self, row: int) -> bool:
        return bool(np.isfinite(self.points_lps_mm[row]).all())

    def usable(self, row: int) -> bool:
        """Found and reliable."""
        return self.found(row) and bool(self.reliable[row])

    def description(self, row: int) -> str:
        """Text for the control point: the library's one match description, or that there is no match."""
        if not self.found(row):
            return "MedDIFT: no match"
        return describe_match(float(self.confidence[row]), float(self.forward_backward_mm[row]), self.usable(row))


def _set_match(markups_node, index: int, matches: MatchResult, row: int) -> None:
    if matches.found(row):
        position_ras = [float(v) for v in matches.points_lps_mm[row] * RAS_FROM_LPS]
        markups_node.SetNthControlPointPositionWorld(index, *position_ras)
        markups_node.SetNthControlPointSelected(index, bool(matches.reliable[row]))
    else:
        markups_node.SetNthControlPointPositionMissing(index)
        markups_node.SetNthControlPointSelected(index, False)
    markups_node.SetNthControlPointDescription(index, matches.description(row))


def _json_attribute(markups_node, name: str) -> dict[str, Any]:
    try:
        value = json.loads(markups_node.GetAttribute(name) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def match_scores(markups_node) -> dict[str, dict[str, Any]]:
    """The ``MedDIFT.matchScores`` attribute of a node (label -> scores); empty when absent or unreadable."""
    return _json_attribute(markups_node, MATCH_SCORES_ATTRIBUTE)


def reviews(markups_node) -> dict[str, str]:
    """The reviewer's decisions (label -> ``accepted`` | ``rejected``) of a node; empty when none."""
    if markups_node is None:
        return {}
    return {str(label): value for label, value in _json_attribute(markups_node, REVIEW_ATTRIBUTE).items()
            if value in (ACCEPTED, REJECTED)}


def write_matches_to_markups(scene, matches: MatchResult, markups_node=None, name: str = "MedDIFT matches",
                             replace_all: bool = True):
    """Put matched moving points into a markups node (RAS), paired with the fixed ones by label.

    ``replace_all``: the node then holds exactly the matches, in their order; otherwise only
    the points with these labels are updated (added when absent), as in live propagation.
    A match without a point becomes a control point with the "missing" status. Confidence
    and forward-backward distance go into the description (and, exactly, into the node
    attribute ``MedDIFT.matchScores``); unreliable matches are unselected (drawn in the
    unreliable colour) and their description starts with ``UNRELIABLE``. A reviewer's decision
    on a re-matched label is cleared (the pair is new).
    """
    if markups_node is None:
        markups_node = add_markups_node(scene, scene.GenerateUniqueName(name))
    ensure_markups_display(markups_node)
    scores = {} if replace_all else match_scores(markups_node)
    decisions = {} if replace_all else reviews(markups_node)
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
                "reliable": matches.usable(row),
            }
            decisions.pop(label, None)
        markups_node.SetAttribute(MATCH_SCORES_ATTRIBUTE, json.dumps(scores))
        markups_node.SetAttribute(REVIEW_ATTRIBUTE, json.dumps(decisions))
    finally:
        markups_node.EndModify(was_modifying)
    return markups_node


@dataclass(frozen=True)
class PairRow:
    """One row of the pairs table: positions in RAS mm (None when that side has no point)."""

    label: str
    confidence: float
    forward_backward_mm: float
    reliable: bool
    fixed_ras: tuple[float, float, float] | None
    moving_ras: tuple[float, float, float] | None


def _score_number(score: dict[str, Any], key: str) -> float:
    value = score.get(key)
    return math.nan if value is None else float(value)


def pair_rows(fixed_landmarks, moving_landmarks) -> list[PairRow]:
    """Pairs of fixed and matched landmarks (by label, in the fixed order) with their scores.

    Scores come from the moving node's ``MedDIFT.matchScores`` attribute written by
    :func:`write_matches_to_markups`, so the table can be rebuilt from a saved scene; a pair
    without a recorded ``reliable`` flag is unreliable.
    """
    if moving_landmarks is None:
        return []
    scores = match_scores(moving_landmarks)
    moving_positions = positions_ras_by_label(moving_landmarks)
    rows = []
    for label, fixed_ras in positions_ras_by_label(fixed_landmarks).items():
        if moving_landmarks.GetControlPointIndexByLabel(label) < 0:
            continue
        score = scores.get(label, {})
        rows.append(
            PairRow(
                label=label,
                confidence=_score_number(score, "confidence"),
                forward_backward_mm=_score_number(score, "forward_backward_mm"),
                reliable=score.get("reliable") is True and label in moving_positions,
                fixed_ras=fixed_ras,
                moving_ras=moving_positions.get(label),
            )
        )
    return rows
