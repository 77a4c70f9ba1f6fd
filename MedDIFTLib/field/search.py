"""Dense local search: match every node of a fixed lattice inside a window around its prior.

This is the matching stage's local search (fused multi-level cosine similarity, best candidate,
sub-voxel parabola, forward-backward check, confidence = agreement x similarity) laid out for a
whole lattice at once. Matching each lattice point on its own (``MatchOptions`` search) costs
tens of milliseconds per point on a CPU, because each point gathers and normalises its own box
of descriptors; a field needs thousands of points. Here the descriptors of all levels are
L2-normalised, average-pooled to the lattice step and sampled once on the fixed lattice and on
the moving one (through the prior field), so the similarity of every node with every candidate
shift is one multiply-add pass per shift, shared by all nodes. The similarity is then averaged
over a box of neighbouring nodes (patch matching: a lone pooled descriptor is not distinctive
enough), and the backward search reuses the same similarity volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import Geometry
from ..core.progress import ProgressFn, no_progress
from ..features.protocol import FeaturePyramid
from . import grids
from .optimise import pooled_descriptors

FB_SCALE_STEPS = 1.0


@dataclass
class LatticeMatches:
    """Per lattice node (nodes of ``grid``, raster order ``[k, j, i]``): the shift (LPS mm) from
    the prior to the best moving match, and a confidence in [0, 1]."""

    grid: Geometry
    shift_lps_mm: torch.Tensor  # (3, K, J, I)
    confidence: torch.Tensor  # (K, J, I)


def _extended(grid: Geometry, margin: np.ndarray) -> Geometry:
    """``grid`` grown by ``margin`` nodes (ijk) on every side."""
    origin = grid.ijk_to_lps(-margin[None].astype(float))[0]
    return Geometry.create(np.asarray(grid.shape_ijk) + 2 * margin, grid.spacing_mm, origin, grid.direction_matrix)


def _sample_on(
    features: torch.Tensor, geometry: Geometry, target: Geometry, prior: tuple[torch.Tensor, Geometry] | None
) -> torch.Tensor:
    """Descriptors sampled at ``target``'s nodes (moved by the prior field), re-normalised."""
    if prior is None:
        values = grids.resample(features, geometry, target)
    else:
        prior_values, prior_grid = prior
        values = torch.empty((features.shape[0], *target.shape_kji))
        for k_start, k_stop in grids.slabs(target, grids.SLAB_VOXELS // 4):
            positions = grids.slab_lps(target, k_start, k_stop)
            positions += grids.sample_lps(prior_values, prior_grid, positions.numpy()).double()
            samples = grids.sample(features, torch.as_tensor(geometry.lps_to_ijk(positions.numpy())))
            values[:, k_start:k_stop] = samples.T.reshape(-1, k_stop - k_start, *target.shape_kji[1:])
    return F.normalize(values, dim=0)


def _parabola(minus: torch.Tensor, centre: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """Vertex offset in [-0.5, 0.5] of the parabola through three equally spaced scores."""
    curvature = minus - 2.0 * centre + plus
    usable = torch.isfinite(minus) & torch.isfinite(plus) & (curvature < 0)
    offset = (minus - plus) / (2.0 * torch.where(usable, curvature, -torch.ones_like(curvature)))
    return torch.where(usable, offset, torch.zeros_like(offset)).clamp(-0.5, 0.5)


def lattice_search(
    fixed: FeaturePyramid,
    moving: FeaturePyramid,
    spacing_mm: float,
    radius_mm: float,
    aggregation_nodes: int = 1,
    prior: tuple[torch.Tensor, Geometry] | None = None,
    progress: ProgressFn = no_progress,
) -> LatticeMatches:
    """Search every node of a ``spacing_mm`` lattice of the fixed image within ``radius_mm``.

    ``prior`` is a field ``(values (3, K, J, I), grid)`` (LPS mm) the search starts from (none:
    identity); the result holds the shift from it. ``aggregation_nodes`` is the half-width of
    the box (in nodes) over which similarities are averaged.
    """
    grid = grids.node_grid(fixed.image_geometry, spacing_mm)
    margin = np.ceil(radius_mm / np.asarray(grid.spacing_mm)).astype(int)
    extended = _extended(grid, margin)
    total_weight = sum(level.weight for level in fixed.levels)
    fixed_parts, moving_parts = [], []
    for fixed_level, moving_level in zip(fixed.levels, moving.levels):
        scale = (fixed_level.weight / total_weight) ** 0.5
        features, geometry = pooled_descriptors(fixed_level.features, fixed_level.geometry, spacing_mm)
        fixed_parts.append(scale * _sample_on(features, geometry, grid, None))
        features, geometry = pooled_descriptors(moving_level.features, moving_level.geometry, spacing_mm)
        moving_parts.append(scale * _sample_on(features, geometry, extended, prior))
    fixed_stack = torch.cat(fixed_parts)
    moving_stack = torch.cat(moving_parts)
    del fixed_parts, moving_parts

    steps = [torch.arange(-m, m + 1) for m in margin[::-1]]
    cube_kji = torch.stack(torch.meshgrid(*steps, indexing="ij"), dim=-1).reshape(-1, 3)
    offset_mm = torch.as_tensor(grid.direction_matrix * np.asarray(grid.spacing_mm)[None, :], dtype=torch.float32)
    within = (cube_kji.flip(1).float() @ offset_mm.T).norm(dim=1) <= radius_mm + 1e-6
    shifts_kji = cube_kji[within]
    size_k, size_j, size_i = grid.shape_kji
    # one slot per candidate shift, plus a last slot of -inf for neighbours outside the sphere
    similarity = torch.empty((len(shifts_kji) + 1, size_k, size_j, size_i))
    similarity[-1] = float("-inf")
    origin_kji = torch.as_tensor(margin[::-1].copy())
    for index, shift in enumerate(shifts_kji):
        dk, dj, di = (int(v) for v in shift + origin_kji)
        window = moving_stack[:, dk : dk + size_k, dj : dj + size_j, di : di + size_i]
        similarity[index] = torch.einsum("ckji,ckji->kji", fixed_stack, window)
        if index % 64 == 0:
            progress("search", index / len(shifts_kji), "")
    del moving_stack, fixed_stack
    if aggregation_nodes > 0:
        width = 2 * aggregation_nodes + 1
        padded = F.pad(similarity[None, :-1], (aggregation_nodes,) * 6, mode="replicate")
        similarity[:-1] = F.avg_pool3d(padded, width, stride=1)[0]
        del padded

    best_score, best = similarity.max(dim=0)
    best_shift = shifts_kji[best]  # (K, J, I, 3) in k, j, i
    compact = torch.full((len(cube_kji),), len(shifts_kji), dtype=torch.long)
    compact[within] = torch.arange(len(shifts_kji))
    cube_side = torch.as_tensor([2 * int(m) + 1 for m in margin[::-1]])
    cube_index = ((best_shift + origin_kji) * torch.stack([cube_side[1] * cube_side[2], cube_side[2], torch.tensor(1)]))
    cube_index = cube_index.sum(dim=-1)
    sub_step = torch.zeros((3, size_k, size_j, size_i))
    for axis, stride in enumerate((int(cube_side[1] * cube_side[2]), int(cube_side[2]), 1)):
        coordinate = best_shift[..., axis] + origin_kji[axis]
        minus_index = torch.where(coordinate > 0, compact[(cube_index - stride).clamp(min=0)], len(shifts_kji))
        upper = int(cube_side[axis]) - 1
        plus_index = torch.where(
            coordinate < upper, compact[(cube_index + stride).clamp(max=len(cube_kji) - 1)], len(shifts_kji)
        )
        minus = torch.gather(similarity, 0, minus_index[None])[0]
        plus = torch.gather(similarity, 0, plus_index[None])[0]
        sub_step[axis] = _parabola(minus, best_score, plus)

    backward_distance = _backward_distance(similarity[:-1], shifts_kji, best)
    agreement = torch.exp(-0.5 * (backward_distance / FB_SCALE_STEPS) ** 2)
    confidence = (agreement * best_score.clamp(0.0, 1.0)).nan_to_num(0.0)
    shift_ijk = (best_shift.permute(3, 0, 1, 2).float() + sub_step).flip(0)
    shift_lps = torch.einsum("ab,bkji->akji", offset_mm, shift_ijk)
    progress("search", 1.0, "")
    return LatticeMatches(grid, shift_lps, confidence)


def _backward_distance(similarity: torch.Tensor, shifts_kji: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Forward-backward distance (lattice steps) of each node's best shift.

    The moving node ``y = x + d`` searches back over fixed nodes ``y - e``; its score for ``e``
    is ``similarity[e](y - e)``. Nodes whose ``y`` leaves the lattice get distance 0 (no test).
    """
    shape = torch.tensor(similarity.shape[1:])
    nodes = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape.tolist()], indexing="ij"), dim=-1)
    target = nodes + shifts_kji[best]
    inside = ((target >= 0) & (target < shape)).all(dim=-1)
    target = torch.where(inside[..., None], target, nodes)
    flat = similarity.reshape(len(shifts_kji), -1)
    best_back = torch.full(tuple(shape.tolist()), float("-inf"))
    back_index = torch.zeros(tuple(shape.tolist()), dtype=torch.long)
    for index, shift in enumerate(shifts_kji):
        source = target - shift
        valid = ((source >= 0) & (source < shape)).all(dim=-1)
        linear = (source[..., 0].clamp(0, int(shape[0]) - 1) * shape[1] + source[..., 1].clamp(0, int(shape[1]) - 1))
        linear = linear * shape[2] + source[..., 2].clamp(0, int(shape[2]) - 1)
        score = torch.where(valid, flat[index][linear], float("-inf"))
        better = score > best_back
        best_back = torch.where(better, score, best_back)
        back_index = torch.where(better, index, back_index)
    distance = (shifts_kji[best] - shifts_kji[back_index]).float().norm(dim=-1)
    return torch.where(inside, distance, torch.zeros_like(distance))
