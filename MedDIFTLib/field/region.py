"""Where the field is fitted: the automatic region of the fixed image, or a user mask.

The automatic region is the scanned object without the empty background around it, for any
modality and field of view. Background is what is both *dark* (a local mean in the lowest
``DARK_SHARE`` of the image's robust intensity range) and *uniform* (a local standard deviation
below ``FLAT_SHARE`` of that range), connected to the image border: air around a body in CT,
no-signal areas in MRI. Lungs are dark but full of vessels, so they stay inside even where they
touch the border of a crop; no Hounsfield threshold is assumed. The statistics are taken on cells
of about ``CELL_MM`` and windows of ``WINDOW_CELLS`` cells, so the cost follows the cell count.
The largest part of what remains, after an opening that cuts thin bridges (a scanner table, the
rim of the reconstruction circle), grown by one cell, is the region. An image with no such
background (a crop inside the body, most MRI fields of view) is all region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.volumes import Volume
from ..grid.cells import pool, pool_factors, pooled_grid

CELL_MM = 3.0
WINDOW_CELLS = 3
DARK_SHARE = 0.1
FLAT_SHARE = 0.02
OPENING_CELLS = 2


@dataclass(frozen=True)
class Region:
    """A binary mask ``[k, j, i]`` on a grid; ``contains`` looks points up (nearest voxel)."""

    inside: np.ndarray
    geometry: Geometry

    def contains(self, points_lps_mm: np.ndarray) -> np.ndarray:
        ijk = np.round(self.geometry.lps_to_ijk(np.asarray(points_lps_mm, float).reshape(-1, 3))).astype(int)
        valid = np.all((ijk >= 0) & (ijk < np.asarray(self.geometry.shape_ijk)), axis=1)
        result = np.zeros(len(ijk), bool)
        result[valid] = self.inside[ijk[valid, 2], ijk[valid, 1], ijk[valid, 0]]
        return result

    @property
    def fraction(self) -> float:
        return float(self.inside.mean())

    @staticmethod
    def whole(geometry: Geometry) -> Region:
        return Region(np.ones(geometry.shape_kji, bool), geometry)


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` connected to a face of the array."""
    labels, _ = ndimage.label(mask)
    faces = [labels[[0, -1]], labels[:, [0, -1]], labels[:, :, [0, -1]]]
    touching = np.unique(np.concatenate([face.ravel() for face in faces]))
    return np.isin(labels, touching[touching > 0])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def automatic_region(volume: Volume) -> Region:
    """The region of ``volume`` (see the module notes), on cells of about ``CELL_MM``."""
    geometry = volume.geometry
    factors = pool_factors(geometry, CELL_MM)
    voxels = torch.from_numpy(volume.voxels)[None]
    mean = pool(voxels, factors)[0].double().numpy()
    mean_square = pool(voxels.double() * voxels.double(), factors)[0].numpy()
    cells = pooled_grid(geometry, factors)
    local_mean = ndimage.uniform_filter(mean, WINDOW_CELLS, mode="nearest")
    local_square = ndimage.uniform_filter(mean_square, WINDOW_CELLS, mode="nearest")
    local_std = np.sqrt(np.maximum(local_square - local_mean**2, 0.0))
    low, high = np.percentile(mean, [0.5, 99.5])
    spread = max(float(high - low), 1e-6)
    empty = (local_mean < low + DARK_SHARE * spread) & (local_std < FLAT_SHARE * spread)
    background = _border_connected(ndimage.binary_opening(empty, iterations=OPENING_CELLS))
    content = ~background
    core = _largest_component(ndimage.binary_opening(content, iterations=OPENING_CELLS))
    if core.any():
        content &= ndimage.binary_dilation(core, iterations=OPENING_CELLS)
    inside = ndimage.binary_dilation(content, iterations=1)
    if not inside.any():
        return Region.whole(geometry)
    return Region(inside, cells)


def region_from_mask(mask: Volume) -> Region:
    """A user mask: non-zero voxels are inside."""
    inside = mask.voxels != 0
    if not inside.any():
        raise BadInputError(f"{mask.name or 'mask'}: the mask is empty")
    return Region(inside, mask.geometry)
