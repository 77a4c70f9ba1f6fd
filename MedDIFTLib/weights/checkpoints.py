"""Safe checkpoint loading (``torch.load(weights_only=True)``, memory-mapped) and layout checks.

The messages that say how to fetch missing weights live here too, so every stage words them alike.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from ..core.errors import BadInputError, MissingWeightsError


def fetch_commands(config_name: str | None = None) -> str:
    """The commands that put missing weights in place, for error messages."""
    download = "meddift weights download" + (f" --config {config_name}" if config_name else "")
    return f"fetch them with `{download}` or, if you already have a file, `meddift weights import FILE`"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint dict; unreadable files become :class:`BadInputError`.

    Files in PyTorch's zip format are memory-mapped, so loading does not hold a second copy.
    torch is imported here, on use, so that the weights registry stays importable in Slicer's
    torch-free process.
    """
    import torch

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise MissingWeightsError(f"{path}: no such file; {fetch_commands()}") from None
    zip_format = magic == b"PK\x03\x04"
    if not zip_format and not magic.startswith(b"\x80"):
        raise BadInputError(f"{path}: not a PyTorch checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Unsupported global" in text or "can still be loaded" in text:
            raise BadInputError(
                f"{path}: holds Python objects besides tensors and plain values; not loaded (weights_only=True)"
            ) from None
        raise BadInputError(f"{path}: not a PyTorch checkpoint") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from None
    if not isinstance(checkpoint, dict):
        raise BadInputError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


def describe_checkpoint(path: str | os.PathLike, role: str) -> str:
    """Open a checkpoint safely and check its top-level layout for ``role``; a one-line summary.

    Autoencoder: a plain state dict with ``encoder.*`` keys. Diffusion UNet: a dict with
    ``unet_state_dict`` (and ``scale_factor``). Raises :class:`BadInputError` otherwise.
    """
    checkpoint = load_checkpoint(Path(path))
    if role == "autoencoder":
        if "unet_state_dict" in checkpoint:
            raise BadInputError(
                f"{path}: this is a diffusion UNet checkpoint (it has unet_state_dict), not an autoencoder"
            )
        if not any(str(key).startswith("encoder.") for key in checkpoint):
            raise BadInputError(f"{path}: not an autoencoder state dict (no encoder.* keys)")
        return f"autoencoder state dict, {len(checkpoint)} tensors"
    if "unet_state_dict" not in checkpoint:
        raise BadInputError(
            f"{path}: not a MAISI diffusion UNet checkpoint (expected a dict with unet_state_dict; "
            f"top-level keys: {', '.join(sorted(map(str, checkpoint))[:8])})"
        )
    return f"diffusion UNet checkpoint, {len(checkpoint['unet_state_dict'])} tensors"
