"""A volume resampled onto another grid, the one way every stage does it.

Trilinear interpolation (SimpleITK), with Gaussian anti-aliasing along each image axis that the
target grid coarsens: ``sigma = sqrt(target^2 - source^2) / 2`` mm, the blur that brings the
source's resolution to the target's. Outside the source image the voxels take ``outside_value``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry
from .io.volumes import Volume, sitk_image


def target_spacing_along_axes(source: Geometry, target: Geometry) -> np.ndarray:
    """The target's voxel spacing (mm) along each source axis (ijk): the spacing of the target
    axis closest in direction to it."""
    alignment = np.abs(source.direction_matrix.T @ target.direction_matrix)  # [source axis, target axis]
    return np.asarray(target.spacing_mm, float)[np.argmax(alignment, axis=1)]


def resample_volume(volume: Volume, target: Geometry, outside_value: float = 0.0) -> Volume:
    """``volume`` on ``target``'s voxels (float32), anti-aliased where ``target`` is coarser."""
    source_spacing = np.asarray(volume.geometry.spacing_mm, float)
    wanted = target_spacing_along_axes(volume.geometry, target)
    sigma_mm = np.sqrt(np.maximum(wanted**2 - source_spacing**2, 0.0)) / 2.0
    image = sitk_image(np.ascontiguousarray(volume.voxels, dtype=np.float32), volume.geometry)
    if np.any(sigma_mm > 0.25 * source_spacing):
        image = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma_mm])
    reference = sitk_image(np.zeros(target.shape_kji, np.float32), target)
    resampled = sitk.Resample(
        image, reference, sitk.Transform(), sitk.sitkLinear, float(outside_value), sitk.sitkFloat32
    )
    return Volume(np.ascontiguousarray(sitk.GetArrayFromImage(resampled)), target, volume.name, volume.stored_dtype)
