"""The one text that describes a match to a user: in point files written by ``meddift match`` and
``meddift register`` and in Slicer's control point descriptions. Torch-free."""

from __future__ import annotations

import math

from .io.points import UNRELIABLE_TAG


def describe_match(confidence: float | None, forward_backward_mm: float | None, reliable: bool) -> str:
    """``"confidence 0.83; forward-backward 1.20 mm"``, led by ``UNRELIABLE;`` when not ``reliable``.

    A missing (None or NaN) score is left out; with neither score the text says so."""
    parts = []
    if confidence is not None and math.isfinite(confidence):
        parts.append(f"confidence {confidence:.2f}")
    if forward_backward_mm is not None and math.isfinite(forward_backward_mm):
        parts.append(f"forward-backward {forward_backward_mm:.2f} mm")
    text = "; ".join(parts) or "no match scores"
    return text if reliable else f"{UNRELIABLE_TAG}; {text}"


__all__ = ["describe_match"]
