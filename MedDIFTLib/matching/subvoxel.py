"""Sub-voxel refinement: the vertex of a parabola through the best score and its neighbours."""

from __future__ import annotations

import torch


def parabola_vertex(minus: torch.Tensor, centre: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """Vertex offset in [-0.5, 0.5] steps of the parabola through three equally spaced scores.

    0 where a neighbour is missing (not finite) or the scores do not form a peak.
    """
    curvature = minus - 2.0 * centre + plus
    usable = torch.isfinite(minus) & torch.isfinite(plus) & (curvature < 0)
    offset = (minus - plus) / (2.0 * torch.where(usable, curvature, -torch.ones_like(curvature)))
    return torch.where(usable, offset, torch.zeros_like(offset)).clamp(-0.5, 0.5)


def subvoxel_offsets(scores: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Vertex (B, 3) in lattice steps, ijk order, around flat index ``best`` of (B, K, J, I) scores."""
    batch = scores.shape[0]
    rows = torch.arange(batch, device=scores.device)
    shape = scores.shape[1:]
    k, rest = best // (shape[1] * shape[2]), best % (shape[1] * shape[2])
    position = [k, rest // shape[2], rest % shape[2]]
    centre = scores[rows, position[0], position[1], position[2]]
    offsets = torch.zeros(batch, 3, dtype=scores.dtype, device=scores.device)
    missing = torch.full_like(centre, float("-inf"))
    for axis in range(3):
        lower, upper = list(position), list(position)
        lower[axis] = (position[axis] - 1).clamp(min=0)
        upper[axis] = (position[axis] + 1).clamp(max=shape[axis] - 1)
        minus = torch.where(position[axis] > 0, scores[(rows, *lower)], missing)
        plus = torch.where(position[axis] < shape[axis] - 1, scores[(rows, *upper)], missing)
        offsets[:, 2 - axis] = parabola_vertex(minus, centre, plus)
    return offsets
