"""Voxel grids in LPS world millimetres.

A :class:`Geometry` is the SimpleITK image geometry: ``shape_ijk`` (sizes along i, j, k; i
fastest), ``spacing_mm`` along i, j, k, ``origin_lps_mm`` (centre of voxel 0,0,0) and
``direction`` (3x3, column n is the LPS direction of axis n). Arrays holding voxel data use
the SimpleITK/NumPy order ``[k, j, i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

CUBIC_TOLERANCE = 1.05
"""Largest over smallest voxel spacing up to which voxels count as cubic (:attr:`Geometry.cubic`):
no isotropic working grid for the features, the native grid for the baselines."""

FINEST_WORKING_MM = 1.25
"""The finest isotropic working grid the features take by default for voxels that are not cubic
(thick slices): a full-resolution CT of 2 mm slices is not doubled in memory."""


def box_slices(lo_ijk, hi_ijk) -> tuple[slice, slice, slice]:
    """The ``[k, j, i]`` array slices of the voxel box ``[lo, hi)`` given in ``ijk``."""
    return tuple(slice(int(a), int(b)) for a, b in zip(np.asarray(lo_ijk)[::-1], np.asarray(hi_ijk)[::-1]))


@dataclass(frozen=True)
class Geometry:
    shape_ijk: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    @staticmethod
    def create(shape_ijk, spacing_mm, origin_lps_mm=(0.0, 0.0, 0.0), direction=None) -> Geometry:
        """Build a geometry from array-likes; ``direction`` defaults to identity."""
        direction_matrix = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
        return Geometry(
            tuple(int(n) for n in shape_ijk),
            tuple(float(s) for s in spacing_mm),
            tuple(float(o) for o in origin_lps_mm),
            tuple(float(d) for d in direction_matrix.ravel()),
        )

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        """Array shape of the voxel data, ``[k, j, i]``."""
        return self.shape_ijk[::-1]

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape_ijk))

    @cached_property
    def _affine(self) -> np.ndarray:
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing_mm)[None, :]
        affine[:3, 3] = self.origin_lps_mm
        affine.setflags(write=False)
        return affine

    @cached_property
    def _lps_to_ijk_linear(self) -> np.ndarray:
        inverse = np.linalg.inv(self._affine[:3, :3]).T
        inverse.setflags(write=False)
        return inverse

    @property
    def affine_ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``ijk`` (column vector) to LPS mm (a fresh copy)."""
        return self._affine.copy()

    def ijk_to_lps(self, ijk) -> np.ndarray:
        """Continuous voxel indices (N, 3) -> LPS mm (N, 3)."""
        ijk = np.asarray(ijk, float)
        return ijk @ self._affine[:3, :3].T + self._affine[:3, 3]

    def lps_to_ijk(self, points_lps_mm) -> np.ndarray:
        """LPS mm (N, 3) -> continuous voxel indices (N, 3)."""
        points = np.asarray(points_lps_mm, float)
        return (points - self._affine[:3, 3]) @ self._lps_to_ijk_linear

    def contains_lps(self, points_lps_mm, margin_voxels: float = 0.5) -> np.ndarray:
        """True for points inside the grid's extent (voxel centres +- ``margin_voxels``)."""
        ijk = self.lps_to_ijk(np.atleast_2d(points_lps_mm))
        upper = np.asarray(self.shape_ijk) - 1 + margin_voxels
        return np.all((ijk >= -margin_voxels) & (ijk <= upper), axis=1)

    def box(self, lo_ijk, hi_ijk) -> Geometry:
        """The sub-grid of the voxels ``[lo, hi)`` (ijk; same spacing and direction, voxel ``lo`` its first)."""
        lo = np.asarray(lo_ijk, int)
        shape = np.asarray(hi_ijk, int) - lo
        if np.any(shape < 1):
            raise ValueError(f"empty box {lo.tolist()} .. {np.asarray(hi_ijk, int).tolist()}")
        origin = self.ijk_to_lps(lo[None].astype(float))[0]
        return Geometry.create(shape, self.spacing_mm, origin, self.direction_matrix)

    def covering_box(self, points_lps_mm, margin_voxels: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The voxels ``[lo, hi)`` (ijk) that trilinear reads at ``points_lps_mm`` (N, 3) touch, grown
        by ``margin_voxels`` each side and clipped to the grid (``hi <= lo`` along an axis the points
        miss)."""
        ijk = self.lps_to_ijk(np.atleast_2d(points_lps_mm))
        lo = np.floor(ijk.min(axis=0)).astype(int) - margin_voxels
        hi = np.floor(ijk.max(axis=0)).astype(int) + 2 + margin_voxels
        return np.clip(lo, 0, self.shape_ijk), np.clip(hi, 0, self.shape_ijk)

    def box_corners_lps(self, lo_ijk, hi_ijk) -> np.ndarray:
        """(8, 3) LPS mm of the corners of the voxel box ``[lo, hi)`` (its outer voxels' centres)."""
        lo, last = np.asarray(lo_ijk, float), np.asarray(hi_ijk, float) - 1
        corners = np.array([[(lo, last)[a][0], (lo, last)[b][1], (lo, last)[c][2]]
                            for a in (0, 1) for b in (0, 1) for c in (0, 1)])
        return self.ijk_to_lps(corners)

    def downsampled(self, factor: int | tuple[int, int, int]) -> Geometry:
        """The grid of ``factor``-times average pooling (voxel n covers voxels n*f .. n*f+f-1).

        ``factor`` is one integer or one per axis (ijk). Voxel centres sit where
        ``torch.nn.functional.interpolate(..., align_corners=False)`` places them, so upsampling
        a pooled level by ``factor`` lands back on this grid.
        """
        factors = np.broadcast_to(np.asarray(factor, int), (3,))
        spacing = np.asarray(self.spacing_mm) * factors
        shift_ijk = (factors - 1) / 2.0
        origin = self.ijk_to_lps(shift_ijk[None])[0]
        shape = [max(1, n // f) for n, f in zip(self.shape_ijk, factors)]
        return Geometry.create(shape, spacing, origin, self.direction_matrix)

    def working_grid(self, spacing_mm: float | None = None, isotropic: bool = True) -> Geometry:
        """A grid over the same extent and orientation with other voxels: ``isotropic``, cubes of
        ``spacing_mm`` (default: this grid's finest spacing; never finer than it); otherwise each
        axis coarsened to at least ``spacing_mm``. Voxel 0 stays where it is."""
        spacing = np.asarray(self.spacing_mm, float)
        if isotropic:
            target = np.full(3, max(float(spacing.min()), spacing_mm or 0.0))
        else:
            target = np.maximum(spacing, spacing_mm or 0.0)
        extent = spacing * (np.asarray(self.shape_ijk) - 1)
        shape = np.floor(extent / target + 1e-6).astype(int) + 1
        return Geometry.create(shape, target, self.origin_lps_mm, self.direction_matrix)

    @property
    def anisotropy(self) -> float:
        """Largest over smallest voxel spacing (1 for cubic voxels)."""
        return float(max(self.spacing_mm) / min(self.spacing_mm))

    @property
    def cubic(self) -> bool:
        """Whether the voxels count as cubic: anisotropy at most :data:`CUBIC_TOLERANCE` (else thick slices)."""
        return self.anisotropy <= CUBIC_TOLERANCE

    def same_grid(self, other: Geometry, tol: float = 1e-4) -> bool:
        return self.shape_ijk == other.shape_ijk and np.allclose(
            self.affine_ijk_to_lps, other.affine_ijk_to_lps, atol=tol
        )
