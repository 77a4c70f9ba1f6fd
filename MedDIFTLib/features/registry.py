"""The backbones, chosen by name: the only place that maps a name to a featurizer.

``mind`` (weight-free MIND-SSC) and ``maisi`` (diffusion features). Each entry names its
featurizer class (imported on first use, so listing the backbones imports no network code), the
options it takes and whether it needs pretrained weights. The CLI, the worker, the evaluation
and the Slicer panel read these entries; nothing else branches on a backbone name.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ..core.errors import BadInputError
from .protocol import Featurizer

# Options every backbone is given by the job that runs it, never by the user's option list.
RUN_OPTIONS = ("device",)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: its featurizer class (module and class name) and whether it needs weights."""

    name: str
    module: str
    class_name: str
    requires_weights: bool
    summary: str

    def featurizer_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.class_name)

    def option_names(self) -> list[str]:
        """The options the featurizer takes (its constructor's keywords), ``device`` included."""
        return list(inspect.signature(self.featurizer_class()).parameters)

    def weights_status(self, **options: Any) -> tuple[bool, str]:
        """``(present, message)`` for the weights this backbone needs with ``options``."""
        if not self.requires_weights:
            return True, "needs no weights"
        return self.featurizer_class().weights_status(**options)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mind", "MedDIFTLib.features.mind", "MindFeaturizer", False, "MIND-SSC, weight-free"),
        BackboneSpec("maisi", "MedDIFTLib.features.maisi", "MaisiFeaturizer", True, "MAISI diffusion UNet features"),
    )
}


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def backbone_spec(name: str) -> BackboneSpec:
    """The registered backbone ``name``; an unknown name is a :class:`BadInputError` listing the known ones."""
    if name not in BACKBONES:
        raise BadInputError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    return BACKBONES[name]


def create_featurizer(name: str, **options: Any) -> Featurizer:
    """Build the backbone ``name`` with its options (e.g. ``device``); unknown names and options are refused.

    ``weights_dir`` is accepted, and ignored, by a backbone that needs no weights, so one command
    line serves every backbone.
    """
    spec = backbone_spec(name)
    featurizer_class = spec.featurizer_class()
    accepted = spec.option_names()
    if not spec.requires_weights:
        options.pop("weights_dir", None)
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise BadInputError(
            f"backbone {name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    return featurizer_class(**options)


__all__ = ["BACKBONES", "RUN_OPTIONS", "BackboneSpec", "available_backbones", "backbone_spec", "create_featurizer"]
