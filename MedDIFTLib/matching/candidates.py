"""Where the engine looks: the candidate lattice around a prior.

Its offsets are integer voxel offsets in ``[k, j, i]`` raster order (i fastest), returned as ``ijk``
columns (:func:`raster_offsets`, which also lays out a patch's taps).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..core.geometry import Geometry


@dataclass(frozen=True)
class CandidateLattice:
    """Candidate offsets ``stride * o`` (voxels) with ``|o| <= half`` per axis, kept inside a
    sphere of ``radius_mm`` around the prior."""

    half: np.ndarray  # (3,) ints, ijk
    stride: np.ndarray  # (3,) ints, ijk
    radius_mm: float

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(int(2 * h + 1) for h in self.half[::-1])

    @property
    def size(self) -> int:
        return int(np.prod(2 * self.half + 1))

    def offsets_ijk(self) -> np.ndarray:
        """(Nc, 3) voxel offsets in ``[k, j, i]`` raster order (i fastest); read-only, shared."""
        return _lattice_offsets(tuple(int(h) for h in self.half), tuple(int(s) for s in self.stride))

    def offsets_mm(self, geometry: Geometry) -> np.ndarray:
        """(Nc, 3) the offsets as LPS mm vectors on ``geometry``'s axes."""
        return self.offsets_ijk() @ geometry.affine_ijk_to_lps[:3, :3].T

    @staticmethod
    def around(geometry: Geometry, radius_mm: float, step_mm: float | None = None) -> CandidateLattice:
        """Offsets of about ``step_mm`` (None: every voxel) within ``radius_mm``.

        Along each axis the lattice is capped at the volume's extent: a centre inside the volume
        reaches every voxel of it, and a huge radius cannot grow the lattice beyond the volume.
        """
        spacing = np.asarray(geometry.spacing_mm)
        stride = np.ones(3, int) if step_mm is None else np.maximum(1, np.round(step_mm / spacing)).astype(int)
        half = np.ceil(radius_mm / (spacing * stride)).astype(int)
        reach = -(-(np.asarray(geometry.shape_ijk) - 1) // stride)
        return CandidateLattice(np.minimum(half, reach), stride, radius_mm)


def raster_offsets(axes: list[np.ndarray]) -> np.ndarray:
    """(n, 3) read-only ``ijk`` offsets of the grid ``axes`` (i, j, k values) in ``[k, j, i]`` raster order."""
    k, j, i = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    offsets = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    offsets.setflags(write=False)
    return offsets


@functools.lru_cache(maxsize=64)
def _lattice_offsets(half: tuple[int, int, int], stride: tuple[int, int, int]) -> np.ndarray:
    return raster_offsets([np.arange(-h, h + 1) * s for h, s in zip(half, stride)])
