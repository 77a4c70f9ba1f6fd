"""The known weight files and the folder they live in on this machine.

The registry lists the MAISI checkpoints the ``maisi`` backbone loads, with the places MONAI/NVIDIA
publish them (HuggingFace ``nvidia/NV-Generate-CT`` and the older NVIDIA download URLs), former
file names, and checksums only where a publisher states one (unknown stays ``None``).

Files live in one folder: ``--weights-dir`` / ``weights_dir=``, else ``$MEDDIFT_WEIGHTS_DIR``, else
the user cache (``~/.cache/meddift/weights``, ``%LOCALAPPDATA%\\meddift\\weights`` on Windows).
A folder laid out like an NV-Generate checkout (files under ``models/``) works too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BadInputError, MissingWeightsError
from .checkpoints import fetch_commands

WEIGHTS_DIR_ENV = "MEDDIFT_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightSource:
    """One place a file is published; ``md5``/``sha256`` only when that publisher states them."""

    url: str
    label: str
    md5: str | None = None
    sha256: str | None = None
    checksum_reference: str = ""


@dataclass(frozen=True)
class WeightFile:
    """A checkpoint: canonical local ``name``, its ``role`` and the configurations that use it."""

    name: str
    role: str  # "autoencoder" or "diffusion_unet" (see checkpoints.ROLES)
    configs: tuple[str, ...]
    sources: tuple[WeightSource, ...]
    former_names: tuple[str, ...] = ()
    size_bytes: int | None = None
    license: str = ""
    description: str = ""
    layout: str = ""

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.former_names)


_HF_CT = "https://huggingface.co/nvidia/NV-Generate-CT/resolve/main/models/"
_NVIDIA = "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/"
_MODEL_ZOO_LIST = "Project-MONAI/model-zoo models/maisi_ct_generative/large_files.yml"
_LICENSE_CT = "NVIDIA Open Model License (see huggingface.co/nvidia/NV-Generate-CT)"

REGISTRY: dict[str, WeightFile] = {
    entry.name: entry
    for entry in (
        WeightFile(
            name="autoencoder_v1.pt",
            role="autoencoder",
            configs=("ddpm-ct", "rflow-ct"),
            former_names=("autoencoder_epoch273.pt",),
            sources=(
                WeightSource(_HF_CT + "autoencoder_v1.pt", "huggingface"),
                WeightSource(
                    _NVIDIA + "model_zoo/model_maisi_autoencoder_epoch273_alternative.pt",
                    "nvidia",
                    md5="917cfb1e49631c8a713e3bb7c758fbca",
                    checksum_reference=_MODEL_ZOO_LIST,
                ),
            ),
            license=_LICENSE_CT,
            description="MAISI CT autoencoder (AutoencoderKlMaisi, latent 4)",
            layout="plain state dict",
        ),
        WeightFile(
            name="diff_unet_3d_ddpm-ct.pt",
            role="diffusion_unet",
            configs=("ddpm-ct",),
            former_names=(
                "diff_unet_3d_ddpm.pt",
                "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
            ),
            sources=(
                WeightSource(_HF_CT + "diff_unet_3d_ddpm-ct.pt", "huggingface"),
                WeightSource(
                    _NVIDIA
                    + "model_zoo/model_maisi_input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1"
                    + "_alternative.pt",
                    "nvidia",
                    md5="623bd02ff223b70d280cc994fcb70a69",
                    checksum_reference=_MODEL_ZOO_LIST,
                ),
            ),
            license=_LICENSE_CT,
            description="MAISI v1 diffusion UNet (DDPM, body-region and spacing inputs)",
            layout="dict with unet_state_dict, scale_factor, num_train_timesteps",
        ),
        WeightFile(
            name="diff_unet_3d_rflow-ct.pt",
            role="diffusion_unet",
            configs=("rflow-ct",),
            former_names=("diff_unet_3d_rflow.pt", "diff_unet_ckpt_rflow_epoch19350.pt"),
            sources=(
                WeightSource(_HF_CT + "diff_unet_3d_rflow-ct.pt", "huggingface"),
                WeightSource(_NVIDIA + "diff_unet_ckpt_rflow_epoch19350.pt", "nvidia"),
            ),
            license=_LICENSE_CT,
            description="MAISI v2 diffusion UNet (rectified flow, modality and spacing inputs)",
            layout="dict with unet_state_dict, scale_factor, num_train_timesteps",
        ),
    )
}


def default_weights_dir() -> Path:
    """``$MEDDIFT_WEIGHTS_DIR`` if set, else the per-user cache folder."""
    configured = os.environ.get(WEIGHTS_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "meddift" / "weights"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "meddift" / "weights"


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder to use: the given one, else :func:`default_weights_dir`."""
    return Path(weights_dir).expanduser() if weights_dir else default_weights_dir()


def is_registered(name: str) -> bool:
    """Whether ``name`` is a canonical or former name of a registered file."""
    return any(name in entry.all_names for entry in REGISTRY.values())


def registry_entry(name: str) -> WeightFile:
    """The entry for a canonical or former file name; unknown names are rejected."""
    for entry in REGISTRY.values():
        if name in entry.all_names:
            return entry
    raise BadInputError(f"unknown weight file {name!r}; known files: {', '.join(REGISTRY)}")


def files_for_config(config_name: str) -> list[WeightFile]:
    """Registry entries a backbone configuration (e.g. ``ddpm-ct``) needs."""
    entries = [entry for entry in REGISTRY.values() if config_name in entry.configs]
    if not entries:
        known = sorted({name for entry in REGISTRY.values() for name in entry.configs})
        raise BadInputError(f"no registered weights for configuration {config_name!r}; known: {', '.join(known)}")
    return entries


def find_weight_file(file_names: Iterable[str], weights_dir: str | os.PathLike | None = None) -> Path | None:
    """First existing file among ``file_names`` in the folder or its ``models/`` subfolder."""
    folder = resolve_weights_dir(weights_dir)
    for candidate_folder in (folder, folder / "models"):
        for name in file_names:
            path = candidate_folder / name
            if path.is_file():
                return path
    return None


def locate(file_name: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """A checkpoint by its name, or by any former name when it is a registered file; None if absent."""
    names = registry_entry(file_name).all_names if is_registered(file_name) else (file_name,)
    return find_weight_file(names, weights_dir)


def missing_weights_error(missing: list[str], weights_dir: Path, config_name: str | None) -> MissingWeightsError:
    """The error for absent files: names them and says how to fetch or import them."""
    names = ", ".join(missing)
    return MissingWeightsError(
        f"MAISI weights not found in {weights_dir}: {names}; {fetch_commands(config_name)} "
        f"(or point --weights-dir / ${WEIGHTS_DIR_ENV} at the folder holding them)"
    )
