"""Pretrained weight files: what exists (:mod:`.registry`), where it lives on this machine, how to get
it (:mod:`.download`), how to check it (:mod:`.verify`) and how to load it safely (:mod:`.checkpoints`).

Importing this package imports no torch (Slicer's process reads :func:`default_weights_dir`);
:func:`load_checkpoint` imports it on use.
"""

from .checkpoints import ROLES, check_layout, describe_checkpoint, fetch_commands, load_checkpoint, scale_factor_of
from .download import HF_TOKEN_ENV, choose_source, download_file, import_file
from .registry import (
    REGISTRY,
    WEIGHTS_DIR_ENV,
    WeightFile,
    WeightSource,
    default_weights_dir,
    files_for_config,
    find_weight_file,
    is_registered,
    locate,
    missing_weights_error,
    registry_entry,
    resolve_weights_dir,
)
from .verify import Verification, check_digests, file_digests, quick_fingerprint, verify_file

__all__ = [
    "HF_TOKEN_ENV",
    "REGISTRY",
    "ROLES",
    "WEIGHTS_DIR_ENV",
    "Verification",
    "WeightFile",
    "WeightSource",
    "check_digests",
    "check_layout",
    "choose_source",
    "default_weights_dir",
    "describe_checkpoint",
    "download_file",
    "fetch_commands",
    "file_digests",
    "files_for_config",
    "find_weight_file",
    "import_file",
    "is_registered",
    "load_checkpoint",
    "locate",
    "missing_weights_error",
    "quick_fingerprint",
    "registry_entry",
    "resolve_weights_dir",
    "scale_factor_of",
    "verify_file",
]
