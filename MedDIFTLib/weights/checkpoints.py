"""Safe checkpoint loading (``torch.load(weights_only=True)``, memory-mapped) and the layout checks.

Every caller (the ``maisi`` backbone, verify, download, import) checks a checkpoint's top-level
layout through :func:`check_layout`, so a wrong file is refused with the same words everywhere.
The messages that say how to fetch missing weights live here too.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

from ..core.errors import BadInputError, MissingWeightsError

ROLES = ("autoencoder", "diffusion_unet")


def fetch_commands(config_name: str | None = None) -> str:
    """The commands that put missing weights in place, for error messages."""
    download = "meddift weights download" + (f" --config {config_name}" if config_name else "")
    return f"fetch them with `{download}` or, if you already have a file, `meddift weights import FILE`"


def load_checkpoint(path: str | os.PathLike, role: str | None = None) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint dict, its layout checked for ``role`` if given.

    Unreadable or unsafe files become :class:`BadInputError`. Files in PyTorch's zip format are
    memory-mapped, so loading does not hold a second copy. torch is imported here, on use, so that
    the weights package stays importable in Slicer's torch-free process.
    """
    import torch

    path = Path(path)
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
    if role is not None:
        check_layout(checkpoint, role, path)
    return checkpoint


def check_layout(checkpoint: dict[str, Any], role: str, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose top-level layout does not fit ``role`` (:class:`BadInputError`).

    Autoencoder: a plain state dict with ``encoder.*`` keys. Diffusion UNet: a dict with a
    ``unet_state_dict`` state dict and a positive ``scale_factor`` (MAISI's latent scaling).
    """
    if role not in ROLES:
        raise ValueError(f"unknown checkpoint role {role!r}; one of {', '.join(ROLES)}")
    has_encoder = any(str(key).startswith("encoder.") for key in checkpoint)
    if role == "autoencoder":
        if "unet_state_dict" in checkpoint:
            raise BadInputError(
                f"{path}: this is a diffusion UNet checkpoint (it has unet_state_dict), not an autoencoder state dict"
            )
        if not has_encoder:
            raise BadInputError(f"{path}: not an autoencoder state dict (no encoder.* keys)")
        return
    if "unet_state_dict" not in checkpoint:
        found = "an autoencoder state dict" if has_encoder else "a dict"
        keys = ", ".join(sorted(map(str, checkpoint))[:8])
        raise BadInputError(
            f"{path}: found {found}, not a MAISI diffusion UNet checkpoint "
            f"(a dict with unet_state_dict and scale_factor; top-level keys: {keys})"
        )
    if not isinstance(checkpoint["unet_state_dict"], dict):
        raise BadInputError(f"{path}: unet_state_dict is not a state dict")
    if "scale_factor" not in checkpoint:
        raise BadInputError(f"{path}: the checkpoint has no scale_factor (the latent scaling of MAISI)")
    try:
        scale_factor = scale_factor_of(checkpoint)
    except (TypeError, ValueError, IndexError):
        scale_factor = math.nan
    if not math.isfinite(scale_factor) or scale_factor <= 0:
        raise BadInputError(f"{path}: scale_factor {checkpoint['scale_factor']!r} is not a positive number")


def scale_factor_of(checkpoint: dict[str, Any]) -> float:
    """The latent scaling stored in a diffusion UNet checkpoint (a number or a one-element tensor)."""
    value = checkpoint["scale_factor"]
    if hasattr(value, "reshape"):
        value = value.reshape(-1)[0]
    return float(value)


def describe_checkpoint(path: str | os.PathLike, role: str) -> str:
    """Open a checkpoint safely, check its layout for ``role`` and summarise it in one line."""
    checkpoint = load_checkpoint(path, role)
    if role == "autoencoder":
        return f"autoencoder state dict, {len(checkpoint)} tensors"
    return f"diffusion UNet checkpoint, {len(checkpoint['unet_state_dict'])} tensors"
