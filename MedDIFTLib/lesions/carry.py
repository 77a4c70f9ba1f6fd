"""Carry a baseline labelmap onto the follow-up grid through a displacement field.

The field follows the ITK convention with fixed = follow-up, moving = baseline: a follow-up voxel
centre ``x`` (LPS mm) corresponds to the baseline point ``x + u(x)``. Each label's indicator is
sampled there (trilinear) and a voxel takes the label whose indicator is largest, when at least
one half: label-preserving (no value is ever mixed into another) and without the staircase of a
nearest-neighbour pull. Work is done slab by slab and, per label, only near its baseline box.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..core.geometry import Geometry
from ..grid.displacement_field import DisplacementField
from ..grid.slabs import slab_lps, slabs


def _label_boxes(labelmap: np.ndarray, labels: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per label, its ``[k, j, i]`` box in the baseline grid grown by one voxel (low, high inclusive)."""
    boxes = {}
    upper = np.asarray(labelmap.shape) - 1
    for label, found in zip(range(1, int(labelmap.max()) + 1), ndimage.find_objects(labelmap)):
        if found is not None and label in labels:
            low = np.maximum([s.start - 1 for s in found], 0)
            high = np.minimum([s.stop for s in found], upper)
            boxes[label] = (low, high)
    return boxes


def carry_labelmap(labelmap: np.ndarray, baseline_geometry: Geometry, labels: list[int],
                   field: DisplacementField) -> np.ndarray:
    """The baseline ``labelmap`` (``[k, j, i]`` int) pulled onto ``field.geometry`` (the follow-up grid)."""
    geometry = field.geometry
    boxes = _label_boxes(labelmap, labels)
    carried = np.zeros(geometry.shape_kji, np.int32)
    lps_to_baseline = np.linalg.inv(baseline_geometry.affine_ijk_to_lps)
    for k_start, k_stop in slabs(geometry):
        positions = slab_lps(geometry, k_start, k_stop)
        positions += torch.from_numpy(field.displacement_lps_mm[k_start:k_stop].reshape(-1, 3)).double()
        baseline_kji = (positions.numpy() @ lps_to_baseline[:3, :3].T + lps_to_baseline[:3, 3])[:, ::-1]
        best = np.full(len(baseline_kji), 0.5, np.float32)
        chosen = np.zeros(len(baseline_kji), np.int32)
        for label, (low, high) in boxes.items():
            near = np.flatnonzero(np.all((baseline_kji >= low - 0.5) & (baseline_kji <= high + 0.5), axis=1))
            if len(near) == 0:
                continue
            box = (labelmap[low[0]:high[0] + 1, low[1]:high[1] + 1, low[2]:high[2] + 1] == label).astype(np.float32)
            values = ndimage.map_coordinates(box, (baseline_kji[near] - low).T, order=1, mode="constant", cval=0.0)
            wins = values >= best[near]
            best[near[wins]] = values[wins]
            chosen[near[wins]] = label
        carried[k_start:k_stop] = chosen.reshape(k_stop - k_start, *geometry.shape_kji[1:])
    return carried
