"""Lengths and unit vectors along one axis of a tensor (displacements, descriptors)."""

from __future__ import annotations

import torch


def vector_lengths(values: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """L2 lengths of ``values`` along ``dim`` (``torch.linalg.vector_norm``, behind ``F.normalize``
    and ``Tensor.norm``, reduces a short axis such as 3 coordinates or 12 channels far slower on the CPU)."""
    return values.pow(2).sum(dim, keepdim=keepdim).sqrt_()


def unit_vectors(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` divided by their L2 length along ``dim`` (at least 1e-12), as ``F.normalize``."""
    return values / vector_lengths(values, dim, keepdim=True).clamp_(min=1e-12)
