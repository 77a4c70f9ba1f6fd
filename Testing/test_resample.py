"""Resampling onto other grids (``MedDIFTLib.core.resample``): an image's working grid read box by box
equals the whole, anti-aliased where coarser, and agrees with SimpleITK's resampling of the whole."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.io import Volume
from MedDIFTLib.core.resample import WorkingImage, resample_volume


def _volume(spacing_mm: tuple[float, float, float], shape_ijk=(40, 36, 14)) -> Volume:
    noise = np.random.default_rng(1).normal(size=shape_ijk[::-1])
    voxels = (ndimage.gaussian_filter(noise, 1.5) * 3000.0).astype(np.float32)
    rotation = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return Volume(voxels, Geometry.create(shape_ijk, spacing_mm, (12.0, -3.0, 40.0), rotation))


@pytest.mark.parametrize("spacing_mm, working_mm", [((1.0, 1.0, 3.0), 1.25), ((1.5, 1.5, 4.0), None)])
def test_any_box_of_the_working_grid_equals_the_same_box_of_the_whole(spacing_mm, working_mm):
    volume = _volume(spacing_mm)
    image = WorkingImage(volume, volume.geometry.working_grid(working_mm))
    shape = np.asarray(image.geometry.shape_kji)
    whole = image.box(np.zeros(3, int), shape)
    assert whole.shape == tuple(shape)
    for lo, hi in (([0, 0, 0], [5, 7, 9]), ([3, 10, 20], [11, 17, 31]), (shape - [4, 6, 5], shape)):
        box = image.box(np.asarray(lo), np.asarray(hi))
        np.testing.assert_array_equal(box, whole[tuple(slice(a, b) for a, b in zip(lo, hi))])


@pytest.mark.parametrize("spacing_mm, working_mm", [((1.0, 1.0, 3.0), 1.25), ((1.5, 1.5, 4.0), None)])
def test_the_working_grid_agrees_with_simpleitks_resampling_of_the_whole(spacing_mm, working_mm):
    """Same linear interpolation where the grid is finer; the same anti-aliasing width where it is
    coarser (a finite filter here, SimpleITK's recursive one there), in world mm on a rotated grid."""
    volume = _volume(spacing_mm)
    grid = volume.geometry.working_grid(working_mm)
    ours = WorkingImage(volume, grid).box(np.zeros(3, int), np.asarray(grid.shape_kji))
    theirs = resample_volume(volume, grid).voxels
    inner = (slice(2, -2),) * 3  # the filters treat the border differently
    assert np.abs(ours - theirs)[inner].mean() < 0.01 * np.abs(theirs).mean()


def test_the_images_own_grid_is_read_as_it_is_and_other_origins_are_refused():
    volume = _volume((1.0, 1.0, 1.0))
    image = WorkingImage(volume, volume.geometry)
    assert image.identity
    np.testing.assert_array_equal(image.box(np.array([1, 2, 3]), np.array([4, 5, 6])), volume.voxels[1:4, 2:5, 3:6])
    shifted = Geometry.create(volume.geometry.shape_ijk, volume.geometry.spacing_mm, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="origin"):
        WorkingImage(volume, shifted)
