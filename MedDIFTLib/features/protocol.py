"""The backbone contract: a :class:`Featurizer` turns a volume into a :class:`FeaturePyramid`.

Each level holds a ``(C, K, J, I)`` float tensor on its own grid (a :class:`Geometry` whose
``affine_ijk_to_lps`` maps level voxels to LPS mm) and a fusion weight. Matching reads only
this contract, never a backbone's internals.

A level with a ``filler`` (:mod:`.regions`, from ``extract_regions`` of a backbone with local
descriptors) is valid only where it has been filled. Its values are read through its readers,
which fill what they read and no more: :meth:`FeatureLevel.values` (the whole level),
:meth:`FeatureLevel.boxes` (boxes of voxels) and :meth:`FeatureLevel.samples` (trilinear samples).
``FeatureLevel.features`` is the storage they read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from ..core.geometry import Geometry, box_slices
from ..core.io.volumes import Volume
from ..core.progress import ProgressFn, no_progress
from ..grid.sampling import sample_stored, windows
from .regions import RegionFiller


@dataclass
class FeatureLevel:
    """One level: ``features`` is ``(C, K, J, I)``; ``geometry`` places its voxels in LPS mm.

    ``weight`` is the level's share in the fused similarity. ``patch_radius`` (level voxels) is
    the backbone's advice for matching: average the cosine over a (2r+1)^3 patch. Descriptors
    with a wide receptive field (diffusion features) need 0; very local ones (MIND) need more.
    ``unit_norm`` says every voxel's descriptor already has unit L2 norm, so matching can take the
    stored values as they are instead of normalising each window it reads. ``filler`` (None: the
    tensor is complete) computes boxes of the tensor on demand: read the values through
    :meth:`values`, :meth:`boxes` or :meth:`samples`, never ``features`` directly.
    """

    name: str
    features: torch.Tensor
    geometry: Geometry
    weight: float = 1.0
    patch_radius: int = 0
    unit_norm: bool = False
    filler: RegionFiller | None = None

    def __post_init__(self) -> None:
        if self.features.dim() != 4 or tuple(self.features.shape[1:]) != self.geometry.shape_kji:
            raise ValueError(
                f"level {self.name}: features {tuple(self.features.shape)} do not fit grid {self.geometry.shape_kji}"
            )

    @property
    def channels(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    @property
    def filled_bytes(self) -> int:
        """Bytes of the tensor computed so far (all of it when complete)."""
        return self.nbytes if self.complete else int(self.nbytes * self.filler.filled_share)

    @property
    def complete(self) -> bool:
        return self.filler is None or self.filler.done

    def ensure_boxes(self, lo_ijk: np.ndarray, hi_ijk: np.ndarray) -> None:
        """Make the level valid in the voxel boxes ``[lo, hi)`` (B, 3 ``ijk``; clipped to the grid)."""
        if not self.complete:
            self.filler.ensure_boxes(self.features, lo_ijk, hi_ijk)

    def values(self) -> torch.Tensor:
        """The whole ``(C, K, J, I)`` tensor, filled first."""
        self.fill()
        return self.features

    def boxes(self, start_ijk: np.ndarray, sizes_ijk: list[int]) -> torch.Tensor:
        """Float32 ``(B, C, K, J, I)`` boxes ``sizes_ijk`` voxels long from each ``start_ijk`` row
        (B, 3; :func:`~MedDIFTLib.grid.sampling.windows`), filled first where they lie."""
        start = np.asarray(start_ijk, int).reshape(-1, 3)
        self.ensure_boxes(start, start + np.asarray(sizes_ijk))
        return windows(self.features, start, sizes_ijk)

    def samples(self, ijk: torch.Tensor, taps_ijk: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 trilinear samples ``(N, C)`` at the continuous voxel coordinates ``ijk``
        (B, n, 3), or at each of them plus each whole-voxel tap offset of ``taps_ijk`` (T, 3):
        N = B * n (* T) in that order. Filled first in one box per row ``b`` around its reads."""
        rows = ijk.reshape(len(ijk), -1, 3)
        if not self.complete:
            reach = 0 if taps_ijk is None else int(taps_ijk.abs().max())
            corners = rows.cpu().double().numpy()
            self.ensure_boxes(np.floor(corners.min(axis=1)) - reach - 1, np.floor(corners.max(axis=1)) + reach + 3)
        positions = rows if taps_ijk is None else rows[:, :, None, :] + taps_ijk[None, None]
        return sample_stored(self.features, positions.reshape(-1, 3))

    def fill(self) -> None:
        """Make the whole level valid."""
        if not self.complete:
            self.filler.fill(self.features)

    def fill_some(self, voxels: int) -> None:
        """Make about ``voxels`` working-grid voxels more of the level valid (see
        :meth:`.regions.RegionFiller.fill_some`)."""
        if not self.complete:
            self.filler.fill_some(self.features, voxels)


@dataclass
class FeaturePyramid:
    """Descriptor levels of one volume; ``image_geometry`` is the original image grid."""

    levels: list[FeatureLevel]
    image_geometry: Geometry
    backbone: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)

    @property
    def filled_bytes(self) -> int:
        return sum(level.filled_bytes for level in self.levels)

    @property
    def complete(self) -> bool:
        return all(level.complete for level in self.levels)

    @property
    def finest_level(self) -> int:
        """Index of the level with the smallest voxels (by volume)."""
        return int(np.argmin([np.prod(level.geometry.spacing_mm) for level in self.levels]))

    def fill(self, progress: ProgressFn = no_progress) -> FeaturePyramid:
        """This pyramid with every level valid (filled in place)."""
        for n, level in enumerate(self.levels):
            if not level.complete:
                progress("features", n / len(self.levels), f"{level.name}: the rest of the volume")
                level.fill()
        return self

    def fill_some(self, voxels: int) -> bool:
        """Fill about ``voxels`` more of the coarsest incomplete level (the one every search reads
        widest, and the cheapest to complete); False when all were complete."""
        incomplete = [level for level in self.levels if not level.complete]
        if not incomplete:
            return False
        min(incomplete, key=lambda level: level.features[0].numel()).fill_some(voxels)
        return True

    def cropped(self, lo_ijk: np.ndarray, hi_ijk: np.ndarray) -> FeaturePyramid:
        """The pyramid of the image voxels ``[lo, hi)`` (ijk): each level's voxels that every read inside
        that box touches (one voxel more each side, within the level), filled there and copied, so the
        values are the whole volume's; its ``image_geometry`` is the box."""
        box = self.image_geometry.box(lo_ijk, hi_ijk)
        corners_lps_mm = self.image_geometry.box_corners_lps(lo_ijk, hi_ijk)
        levels = []
        for level in self.levels:
            level_lo, level_hi = level.geometry.covering_box(corners_lps_mm, margin_voxels=1)
            level.ensure_boxes(level_lo[None], level_hi[None])
            features = level.features[(slice(None), *box_slices(level_lo, level_hi))].clone()
            levels.append(replace(level, features=features, geometry=level.geometry.box(level_lo, level_hi),
                                  filler=None))
        return FeaturePyramid(levels, box, self.backbone, dict(self.config))

    def to(self, device: torch.device | str) -> FeaturePyramid:
        """A copy on ``device`` (filled first: a copy could not be filled any more)."""
        self.fill()
        levels = [replace(level, features=level.features.to(device)) for level in self.levels]
        return FeaturePyramid(levels, self.image_geometry, self.backbone, dict(self.config))


class Featurizer(Protocol):
    """A backbone. ``config`` must identify the features fully (it keys the feature cache).

    ``requires_weights`` tells whether it needs pretrained files; such a backbone also offers
    ``weights_status(**options) -> (present, message)`` and raises ``MissingWeightsError`` when
    built without them.
    """

    name: str
    requires_weights: bool

    @property
    def config(self) -> dict[str, Any]: ...

    def extract(self, volume: Volume, progress: ProgressFn = no_progress) -> FeaturePyramid: ...


def region_extractor(featurizer: Featurizer, device: torch.device | str) -> Callable[[Volume], FeaturePyramid] | None:
    """The featurizer's ``extract_regions`` (a pyramid computed where it is read) when it offers one and
    runs on the CPU; None otherwise (extract the whole volume)."""
    extract_regions = getattr(featurizer, "extract_regions", None)
    return extract_regions if torch.device(device).type == "cpu" else None
