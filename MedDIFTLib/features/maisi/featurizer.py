"""MAISI diffusion features, the MedDIFT backbone: :class:`MaisiFeaturizer`.

For one volume:
1. The image is resampled onto the model grid (:mod:`.grid`), HU clipped to ``hu_window``
   ([-1000, 1000]) and scaled to [0, 1].
2. Encoder: latent = posterior mean (default, deterministic) or a sample, times the diffusion
   checkpoint's ``scale_factor``.
3. Noise of timestep ``t`` (default 20 of 1000) added in fp32 from a seeded generator with the
   configured scheduler (DDPM for v1, rectified flow for v2), optionally averaged over draws.
4. One UNet pass conditioned as in MAISI: spacing in mm x 100, top/bottom body region one-hot x 100
   (v1; chest by default), modality class (v2). Forward hooks on ``up_blocks[i]`` capture the
   decoder activations (512/256/128/64 channels at 1/16, 1/8, 1/4, 1/4 of the model grid in the
   official networks) and are removed afterwards. Each level's geometry is exact (:mod:`.grid`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import weights as weight_files
from ...core.devices import is_out_of_memory, resolve_device
from ...core.errors import BadInputError, MissingWeightsError, OutOfMemoryError
from ...core.geometry import Geometry
from ...core.io.volumes import Volume
from ...core.progress import ProgressFn, no_progress
from ..protocol import FeatureLevel, FeaturePyramid
from .config import SPACING_SCALE, ConfigSource, load_config, one_hot_region, weight_file_names
from .grid import describe_grid, level_layouts, model_grid, model_image, model_size_multiple
from .networks import (
    build_networks,
    build_scheduler,
    load_autoencoder_weights,
    load_unet_weights,
    safe_num_splits,
    set_flash_attention,
    set_num_splits,
)

PRECISIONS = ("fp32", "bf16", "fp16")
LATENT_MODES = ("mean", "sample")
# Peak host memory of a CPU extraction above the loaded networks: a fixed part plus a part per
# model-grid voxel of the full-size v1 networks (``bytes_per_model_voxel`` of
# benchmarks/maisi_features.py; re-measure there when the networks or MONAI change). It is used
# to refuse, before starting, a run that cannot fit.
CPU_OVERHEAD_BYTES = 0.3 * 2**30
CPU_BYTES_PER_MODEL_VOXEL = {"fp32": 1000, "bf16": 900}


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where the system does not tell."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _weight_paths(config: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """The configuration's checkpoint files in ``folder``; absent ones raise :class:`MissingWeightsError`."""
    names = weight_file_names(config)
    paths = [weight_files.locate(name, folder) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raise weight_files.missing_weights_error(missing, folder, config["name"])
    return paths[0], paths[1]


class MaisiFeaturizer:
    """MAISI diffusion-UNet decoder features; weights come from ``weights_dir`` (see :mod:`MedDIFTLib.weights`).

    ``device``: ``auto``, ``cpu`` or ``cuda[:n]``. ``precision``: ``fp32``, ``bf16`` or ``fp16``
    (CUDA only); default bf16 on CUDA, fp32 on CPU. ``timestep``: diffusion step of the added noise.
    ``spacing_mm``: model-grid spacing (one value or per R, A, S axis; default: the image's).
    ``top_region``/``bottom_region``: body-region conditioning of the v1 UNet.
    ``latent``: ``mean`` (deterministic) or ``sample``. ``noise_draws``: features averaged over
    this many noise draws from generator seed ``seed``. ``levels``: up-block indices to keep,
    ``level_weights`` their fusion weights. ``config``: ``ddpm-ct`` (v1, default), ``rflow-ct``
    (v2), or a JSON path/dict of the same layout (tiny networks for tests and experiments).
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
        config: ConfigSource | None = None,
        **_other_options: Any,
    ) -> tuple[bool, str]:
        """``(present, message)``: whether the configuration's checkpoint files are in the weights folder."""
        loaded = load_config(config)
        folder = weight_files.resolve_weights_dir(weights_dir)
        try:
            _weight_paths(loaded, folder)
        except MissingWeightsError as error:
            return False, str(error)
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
        config: ConfigSource | None = None,
        flash_attention: bool = True,
        check_memory: bool = True,
    ) -> None:
        self._config = load_config(config)
        self.device = resolve_device(str(device))
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise BadInputError("fp16 runs on CUDA only; on CPU use fp32 or bf16")
        self.spacing_mm = None if spacing_mm is None else tuple(np.broadcast_to(np.asarray(spacing_mm, float), (3,)))
        if self.spacing_mm is not None and not all(np.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise BadInputError(f"spacing must be positive mm, got {spacing_mm}")
        for region in (top_region, bottom_region):
            one_hot_region(region)
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

        self.weights_dir = weight_files.resolve_weights_dir(weights_dir)
        autoencoder_path, unet_path = _weight_paths(self._config, self.weights_dir)
        self.autoencoder, self.unet = build_networks(
            self._config, norm_float16=self.device.type == "cuda" and self.precision == "fp16"
        )
        load_autoencoder_weights(self.autoencoder, autoencoder_path, self._config)
        self.scale_factor, checkpoint_timesteps = load_unet_weights(self.unet, unet_path, self._config)
        self.scheduler, self.num_train_timesteps = build_scheduler(self._config, checkpoint_timesteps)
        if not 0 <= int(timestep) < self.num_train_timesteps:
            raise BadInputError(f"timestep must lie in [0, {self.num_train_timesteps - 1}], got {timestep}")
        self.timestep = int(timestep)
        set_flash_attention(self.unet, self.flash_attention)
        self._weights_fingerprint = {
            "autoencoder": weight_files.quick_fingerprint(autoencoder_path),
            "diffusion_unet": weight_files.quick_fingerprint(unet_path),
        }
        self.autoencoder.to(self.device)
        self.unet.to(self.device)

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
        per_voxel = CPU_BYTES_PER_MODEL_VOXEL.get(self.precision, CPU_BYTES_PER_MODEL_VOXEL["fp32"])
        scale = self._config["autoencoder"]["num_channels"][0] / 64  # the full-resolution activations dominate
        return int(CPU_OVERHEAD_BYTES + grid.num_voxels * per_voxel * scale)

    def extract(self, volume: Volume, progress: ProgressFn = no_progress) -> FeaturePyramid:
        """Features of ``volume``; every level's geometry maps its voxels to LPS mm exactly."""
        progress("features", 0.0, "MAISI: resampling to the model grid")
        grid = self.model_grid(volume.geometry)
        self._refuse_if_too_large(grid)
        try:
            summed = self._run(volume, grid, progress)
        except (RuntimeError, MemoryError) as error:
            if is_out_of_memory(error):
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
        available = available_host_bytes()
        needed = self.estimated_peak_bytes(grid)
        if available is not None and needed > available:
            raise OutOfMemoryError(
                f"MAISI features on a {describe_grid(grid)} need about {needed / 2**30:.1f} GiB of memory, "
                f"{available / 2**30:.1f} GiB are available; {self._memory_advice()}"
            )

    def _memory_advice(self) -> str:
        if self.device.type == "cpu":
            return "use a coarser model spacing (backbone option spacing_mm) or a GPU"
        return "use a coarser model spacing (backbone option spacing_mm), bf16/fp16 precision, or a larger GPU"

    def _out_of_memory_message(self, grid: Geometry) -> str:
        return (
            f"MAISI feature extraction ran out of {self.device.type} memory on a {describe_grid(grid)}; "
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

    def _conditioning(self, grid: Geometry) -> dict[str, torch.Tensor]:
        unet = self.unet
        inputs: dict[str, torch.Tensor] = {}
        if unet.include_spacing_input:
            spacing = [s * SPACING_SCALE for s in grid.spacing_mm]
            inputs["spacing_tensor"] = torch.tensor([spacing], dtype=torch.float32, device=self.device)
        if unet.include_top_region_index_input:
            region = [one_hot_region(self.top_region)]
            inputs["top_region_index_tensor"] = torch.tensor(region, dtype=torch.float32, device=self.device)
        if unet.include_bottom_region_index_input:
            region = [one_hot_region(self.bottom_region)]
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
        set_num_splits(self.autoencoder, safe_num_splits(configured, size, stages))

    def _run(self, volume: Volume, grid: Geometry, progress: ProgressFn) -> dict[int, torch.Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        image = torch.from_numpy(model_image(volume, grid, self.hu_window))[None, None].to(self.device)
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
