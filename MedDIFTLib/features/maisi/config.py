"""MAISI network configurations: the packaged ones (``features/configs/maisi_*.json``) or a given file/dict.

A configuration names the two checkpoint files, and writes out every constructor argument of the
autoencoder and diffusion UNet and the noise scheduler (``kind`` ``ddpm`` or ``rflow``), so MONAI
defaults that differ from MAISI's never apply. It also holds the conditioning vocabulary (body
regions) the v1 UNet is fed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from ...core.errors import BadInputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "ddpm-ct"
CONFIG_KEYS = ("name", "autoencoder_file", "unet_file", "autoencoder", "diffusion_unet", "noise_scheduler")
SCHEDULER_KINDS = ("ddpm", "rflow")
BODY_REGIONS = ("head", "chest", "abdomen", "pelvis")  # order of MAISI's region one-hot vectors
REGION_SCALE = 100.0  # MAISI feeds region one-hots and spacing (mm) multiplied by 100
SPACING_SCALE = 100.0

ConfigSource = str | os.PathLike | dict[str, Any]


def packaged_configs() -> list[str]:
    """Names of the configurations shipped in ``MedDIFTLib/features/configs`` (``ddpm-ct``, ``rflow-ct``)."""
    return sorted(path.stem.removeprefix("maisi_") for path in CONFIG_DIR.glob("maisi_*.json"))


def load_config(config: ConfigSource | None = None) -> dict[str, Any]:
    """A network configuration: a packaged name (default ``ddpm-ct``), a JSON file path, or a dict.

    A file or dict must have the packaged files' layout (see ``configs/maisi_ddpm-ct.json``);
    custom ones (e.g. tiny networks) are for tests and experiments.
    """
    config = DEFAULT_CONFIG if config is None else config
    if isinstance(config, dict):
        loaded = copy.deepcopy(config)
        origin = "configuration dict"
    else:
        packaged = CONFIG_DIR / f"maisi_{config}.json"
        path = packaged if isinstance(config, str) and packaged.is_file() else Path(config)
        if not path.is_file():
            raise BadInputError(
                f"unknown MAISI configuration {str(config)!r}: neither a packaged name "
                f"({', '.join(packaged_configs())}) nor a JSON file"
            )
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise BadInputError(f"{path}: cannot read the MAISI configuration ({error})") from None
        origin = str(path)
    if not isinstance(loaded, dict):
        raise BadInputError(f"{origin}: a MAISI configuration is a JSON object")
    missing = [key for key in CONFIG_KEYS if key not in loaded]
    if missing:
        raise BadInputError(f"{origin}: MAISI configuration lacks {', '.join(missing)}")
    if loaded["noise_scheduler"].get("kind") not in SCHEDULER_KINDS:
        raise BadInputError(f"{origin}: noise_scheduler.kind must be one of {', '.join(SCHEDULER_KINDS)}")
    return loaded


def weight_file_names(config: dict[str, Any]) -> tuple[str, str]:
    """``(autoencoder file, diffusion UNet file)`` the configuration loads."""
    return config["autoencoder_file"], config["unet_file"]


def one_hot_region(region: str) -> list[float]:
    """MAISI's body-region input: the one-hot of ``region`` over :data:`BODY_REGIONS`, times 100."""
    if region not in BODY_REGIONS:
        raise BadInputError(f"unknown body region {region!r}; choose one of: {', '.join(BODY_REGIONS)}")
    return [REGION_SCALE if name == region else 0.0 for name in BODY_REGIONS]
