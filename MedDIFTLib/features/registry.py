"""The backbones, chosen by name: the only place that maps a name to a featurizer.

``mind`` (weight-free MIND-SSC) and ``maisi`` (diffusion features) are registered backbones. Each
entry names its featurizer class (imported on first use, so listing the backbones imports no
network code), the options it takes and whether it needs pretrained weights. The CLI, the worker,
the evaluation and the Slicer panel read these entries; nothing else branches on a backbone name.

Fused backbones: registered names joined by ``+`` (each at most once), e.g. ``mind+maisi``
(listed) or ``maisi+mind`` (built on request), give a :class:`~.fused.FusedFeaturizer`. Their options:

- ``part.option`` goes to that part: ``maisi.timestep=20``, ``maisi.config="rflow-ct"``, ``mind.scales=[1, 2]``;
- ``device`` and ``weights_dir`` are shared: every part that takes them gets them (a weight-free
  part ignores ``weights_dir``);
- ``part_weights``: one positive number per part, in name order (default all 1), the parts' shares
  of the fused similarity.

A fused backbone needs weights when any part does; its ``weights_status`` is its parts'.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from ..core.errors import BadInputError
from .fused import PART_SEPARATOR, FusedFeaturizer, check_part_weights
from .protocol import Featurizer

# Options every backbone is given by the job that runs it, never by the user's option list.
RUN_OPTIONS = ("device",)
# Options a fused backbone hands to each of its parts that takes them.
SHARED_OPTIONS = ("device", "weights_dir")
PART_OPTION_SEPARATOR = "."


def _refuse_unknown(name: str, options: dict[str, Any], accepted: list[str]) -> None:
    unknown = [option for option in options if option not in accepted]
    if unknown:
        raise BadInputError(
            f"backbone {name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )


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

    def create(self, **options: Any) -> Featurizer:
        """The featurizer with ``options``; unknown ones are refused, ``weights_dir`` is dropped if weight-free."""
        if not self.requires_weights:
            options.pop("weights_dir", None)
        _refuse_unknown(self.name, options, self.option_names())
        return self.featurizer_class()(**options)


@dataclass(frozen=True)
class FusedBackboneSpec:
    """Registered backbones fused into one pyramid (see the module notes for names and options)."""

    parts: tuple[BackboneSpec, ...]

    @property
    def name(self) -> str:
        return PART_SEPARATOR.join(part.name for part in self.parts)

    @property
    def requires_weights(self) -> bool:
        return any(part.requires_weights for part in self.parts)

    @property
    def summary(self) -> str:
        return f"{' fused with '.join(part.name for part in self.parts)} (per-part weights)"

    def featurizer_class(self) -> type:
        for part in self.parts:
            part.featurizer_class()
        return FusedFeaturizer

    def option_names(self) -> list[str]:
        """``device``, ``part_weights``, ``weights_dir`` if a part needs weights, and every ``part.option``."""
        shared = [option for option in SHARED_OPTIONS if option != "weights_dir" or self.requires_weights]
        routed = [
            f"{part.name}{PART_OPTION_SEPARATOR}{option}"
            for part in self.parts
            for option in part.option_names()
            if option not in SHARED_OPTIONS
        ]
        return [*shared, "part_weights", *routed]

    def route(self, options: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], Any]:
        """``(options per part name, part_weights)``; unknown options are refused."""
        options = dict(options)
        if not self.requires_weights:
            options.pop("weights_dir", None)
        _refuse_unknown(self.name, options, self.option_names())
        part_weights = options.pop("part_weights", None)
        routed: dict[str, dict[str, Any]] = {}
        for part in self.parts:
            accepted = part.option_names()
            shared = {key: value for key, value in options.items() if key in SHARED_OPTIONS and key in accepted}
            prefix = f"{part.name}{PART_OPTION_SEPARATOR}"
            own = {key.removeprefix(prefix): value for key, value in options.items() if key.startswith(prefix)}
            routed[part.name] = {**shared, **own}
        return routed, part_weights

    def weights_status(self, **options: Any) -> tuple[bool, str]:
        """Present when every part's weights are; the message names each part that needs weights."""
        routed, _ = self.route(options)
        statuses = [(part.name, part.weights_status(**routed[part.name])) for part in self.parts]
        present = all(status[0] for _, status in statuses)
        needing = [(name, status) for (name, status), part in zip(statuses, self.parts) if part.requires_weights]
        return present, "; ".join(f"{name}: {message}" for name, (_, message) in needing) or "needs no weights"

    def create(self, **options: Any) -> Featurizer:
        """Every part built with its own options, fused with ``part_weights``."""
        routed, part_weights = self.route(options)
        shares = check_part_weights(part_weights, len(self.parts))  # before any part loads its networks
        parts = {part.name: part.create(**routed[part.name]) for part in self.parts}
        return FusedFeaturizer(parts, shares)


Backbone = BackboneSpec | FusedBackboneSpec

_SINGLE: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mind", "MedDIFTLib.features.mind", "MindFeaturizer", False, "MIND-SSC, weight-free"),
        BackboneSpec(
            "maisi", "MedDIFTLib.features.maisi.featurizer", "MaisiFeaturizer", True, "MAISI diffusion UNet features"
        ),
    )
}


def fused_spec(part_names: list[str]) -> FusedBackboneSpec:
    """The fusion of registered backbones ``part_names`` (at least two, each once, none itself fused)."""
    unknown = [name for name in part_names if name not in _SINGLE]
    if unknown:
        raise BadInputError(
            f"unknown backbone(s) {', '.join(map(repr, unknown))} in "
            f"{PART_SEPARATOR.join(part_names)!r}; parts are: {', '.join(sorted(_SINGLE))}"
        )
    if len(part_names) < 2 or len(set(part_names)) != len(part_names):
        raise BadInputError(
            f"a fused backbone names two or more different backbones, got {PART_SEPARATOR.join(part_names)!r}"
        )
    return FusedBackboneSpec(tuple(_SINGLE[name] for name in part_names))


BACKBONES: dict[str, Backbone] = {**_SINGLE, "mind+maisi": fused_spec(["mind", "maisi"])}


def available_backbones() -> list[str]:
    """The listed backbone names (any other fusion of registered ones is built on request)."""
    return sorted(BACKBONES)


def backbone_spec(name: str) -> Backbone:
    """The backbone ``name`` (a registered one or a ``+`` fusion of them); unknown names are a
    :class:`BadInputError` listing the known ones."""
    if name in BACKBONES:
        return BACKBONES[name]
    if isinstance(name, str) and PART_SEPARATOR in name:
        return fused_spec(name.split(PART_SEPARATOR))
    raise BadInputError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")


def create_featurizer(name: str, **options: Any) -> Featurizer:
    """Build the backbone ``name`` with its options (e.g. ``device``); unknown names and options are refused.

    ``weights_dir`` is accepted, and ignored, by a backbone that needs no weights, so one command
    line serves every backbone.
    """
    return backbone_spec(name).create(**options)


__all__ = [
    "BACKBONES",
    "RUN_OPTIONS",
    "SHARED_OPTIONS",
    "Backbone",
    "BackboneSpec",
    "FusedBackboneSpec",
    "available_backbones",
    "backbone_spec",
    "create_featurizer",
    "fused_spec",
]
