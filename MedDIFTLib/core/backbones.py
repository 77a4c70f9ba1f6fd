"""The backbones as a user interface offers them, without loading any: torch-free and numpy-free.

The Slicer panel lists :data:`PANEL_BACKBONES` (label, whether pretrained weights are needed and
which weights configuration, and the options it shows, each with its range or choices and
default) and builds the run's ``backbone_options`` with :func:`backbone_options`. The registry
(:mod:`MedDIFTLib.features.registry`) stays the only place that turns a name into a featurizer;
a test checks that each name, weights flag, option and default here is the registry's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadInputError

BODY_REGIONS = ("head", "chest", "abdomen", "pelvis")


@dataclass(frozen=True)
class PanelOption:
    """One backbone option a panel shows: the backbone's keyword ``name``, its ``label``, its
    ``default`` and either a whole-number range (``minimum``..``maximum``) or ``choices``."""

    name: str
    label: str
    default: Any
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    help: str = ""

    def check(self, value: Any) -> Any:
        """``value`` if it fits the range or the choices, else a :class:`BadInputError`."""
        if self.choices:
            if value not in self.choices:
                raise BadInputError(f"option {self.name!r}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not self.minimum <= value <= self.maximum:
            raise BadInputError(f"option {self.name!r} must be a whole number in [{self.minimum}, {self.maximum}]")
        return value


@dataclass(frozen=True)
class PanelBackbone:
    """A backbone in the panel: registry ``name``, ``label``, its ``weights_config`` (the weights
    files it needs; None: weight-free) and the ``options`` shown."""

    name: str
    label: str
    weights_config: str | None
    options: tuple[PanelOption, ...] = ()

    @property
    def requires_weights(self) -> bool:
        return self.weights_config is not None


_REGION_HELP = "body region at the {} of the volume (the diffusion UNet is conditioned on it)"
PANEL_BACKBONES: tuple[PanelBackbone, ...] = (
    PanelBackbone("mind", "Weight-free (MIND-SSC)", None),
    PanelBackbone(
        "maisi",
        "Diffusion (MAISI)",
        "ddpm-ct",
        (
            PanelOption("timestep", "Diffusion timestep", 20, minimum=0, maximum=999,
                        help="noise level of the single UNet pass (of 1000 steps); small values work best"),
            PanelOption("top_region", "Body region (top)", "chest", choices=BODY_REGIONS,
                        help=_REGION_HELP.format("top")),
            PanelOption("bottom_region", "Body region (bottom)", "chest", choices=BODY_REGIONS,
                        help=_REGION_HELP.format("bottom")),
        ),
    ),
)


def panel_backbone(name: str) -> PanelBackbone:
    """The panel's entry for backbone ``name``; unknown names are a :class:`BadInputError`."""
    for backbone in PANEL_BACKBONES:
        if backbone.name == name:
            return backbone
    raise BadInputError(f"the panel offers no backbone {name!r}; it offers: "
                        f"{', '.join(backbone.name for backbone in PANEL_BACKBONES)}")


def backbone_options(name: str, values: Mapping[str, Any], weights_dir: str | None = None) -> dict[str, Any]:
    """The ``backbone_options`` of a run: each shown option's value (its default when ``values``
    lacks it, checked against its range), and ``weights_dir`` for a backbone that needs weights."""
    backbone = panel_backbone(name)
    options = {option.name: option.check(values.get(option.name, option.default)) for option in backbone.options}
    if backbone.requires_weights and weights_dir:
        options["weights_dir"] = str(weights_dir)
    return options
