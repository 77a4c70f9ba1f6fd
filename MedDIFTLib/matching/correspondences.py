"""The engine's answer: :class:`Correspondences`, and the one confidence formula.

Confidence of a match, in [0, 1]::

    confidence = exp(-0.5 * (forward_backward_mm / fb_scale_mm) ** 2) * clip(similarity, 0, 1)

``forward_backward_mm`` is the distance (LPS mm) between the fixed point and where the match,
searched back from the moving into the fixed volume, lands; ``similarity`` is the fused
multi-level patch cosine at the match. Without a backward check the distance is NaN and only
the similarity counts. A match below ``MatchOptions.confidence_threshold`` is kept and marked
unreliable, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.io import PointSet
from ..core.match_text import describe_match
from ..core.options import MatchOptions


def confidence(forward_backward_mm: np.ndarray, similarity: np.ndarray, fb_scale_mm: float) -> np.ndarray:
    """Gaussian of the forward-backward distance (mm) times the non-negative peak similarity."""
    agreement = np.exp(-0.5 * (np.nan_to_num(forward_backward_mm, nan=0.0) / fb_scale_mm) ** 2)
    peak = np.clip(np.nan_to_num(similarity, nan=0.0, neginf=0.0), 0.0, 1.0)
    return np.clip(agreement * peak, 0.0, 1.0)


@dataclass
class Correspondences:
    """Per fixed point (LPS mm, ``(N, 3)``): the matched moving point and how far to trust it."""

    fixed_points_lps_mm: np.ndarray
    points_lps_mm: np.ndarray
    similarity: np.ndarray
    confidence: np.ndarray
    forward_backward_mm: np.ndarray
    reliable: np.ndarray

    @staticmethod
    def scored(
        fixed_points_lps_mm: np.ndarray,
        matched_lps_mm: np.ndarray,
        similarity: np.ndarray,
        forward_backward_mm: np.ndarray,
        options: MatchOptions,
    ) -> Correspondences:
        """Matches with their confidence and reliability from ``options`` (the formula above)."""
        similarity = np.where(np.isfinite(similarity), similarity, np.nan)
        scores = confidence(forward_backward_mm, similarity, options.fb_scale_mm)
        return Correspondences(
            np.asarray(fixed_points_lps_mm, float),
            np.asarray(matched_lps_mm, float),
            similarity,
            scores,
            np.asarray(forward_backward_mm, float),
            scores >= options.confidence_threshold,
        )

    @property
    def displacement_lps_mm(self) -> np.ndarray:
        """``(N, 3)`` matched minus fixed point, LPS mm."""
        return self.points_lps_mm - self.fixed_points_lps_mm

    def __len__(self) -> int:
        return len(self.fixed_points_lps_mm)

    def point_set(self, labels: list[str]) -> PointSet:
        """The matched points under ``labels`` (the fixed points'), as ``meddift match`` writes them:
        scores as columns and in each description, unreliable matches flagged."""
        descriptions = [
            describe_match(c, d, r) for c, d, r in zip(self.confidence, self.forward_backward_mm, self.reliable)
        ]
        return PointSet(
            self.points_lps_mm,
            labels,
            descriptions,
            unreliable=~self.reliable,
            attributes={
                "confidence": self.confidence,
                "similarity": self.similarity,
                "forward_backward_mm": self.forward_backward_mm,
            },
        )
