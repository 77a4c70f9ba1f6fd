"""MAISI diffusion features, the MedDIFT backbone (MONAI ``AutoencoderKlMaisi`` + ``DiffusionModelUNetMaisi``).

For one volume:
1. Model grid: the image axes permuted/flipped to the closest R, A, S order (MAISI was trained on
   RAS-oriented arrays; direction cosines are kept, so oblique scans stay oblique), spacing
   ``spacing_mm`` (default: the image's own), each size the smallest multiple of 32 covering the
   image (never shrunk). The image is resampled onto it (linear, Gaussian anti-aliasing when
   coarsening, air outside).
2. HU clipped to ``hu_window`` ([-1000, 1000]) and scaled to [0, 1].
3. Encoder: latent = posterior mean (default, deterministic) or a sample, times the diffusion
   checkpoint's ``scale_factor``.
4. Noise of timestep ``t`` (default 20 of 1000) added in fp32 from a seeded generator with the
   configured scheduler (DDPM for v1, rectified flow for v2), optionally averaged over draws.
5. One UNet pass conditioned as in MAISI: spacing in mm x 100, top/bottom body region one-hot x 100
   (v1; chest by default), modality class (v2). Forward hooks on ``up_blocks[i]`` capture the
   decoder activations (512/256/128/64 channels at 1/16, 1/8, 1/4, 1/4 of the model grid) and are
   removed afterwards.

Level geometry (exact voxel -> LPS map). A down-sampling stage maps coarse voxel ``n`` to fine
voxel ``2n + c``, the centre of its receptive field: ``c = 1`` in the autoencoder (one voxel of
padding at the high end, then a 3x3x3 stride-2 convolution without padding reads fine voxels
2n..2n+2), ``c = 0`` in the v1 UNet (3x3x3 stride-2 convolution with padding 1: 2n-1..2n+1) and
``c = 0.5`` in the v2 UNet (2x2x2 average pooling). Latent voxel ``n`` therefore sits at model
voxel ``4n + 3``, not at ``4n + 1.5`` as average pooling would place it. An up-block output is
concatenated with the down-path skip features of its resolution, so it is placed on that grid (in v1
the nearest-neighbour upsampled part alone would sit half a fine voxel lower; the network aligns it
with the skip features). The down-path centres are measured on MONAI's own modules in
``Testing/test_maisi_backbone.py``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .. import weights as weight_registry
from ..core.errors import BadInputError, OutOfMemoryError
from ..core.geometry import Geometry
from ..core.io.volumes import Volume
from ..core.progress import ProgressFn, no_progress
from ..weights.checkpoints import load_checkpoint
from .protocol import FeatureLevel, FeaturePyramid

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "ddpm-ct"
CONFIG_ENV = "MEDDIFT_MAISI_CONFIG"  # default configuration override, for tests and experiments
BODY_REGIONS = ("head", "chest", "abdomen", "pelvis")  # order of MAISI's region one-hot vectors
PRECISIONS = ("fp32", "bf16", "fp16")
LATENT_MODES = ("mean", "sample")
REGION_SCALE = 100.0  # MAISI feeds region one-hots and spacing (mm) multiplied by 100
SPACING_SCALE = 100.0
# LPS direction of the model axes R, A, S (rows)
_RAS_IN_LPS = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
_CONFIG_KEYS = ("name", "autoencoder_file", "unet_file", "autoencoder", "diffusion_unet", "noise_scheduler")
# peak host memory of a CPU extraction with the full-size v1 networks, above the loaded networks: a fixed
# part plus a part per model-grid voxel (measured 7.95 GiB fp32, 6.99 GiB bf16 on a 192x192x224 grid,
# benchmarks/maisi_features.py); used to refuse, before starting, a run that cannot fit
_CPU_OVERHEAD_BYTES = 0.3 * 2**30
_CPU_BYTES_PER_MODEL_VOXEL = {"fp32": 1000, "bf16": 900}


def packaged_configs() -> list[str]:
    """Names of the configurations shipped in ``MedDIFTLib/configs`` (``ddpm-ct``, ``rflow-ct``)."""
    return sorted(path.stem.removeprefix("maisi_") for path in CONFIG_DIR.glob("maisi_*.json"))


def load_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A network configuration: a packaged name, a JSON file path, or an already-loaded dict.

    A file or dict must have the packaged files' layout (see ``configs/maisi_ddpm-ct.json``);
    custom ones (e.g. tiny networks) are for tests and experiments.
    """
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
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise BadInputError(f"{path}: cannot read the MAISI configuration ({error})") from None
        origin = str(path)
    missing = [key for key in _CONFIG_KEYS if key not in loaded]
    if missing:
        raise BadInputError(f"{origin}: MAISI configuration lacks {', '.join(missing)}")
    if loaded["noise_scheduler"].get("kind") not in ("ddpm", "rflow"):
        raise BadInputError(f"{origin}: noise_scheduler.kind must be 'ddpm' or 'rflow'")
    return loaded


def chosen_config(config: str | os.PathLike | dict[str, Any] | None) -> str | os.PathLike | dict[str, Any]:
    """``config`` if given, else ``$MEDDIFT_MAISI_CONFIG`` (tests, experiments), else ``ddpm-ct``."""
    return config if config is not None else os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


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
    on CUDA) and ``num_splits`` (1 here; chosen per volume where exact, see :func:`set_num_splits`),
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


def load_autoencoder_weights(autoencoder: torch.nn.Module, path: Path, config_name: str) -> None:
    """Load a plain autoencoder state dict (official layout) with ``strict=True``."""
    checkpoint = load_checkpoint(path)
    if "unet_state_dict" in checkpoint:
        raise BadInputError(f"{path.name}: this is a diffusion UNet checkpoint, not the autoencoder")
    _load_state(autoencoder, checkpoint, path, f"{config_name} autoencoder")


def load_unet_weights(unet: torch.nn.Module, path: Path, config: dict[str, Any]) -> tuple[float, int | None]:
    """Load a UNet checkpoint ``{unet_state_dict, scale_factor, num_train_timesteps}``.

    Returns ``(scale_factor, num_train_timesteps or None)``.
    """
    checkpoint = load_checkpoint(path)
    if "unet_state_dict" not in checkpoint:
        found = "an autoencoder state dict" if any(str(k).startswith("encoder.") for k in checkpoint) else "a dict"
        raise BadInputError(
            f"{path.name}: found {found}, not a MAISI diffusion UNet checkpoint "
            "(a dict with unet_state_dict and scale_factor)"
        )
    state_dict = checkpoint["unet_state_dict"]
    if not isinstance(state_dict, dict):
        raise BadInputError(f"{path.name}: unet_state_dict is not a state dict")
    _load_state(unet, state_dict, path, f"{config['name']} diffusion UNet", _unet_hint(set(state_dict), config))
    if "scale_factor" not in checkpoint:
        raise BadInputError(f"{path.name}: the checkpoint has no scale_factor (the latent scaling of MAISI)")
    scale_factor = float(torch.as_tensor(checkpoint["scale_factor"]).reshape(-1)[0])
    if not np.isfinite(scale_factor) or scale_factor <= 0:
        raise BadInputError(f"{path.name}: scale_factor {scale_factor} is not a positive number")
    timesteps = checkpoint.get("num_train_timesteps")
    return scale_factor, (int(timesteps) if timesteps is not None else None)


def closest_ras_axes(direction_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permutation ``p`` and signs ``s`` such that model axis ``a`` (R, A, S) is image axis ``p[a]`` times ``s[a]``."""
    alignment = _RAS_IN_LPS @ np.asarray(direction_matrix, float)  # [model axis, image axis]
    permutation = np.full(3, -1)
    used: set[int] = set()
    for flat in np.argsort(-np.abs(alignment), axis=None, kind="stable"):
        model_axis, image_axis = divmod(int(flat), 3)
        if permutation[model_axis] < 0 and image_axis not in used:
            permutation[model_axis] = image_axis
            used.add(image_axis)
    signs = np.where(alignment[np.arange(3), permutation] < 0, -1.0, 1.0)
    return permutation, signs


def model_grid(image: Geometry, spacing_mm: float | tuple[float, float, float] | None, multiple: int) -> Geometry:
    """The grid the networks see: RAS-ordered axes, ``spacing_mm`` (per model axis R, A, S; default: the
    image's own), sizes the smallest multiples of ``multiple`` covering the image, centred on it.
    """
    permutation, signs = closest_ras_axes(image.direction_matrix)
    direction = image.direction_matrix[:, permutation] * signs[None, :] + 0.0  # + 0.0: no negative zeros
    if spacing_mm is None:
        spacing = np.asarray(image.spacing_mm, float)[permutation]
    else:
        spacing = np.broadcast_to(np.asarray(spacing_mm, float), (3,)).astype(float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise BadInputError(f"model spacing must be positive mm, got {spacing.tolist()}")
    corners_ijk = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in image.shape_ijk])))
    centre = image.ijk_to_lps(((np.asarray(image.shape_ijk) - 1) / 2.0)[None])[0]
    along_axes = (image.ijk_to_lps(corners_ijk) - centre) @ direction
    cells = np.ceil((along_axes.max(axis=0) - along_axes.min(axis=0)) / spacing - 1e-6)
    shape = (np.maximum(np.ceil(cells / multiple), 1) * multiple).astype(int)
    origin = centre - direction @ ((shape - 1) / 2.0 * spacing)
    return Geometry.create(shape, spacing, origin, direction)


@dataclass(frozen=True)
class LevelLayout:
    """Where the output of ``up_blocks[block]`` lies: level voxel ``n`` = model voxel ``factor * n + offset``."""

    block: int
    channels: int
    factor: int
    offset: float

    @property
    def name(self) -> str:
        return f"maisi_up{self.block}_1/{self.factor}"

    def geometry(self, model: Geometry) -> Geometry:
        """This level's grid in LPS mm, derived exactly from the model grid."""
        shape = [n // self.factor for n in model.shape_ijk]
        origin = model.ijk_to_lps(np.full((1, 3), self.offset))[0]
        return Geometry.create(shape, np.asarray(model.spacing_mm) * self.factor, origin, model.direction_matrix)


def level_layouts(config: dict[str, Any]) -> list[LevelLayout]:
    """Resolution and position of every UNet up-block output, from the network configuration."""
    encoder_stages = len(config["autoencoder"]["num_channels"]) - 1
    latent_factor = 2**encoder_stages
    latent_offset = float(sum(2**stage for stage in range(encoder_stages)))  # c = 1 per encoder stage
    unet_args = config["diffusion_unet"]
    unet_centre = 0.5 if unet_args["resblock_updown"] else 0.0
    channels = list(reversed(unet_args["num_channels"]))
    layouts = []
    for block in range(len(channels)):
        level = max(len(channels) - 2 - block, 0)
        offset_latent = sum(2**stage * unet_centre for stage in range(level))
        layouts.append(
            LevelLayout(block, channels[block], latent_factor * 2**level, latent_offset + latent_factor * offset_latent)
        )
    return layouts


def model_size_multiple(config: dict[str, Any]) -> int:
    """Model-grid sizes must be multiples of this (autoencoder and UNet down-sampling together)."""
    return 2 ** (len(config["autoencoder"]["num_channels"]) - 1) * 2 ** (
        len(config["diffusion_unet"]["num_channels"]) - 1
    )


def _safe_num_splits(configured: int, size: int, encoder_stages: int) -> int:
    """Largest split count <= ``configured`` that MAISI's split convolution handles exactly for ``size``.

    Each split must be even and hold at least 4 voxels (the overlap it adds) at every encoder level.
    """
    for splits in range(max(configured, 1), 1, -1):
        sizes = [size >> stage for stage in range(encoder_stages + 1)]
        if all(n % (2 * splits) == 0 and n // splits >= 4 for n in sizes):
            return splits
    return 1


def _one_hot_region(region: str) -> list[float]:
    if region not in BODY_REGIONS:
        raise BadInputError(f"unknown body region {region!r}; choose one of: {', '.join(BODY_REGIONS)}")
    return [REGION_SCALE if name == region else 0.0 for name in BODY_REGIONS]


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _describe_grid(grid: Geometry) -> str:
    size = "x".join(str(n) for n in grid.shape_ijk)
    spacing = "x".join(f"{s:.3g}" for s in grid.spacing_mm)
    return f"{size} model grid ({spacing} mm)"


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _weight_file_names(config: dict[str, Any]) -> list[str]:
    return [config["autoencoder_file"], config["unet_file"]]


def _find_weight(file_name: str, folder: Path) -> Path | None:
    """A checkpoint by its canonical name, or by a former name when it is a registered file."""
    try:
        names = weight_registry.registry_entry(file_name).all_names
    except BadInputError:
        names = (file_name,)
    return weight_registry.find_weight_file(names, folder)


class MaisiFeaturizer:
    """MAISI diffusion-UNet decoder features; weights come from ``weights_dir`` (see :mod:`MedDIFTLib.weights`).

    ``device``: ``cpu`` or ``cuda[:n]``. ``precision``: ``fp32``, ``bf16`` or ``fp16`` (CUDA only);
    default bf16 on CUDA, fp32 on CPU. ``timestep``: diffusion step of the added noise.
    ``spacing_mm``: model-grid spacing (one value or per R, A, S axis; default: the image's).
    ``top_region``/``bottom_region``: body-region conditioning of the v1 UNet.
    ``latent``: ``mean`` (deterministic) or ``sample``. ``noise_draws``: features averaged over
    this many noise draws from generator seed ``seed``. ``levels``: up-block indices to keep.
    ``config``: ``ddpm-ct`` (v1, default), ``rflow-ct`` (v2), or a JSON path/dict of the same
    layout (tiny networks for tests and experiments; ``$MEDDIFT_MAISI_CONFIG`` sets the default).
    ``flash_attention``: scaled-dot-product attention (switched on after construction).
    ``check_memory``: refuse a CPU run whose estimated peak exceeds the available memory, before
    starting it. Missing checkpoint files raise :class:`MissingWeightsError` here, at construction.
    """

    name = "maisi"
    requires_weights = True

    @classmethod
    def weights_status(
        cls,
        weights_dir: str | os.PathLike | None = None,
        config: str | os.PathLike | dict[str, Any] | None = None,
        **_other_options: Any,
    ) -> tuple[bool, str]:
        """``(present, message)``: whether the configuration's checkpoint files are in the weights folder."""
        loaded = load_config(chosen_config(config))
        folder = weight_registry.resolve_weights_dir(weights_dir)
        missing = [name for name in _weight_file_names(loaded) if _find_weight(name, folder) is None]
        if missing:
            return False, str(weight_registry.missing_weights_error(missing, folder, loaded["name"]))
        return True, f"{loaded['name']} weights found in {folder}"

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        precision: str | None = None,
        timestep: int = 20,
        spacing_mm: float | tuple[float, float, float] | None = None,
        top_region: str = "chest",
        bottom_region: str = "chest",
        latent: str = "mean",
        noise_draws: int = 1,
        seed: int = 0,
        levels: tuple[int, ...] = (0, 1, 2, 3),
        level_weights: tuple[float, ...] | None = None,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        config: str | os.PathLike | dict[str, Any] | None = None,
        flash_attention: bool = True,
        check_memory: bool = True,
    ) -> None:
        self._config = load_config(chosen_config(config))
        self.device = self._parse_device(device)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise BadInputError("fp16 runs on CUDA only; on CPU use fp32 or bf16")
        self.spacing_mm = None if spacing_mm is None else tuple(np.broadcast_to(np.asarray(spacing_mm, float), (3,)))
        if self.spacing_mm is not None and not all(np.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise BadInputError(f"spacing must be positive mm, got {spacing_mm}")
        for region in (top_region, bottom_region):
            _one_hot_region(region)
        self.top_region, self.bottom_region = top_region, bottom_region
        if latent not in LATENT_MODES:
            raise BadInputError(f"unknown latent mode {latent!r}; choose one of: {', '.join(LATENT_MODES)}")
        self.latent = latent
        if int(noise_draws) < 1:
            raise BadInputError(f"noise draws must be at least 1, got {noise_draws}")
        self.noise_draws, self.seed = int(noise_draws), int(seed)
        low, high = (float(v) for v in hu_window)
        if not high > low:
            raise BadInputError(f"HU window must be (low, high) with high > low, got {hu_window}")
        self.hu_window = (low, high)
        self.flash_attention = bool(flash_attention)
        self.check_memory = bool(check_memory)

        all_layouts = level_layouts(self._config)
        self.levels = tuple(int(level) for level in levels)
        if not self.levels or any(level not in range(len(all_layouts)) for level in self.levels):
            raise BadInputError(f"levels must be up-block indices in 0..{len(all_layouts) - 1}, got {levels}")
        self.layouts = [all_layouts[level] for level in self.levels]
        self.level_weights = tuple(float(w) for w in level_weights) if level_weights else (1.0,) * len(self.levels)
        if len(self.level_weights) != len(self.levels):
            raise BadInputError(f"{len(self.level_weights)} level weights for {len(self.levels)} levels")
        self._size_multiple = model_size_multiple(self._config)

        self.weights_dir = weight_registry.resolve_weights_dir(weights_dir)
        autoencoder_path, unet_path = self._weight_paths()
        self.autoencoder, self.unet = build_networks(
            self._config, norm_float16=self.device.type == "cuda" and self.precision == "fp16"
        )
        load_autoencoder_weights(self.autoencoder, autoencoder_path, self._config["name"])
        self.scale_factor, checkpoint_timesteps = load_unet_weights(self.unet, unet_path, self._config)
        self.scheduler, self.num_train_timesteps = self._build_scheduler(checkpoint_timesteps)
        if not 0 <= int(timestep) < self.num_train_timesteps:
            raise BadInputError(f"timestep must lie in [0, {self.num_train_timesteps - 1}], got {timestep}")
        self.timestep = int(timestep)
        set_flash_attention(self.unet, self.flash_attention)
        self._weights_fingerprint = {
            "autoencoder": weight_registry.quick_fingerprint(autoencoder_path),
            "diffusion_unet": weight_registry.quick_fingerprint(unet_path),
        }
        self.autoencoder.to(self.device)
        self.unet.to(self.device)

    @staticmethod
    def _parse_device(device: str | torch.device) -> torch.device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise BadInputError(f"unknown device {device!r}; use cpu or cuda[:index]") from None
        if parsed.type not in ("cpu", "cuda"):
            raise BadInputError(f"unsupported device {device!r}; use cpu or cuda[:index]")
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise BadInputError("CUDA was requested but is not available here; use --device cpu")
        return parsed

    def _weight_paths(self) -> tuple[Path, Path]:
        names = _weight_file_names(self._config)
        paths = [_find_weight(name, self.weights_dir) for name in names]
        missing = [name for name, path in zip(names, paths) if path is None]
        if missing:
            raise weight_registry.missing_weights_error(missing, self.weights_dir, self._config["name"])
        return paths[0], paths[1]

    def _build_scheduler(self, checkpoint_timesteps: int | None) -> tuple[Any, int]:
        from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

        arguments = dict(self._config["noise_scheduler"])
        kind = arguments.pop("kind")
        if checkpoint_timesteps is not None:
            arguments["num_train_timesteps"] = checkpoint_timesteps
        scheduler_class = DDPMScheduler if kind == "ddpm" else RFlowScheduler
        try:
            scheduler = scheduler_class(**arguments)
        except (TypeError, ValueError) as error:
            raise BadInputError(f"noise_scheduler of {self._config['name']!r} cannot be built: {error}") from None
        return scheduler, int(arguments["num_train_timesteps"])

    @property
    def config(self) -> dict[str, Any]:
        networks = {key: self._config[key] for key in ("autoencoder", "diffusion_unet", "noise_scheduler")}
        return {
            "config": self._config["name"],
            "networks_sha1": hashlib.sha1(json.dumps(networks, sort_keys=True).encode()).hexdigest(),
            "weights": dict(self._weights_fingerprint),
            "precision": self.precision,
            "timestep": self.timestep,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm is not None else None,
            "top_region": self.top_region,
            "bottom_region": self.bottom_region,
            "latent": self.latent,
            "noise_draws": self.noise_draws,
            "seed": self.seed,
            "levels": list(self.levels),
            "level_weights": list(self.level_weights),
            "hu_window": list(self.hu_window),
        }

    def model_grid(self, image: Geometry) -> Geometry:
        """The model grid this featurizer uses for an image grid."""
        return model_grid(image, self.spacing_mm, self._size_multiple)

    def estimated_peak_bytes(self, grid: Geometry) -> int:
        """Approximate peak host memory of a CPU extraction on ``grid``, beyond the loaded networks."""
        per_voxel = _CPU_BYTES_PER_MODEL_VOXEL.get(self.precision, _CPU_BYTES_PER_MODEL_VOXEL["fp32"])
        scale = self._config["autoencoder"]["num_channels"][0] / 64  # the full-resolution activations dominate
        return int(_CPU_OVERHEAD_BYTES + grid.num_voxels * per_voxel * scale)

    def extract(self, volume: Volume, progress: ProgressFn = no_progress) -> FeaturePyramid:
        """Features of ``volume``; every level's geometry maps its voxels to LPS mm exactly."""
        progress("features", 0.0, "MAISI: resampling to the model grid")
        grid = self.model_grid(volume.geometry)
        self._refuse_if_too_large(grid)
        try:
            summed = self._run(volume, grid, progress)
        except RuntimeError as error:
            if _is_out_of_memory(error):
                self._free_device_memory()
                raise OutOfMemoryError(self._out_of_memory_message(grid)) from None
            raise
        levels = [
            FeatureLevel(layout.name, summed[layout.block].div_(self.noise_draws), layout.geometry(grid), weight)
            for layout, weight in zip(self.layouts, self.level_weights)
        ]
        progress("features", 1.0, "MAISI features done")
        return FeaturePyramid(levels, volume.geometry, self.name, self.config)

    def _refuse_if_too_large(self, grid: Geometry) -> None:
        if not self.check_memory or self.device.type != "cpu":
            return
        available = _available_host_bytes()
        needed = self.estimated_peak_bytes(grid)
        if available is not None and needed > available:
            raise OutOfMemoryError(
                f"MAISI features on a {_describe_grid(grid)} need about {needed / 2**30:.1f} GiB of memory, "
                f"{available / 2**30:.1f} GiB are available; {self._memory_advice()}"
            )

    def _memory_advice(self) -> str:
        if self.device.type == "cpu":
            return "use a coarser model spacing (backbone option spacing_mm) or a GPU"
        return "use a coarser model spacing (backbone option spacing_mm), bf16/fp16 precision, or a larger GPU"

    def _out_of_memory_message(self, grid: Geometry) -> str:
        return (
            f"MAISI feature extraction ran out of {self.device.type} memory on a {_describe_grid(grid)}; "
            f"{self._memory_advice()}"
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _free_device_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _model_input(self, volume: Volume, grid: Geometry) -> torch.Tensor:
        """Resampled, windowed image as a ``(1, 1, I, J, K)`` float32 tensor (MONAI axis order)."""
        low, high = self.hu_window
        voxels = volume.voxels
        permutation, _ = closest_ras_axes(volume.geometry.direction_matrix)
        image_spacing = np.asarray(volume.geometry.spacing_mm)
        model_spacing_per_image_axis = np.empty(3)
        model_spacing_per_image_axis[permutation] = grid.spacing_mm
        sigma_voxels_ijk = np.maximum((model_spacing_per_image_axis / image_spacing - 1.0) / 2.0, 0.0)
        if np.any(sigma_voxels_ijk > 0):
            voxels = ndimage.gaussian_filter(voxels, sigma=sigma_voxels_ijk[::-1], mode="nearest")
        source = Volume(np.ascontiguousarray(voxels, dtype=np.float32), volume.geometry).to_sitk()
        reference = sitk.Image([int(n) for n in grid.shape_ijk], sitk.sitkFloat32)
        reference.SetSpacing(grid.spacing_mm)
        reference.SetOrigin(grid.origin_lps_mm)
        reference.SetDirection(grid.direction)
        resampled = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, low, sitk.sitkFloat32)
        array_kji = sitk.GetArrayFromImage(resampled)
        normalised = (np.clip(array_kji, low, high) - low) / (high - low)
        tensor_ijk = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 1, 0), dtype=np.float32))
        return tensor_ijk[None, None].to(self.device)

    def _conditioning(self, grid: Geometry) -> dict[str, torch.Tensor]:
        unet = self.unet
        inputs: dict[str, torch.Tensor] = {}
        if unet.include_spacing_input:
            spacing = [s * SPACING_SCALE for s in grid.spacing_mm]
            inputs["spacing_tensor"] = torch.tensor([spacing], dtype=torch.float32, device=self.device)
        if unet.include_top_region_index_input:
            region = [_one_hot_region(self.top_region)]
            inputs["top_region_index_tensor"] = torch.tensor(region, dtype=torch.float32, device=self.device)
        if unet.include_bottom_region_index_input:
            region = [_one_hot_region(self.bottom_region)]
            inputs["bottom_region_index_tensor"] = torch.tensor(region, dtype=torch.float32, device=self.device)
        if unet.num_class_embeds is not None:
            modality = int(self._config.get("modality_class", 1))
            inputs["class_labels"] = torch.tensor([modality], dtype=torch.long, device=self.device)
        return inputs

    def _set_num_splits(self, grid: Geometry) -> None:
        """MAISI's split convolutions: only on CUDA (they raise the CPU peak) and only where exact."""
        arguments = self._config["autoencoder"]
        size = grid.shape_ijk[int(arguments["dim_split"])]
        stages = len(arguments["num_channels"]) - 1
        configured = int(arguments["num_splits"]) if self.device.type == "cuda" else 1
        set_num_splits(self.autoencoder, _safe_num_splits(configured, size, stages))

    def _run(self, volume: Volume, grid: Geometry, progress: ProgressFn) -> dict[int, torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        image = self._model_input(volume, grid)
        progress("features", 0.05, "MAISI: encoding")
        self._set_num_splits(grid)
        with torch.no_grad():
            with self._autocast():
                z_mu, z_sigma = self.autoencoder.encode(image)
            del image
            latent = z_mu.float()
            if self.latent == "sample":
                draw = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(self.device)
                latent = latent + draw * z_sigma.float()
            del z_mu, z_sigma
            latent = latent * self.scale_factor
            self._free_device_memory()
            progress("features", 0.4, "MAISI: diffusion UNet")
            return self._decoder_features(latent, grid, generator, progress)

    def _decoder_features(
        self, latent: torch.Tensor, grid: Geometry, generator: torch.Generator, progress: ProgressFn
    ) -> dict[int, torch.Tensor]:
        summed: dict[int, torch.Tensor] = {}
        blocks = [layout.block for layout in self.layouts]
        state = {"draw": 0}

        def capture(block: int):
            def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
                features_kji = output.detach()[0].float().permute(0, 3, 2, 1).contiguous().cpu()
                if block in summed:
                    summed[block].add_(features_kji)
                else:
                    summed[block] = features_kji
                done = state["draw"] + (block + 1) / len(self.unet.up_blocks)
                progress("features", 0.4 + 0.55 * done / self.noise_draws, f"MAISI: decoder block {block}")

            return hook

        timesteps = torch.tensor([self.timestep], dtype=torch.long, device=self.device)
        conditioning = self._conditioning(grid)
        handles = [self.unet.up_blocks[block].register_forward_hook(capture(block)) for block in blocks]
        try:
            for draw in range(self.noise_draws):
                state["draw"] = draw
                noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(self.device)
                noisy = self.scheduler.add_noise(original_samples=latent, noise=noise, timesteps=timesteps)
                del noise
                with self._autocast():
                    self.unet(x=noisy, timesteps=timesteps, **conditioning)
                del noisy
                self._free_device_memory()
        finally:
            for handle in handles:
                handle.remove()
        return summed
