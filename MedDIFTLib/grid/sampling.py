"""Trilinear sampling of feature and vector volumes: the one ``grid_sample`` wrapper, at points and
onto other grids.

Volumes are ``(C, K, J, I)`` tensors (or batched ``(B, C, K, J, I)``) on a :class:`Geometry`;
coordinates are continuous voxel indices ``ijk`` (SimpleITK order, 0-based); points are LPS mm
``(N, 3)``. Outside the grid the border value is repeated, as ``F.interpolate`` does.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import Geometry
from .slabs import slab_ijk, slabs

SPLIT_POINTS = 8192
"""Fewest points per thread worth sampling apart (:func:`interpolate`)."""


@functools.lru_cache(maxsize=256)
def _grid_map(shape_ijk: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Scale and shift (3,) taking voxel coordinates on ``shape_ijk`` to ``grid_sample``'s [-1, 1]
    (``align_corners=True``; 0 along an axis of one voxel). Kept: every sampling asks."""
    sizes = np.asarray(shape_ijk, float)
    scale = np.where(sizes > 1, 2.0 / np.maximum(sizes - 1, 1), 0.0)
    shift = np.where(sizes > 1, -1.0, 0.0)
    return tuple(torch.as_tensor(values, dtype=dtype, device=device) for values in (scale, shift))


def normalised(ijk: torch.Tensor, shape_ijk: tuple[int, int, int]) -> torch.Tensor:
    """Voxel coordinates -> ``grid_sample``'s [-1, 1] (``align_corners=True``)."""
    scale, shift = _grid_map(tuple(int(n) for n in shape_ijk), ijk.dtype, ijk.device)
    return torch.addcmul(shift, ijk, scale)


def interpolate(volume: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(B, C, N)`` of ``volume`` ``(B, C, K, J, I)`` at ``(B, N, 3)`` voxel coordinates.

    On the CPU ``grid_sample`` shares out only the batch among threads: one volume's many points
    are sampled as one part per thread (the volume repeated by a stride-0 view), with the same values.
    """
    shape_ijk = tuple(int(n) for n in volume.shape[2:][::-1])
    grid = normalised(ijk.to(volume.dtype), shape_ijk)
    batch, count = grid.shape[:2]
    parts = torch.get_num_threads() if batch == 1 and volume.device.type == "cpu" else 1
    parts = max(1, min(parts, count // SPLIT_POINTS))
    if parts == 1:
        samples = F.grid_sample(volume, grid[:, :, None, None], mode="bilinear", padding_mode="border",
                                align_corners=True)
        return samples[:, :, :, 0, 0]
    per_part = -(-count // parts)
    padded = torch.cat([grid[0], grid.new_zeros((per_part * parts - count, 3))]).reshape(parts, per_part, 1, 1, 3)
    samples = F.grid_sample(volume.expand(parts, *volume.shape[1:]), padded, mode="bilinear", padding_mode="border",
                            align_corners=True)
    return samples[:, :, :, 0, 0].transpose(0, 1).reshape(1, volume.shape[1], -1)[:, :, :count]


def sample(values: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(N, C)`` of ``values`` ``(C, K, J, I)`` at voxel coordinates ``(N, 3)``."""
    return interpolate(values[None], ijk.reshape(1, -1, 3))[0].T


_CORNER_BITS = torch.tensor([[(corner >> axis) & 1 for axis in range(3)] for corner in range(8)])
"""(8, 3) the corners of a voxel cell, ijk offsets 0 or 1."""


def sample_stored(values: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Float32 trilinear samples ``(N, C)`` of stored features ``(C, K, J, I)`` (any float dtype,
    e.g. half precision) at voxel coordinates ``(N, 3)``: the eight corners are gathered in one
    indexing and only they are converted, never the whole level. Outside the grid the border
    value is repeated, as :func:`sample` does."""
    upper = torch.tensor(values.shape[1:][::-1], dtype=ijk.dtype, device=ijk.device) - 1
    clamped = ijk.reshape(-1, 3).clamp(min=torch.zeros_like(upper), max=upper)
    base = clamped.floor().clamp(max=(upper - 1).clamp(min=0))
    fraction = clamped - base
    bits = _CORNER_BITS.to(ijk.device)
    index = torch.minimum(base.long()[None] + bits[:, None, :], upper.long())
    weights = torch.where(bits[:, None, :].bool(), fraction[None], 1.0 - fraction[None]).prod(dim=2)
    corners = values[:, index[..., 2], index[..., 1], index[..., 0]].float()
    return torch.einsum("cmn,mn->nc", corners, weights.float())


def _clipped_span(start: int, size: int, length: int) -> tuple[slice, int, int]:
    """The part of ``[start, start + size)`` inside ``[0, length)`` and how many border copies go
    before and after it (one border voxel when the span lies wholly outside)."""
    if start >= length:
        return slice(length - 1, length), 0, size - 1
    if start + size <= 0:
        return slice(0, 1), size - 1, 0
    lo, hi = max(start, 0), min(start + size, length)
    return slice(lo, hi), lo - start, start + size - hi


def windows(features: torch.Tensor, start_ijk: np.ndarray, sizes_ijk: list[int]) -> torch.Tensor:
    """Float32 ``(B, C, K, J, I)`` boxes of ``features`` ``(C, K, J, I)`` (any float dtype) from each
    ``start_ijk`` (B, 3) row, ``sizes_ijk`` voxels long; outside the grid the border voxel is
    repeated. Each box is converted as it is copied into place (one pass over its voxels)."""
    shape_ijk = features.shape[1:][::-1]
    sizes = [int(n) for n in sizes_ijk]
    starts = np.asarray(start_ijk, int).reshape(-1, 3)
    boxes = torch.empty((len(starts), features.shape[0], *sizes[::-1]), device=features.device)
    for row, start in enumerate(starts.tolist()):
        spans = [_clipped_span(*axis) for axis in zip(start, sizes, shape_ijk)]
        box = features[:, spans[2][0], spans[1][0], spans[0][0]]
        pads = [n for _, before, after in spans for n in (before, after)]
        if any(pads):  # repeat the border voxels
            boxes[row] = F.pad(box.float(), pads, mode="replicate")
        else:
            boxes[row].copy_(box)
    return boxes


def channels_last(values: torch.Tensor) -> torch.Tensor:
    """``(C, K, J, I)`` stored with the channel axis fastest (same values): trilinear sampling of
    many channels at many points then reads each corner's channels together, several times faster."""
    return values.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def sample_lps(values: torch.Tensor, geometry: Geometry, points_lps_mm: np.ndarray) -> torch.Tensor:
    """Trilinear samples ``(N, C)`` of ``values`` on ``geometry`` at LPS points ``(N, 3)``."""
    ijk = geometry.lps_to_ijk(np.asarray(points_lps_mm, float).reshape(-1, 3))
    return sample(values, torch.as_tensor(ijk, dtype=values.dtype, device=values.device))


def index_map(source: Geometry, target: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` with ``source_ijk = matrix @ target_ijk + offset``."""
    source_affine = source.affine_ijk_to_lps
    target_affine = target.affine_ijk_to_lps
    matrix = np.linalg.solve(source_affine[:3, :3], target_affine[:3, :3])
    offset = np.linalg.solve(source_affine[:3, :3], target_affine[:3, 3] - source_affine[:3, 3])
    return matrix, offset


def resample(values: torch.Tensor, source: Geometry, target: Geometry) -> torch.Tensor:
    """``values`` ``(C, K, J, I)`` on ``source`` resampled (trilinear) onto ``target``'s voxels."""
    matrix, offset = index_map(source, target)
    matrix_t = torch.as_tensor(matrix.T, dtype=torch.float32)
    offset_t = torch.as_tensor(offset, dtype=torch.float32)
    output = torch.empty((values.shape[0], *target.shape_kji), dtype=values.dtype)
    for k_start, k_stop in slabs(target):
        source_ijk = slab_ijk(target, k_start, k_stop) @ matrix_t + offset_t
        output[:, k_start:k_stop] = sample(values, source_ijk).T.reshape(-1, k_stop - k_start, *target.shape_kji[1:])
    return output
