"""Sub-voxel refinement: the vertex of a parabola through the best score and its neighbours."""

from __future__ import annotations

import numpy as np


def parabola_vertex(minus: np.ndarray, centre: np.ndarray, plus: np.ndarray) -> np.ndarray:
    """Vertex offset in [-0.5, 0.5] steps of the parabola through three equally spaced scores.

    0 where a neighbour is missing (not finite) or the scores do not form a peak.
    """
    with np.errstate(invalid="ignore"):
        curvature = minus - 2.0 * centre + plus
        usable = np.isfinite(minus) & np.isfinite(plus) & (curvature < 0)
        offset = (minus - plus) / (2.0 * np.where(usable, curvature, -1.0))
    return np.clip(np.where(usable, offset, 0.0), -0.5, 0.5)


def subvoxel_offsets(scores: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Vertex (B, 3) in lattice steps, ijk order, around flat index ``best`` (B,) of (B, K, J, I) scores."""
    rows = np.arange(scores.shape[0])
    shape = scores.shape[1:]
    position = list(np.unravel_index(best, shape))
    centre = scores[(rows, *position)]
    offsets = np.zeros((len(rows), 3), scores.dtype)
    for axis in range(3):
        lower, upper = list(position), list(position)
        lower[axis] = np.maximum(position[axis] - 1, 0)
        upper[axis] = np.minimum(position[axis] + 1, shape[axis] - 1)
        minus = np.where(position[axis] > 0, scores[(rows, *lower)], -np.inf)
        plus = np.where(position[axis] < shape[axis] - 1, scores[(rows, *upper)], -np.inf)
        offsets[:, 2 - axis] = parabola_vertex(minus, centre, plus)
    return offsets
