"""Backbones, chosen by name: ``mind`` (weight-free MIND-SSC) and ``maisi`` (diffusion features)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..core.errors import BadInputError
from .protocol import Featurizer

BACKBONES = {
    "mind": ("MedDIFTLib.features.mind", "MindFeaturizer"),
    "maisi": ("MedDIFTLib.features.maisi", "MaisiFeaturizer"),
}


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def create_featurizer(name: str, **options: Any) -> Featurizer:
    """Build the backbone ``name`` with its options (e.g. ``device``); unknown names are rejected."""
    if name not in BACKBONES:
        raise BadInputError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    module_name, class_name = BACKBONES[name]
    featurizer_class = getattr(importlib.import_module(module_name), class_name)
    try:
        inspect.signature(featurizer_class).bind(**options)
    except TypeError:
        accepted = list(inspect.signature(featurizer_class).parameters)
        unknown = [option for option in options if option not in accepted]
        raise BadInputError(
            f"backbone {name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        ) from None
    return featurizer_class(**options)


__all__ = ["BACKBONES", "available_backbones", "create_featurizer"]
