"""The lattice layout: match every node of a regular lattice of fixed points at once.

Same quantity as the point layout (:mod:`.scorer`): per level, the patch-mean cosine between the
fixed point and a moving candidate, fused with the same weights and patch radii, the same
candidate lattice and sphere, the same parabola and the same confidence. Because all nodes share
the candidate shifts, each level is scored per shift in one pass at its own grid
(:mod:`.shared_shifts`). Where a node sits on the level's voxels and no prior is given, the two
layouts give the same match.

It searches one candidate lattice: every ``coarse_step_mm`` when ``coarse_to_fine`` (its
refinement is the caller's, e.g. the next field level), else every voxel; only the levels that
resolve that step take part (:func:`.scorer.resolving_levels`). A prior field ``p`` moves the
moving descriptors first (sampled at ``u + p(u)``), so a node ``x`` found at shift ``d`` matches
``x + d + p(x + d)``. The backward check searches back from every node of the same lattice in
that moved frame, on the same similarity maps, and is read at each match (trilinear between
nodes). Optionally the fused similarity is averaged over ``aggregation_nodes`` neighbouring nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import Geometry
from ..core.options import MatchOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeaturePyramid
from ..grid.displacement_field import DisplacementField, displacement_at
from ..grid.nodes import grid_points, node_grid
from .candidates import CandidateLattice
from .correspondences import Correspondences
from .scorer import Scorer, resolving_levels
from .shared_shifts import level_similarity
from .subvoxel import parabola_vertex


@dataclass
class LatticeMatches:
    """The engine's matches of every node of ``grid`` (raster order ``[k, j, i]``)."""

    grid: Geometry
    matches: Correspondences

    def on_grid(self, values: np.ndarray) -> torch.Tensor:
        """Per-node values ``(N,)`` (e.g. the confidence) as a float32 ``(K, J, I)`` map."""
        return torch.as_tensor(np.asarray(values), dtype=torch.float32).reshape(self.grid.shape_kji)

    def displacement_field(self) -> DisplacementField:
        """The matched displacements (LPS mm, fixed node -> its match) as a field on :attr:`grid`."""
        return DisplacementField(self.matches.displacement_lps_mm.reshape(*self.grid.shape_kji, 3), self.grid)


def _neighbours(lattice: CandidateLattice, kept: np.ndarray) -> np.ndarray:
    """``(Nc, 3, 2)``: per kept candidate and axis (ijk), the kept index one step below / above (-1: none)."""
    compact = np.full(lattice.size, -1)
    compact[kept] = np.arange(len(kept))
    side_k, side_j, side_i = lattice.shape_kji
    k, rest = kept // (side_j * side_i), kept % (side_j * side_i)
    position = np.stack([rest % side_i, rest // side_i, k], axis=1)  # ijk
    sides = np.array([side_i, side_j, side_k])
    strides = np.array([1, side_i, side_i * side_j])
    table = np.full((len(kept), 3, 2), -1)
    for axis in range(3):
        for column, step in enumerate((-1, 1)):
            moved = position[:, axis] + step
            valid = (moved >= 0) & (moved < sides[axis])
            table[valid, axis, column] = compact[kept[valid] + step * strides[axis]]
    return table


def _mask_outside(scores: torch.Tensor, base_lps_mm: np.ndarray, shifts_mm: np.ndarray, geometry: Geometry) -> None:
    """Set ``-inf`` where candidate ``base + shift`` lies outside ``geometry`` (in place)."""
    to_ijk = np.linalg.inv(geometry.affine_ijk_to_lps[:3, :3])
    base_ijk = torch.as_tensor(geometry.lps_to_ijk(base_lps_mm), dtype=torch.float32)
    shifts_ijk = torch.as_tensor(shifts_mm @ to_ijk.T, dtype=torch.float32)
    upper = torch.as_tensor(geometry.shape_ijk, dtype=torch.float32) - 1 + 1e-3
    for begin in range(0, len(shifts_ijk), 32):
        candidate = base_ijk[None] + shifts_ijk[begin : begin + 32, None]
        outside = ((candidate < -1e-3) | (candidate > upper)).any(dim=2)
        scores[begin : begin + 32].masked_fill_(outside, float("-inf"))


def _best(scores: torch.Tensor, lattice: CandidateLattice, kept: np.ndarray, subvoxel: bool):
    """Per node: best score ``(N,)`` and its offset ``(N, 3)`` in voxels (ijk) with the parabola step."""
    best_score, best = scores.max(dim=0)
    offsets = lattice.offsets_ijk()[kept][best.numpy()]
    if subvoxel:
        table = torch.as_tensor(_neighbours(lattice, kept))[best]  # (N, 3, 2)
        columns = torch.arange(scores.shape[1])
        for axis in range(3):
            minus, plus = (
                torch.where(table[:, axis, c] >= 0, scores[table[:, axis, c].clamp(min=0), columns], float("-inf"))
                for c in (0, 1)
            )
            offsets[:, axis] += parabola_vertex(minus.numpy(), best_score.numpy(), plus.numpy()) * lattice.stride[axis]
    return best_score.numpy(), offsets


def _aggregate(scores: torch.Tensor, grid: Geometry, nodes: int) -> torch.Tensor:
    """Mean of ``scores`` ``(Nc, N)`` over a box of ``2 nodes + 1`` nodes per axis (border repeated),
    one axis at a time; ``nodes <= 0`` returns ``scores`` unchanged."""
    if nodes <= 0:
        return scores
    result = F.pad(scores.reshape(1, len(scores), *grid.shape_kji), (nodes,) * 6, mode="replicate")[0]
    width = 2 * nodes + 1
    for dim, size in zip((1, 2, 3), grid.shape_kji):
        total = result.narrow(dim, 0, size).clone()
        for offset in range(1, width):
            total += result.narrow(dim, offset, size)
        result = total
    return result.div_(width**3).reshape(len(scores), -1)


def match_lattice(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    spacing_mm: float,
    options: MatchOptions | None = None,
    prior: DisplacementField | None = None,
    aggregation_nodes: int = 0,
    progress: ProgressFn = no_progress,
) -> LatticeMatches:
    """Match every node of a ``spacing_mm`` lattice of the fixed image
    (:func:`MedDIFTLib.grid.nodes.node_grid`).

    ``prior`` is the field (any grid, fixed point to moving point) the search starts from (none:
    identity). Returns the nodes' Correspondences.
    """
    options = options or MatchOptions()
    scorer = Scorer(fixed, moving, options)
    image = fixed.image_geometry
    grid = node_grid(image, spacing_mm)
    lattice = CandidateLattice.around(
        image, options.search_radius_mm, options.coarse_step_mm if options.coarse_to_fine else None
    )
    offsets_mm = lattice.offsets_mm(image)
    kept = np.flatnonzero(np.linalg.norm(offsets_mm, axis=1) <= lattice.radius_mm + 1e-6)
    shifts_mm = offsets_mm[kept]
    nodes = grid_points(grid)
    levels = resolving_levels(moving.levels, float(np.min(lattice.stride * np.asarray(image.spacing_mm))))
    total = sum(scorer.weights[n] for n in levels)
    forward = torch.zeros((len(kept), len(nodes)))
    backward = torch.zeros((len(kept), len(nodes)))
    with torch.inference_mode():
        for count, n in enumerate(levels):
            report = scaled(progress, count / len(levels), (count + 1) / len(levels))
            level_forward, level_backward = level_similarity(
                fixed.levels[n], moving.levels[n], scorer.radii[n], grid, shifts_mm, prior, report, scorer.steps[n]
            )
            forward += (scorer.weights[n] / total) * level_forward
            backward += (scorer.weights[n] / total) * level_backward
            del level_forward, level_backward
        forward = _aggregate(forward, grid, aggregation_nodes)
        _mask_outside(forward, nodes + displacement_at(prior, nodes), shifts_mm, moving.image_geometry)
        similarity, offsets = _best(forward, lattice, kept, options.subvoxel)
        del forward
        to_mm = image.affine_ijk_to_lps[:3, :3].T
        shifted = nodes + offsets @ to_mm
        matched = shifted + displacement_at(prior, shifted)
        found = np.isfinite(similarity)
        matched[~found] = (nodes + displacement_at(prior, nodes))[~found]
        if options.backward_check:
            backward = _aggregate(backward, grid, aggregation_nodes)
            _mask_outside(backward, nodes, -shifts_mm, image)
            _, back_offsets = _best(backward, lattice, kept, options.subvoxel)
            back_field = DisplacementField((-back_offsets @ to_mm).reshape(*grid.shape_kji, 3), grid)
            returned = shifted + displacement_at(back_field, shifted)
            forward_backward = np.linalg.norm(returned - nodes, axis=1)
        else:
            forward_backward = np.full(len(nodes), np.nan)
    return LatticeMatches(grid, Correspondences.scored(nodes, matched, similarity, forward_backward, options))
