"""The MAISI diffusion backbone, read in pipeline order: :mod:`.config` (network configurations),
:mod:`.grid` (model grid, resampling and exact level geometry in LPS mm), :mod:`.networks` (MONAI
networks, scheduler, strict checkpoint loading) and :mod:`.featurizer` (:class:`MaisiFeaturizer`).
"""

from .config import BODY_REGIONS, DEFAULT_CONFIG, load_config, packaged_configs
from .featurizer import LATENT_MODES, PRECISIONS, MaisiFeaturizer, available_host_bytes
from .grid import LevelLayout, closest_ras_axes, level_layouts, model_grid, model_image, model_size_multiple
from .networks import build_networks, build_scheduler, safe_num_splits, set_flash_attention, set_num_splits

__all__ = [
    "BODY_REGIONS",
    "DEFAULT_CONFIG",
    "LATENT_MODES",
    "PRECISIONS",
    "LevelLayout",
    "MaisiFeaturizer",
    "available_host_bytes",
    "build_networks",
    "build_scheduler",
    "closest_ras_axes",
    "level_layouts",
    "load_config",
    "model_grid",
    "model_image",
    "model_size_multiple",
    "packaged_configs",
    "safe_num_splits",
    "set_flash_attention",
    "set_num_splits",
]
