"""Features filled on demand, box by box, for backbones whose descriptors are local (MIND).

A :class:`RegionFiller` belongs to one :class:`~.protocol.FeatureLevel`: the level's tensor is
allocated full size but holds valid values only where the filler has computed them. It keeps a
map of filled blocks (about ``BLOCK`` working-grid voxels per axis: ``BLOCK // scale`` voxels of a
level pooled by ``scale``, at least ``MIN_BLOCK``) and, asked for a box, computes the bounding box
of the blocks still missing there, grown by ``READ_AHEAD`` blocks, in one call of the backbone's
``compute``. A backbone offers this only when a voxel's descriptor depends on the image near it
alone, so that a box computed on its own equals the same box of the whole-volume extraction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

BLOCK = 8
MIN_BLOCK = 2
READ_AHEAD = 1  # blocks computed beyond a request on each side, so a dragged point finds them ready

RegionCompute = Callable[[np.ndarray, np.ndarray], torch.Tensor]
"""``compute(lo_kji, hi_kji)``: the ``(C, ...)`` features of the level box ``[lo, hi)``."""


class RegionFiller:
    """Fills a level's ``(C, K, J, I)`` tensor where it is read; ``done`` once all of it is filled.

    ``scale``: the level's voxel size in working-grid voxels (its pooling factor); it sets the
    block size (unless ``block`` gives it, level voxels) and the cost of a voxel in :meth:`fill_some`.
    ``around_filled``: where the filled blocks inside a request's missing box form one box (a wider
    box asked for around a narrower one), compute the missing box without them, in up to six boxes.
    """

    def __init__(self, compute: RegionCompute, shape_kji: tuple[int, int, int], scale: int = 1,
                 block: int | None = None, around_filled: bool = False) -> None:
        self._compute: RegionCompute | None = compute
        self.around_filled = bool(around_filled)
        self.shape_kji = np.asarray(shape_kji, int)
        self.scale = int(scale)
        self.block = max(MIN_BLOCK, BLOCK // self.scale) if block is None else int(block)
        self._filled = np.zeros(-(-self.shape_kji // self.block), bool)

    @property
    def done(self) -> bool:
        return bool(self._filled.all())

    @property
    def filled_share(self) -> float:
        return float(self._filled.mean())

    def ensure(self, features: torch.Tensor, lo_kji: np.ndarray, hi_kji: np.ndarray, ahead: int = READ_AHEAD) -> None:
        """Make ``features[:, lo:hi]`` valid (the box is clipped to the grid), computing ``ahead``
        blocks more on each side of the missing ones."""
        lo = np.clip(np.asarray(lo_kji, int), 0, self.shape_kji)
        hi = np.clip(np.asarray(hi_kji, int), 0, self.shape_kji)
        if np.any(hi <= lo):
            return
        block = self.block
        first, last = lo // block, -(-hi // block)
        missing = np.argwhere(~self._filled[tuple(slice(a, b) for a, b in zip(first, last))])
        if not len(missing):
            return
        grid = np.asarray(self._filled.shape)
        block_lo = np.maximum(first + missing.min(axis=0) - ahead, 0)
        block_hi = np.minimum(first + missing.max(axis=0) + 1 + ahead, grid)
        parts = _around_filled(self._filled, block_lo, block_hi) if self.around_filled else [(block_lo, block_hi)]
        for part_lo, part_hi in parts:
            box_lo = part_lo * block
            box_hi = np.minimum(part_hi * block, self.shape_kji)
            box = tuple(slice(int(a), int(b)) for a, b in zip(box_lo, box_hi))
            features[(slice(None), *box)] = self._compute(box_lo, box_hi).to(features.device, features.dtype)
        self._filled[tuple(slice(int(a), int(b)) for a, b in zip(block_lo, block_hi))] = True
        if self.done:
            self._compute = None  # lets go of what it computed from

    def ensure_boxes(self, features: torch.Tensor, lo_ijk: np.ndarray, hi_ijk: np.ndarray) -> None:
        """:meth:`ensure` for each row of ``lo_ijk`` / ``hi_ijk`` (B, 3), voxel index order ``ijk``
        (as the matcher holds them), upper bounds exclusive."""
        for lo, hi in zip(np.asarray(lo_ijk, int), np.asarray(hi_ijk, int)):
            self.ensure(features, lo[::-1], hi[::-1])

    def fill(self, features: torch.Tensor) -> None:
        """Make the whole tensor valid."""
        self.ensure(features, np.zeros(3, int), self.shape_kji)

    def fill_some(self, features: torch.Tensor, voxels: int) -> None:
        """Fill about ``voxels`` more working-grid voxels (``voxels / scale**3`` level voxels, at
        least one block), from the first missing block in raster order (k slowest) along rows of
        whole i lines, without read-ahead: one bounded step of filling the rest of the level behind
        the searches."""
        missing = np.argwhere(~self._filled)
        if not len(missing):
            return
        k, j, _ = missing[0]
        block = self.block
        rows = max(1, int(voxels) // (self.scale**3 * block * block * int(self.shape_kji[2])))
        lo = np.array([k, j, 0]) * block
        hi = np.array([k + 1, j + rows, self._filled.shape[2]]) * block
        self.ensure(features, lo, hi, ahead=0)


def _around_filled(filled: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes of blocks ``[lo, hi)`` covering the box without its filled blocks when these form one box
    (up to six: before and after it along k, then along j within its k range, then along i within
    its k and j ranges); the whole box otherwise."""
    inside = filled[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    where = np.argwhere(inside)
    if not len(where):
        return [(lo, hi)]
    core_lo, core_hi = lo + where.min(axis=0), lo + where.max(axis=0) + 1
    if len(where) != np.prod(core_hi - core_lo):
        return [(lo, hi)]
    parts = []
    outer_lo, outer_hi = lo.copy(), hi.copy()
    for axis in range(3):
        before_hi, after_lo = outer_hi.copy(), outer_lo.copy()
        before_hi[axis], after_lo[axis] = core_lo[axis], core_hi[axis]
        parts += [(outer_lo.copy(), before_hi), (after_lo, outer_hi.copy())]
        outer_lo[axis], outer_hi[axis] = core_lo[axis], core_hi[axis]
    return [(a, b) for a, b in parts if np.all(b > a)]
