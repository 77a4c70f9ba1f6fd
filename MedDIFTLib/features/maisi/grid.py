"""Where MAISI's voxels lie in the world: the model grid, the image resampled onto it, the level grids.

Model grid: the image axes permuted/flipped to the closest R, A, S order (MAISI was trained on
RAS-oriented arrays; direction cosines are kept, so oblique scans stay oblique), a given spacing
(default: the image's own), each size the smallest multiple of the networks' down-sampling
covering the image (never shrunk), centred on it.

Level geometry (exact voxel -> LPS map). A down-sampling stage maps coarse voxel ``n`` to fine
voxel ``2n + c``, the centre of its receptive field: ``c = 1`` in the autoencoder (one voxel of
padding at the high end, then a 3x3x3 stride-2 convolution without padding reads fine voxels
2n..2n+2), ``c = 0`` in the v1 UNet (3x3x3 stride-2 convolution with padding 1: 2n-1..2n+1) and
``c = 0.5`` in the v2 UNet (2x2x2 average pooling). Latent voxel ``n`` therefore sits at model
voxel ``4n + 3``, not at ``4n + 1.5`` as average pooling would place it. An up-block output is
concatenated with the down-path skip features of its resolution, so it is placed on that grid (in v1
the nearest-neighbour upsampled part alone would sit half a fine voxel lower; the network aligns it
with the skip features). The down-path centres are measured on MONAI's own modules in
``Testing/test_maisi_backbone.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.errors import BadInputError
from ...core.geometry import Geometry
from ...core.io.volumes import Volume
from ...core.resample import resample_volume

# LPS direction of the model axes R, A, S (rows)
RAS_IN_LPS = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])


def closest_ras_axes(direction_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permutation ``p`` and signs ``s`` such that model axis ``a`` (R, A, S) is image axis ``p[a]`` times ``s[a]``."""
    alignment = RAS_IN_LPS @ np.asarray(direction_matrix, float)  # [model axis, image axis]
    permutation = np.full(3, -1)
    used: set[int] = set()
    for flat in np.argsort(-np.abs(alignment), axis=None, kind="stable"):
        model_axis, image_axis = divmod(int(flat), 3)
        if permutation[model_axis] < 0 and image_axis not in used:
            permutation[model_axis] = image_axis
            used.add(image_axis)
    signs = np.where(alignment[np.arange(3), permutation] < 0, -1.0, 1.0)
    return permutation, signs


def model_grid(image: Geometry, spacing_mm: float | tuple[float, float, float] | None, multiple: int) -> Geometry:
    """The grid the networks see: RAS-ordered axes, ``spacing_mm`` (per model axis R, A, S; default: the
    image's own), sizes the smallest multiples of ``multiple`` covering the image, centred on it.
    """
    permutation, signs = closest_ras_axes(image.direction_matrix)
    direction = image.direction_matrix[:, permutation] * signs[None, :] + 0.0  # + 0.0: no negative zeros
    if spacing_mm is None:
        spacing = np.asarray(image.spacing_mm, float)[permutation]
    else:
        spacing = np.broadcast_to(np.asarray(spacing_mm, float), (3,)).astype(float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise BadInputError(f"model spacing must be positive mm, got {spacing.tolist()}")
    corners_ijk = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in image.shape_ijk])))
    centre = image.ijk_to_lps(((np.asarray(image.shape_ijk) - 1) / 2.0)[None])[0]
    along_axes = (image.ijk_to_lps(corners_ijk) - centre) @ direction
    cells = np.ceil((along_axes.max(axis=0) - along_axes.min(axis=0)) / spacing - 1e-6)
    shape = (np.maximum(np.ceil(cells / multiple), 1) * multiple).astype(int)
    origin = centre - direction @ ((shape - 1) / 2.0 * spacing)
    return Geometry.create(shape, spacing, origin, direction)


def model_image(volume: Volume, grid: Geometry, hu_window: tuple[float, float]) -> np.ndarray:
    """``volume`` resampled onto ``grid`` (:func:`MedDIFTLib.core.resample.resample_volume`: linear,
    anti-aliased where the grid is coarser; outside the image is air), HU clipped to ``hu_window``
    and scaled to [0, 1]: ``(I, J, K)`` float32."""
    low, high = hu_window
    resampled = resample_volume(volume, grid, outside_value=low).voxels
    normalised_kji = (np.clip(resampled, low, high) - low) / (high - low)
    return np.ascontiguousarray(normalised_kji.transpose(2, 1, 0), dtype=np.float32)


def describe_grid(grid: Geometry) -> str:
    """``"64x64x32 model grid (2x2x2.5 mm)"``, for messages."""
    size = "x".join(str(n) for n in grid.shape_ijk)
    spacing = "x".join(f"{s:.3g}" for s in grid.spacing_mm)
    return f"{size} model grid ({spacing} mm)"


@dataclass(frozen=True)
class LevelLayout:
    """Where the output of ``up_blocks[block]`` lies: level voxel ``n`` = model voxel ``factor * n + offset``."""

    block: int
    channels: int
    factor: int
    offset: float

    @property
    def name(self) -> str:
        return f"maisi_up{self.block}_1/{self.factor}"

    def geometry(self, model: Geometry) -> Geometry:
        """This level's grid in LPS mm, derived exactly from the model grid."""
        shape = [n // self.factor for n in model.shape_ijk]
        origin = model.ijk_to_lps(np.full((1, 3), self.offset))[0]
        return Geometry.create(shape, np.asarray(model.spacing_mm) * self.factor, origin, model.direction_matrix)


def level_layouts(config: dict[str, Any]) -> list[LevelLayout]:
    """Resolution and position of every UNet up-block output, from the network configuration."""
    encoder_stages = len(config["autoencoder"]["num_channels"]) - 1
    latent_factor = 2**encoder_stages
    latent_offset = float(sum(2**stage for stage in range(encoder_stages)))  # c = 1 per encoder stage
    unet_args = config["diffusion_unet"]
    unet_centre = 0.5 if unet_args["resblock_updown"] else 0.0
    channels = list(reversed(unet_args["num_channels"]))
    layouts = []
    for block in range(len(channels)):
        level = max(len(channels) - 2 - block, 0)
        offset_latent = sum(2**stage * unet_centre for stage in range(level))
        layouts.append(
            LevelLayout(block, channels[block], latent_factor * 2**level, latent_offset + latent_factor * offset_latent)
        )
    return layouts


def model_size_multiple(config: dict[str, Any]) -> int:
    """Model-grid sizes must be multiples of this (autoencoder and UNet down-sampling together)."""
    return 2 ** (len(config["autoencoder"]["num_channels"]) - 1) * 2 ** (
        len(config["diffusion_unet"]["num_channels"]) - 1
    )
