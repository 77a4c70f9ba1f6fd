"""The lattice layout: match every node of a regular lattice of fixed points at once.

Same quantity as the point layout (:mod:`.similarity`): per level, the patch-mean cosine between the
fixed point and a moving candidate, fused with the same weights and patches, the same candidate
lattice and sphere, the same parabola and the same confidence. Because all nodes share the
candidate shifts, each level is scored per shift in one pass at its own grid (the fast evaluation,
laid out for shared shifts): for a whole-voxel shift ``e`` (level voxels) the voxelwise cosine map
``D_e(u) = <f(u), m(u + e)>`` is computed once over the level (padded by the patch radius ``r``);
the patch mean at a node is then the mean of ``D_e`` over the patch's taps, sampled (trilinear) at
the node (:class:`NodeSampler`: box filter and sampling are separable, three small matrices applied
to a batch of maps). The backward check reads the same maps: the moving point ``y`` scores the fixed
candidate ``y - e`` with ``D_e(y - e)``. A shift that is fractional in level voxels reads the moving
unit descriptors interpolated by that fraction (one interpolated copy per fraction, shared by the
shifts that have it; not normalised again). Where a node sits on the level's voxels, the shifts are
whole level voxels and no prior is given, every value equals the reference evaluation and the two
layouts give the same match; elsewhere the lattice interpolates on the fixed side (between nodes)
where the point layout interpolates on the moving side (between candidates).

It searches one candidate lattice: every ``coarse_step_mm`` when ``coarse_to_fine`` (its
refinement is the caller's, e.g. the next field level), else every voxel; only the levels that
resolve that step take part (:func:`.similarity.resolving_levels`). A prior field ``p`` moves the
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

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.options import MatchOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeatureLevel, FeaturePyramid
from ..grid.displacement_field import DisplacementField, displacement_at
from ..grid.nodes import grid_points, node_grid
from ..grid.sampling import channels_last, sample
from ..grid.vectors import unit_vectors
from .candidates import CandidateLattice
from .correspondences import Correspondences
from .descriptors import unit_descriptors
from .similarity import LevelPatch, PatchSimilarity, resolving_levels
from .subvoxel import parabola_vertex

BATCH_BYTES = 2**26
"""Bytes of the cosine maps of one batch of shifts."""
SLAB_VALUES = 2**16
"""Values of one map per slab of slices (about 256 kB) that a cosine map is summed over channels in."""


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


class NodeSampler:
    """Mean over the taps of a :class:`.similarity.LevelPatch` (radius ``r``, taps every ``s`` level
    voxels), then trilinear sampling at the nodes of a grid.

    The node grid's axes must map onto the level's axes (a scaled, signed permutation: true of
    every pyramid level of an image, whatever the backbone's orientation).
    """

    def __init__(self, level: Geometry, nodes: Geometry, patch: LevelPatch) -> None:
        matrix = np.linalg.solve(level.affine_ijk_to_lps[:3, :3], nodes.affine_ijk_to_lps[:3, :3])
        self.node_axis = np.argmax(np.abs(matrix), axis=1)  # per level axis (ijk), its node axis
        kept = np.zeros_like(matrix)
        kept[np.arange(3), self.node_axis] = matrix[np.arange(3), self.node_axis]
        if len(set(self.node_axis.tolist())) != 3 or not np.allclose(matrix, kept, atol=1e-6):
            raise BadInputError("the lattice's axes do not follow the feature level's axes")
        offset = level.lps_to_ijk(np.asarray(nodes.origin_lps_mm, float)[None])[0]
        self.coords = [
            offset[a] + matrix[a, self.node_axis[a]] * np.arange(nodes.shape_ijk[self.node_axis[a]]) for a in range(3)
        ]
        self.sizes = level.shape_ijk
        self.patch = patch
        self.count = nodes.num_voxels
        map_axes = [int(self.node_axis[2]), int(self.node_axis[1]), int(self.node_axis[0])]  # node axis per map dim
        self.permutation = [0] + [1 + map_axes.index(axis) for axis in (2, 1, 0)]
        self._cache: dict[tuple[int, float], torch.Tensor] = {}

    def _matrix(self, axis: int, shift: float) -> torch.Tensor:
        """``(nodes along the axis, size + 2r)``: tap mean, then linear interpolation at coord - shift."""
        key = (axis, shift)
        if key not in self._cache:
            size, width = self.sizes[axis], 2 * self.patch.radius + 1
            coords = np.clip(self.coords[axis] - shift, 0.0, size - 1)
            low = np.minimum(np.floor(coords).astype(int), size - 1)
            fraction = coords - low
            rows = np.arange(len(coords))
            interpolation = np.zeros((len(coords), size))
            interpolation[rows, low] = 1.0 - fraction
            upper = low + 1 < size
            interpolation[rows[upper], low[upper] + 1] += fraction[upper]
            box = np.zeros((size, size + width - 1))
            for offset in range(0, width, self.patch.step):
                box[np.arange(size), np.arange(size) + offset] = 1.0 / self.patch.taps
            self._cache[key] = torch.as_tensor(interpolation @ box, dtype=torch.float32)
        return self._cache[key]

    def apply(self, maps: torch.Tensor, shifts_ijk: np.ndarray | None = None) -> torch.Tensor:
        """``(B, N)`` node values (raster order) of ``(B, K + 2r, J + 2r, I + 2r)`` maps, map ``b``
        read at each node minus ``shifts_ijk[b]`` (level voxels; default none)."""
        batch, size_k = maps.shape[:2]
        if shifts_ijk is None:
            along_i, along_j, along_k = (self._matrix(axis, 0.0) for axis in range(3))
            along_i = along_i.T
        else:
            along_i, along_j, along_k = (
                torch.stack([self._matrix(axis, float(shift[axis])) for shift in shifts_ijk]) for axis in range(3)
            )
            along_i, along_j = along_i.transpose(1, 2)[:, None], along_j[:, None]
        # Each product contracts one axis in place of the layout (no permuted copies of the maps).
        values = torch.matmul(maps, along_i)  # (B, K, J, Z)
        values = torch.matmul(along_j, values)  # (B, K, Y, Z)
        size_y, size_z = values.shape[2:]
        values = torch.matmul(along_k, values.reshape(batch, size_k, -1)).reshape(batch, -1, size_y, size_z)
        return values.permute(*self.permutation).reshape(len(maps), self.count)


def _moving_on_level(
    source: FeatureLevel, target: FeatureLevel, pad_ijk: np.ndarray, prior: DisplacementField | None
) -> torch.Tensor:
    """Normalised target descriptors at the source level's voxels grown by ``pad_ijk`` each side,
    sampled through the prior, ``(C, K + 2 pad_k, J + 2 pad_j, I + 2 pad_i)``."""
    geometry = source.geometry
    if prior is None and target.geometry.same_grid(geometry):
        padding = tuple(int(p) for p in np.repeat(pad_ijk, 2))
        return F.pad(unit_descriptors(target)[None], padding, mode="replicate")[0]
    shape = np.asarray(geometry.shape_ijk) + 2 * pad_ijk
    origin = geometry.ijk_to_lps(-pad_ijk[None].astype(float))[0]
    grown = Geometry.create(shape, geometry.spacing_mm, origin, geometry.direction_matrix)
    positions = grid_points(grown)
    positions = positions + displacement_at(prior, positions)
    ijk = torch.as_tensor(target.geometry.lps_to_ijk(positions), dtype=torch.float32)
    values = sample(channels_last(target.values().float()), ijk)
    return unit_vectors(values, 1).T.reshape(-1, *grown.shape_kji)


def _split_shifts(shifts_level: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shifts ``(M, 3)`` (level voxels, ijk) as whole voxels plus a fraction in ``[0, 1)`` per axis, and
    the margin (voxels per axis) that every shift's window, its next voxel included, stays within."""
    whole = np.floor(shifts_level + 1e-6)
    fraction = shifts_level - whole
    fraction[fraction < 1e-6] = 0.0
    margin = np.maximum(np.abs(whole), whole + (fraction > 0)).max(axis=0).astype(int)
    return whole.astype(int), fraction, margin


def _moved_by_fraction(moving: torch.Tensor, fraction: np.ndarray) -> torch.Tensor:
    """``(C, K, J, I)`` descriptors linearly interpolated a ``fraction`` (ijk, each in ``[0, 1)``) of a
    voxel forward; an axis with a fraction loses its last voxel."""
    for axis, part in zip((3, 2, 1), fraction):
        if part > 0:
            size = moving.shape[axis]
            moving = torch.lerp(moving.narrow(axis, 0, size - 1), moving.narrow(axis, 1, size - 1), float(part))
    return moving


def _level_similarity(
    source: FeatureLevel,
    target: FeatureLevel,
    patch: LevelPatch,
    grid: Geometry,
    shifts_mm: np.ndarray,
    prior: DisplacementField | None,
    progress: ProgressFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-mean cosines ``(Nc, N)`` of one level for each shift (mm) at each node of ``grid``:
    forward (node ``x`` against moving ``x + d``) and backward (moving ``x`` against fixed ``x - d``).

    Shifts that share a fraction of a level voxel share one interpolated copy of the moving
    descriptors, so each shift costs one map whether or not it falls on the level's voxels."""
    shifts_level = shifts_mm @ np.linalg.inv(source.geometry.affine_ijk_to_lps[:3, :3]).T
    whole, fraction, margin = _split_shifts(shifts_level)
    fixed = F.pad(unit_descriptors(source)[None], (patch.radius,) * 6, mode="replicate")[0]
    moving = _moving_on_level(source, target, margin + patch.radius, prior)
    sampler = NodeSampler(source.geometry, grid, patch)
    size_k, size_j, size_i = fixed.shape[1:]
    forward = torch.empty((len(shifts_level), sampler.count))
    backward = torch.empty((len(shifts_level), sampler.count))
    batch = max(1, BATCH_BYTES // (4 * fixed[0].numel()))
    slab = max(1, SLAB_VALUES // (size_j * size_i))
    fractions, group = np.unique(np.round(fraction, 6), axis=0, return_inverse=True)
    done = 0
    for number, part in enumerate(fractions):
        moved = _moved_by_fraction(moving, part)
        members = np.flatnonzero(group.reshape(-1) == number)
        for begin in range(0, len(members), batch):
            rows = members[begin : begin + batch]
            maps = torch.empty((len(rows), size_k, size_j, size_i))
            for first in range(0, size_k, slab):  # slab by slab, so each map's part stays in cache
                last = min(first + slab, size_k)
                for slot, row in enumerate(rows):
                    i, j, k = (int(v) for v in margin + whole[row])
                    window = moved[:, k + first : k + last, j : j + size_j, i : i + size_i]
                    part = maps[slot, first:last]
                    torch.mul(fixed[0, first:last], window[0], out=part)
                    for channel in range(1, fixed.shape[0]):
                        part.addcmul_(fixed[channel, first:last], window[channel])
            index = torch.as_tensor(rows)
            forward[index] = sampler.apply(maps)
            backward[index] = sampler.apply(maps, shifts_level[rows])
            done += len(rows)
            progress("lattice", done / len(shifts_level), source.name)
    return forward, backward


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
    similarity = PatchSimilarity(fixed, moving, options)
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
    forward = torch.zeros((len(kept), len(nodes)))
    backward = torch.zeros((len(kept), len(nodes)))
    with torch.inference_mode():
        for count, (n, share) in enumerate(zip(levels, similarity.shares(levels))):
            report = scaled(progress, count / len(levels), (count + 1) / len(levels))
            level_forward, level_backward = _level_similarity(
                fixed.levels[n], moving.levels[n], similarity.patches[n], grid, shifts_mm, prior, report
            )
            forward += share * level_forward
            backward += share * level_backward
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
