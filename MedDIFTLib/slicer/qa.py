"""Landmark QA: the pairs table ordered by how much to doubt each pair, "next unreliable", and
accept / reject per pair.

A reviewer's decision is stored per label in the moving landmarks' ``MedDIFT.review``
attribute (so it survives a saved scene) and shown on the control point: a rejected pair is
unselected (drawn in the unreliable colour) and its description starts with ``REJECTED``; it is
never deleted. An accepted pair is selected. Re-matching a pair clears its decision
(:func:`MedDIFTLib.slicer.results.write_matches_to_markups`).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence

from ..core.errors import BadInputError
from .results import ACCEPTED, REJECTED, REVIEW_ATTRIBUTE, PairRow, match_scores, reviews

REJECTED_TAG = "REJECTED"


class Order(enum.Enum):
    """How the pairs table is sorted: as the fixed landmarks, or the most doubtful pair first."""

    LANDMARKS = "landmarks"
    CONFIDENCE = "confidence"  # lowest confidence first
    FORWARD_BACKWARD = "forward_backward"  # largest forward-backward distance first


def _doubt_key(value: float, descending: bool) -> tuple[int, float]:
    """Unknown values (NaN) sort first: a pair without a score is the most doubtful."""
    if not math.isfinite(value):
        return (0, 0.0)
    return (1, -value if descending else value)


def ordered_rows(rows: Sequence[PairRow], order: Order) -> list[PairRow]:
    """``rows`` in ``order`` (stable: ties keep the landmarks' order)."""
    if order is Order.LANDMARKS:
        return list(rows)
    if order is Order.CONFIDENCE:
        return sorted(rows, key=lambda row: _doubt_key(row.confidence, descending=False))
    return sorted(rows, key=lambda row: _doubt_key(row.forward_backward_mm, descending=True))


def next_unreliable(rows: Sequence[PairRow], decisions: dict[str, str]) -> PairRow | None:
    """The worst remaining pair: unreliable, not yet accepted or rejected, lowest confidence first."""
    remaining = [row for row in rows if not row.reliable and row.label not in decisions]
    ordered = ordered_rows(remaining, Order.CONFIDENCE)
    return ordered[0] if ordered else None


def _strip_tag(description: str) -> str:
    return description[len(REJECTED_TAG):].lstrip() if description.startswith(REJECTED_TAG) else description


def set_decision(moving_landmarks, label: str, decision: str | None) -> None:
    """Accept (``accepted``) or reject (``rejected``) the pair ``label``, or clear its decision (None).

    Clearing gives the point back the selection of its match (selected when reliable).
    """
    if decision not in (ACCEPTED, REJECTED, None):
        raise BadInputError(f"a pair is '{ACCEPTED}' or '{REJECTED}', not {decision!r}")
    index = moving_landmarks.GetControlPointIndexByLabel(label)
    if index < 0:
        raise BadInputError(f"the landmarks '{moving_landmarks.GetName()}' have no point labelled {label}")
    decisions = reviews(moving_landmarks)
    description = _strip_tag(moving_landmarks.GetNthControlPointDescription(index))
    was_modifying = moving_landmarks.StartModify()
    try:
        if decision is None:
            decisions.pop(label, None)
            reliable = match_scores(moving_landmarks).get(label, {}).get("reliable") is True
            moving_landmarks.SetNthControlPointSelected(index, reliable)
        else:
            decisions[label] = decision
            moving_landmarks.SetNthControlPointSelected(index, decision == ACCEPTED)
            if decision == REJECTED:
                description = f"{REJECTED_TAG} {description}".strip()
        moving_landmarks.SetNthControlPointDescription(index, description)
        moving_landmarks.SetAttribute(REVIEW_ATTRIBUTE, json.dumps(decisions))
    finally:
        moving_landmarks.EndModify(was_modifying)


def summary(rows: Sequence[PairRow], decisions: dict[str, str]) -> str:
    """``12 pairs: 9 reliable, 3 unreliable; 2 accepted, 1 rejected, 0 to review``."""
    unreliable = [row for row in rows if not row.reliable]
    labels = {row.label for row in rows}
    accepted = sum(1 for label, value in decisions.items() if value == ACCEPTED and label in labels)
    rejected = sum(1 for label, value in decisions.items() if value == REJECTED and label in labels)
    to_review = sum(1 for row in unreliable if row.label not in decisions)
    return (
        f"{len(rows)} pairs: {len(rows) - len(unreliable)} reliable, {len(unreliable)} unreliable; "
        f"{accepted} accepted, {rejected} rejected, {to_review} to review"
    )
