"""The displacement field type, the one shape of a vector field in MedDIFTLib, and how it is read at points.

Convention (ITK, DESIGN.md): the field lives on the **fixed** grid and maps a fixed point ``x``
(LPS mm) to ``x + u(x)`` in the **moving** image; it is what resamples the moving image onto the
fixed one. The vectors are LPS mm (world components, not voxel steps). Between voxel centres the
field is trilinear; as in ITK, a point more than half a voxel outside the grid is not moved
(:meth:`DisplacementField.transform_points`). A search prior is read with the border repeated
instead (:func:`displacement_at`). What is done with a field (warp, invert, Jacobian, files) is
:mod:`MedDIFTLib.field.displacement`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from .sampling import sample


@dataclass
class DisplacementField:
    """``displacement_lps_mm`` ``[k, j, i, 3]`` (float32, LPS mm) on ``geometry`` (the fixed grid)."""

    displacement_lps_mm: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        expected = (*self.geometry.shape_kji, 3)
        if self.displacement_lps_mm.shape != expected:
            raise ValueError(f"displacement array {self.displacement_lps_mm.shape} does not fit grid {expected}")
        self.displacement_lps_mm = np.ascontiguousarray(self.displacement_lps_mm, dtype=np.float32)

    @staticmethod
    def from_tensor(values: torch.Tensor, geometry: Geometry) -> DisplacementField:
        """From a ``(3, K, J, I)`` tensor of LPS mm displacements on ``geometry``."""
        return DisplacementField(values.permute(1, 2, 3, 0).cpu().numpy(), geometry)

    def as_tensor(self) -> torch.Tensor:
        """The field as a ``(3, K, J, I)`` float32 tensor (a copy)."""
        return torch.from_numpy(self.displacement_lps_mm).permute(3, 0, 1, 2).contiguous()

    def transform_points(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Fixed points ``(N, 3)`` -> moving points ``x + u(x)`` (LPS mm); ``u`` is zero beyond half
        a voxel outside the grid (as ITK)."""
        points = np.asarray(points_lps_mm, float).reshape(-1, 3)
        if not np.isfinite(points).all():
            raise BadInputError("some points have non-finite coordinates")
        ijk = self.geometry.lps_to_ijk(points)
        inside = self.geometry.contains_lps(points, margin_voxels=0.5) if len(points) else np.zeros(0, bool)
        displacement = np.zeros_like(points)
        if inside.any():
            displacement[inside] = _trilinear(self, ijk[inside])
        return points + displacement


def _trilinear(field: DisplacementField, ijk: np.ndarray) -> np.ndarray:
    """``(N, 3)`` displacement (LPS mm, float64) at voxel coordinates ``(N, 3)``, border repeated."""
    return sample(field.as_tensor(), torch.as_tensor(ijk, dtype=torch.float32)).double().numpy()


def displacement_at(field: DisplacementField | None, points_lps_mm: np.ndarray) -> np.ndarray:
    """``(N, 3)`` displacement (LPS mm, trilinear, border repeated) of ``field`` at points; 0 without one."""
    if field is None:
        return np.zeros_like(points_lps_mm)
    return _trilinear(field, field.geometry.lps_to_ijk(points_lps_mm))
