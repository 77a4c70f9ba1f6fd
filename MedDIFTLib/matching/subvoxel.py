"""Sub-voxel refinement: the vertex of a parabola through the best score and its neighbours, and for
the point layout a pattern search on the finest level.

The fused lattice score places a peak only as finely as the lattice (the moving image's voxels, which
may be thick slices) and its coarse levels, whose patches span centimetres, pull the peak towards the
motion of the surroundings. :func:`pattern_refine` therefore moves each match, within one voxel of the
finest level, to where that level's patch cosine alone is highest: the 26 neighbours and the match
itself at half, a quarter and an eighth of a finest-level voxel, the best kept at each step (a
neighbour must beat the match by more than :data:`PATTERN_MARGIN`, so a flat score does not drift).
It applies where that level is at least as fine as the image's widest voxel side
(:func:`pattern_applies`: MIND's working grid, not diffusion levels several image voxels wide).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..features.protocol import FeaturePyramid
from ..grid.vectors import unit_vectors
from .similarity import PatchSimilarity

PATTERN_STEPS = (0.5, 0.25, 0.125)
"""Steps of the pattern search, in voxels of the finest level (it moves a match at most 0.875 voxel per axis)."""
PATTERN_MARGIN = 1e-6
"""Least gain in patch cosine for which the pattern search leaves its current position."""
_PATTERN = np.array(list(itertools.product((-1, 0, 1), repeat=3)), float)
_STAY = len(_PATTERN) // 2


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


_CORNERS = (-1, 0, 1, 2)
"""Voxels, relative to the voxel of a match's start, that the trilinear weights of the pattern reach."""


def _moved_patches(boxes: torch.Tensor, centres: torch.Tensor, step: float, radius: int, tap_step: int) -> torch.Tensor:
    """Trilinear patches (B, 27, T, C) of ``boxes`` (B, C, K, J, I; voxel 0 at each row's start voxel
    minus ``radius + 1``) at each row's ``centres`` (B, 3 ijk, voxels from its start voxel, within
    (-1, 2)) moved by every ``_PATTERN`` row times ``step`` voxels; taps every ``tap_step`` voxels within
    ``radius`` along each axis, T in the fixed descriptors' k, j, i raster order. The interpolation is
    separable and a move is one fraction for all taps, so each axis is a weighted sum of four shifted
    views of the box (the hat weights of :data:`_CORNERS`), the same views for every row."""
    moves = step * torch.tensor((-1.0, 0.0, 1.0), dtype=boxes.dtype, device=boxes.device)
    corners = torch.tensor(_CORNERS, dtype=boxes.dtype, device=boxes.device)
    positions = centres[:, :, None, None] + moves[None, None, :, None]  # (B, 3 axes, 3 moves, 1)
    weights = (1.0 - (positions - corners).abs()).clamp_(min=0.0)  # (B, 3 axes, 3 moves, 4 corners)
    span = 2 * radius + 1
    patches = boxes
    for axis in range(3):  # i, j, k: each at dim 4 in turn (a new move axis enters at dim 1)
        views = [patches.narrow(4, corner, span)[(slice(None),) * 4 + (slice(None, None, tap_step),)]
                 for corner in range(len(_CORNERS))]
        shape = (len(boxes), 3) + (1,) * (patches.dim() - 1)
        patches = weights[:, axis, :, 0].reshape(shape) * views[0].unsqueeze(1)
        for corner, view in enumerate(views[1:], start=1):
            patches.addcmul_(weights[:, axis, :, corner].reshape(shape), view.unsqueeze(1))
    # patches: (B, Mk, Mj, Mi, C, tk, tj, ti) after the three axes
    batch, channels, taps = len(boxes), boxes.shape[1], patches.shape[-1]
    return patches.permute(0, 3, 2, 1, 5, 6, 7, 4).reshape(batch, 27, taps**3, channels)


def pattern_applies(pyramid: FeaturePyramid) -> bool:
    """Whether :func:`pattern_refine` refines matches into ``pyramid``: its finest level's voxels are
    no wider than the widest side of the image's voxels (else the lattice is the finer grid)."""
    finest = pyramid.levels[pyramid.finest_level].geometry.spacing_mm
    return max(finest) <= max(pyramid.image_geometry.spacing_mm) + 1e-6


def pattern_refine(
    similarity: PatchSimilarity, descriptors: list[torch.Tensor], positions_lps_mm: np.ndarray
) -> np.ndarray:
    """``positions_lps_mm`` (B, 3; moving LPS mm) moved by the pattern search (module docstring) on the
    finest moving level, its patch cosine against the batch's fixed ``descriptors`` (per level, (B, taps, C),
    :meth:`PatchSimilarity.fixed_descriptors`). Candidates outside the moving volume's voxel centres are
    never chosen (a match stays where it is when all its neighbours are)."""
    finest = similarity.moving.finest_level
    level, descriptor = similarity.moving.levels[finest], descriptors[finest]
    radius, tap_step = similarity.patches[finest].radius, similarity.patches[finest].step
    start_ijk = level.geometry.lps_to_ijk(np.asarray(positions_lps_mm, float))
    start_voxel = np.floor(start_ijk)
    boxes = level.boxes(start_voxel.astype(int) - radius - 1, [2 * radius + 4] * 3)
    centres = start_ijk - start_voxel
    rows = np.arange(len(centres))
    for step in PATTERN_STEPS:
        centres_t = torch.as_tensor(centres, dtype=boxes.dtype, device=boxes.device)
        patches = unit_vectors(_moved_patches(boxes, centres_t, step, radius, tap_step), 3)
        scores = torch.einsum("bntc,btc->bn", patches, descriptor.to(patches.dtype)).cpu().numpy()
        candidates = centres[:, None, :] + step * _PATTERN[None]
        lps = level.geometry.ijk_to_lps((candidates + start_voxel[:, None, :]).reshape(-1, 3))
        inside = similarity.moving.image_geometry.contains_lps(lps, margin_voxels=0.0).reshape(candidates.shape[:2])
        gains = np.where(inside, scores - scores[:, _STAY, None], -np.inf)
        gains[:, _STAY] = PATTERN_MARGIN
        centres = candidates[rows, gains.argmax(axis=1)]
    return level.geometry.ijk_to_lps(centres + start_voxel)
