"""Worker results in the scene: match results (:class:`~MedDIFTLib.worker.protocol.results.MatchResult`,
parsed once by the protocol) written into markups, read back as table rows.

Positions in the worker's results are LPS mm; in the scene RAS mm (x and y negate). A match
counts as reliable only when the worker says so (a missing flag reads as unreliable) and has a point.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..core.io.points import RAS_FROM_LPS
from ..worker.protocol.results import MatchResult, json_number
from .nodes import add_markups_node, ensure_markups_display, positions_ras_by_label

MATCH_SCORES_ATTRIBUTE = "MedDIFT.matchScores"  # JSON: label -> confidence, forward-backward mm, reliable
REVIEW_ATTRIBUTE = "MedDIFT.review"  # JSON: label -> ACCEPTED | REJECTED (see .qa)
ACCEPTED = "accepted"
REJECTED = "rejected"


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
                "confidence": json_number(matches.confidence[row]),
                "forward_backward_mm": json_number(matches.forward_backward_mm[row]),
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
