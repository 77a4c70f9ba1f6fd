"""A run's settings: backbone and its options, device, and the matching and field options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Options, option
from .field import FieldOptions
from .matching import MatchOptions


@dataclass(frozen=True)
class RunSettings(Options):
    """How a run goes: backbone name and its options, device (``auto``, ``cpu``, ``cuda[:N]``),
    and the match and field options."""

    backbone: str = option("mind", help="feature backbone")
    backbone_options: dict[str, Any] = option(
        default_factory=dict, help="the backbone's own options, e.g. MAISI's timestep (each backbone checks its own)"
    )
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    match: MatchOptions = option(default_factory=MatchOptions, help="how the correspondence engine searches and scores")
    field: FieldOptions = option(default_factory=FieldOptions, help="how the dense field is built")
