"""The MAISI networks (MONAI ``AutoencoderKlMaisi`` and ``DiffusionModelUNetMaisi``) and their noise scheduler,
built from a configuration and loaded strictly from checkpoints in the official layouts.

A checkpoint's top-level layout is checked by :func:`MedDIFTLib.weights.load_checkpoint`; here
its keys and tensor shapes must fit the configured network exactly (``strict=True``), and a
mismatch names the keys (and which configuration the file looks like it belongs to).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from ...core.errors import BadInputError
from ...weights import load_checkpoint, scale_factor_of


def _network_classes() -> tuple[type, type]:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    return AutoencoderKlMaisi, DiffusionModelUNetMaisi


def _check_arguments(network_class: type, arguments: dict[str, Any], section: str) -> None:
    """Every constructor argument must be written out (several MONAI defaults differ from MAISI's)."""
    parameters = [name for name in inspect.signature(network_class.__init__).parameters if name != "self"]
    missing = [name for name in parameters if name not in arguments]
    unknown = [name for name in arguments if name not in parameters]
    if missing or unknown:
        details = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(unknown)}" if unknown else "",
            )
            if part
        )
        raise BadInputError(
            f"MAISI configuration section {section!r} does not match {network_class.__name__}: {details}"
        )


def build_networks(config: dict[str, Any], norm_float16: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Construct the autoencoder and diffusion UNet of ``config`` (random weights, eval mode, CPU).

    Runtime-only arguments are overridden: the autoencoder's ``norm_float16`` (only valid for fp16
    on CUDA) and ``num_splits`` (1 here; chosen per volume where exact, see :func:`safe_num_splits`),
    and the UNet's ``use_flash_attention`` (MONAI refuses it without CUDA at construction;
    :func:`set_flash_attention` switches it afterwards).
    """
    autoencoder_class, unet_class = _network_classes()
    autoencoder_args = dict(config["autoencoder"])
    unet_args = dict(config["diffusion_unet"])
    _check_arguments(autoencoder_class, autoencoder_args, "autoencoder")
    _check_arguments(unet_class, unet_args, "diffusion_unet")
    autoencoder_args["norm_float16"] = norm_float16
    autoencoder_args["num_splits"] = 1
    unet_args["use_flash_attention"] = False
    try:
        autoencoder = autoencoder_class(**autoencoder_args)
        unet = unet_class(**unet_args)
    except (ValueError, TypeError) as error:
        raise BadInputError(f"MAISI configuration {config['name']!r} cannot be built: {error}") from None
    return autoencoder.eval(), unet.eval()


def build_scheduler(config: dict[str, Any], checkpoint_timesteps: int | None) -> tuple[Any, int]:
    """The configured noise scheduler (DDPM or rectified flow) and its number of training timesteps.

    A UNet checkpoint that states ``num_train_timesteps`` overrides the configuration's.
    """
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    arguments = dict(config["noise_scheduler"])
    kind = arguments.pop("kind")
    if checkpoint_timesteps is not None:
        arguments["num_train_timesteps"] = checkpoint_timesteps
    scheduler_class = DDPMScheduler if kind == "ddpm" else RFlowScheduler
    try:
        scheduler = scheduler_class(**arguments)
    except (TypeError, ValueError) as error:
        raise BadInputError(f"noise_scheduler of {config['name']!r} cannot be built: {error}") from None
    return scheduler, int(arguments["num_train_timesteps"])


def set_flash_attention(network: torch.nn.Module, enabled: bool) -> None:
    """Switch MONAI attention blocks to ``F.scaled_dot_product_attention`` (same weights, less memory)."""
    for module in network.modules():
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = enabled


def set_num_splits(autoencoder: torch.nn.Module, splits: int) -> None:
    """Set how many pieces MAISI's split convolutions cut their input into (memory, not results)."""
    for module in autoencoder.modules():
        if hasattr(module, "num_splits") and hasattr(module, "dim_split"):
            module.num_splits = splits


def safe_num_splits(configured: int, size: int, encoder_stages: int) -> int:
    """Largest split count <= ``configured`` that MAISI's split convolution handles exactly for ``size``.

    Each split must be even and hold at least 4 voxels (the overlap it adds) at every encoder level.
    """
    for splits in range(max(configured, 1), 1, -1):
        sizes = [size >> stage for stage in range(encoder_stages + 1)]
        if all(n % (2 * splits) == 0 and n // splits >= 4 for n in sizes):
            return splits
    return 1


def _key_summary(missing: list[str], unexpected: list[str], shown: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} keys ({', '.join(keys[:shown])}{more})")
    return "; ".join(parts)


def _unet_hint(keys: set[str], config: dict[str, Any]) -> str:
    unet_args = config["diffusion_unet"]
    if "class_embedding.weight" in keys and unet_args["num_class_embeds"] is None:
        return " - it looks like a rectified-flow (v2) UNet: use configuration rflow-ct"
    if "top_region_index_layer.0.weight" in keys and not unet_args["include_top_region_index_input"]:
        return " - it looks like a DDPM (v1) UNet: use configuration ddpm-ct"
    return ""


def _load_state(module: torch.nn.Module, state_dict: dict[str, Any], path: Path, what: str, hint: str = "") -> None:
    expected, given = set(module.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise BadInputError(f"{path.name} does not fit the {what}: {_key_summary(missing, unexpected)}{hint}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = mismatches[0] if mismatches else str(error).strip().splitlines()[0]
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise BadInputError(f"{path.name} does not fit the {what}: {detail}{more}") from None


def load_autoencoder_weights(autoencoder: torch.nn.Module, path: Path, config: dict[str, Any]) -> None:
    """Load a plain autoencoder state dict (official layout) with ``strict=True``."""
    _load_state(autoencoder, load_checkpoint(path, "autoencoder"), path, f"{config['name']} autoencoder")


def load_unet_weights(unet: torch.nn.Module, path: Path, config: dict[str, Any]) -> tuple[float, int | None]:
    """Load a UNet checkpoint ``{unet_state_dict, scale_factor, num_train_timesteps}``.

    Returns ``(scale_factor, num_train_timesteps or None)``.
    """
    checkpoint = load_checkpoint(path, "diffusion_unet")
    state_dict = checkpoint["unet_state_dict"]
    _load_state(unet, state_dict, path, f"{config['name']} diffusion UNet", _unet_hint(set(state_dict), config))
    timesteps = checkpoint.get("num_train_timesteps")
    return scale_factor_of(checkpoint), (int(timesteps) if timesteps is not None else None)
