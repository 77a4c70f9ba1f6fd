"""One level of the lattice layout: patch-mean cosines of every node for shifts shared by all nodes.

For a whole-voxel shift ``e`` (level voxels) the voxelwise cosine map ``D_e(u) = <f(u), m(u + e)>``
is computed once over the level (padded by the patch radius ``r``); the patch mean at a node is
then the mean of ``D_e`` over the patch's taps (every ``s`` voxels from ``-r`` to ``r``, as the
point layout scores), sampled (trilinear) at the node. Box filter and sampling
are separable, so they are three small matrices applied to a batch of maps. The backward check
reads the same maps: the moving point ``y`` scores the fixed candidate ``y - e`` with ``D_e(y - e)``.
A shift that is fractional in level voxels reads the moving descriptors interpolated by that
fraction (one interpolated copy per fraction, shared by the shifts that have it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.progress import ProgressFn
from ..features.protocol import FeatureLevel
from ..grid.displacement_field import DisplacementField, displacement_at
from ..grid.nodes import grid_points
from ..grid.sampling import channels_last, sample
from ..grid.vectors import unit_vectors
from .candidates import patch_taps
from .descriptors import unit_descriptors

BATCH_BYTES = 2**26
SLAB_VALUES = 2**16
"""Values of one map per slab of slices (about 256 kB) that a cosine map is summed over channels in."""


class NodeSampler:
    """Mean over the patch taps (radius ``r``, tap spacing ``step`` level voxels), then trilinear
    sampling at the nodes of a grid.

    The node grid's axes must map onto the level's axes (a scaled, signed permutation: true of
    every pyramid level of an image, whatever the backbone's orientation).
    """

    def __init__(self, level: Geometry, nodes: Geometry, radius: int, step: int = 1) -> None:
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
        self.radius = radius
        self.step, self.taps = patch_taps(radius, step)
        self.count = nodes.num_voxels
        map_axes = [int(self.node_axis[2]), int(self.node_axis[1]), int(self.node_axis[0])]  # node axis per map dim
        self.permutation = [0] + [1 + map_axes.index(axis) for axis in (2, 1, 0)]
        self._cache: dict[tuple[int, float], torch.Tensor] = {}

    def _matrix(self, axis: int, shift: float) -> torch.Tensor:
        """``(nodes along the axis, size + 2r)``: tap mean, then linear interpolation at coord - shift."""
        key = (axis, shift)
        if key not in self._cache:
            size, width = self.sizes[axis], 2 * self.radius + 1
            coords = np.clip(self.coords[axis] - shift, 0.0, size - 1)
            low = np.minimum(np.floor(coords).astype(int), size - 1)
            fraction = coords - low
            rows = np.arange(len(coords))
            interpolation = np.zeros((len(coords), size))
            interpolation[rows, low] = 1.0 - fraction
            upper = low + 1 < size
            interpolation[rows[upper], low[upper] + 1] += fraction[upper]
            box = np.zeros((size, size + width - 1))
            for offset in range(0, width, self.step):
                box[np.arange(size), np.arange(size) + offset] = 1.0 / self.taps
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


def level_similarity(
    source: FeatureLevel,
    target: FeatureLevel,
    radius: int,
    grid: Geometry,
    shifts_mm: np.ndarray,
    prior: DisplacementField | None,
    progress: ProgressFn,
    step: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-mean cosines ``(Nc, N)`` of one level for each shift (mm) at each node of ``grid``:
    forward (node ``x`` against moving ``x + d``) and backward (moving ``x`` against fixed ``x - d``).

    Shifts that share a fraction of a level voxel share one interpolated copy of the moving
    descriptors, so each shift costs one map whether or not it falls on the level's voxels."""
    shifts_level = shifts_mm @ np.linalg.inv(source.geometry.affine_ijk_to_lps[:3, :3]).T
    whole, fraction, margin = _split_shifts(shifts_level)
    fixed = F.pad(unit_descriptors(source)[None], (radius,) * 6, mode="replicate")[0]
    moving = _moving_on_level(source, target, margin + radius, prior)
    sampler = NodeSampler(source.geometry, grid, radius, step)
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
