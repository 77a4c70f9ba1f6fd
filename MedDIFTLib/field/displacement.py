"""What is done with a dense displacement field: warp, invert, check, save.

The field is :class:`MedDIFTLib.grid.displacement_field.DisplacementField`, whose module states the
convention (ITK: fixed grid, fixed point ``x`` -> ``x + u(x)`` in the moving image, LPS mm).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.atomic import atomic_output
from ..core.io.fields import FIELD_TRANSFORM_SUFFIXES, field_suffix, read_field_file
from ..core.io.volumes import Volume
from ..core.progress import ProgressFn, no_progress
from ..grid.displacement_field import DisplacementField
from ..grid.nodes import node_grid
from ..grid.sampling import resample, sample
from ..grid.slabs import SLAB_VOXELS, slab_lps, slabs


def warp_volume(
    moving: Volume, field: DisplacementField, default_value: float | None = None, progress: ProgressFn = no_progress
) -> Volume:
    """Resample ``moving`` onto the field's (fixed) grid: ``W(x) = M(x + u(x))``, trilinear.

    Points that land more than half a voxel outside the moving grid get ``default_value``
    (default: the moving image's minimum, air in CT), as SimpleITK's resampler does. The result
    keeps the moving file's voxel type, so an int16 CT is written back as int16.
    """
    fill = float(moving.voxels.min()) if default_value is None else float(default_value)
    geometry = field.geometry
    moving_geometry = moving.geometry
    lps_to_moving = np.linalg.inv(moving_geometry.affine_ijk_to_lps)
    matrix = torch.as_tensor(lps_to_moving[:3, :3].T)
    offset = torch.as_tensor(lps_to_moving[:3, 3])
    moving_tensor = torch.from_numpy(moving.voxels)[None]
    upper = torch.tensor(moving_geometry.shape_ijk, dtype=torch.float64) - 0.5
    output = np.empty(geometry.shape_kji, np.float32)
    size_k = geometry.shape_ijk[2]
    for k_start, k_stop in slabs(geometry):
        positions = slab_lps(geometry, k_start, k_stop)
        positions += torch.from_numpy(field.displacement_lps_mm[k_start:k_stop].reshape(-1, 3)).double()
        moving_ijk = positions @ matrix + offset
        values = sample(moving_tensor, moving_ijk)[:, 0]
        outside = ((moving_ijk < -0.5) | (moving_ijk > upper)).any(dim=1)
        values[outside] = fill
        output[k_start:k_stop] = values.reshape(k_stop - k_start, *geometry.shape_kji[1:]).numpy()
        progress("warp", k_stop / size_k, f"slice {k_stop}/{size_k}")
    return Volume(output, geometry, name=f"{moving.name or 'moving'}_warped", stored_dtype=moving.stored_dtype)


def jacobian_determinant(field: DisplacementField) -> np.ndarray:
    """``det(I + du/dx)`` ``[k, j, i]`` (float32), x in LPS mm; central differences inside, one-sided
    at the ends, none along an axis of one voxel.

    Kept over ``sitk.DisplacementFieldJacobianDeterminant``, which differentiates along the voxel
    axes scaled by spacing but ignores the direction cosines, so it is wrong on oblique grids
    (``benchmarks/field_tools.py`` measures both).
    """
    return determinant_of_tensor(torch.from_numpy(field.displacement_lps_mm).permute(3, 0, 1, 2), field.geometry)


def determinant_of_tensor(values: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """:func:`jacobian_determinant` of a field held as ``(3, K, J, I)`` values (LPS mm) on ``geometry``,
    slab by slab of ``k`` slices (bounded memory)."""
    inverse_axes = torch.as_tensor(
        np.linalg.inv(geometry.direction_matrix * np.asarray(geometry.spacing_mm)[None, :]), dtype=torch.float32
    )
    size_k = geometry.shape_ijk[2]
    output = np.empty(geometry.shape_kji, np.float32)
    for k_start, k_stop in slabs(geometry, SLAB_VOXELS // 4):
        lower, upper = max(k_start - 1, 0), min(k_stop + 1, size_k)
        block = values[:, lower:upper].float()
        steps = []  # d u / d (i, j, k): (3 components, ...) each
        for array_axis in (3, 2, 1):
            if block.shape[array_axis] > 1:
                steps.append(torch.gradient(block, dim=array_axis)[0][:, k_start - lower : k_stop - lower])
            else:
                steps.append(torch.zeros_like(block[:, k_start - lower : k_stop - lower]))
        # jacobian[c, a] = sum_v d u_c / d v * inverse_axes[v, a], plus the identity
        jacobian = torch.einsum("vc...,va->ca...", torch.stack(steps), inverse_axes)
        for axis in range(3):
            jacobian[axis, axis] += 1.0
        (a, b, c), (d, e, f), (g, h, i) = jacobian
        determinant = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
        output[k_start:k_stop] = determinant.numpy()
    return output


def jacobian_stats(field: DisplacementField, mask: np.ndarray | None = None) -> dict[str, float]:
    """Jacobian determinant statistics over the grid (or the ``[k, j, i]`` ``mask``).

    ``fraction_folding`` is the share of voxels with ``det <= 0`` (the map folds there).
    """
    determinant = jacobian_determinant(field)
    if mask is not None:
        determinant = determinant[np.asarray(mask, bool)]
    if determinant.size == 0:
        raise BadInputError("the Jacobian mask selects no voxel")
    return {
        "min": float(determinant.min()),
        "max": float(determinant.max()),
        "mean": float(determinant.mean()),
        "std": float(determinant.std()),
        "fraction_folding": float(np.mean(determinant <= 0)),
        "folding_voxels": int(np.sum(determinant <= 0)),
    }


def invert(
    field: DisplacementField,
    geometry: Geometry,
    solve_spacing_mm: float | None = None,
    iterations: int = 30,
    progress: ProgressFn = no_progress,
) -> DisplacementField:
    """The inverse field on ``geometry`` (the moving grid): maps a moving point ``y`` to ``y + v(y)``
    in the fixed image, with ``v(y) = -u(y + v(y))`` solved by fixed-point iteration.

    ``solve_spacing_mm`` solves on a coarser node grid of ``geometry`` and interpolates
    (trilinear) the result: the field is smooth, so a grid of a few mm loses well under 0.1 mm.
    Kept over ``sitk.InvertDisplacementField`` (as accurate, but only onto the field's own grid)
    and ``sitk.IterativeInverseDisplacementField`` (less accurate); see ``benchmarks/field_tools.py``.
    """
    solve_geometry = geometry if solve_spacing_mm is None else node_grid(geometry, solve_spacing_mm)
    forward = field.as_tensor()
    lps_to_fixed = np.linalg.inv(field.geometry.affine_ijk_to_lps)
    matrix = torch.as_tensor(lps_to_fixed[:3, :3].T, dtype=torch.float32)
    offset = torch.as_tensor(lps_to_fixed[:3, 3], dtype=torch.float32)
    inverse = torch.empty((3, *solve_geometry.shape_kji), dtype=torch.float32)
    slab_list = list(slabs(solve_geometry))
    for count, (k_start, k_stop) in enumerate(slab_list):
        positions = slab_lps(solve_geometry, k_start, k_stop).float()
        base_ijk = positions @ matrix + offset
        solution = -sample(forward, base_ijk)
        for _ in range(iterations - 1):
            solution = -sample(forward, base_ijk + solution @ matrix)
        inverse[:, k_start:k_stop] = solution.T.reshape(3, k_stop - k_start, *solve_geometry.shape_kji[1:])
        progress("inverse", (count + 1) / len(slab_list), "")
    if solve_geometry != geometry:
        inverse = resample(inverse, solve_geometry, geometry)
    return DisplacementField.from_tensor(inverse, geometry)


def check_field_path(path: str | os.PathLike) -> None:
    """Raise :class:`BadInputError` unless ``path`` names a field format this module writes."""
    field_suffix(path)


def to_sitk_image(field: DisplacementField) -> sitk.Image:
    """The field as a SimpleITK vector image (float64, 3 components) with the fixed geometry."""
    image = sitk.GetImageFromArray(field.displacement_lps_mm.astype(np.float64), isVector=True)
    image.SetSpacing(field.geometry.spacing_mm)
    image.SetOrigin(field.geometry.origin_lps_mm)
    image.SetDirection(field.geometry.direction)
    return image


def write_field(field: DisplacementField, path: str | os.PathLike) -> None:
    """Write ``field`` atomically: a float32 vector image (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) or
    an ITK ``DisplacementFieldTransform`` (``.h5``, double precision, as ITK's transform holds it);
    both load in Slicer, ITK and SimpleITK."""
    target = Path(path)
    suffix = field_suffix(target)
    with atomic_output(target) as tmp:
        if suffix in FIELD_TRANSFORM_SUFFIXES:
            sitk.WriteTransform(sitk.DisplacementFieldTransform(to_sitk_image(field)), str(tmp))
        else:
            sitk.WriteImage(sitk.Cast(to_sitk_image(field), sitk.sitkVectorFloat32), str(tmp), True)


def read_field(path: str | os.PathLike) -> DisplacementField:
    """Read a displacement field written by :func:`write_field` (or by ITK tools)."""
    return DisplacementField(*read_field_file(path))
