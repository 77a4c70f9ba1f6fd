"""MIND-SSC, the weight-free backbone (Heinrich et al., MICCAI 2013).

MIND-SSC compares image patches around the 12 pairs of voxels of the six-neighbourhood that lie
sqrt(2) apart: for a pair (a, b) the distance is the box-filtered squared difference
``(I(x+a) - I(x+b))^2``; the 12 distances are shifted by their minimum, divided by their mean
(the local variance estimate) and mapped through ``exp(-d)``. The descriptor is computed at a
few scales (the image average-pooled by 1, 2, 4, ...), one pyramid level each, so the fused
similarity sees both fine detail and context. Intensities are HU clipped to ``hu_window``. Each voxel's
12-vector is stored with unit L2 norm (matching compares descriptors by cosine).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.devices import resolve_device
from ..core.errors import BadInputError
from ..core.io.volumes import Volume
from ..core.progress import ProgressFn, no_progress
from .protocol import FeatureLevel, FeaturePyramid

SIX_NEIGHBOURHOOD = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
SSC_PAIRS = [
    (a, b) for a, b in combinations(range(6), 2) if np.sum((SIX_NEIGHBOURHOOD[a] - SIX_NEIGHBOURHOOD[b]) ** 2) == 2
]


def _shifted(padded: torch.Tensor, offset_kji: np.ndarray, pad: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """View of ``padded`` (D+2p, H+2p, W+2p) shifted by ``offset_kji`` voxels."""
    k, j, i = (pad + int(o) for o in offset_kji)
    return padded[k : k + shape[0], j : j + shape[1], i : i + shape[2]]


def mind_ssc(image: torch.Tensor, dilation: int = 1, patch_radius: int = 1) -> torch.Tensor:
    """MIND-SSC of a ``(K, J, I)`` image: a ``(12, K, J, I)`` tensor with values in (0, 1]."""
    shape = tuple(image.shape)
    pad = dilation
    padded = F.pad(image[None, None], (pad,) * 6, mode="replicate")[0, 0]
    offsets_kji = SIX_NEIGHBOURHOOD[:, ::-1] * dilation
    distances = torch.empty((len(SSC_PAIRS), *shape), dtype=image.dtype, device=image.device)
    box = 2 * patch_radius + 1
    for channel, (a, b) in enumerate(SSC_PAIRS):
        squared = (_shifted(padded, offsets_kji[a], pad, shape) - _shifted(padded, offsets_kji[b], pad, shape)) ** 2
        squared = F.pad(squared[None, None], (patch_radius,) * 6, mode="replicate")
        distances[channel] = F.avg_pool3d(squared, box, stride=1)[0, 0]
        del squared
    distances -= distances.min(dim=0, keepdim=True).values
    variance = distances.mean(dim=0, keepdim=True)
    mean_variance = variance.mean()
    variance.clamp_(min=float(mean_variance) * 1e-3 + 1e-12, max=float(mean_variance) * 1e3 + 1e-12)
    distances.div_(variance).neg_().exp_()
    return distances


def _unit_norm_(features: torch.Tensor) -> torch.Tensor:
    """``features`` (C, K, J, I) divided in place by each voxel's L2 norm over the channels."""
    norm = features[0] * features[0]
    for channel in features[1:]:
        norm.addcmul_(channel, channel)
    return features.div_(norm.sqrt_().clamp_(min=1e-12))


class MindFeaturizer:
    """MIND-SSC pyramid: level ``n`` is MIND-SSC of the image average-pooled by ``scales[n]``."""

    name = "mind"
    requires_weights = False

    def __init__(
        self,
        scales: tuple[int, ...] = (1, 2, 4),
        weights: tuple[float, ...] | None = None,
        dilation: int = 1,
        patch_radius: int = 1,
        match_patch_radius: int = 3,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        device: str = "cpu",
    ) -> None:
        if weights is not None and len(weights) != len(scales):
            raise BadInputError(f"MIND: {len(weights)} weights for {len(scales)} scales; give one weight per scale")
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or min(self.scales) < 1:
            raise BadInputError(f"MIND: scales must be pooling factors >= 1, got {list(scales)}")
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(self.scales)
        self.dilation = int(dilation)
        self.patch_radius = int(patch_radius)
        self.match_patch_radius = int(match_patch_radius)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.device = resolve_device(str(device))

    @property
    def config(self) -> dict[str, Any]:
        return {
            "scales": list(self.scales),
            "weights": list(self.weights),
            "dilation": self.dilation,
            "patch_radius": self.patch_radius,
            "match_patch_radius": self.match_patch_radius,
            "hu_window": list(self.hu_window),
        }

    def extract(self, volume: Volume, progress: ProgressFn = no_progress) -> FeaturePyramid:
        low, high = self.hu_window
        image = torch.from_numpy(np.clip(volume.voxels, low, high)).to(self.device)
        image = (image - low) / (high - low)
        levels = []
        for n, (scale, weight) in enumerate(zip(self.scales, self.weights)):
            progress("features", n / len(self.scales), f"MIND-SSC level {n + 1}/{len(self.scales)} (1/{scale})")
            pooled = F.avg_pool3d(image[None, None], scale, stride=scale)[0, 0] if scale > 1 else image
            features = _unit_norm_(mind_ssc(pooled, self.dilation, self.patch_radius)).cpu()
            geometry = volume.geometry.downsampled(scale)
            levels.append(
                FeatureLevel(f"mind_1/{scale}", features, geometry, weight, self.match_patch_radius, unit_norm=True)
            )
        progress("features", 1.0, "MIND-SSC done")
        return FeaturePyramid(levels, volume.geometry, self.name, self.config)
