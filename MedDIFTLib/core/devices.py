"""Compute devices: ``auto | cpu | cuda | cuda:N``, and out-of-memory turned into a clear error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import BadInputError, OutOfMemoryError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise BadInputError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    """True for the CPU's or a GPU's out-of-memory failure, however torch or the allocator words it."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def out_of_memory_as_error(device: torch.device) -> Iterator[None]:
    """Re-raise the device's out-of-memory failure as :class:`OutOfMemoryError` with advice."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"out of memory on {device}: use a coarser model grid or a smaller search radius, or run on the CPU"
        ) from None
    except MemoryError:
        raise OutOfMemoryError(
            "out of memory on the CPU: use a smaller search radius or memory budget, or crop the volumes"
        ) from None
