"""A volume resampled onto another grid: any grid at once (:func:`resample_volume`), or an image's
working grid box by box (:class:`WorkingImage`).

Trilinear interpolation (SimpleITK), with Gaussian anti-aliasing along each image axis that the
target grid coarsens: ``sigma = sqrt(target^2 - source^2) / 2`` mm, the blur that brings the
source's resolution to the target's. Outside the source image the voxels take ``outside_value``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import Geometry
from .io.volumes import Volume, sitk_image

FILTER_TRUNCATE = 4.0  # the anti-aliasing filter's reach, in standard deviations


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


class WorkingImage:
    """``volume`` seen on ``grid``, a grid over the same origin and axes with other voxel sizes (an
    isotropic working grid, :meth:`Geometry.working_grid`), computed box by box where it is read.

    Each axis is resampled apart: Gaussian anti-aliasing where ``grid`` is coarser (the same
    ``sigma = sqrt(target^2 - source^2) / 2`` as :func:`resample_volume`, a filter of finite reach in
    source voxels, the border voxel repeated), then linear interpolation. A box is computed from the
    source voxels within that reach of it alone, so any box equals the same box of the whole image.
    """

    def __init__(self, volume: Volume, grid: Geometry) -> None:
        source = volume.geometry
        if not np.allclose(grid.direction_matrix, source.direction_matrix) or not np.allclose(
            grid.origin_lps_mm, source.origin_lps_mm
        ):
            raise ValueError("a working grid keeps the image's origin and axes")
        self.volume, self.geometry = volume, grid
        self._ratio_kji = (np.asarray(grid.spacing_mm) / np.asarray(source.spacing_mm))[::-1]
        self._sigma_kji = np.sqrt(np.maximum(self._ratio_kji**2 - 1.0, 0.0)) / 2.0
        self._reach_kji = np.ceil(FILTER_TRUNCATE * self._sigma_kji).astype(int) + 1

    @property
    def identity(self) -> bool:
        """True when the grid is the image's own (boxes are plain crops)."""
        return bool(np.allclose(self._ratio_kji, 1.0)) and self.geometry.shape_ijk == self.volume.geometry.shape_ijk

    def box(self, lo_kji: np.ndarray, hi_kji: np.ndarray) -> np.ndarray:
        """The working grid's voxels ``[lo, hi)`` (``[k, j, i]``, float32)."""
        lo, hi = np.asarray(lo_kji, int), np.asarray(hi_kji, int)
        if self.identity:
            return self.volume.voxels[tuple(slice(a, b) for a, b in zip(lo, hi))]
        sizes = np.asarray(self.volume.voxels.shape)
        positions = [np.arange(a, b) * ratio for a, b, ratio in zip(lo, hi, self._ratio_kji)]
        first = np.maximum([int(np.floor(p[0])) if len(p) else 0 for p in positions] - self._reach_kji, 0)
        last = np.minimum([int(np.floor(p[-1])) + 2 if len(p) else 0 for p in positions] + self._reach_kji, sizes)
        values = np.asarray(self.volume.voxels[tuple(slice(a, b) for a, b in zip(first, last))], np.float32)
        for axis in range(3):
            if self._sigma_kji[axis] > 0:
                values = ndimage.gaussian_filter1d(values, self._sigma_kji[axis], axis=axis, mode="nearest",
                                                   truncate=FILTER_TRUNCATE)
            index = positions[axis] - first[axis]
            low = np.clip(np.floor(index).astype(int), 0, values.shape[axis] - 1)
            high = np.minimum(low + 1, values.shape[axis] - 1)
            fraction = (index - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            interpolated = np.take(values, low, axis=axis)
            interpolated *= 1.0 - fraction
            above = np.take(values, high, axis=axis)
            above *= fraction
            interpolated += above
            values = interpolated
        return np.ascontiguousarray(values, dtype=np.float32)
