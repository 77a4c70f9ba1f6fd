"""Slabs of whole ``k`` slices of a grid, and their voxels' coordinates: how a large grid is walked
in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..core.geometry import Geometry

SLAB_VOXELS = 2**21
"""Most voxels of one slab (:func:`slabs`)."""


def slabs(geometry: Geometry, max_voxels: int = SLAB_VOXELS, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """``(k_start, k_stop)`` ranges of whole ``k`` slices holding at most ``max_voxels`` each (at
    least ``multiple`` slices), every range but the last a whole ``multiple`` of slices."""
    size_k = geometry.shape_ijk[2]
    per_slice = geometry.shape_ijk[0] * geometry.shape_ijk[1]
    step = multiple * max(1, max_voxels // max(per_slice * multiple, 1))
    for start in range(0, size_k, step):
        yield start, min(start + step, size_k)


def slab_ijk(geometry: Geometry, k_start: int, k_stop: int, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates ``(n, 3)`` of slices ``k_start:k_stop`` in ``[k, j, i]`` raster order."""
    axes = [
        torch.arange(k_start, k_stop, dtype=dtype),
        torch.arange(geometry.shape_ijk[1], dtype=dtype),
        torch.arange(geometry.shape_ijk[0], dtype=dtype),
    ]
    k, j, i = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([i.reshape(-1), j.reshape(-1), k.reshape(-1)], dim=1)


def slab_lps(geometry: Geometry, k_start: int, k_stop: int) -> torch.Tensor:
    """LPS mm ``(n, 3)`` (float64) of the voxel centres of slices ``k_start:k_stop``."""
    affine = torch.as_tensor(geometry.affine_ijk_to_lps)
    return slab_ijk(geometry, k_start, k_stop, torch.float64) @ affine[:3, :3].T + affine[:3, 3]
