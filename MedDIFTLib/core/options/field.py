"""The dense field's options: its coarse-to-fine levels, fit, instance optimisation and inverse
(distances in mm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import BadInputError
from .base import Options, option
from .matching import SEARCH_RADIUS_MM, MatchOptions


@dataclass(frozen=True)
class FieldLevel(Options):
    """One coarse-to-fine level of the field: lattice step (mm), search radius around the field so
    far (mm), smoothness length of the fitted field (mm), and the half-width (lattice nodes) of the
    box over which similarities are averaged."""

    spacing_mm: float = option(6.0, above=0.0, help="lattice of searched points, mm")
    search_radius_mm: float = option(SEARCH_RADIUS_MM, above=0.0, help="largest motion searched for, mm")
    smoothness_mm: float = option(10.0, above=0.0, help="smoothing length of the fitted field, mm")
    aggregation_nodes: int = option(1, minimum=0, help="half-width of the similarity aggregation box, nodes")
    step_mm: float | None = option(None, above=0.0, help="step of the searched shifts, mm (default: spacing_mm)")

    def match_options(self) -> MatchOptions:
        """The correspondence engine's options for this level: its search radius (mm), candidates
        every ``step_mm`` (mm; default ``spacing_mm``), the other matching knobs at their defaults."""
        step_mm = self.spacing_mm if self.step_mm is None else self.step_mm
        return MatchOptions(search_radius_mm=self.search_radius_mm, coarse_step_mm=step_mm)


@dataclass(frozen=True)
class FieldOptions(Options):
    """How the dense field is built (distances in mm).

    ``levels``: coarse to fine; the first searches from identity, so its radius bounds the motion
    that can be found. ``automatic_region``: fit the field where the fixed image has content, leaving
    out uniform dark background connected to its border (:mod:`MedDIFTLib.field.region`; false: the
    whole image)."""

    levels: tuple[FieldLevel, ...] = option(
        (
            FieldLevel(spacing_mm=8.0, search_radius_mm=35.0, smoothness_mm=4.0),
            FieldLevel(spacing_mm=6.0, search_radius_mm=13.0, smoothness_mm=3.0),
        ),
        help="search levels, coarse to fine",
    )
    robust_iterations: int = option(3, minimum=0, help="reweighting passes of the robust fit")
    optimise_iterations: int = option(8, minimum=0, help="instance optimisation steps (0: off)")
    optimise_spacing_mm: float = option(3.0, above=0.0, help="node spacing of the instance optimisation, mm")
    optimise_regularisation: float = option(0.1, minimum=0.0, help="smoothness penalty of the instance optimisation")
    break_gradient: float | None = option(
        0.2, above=0.0, help="displacement gradient (mm/mm) above which the field may break where organs slide "
        "(total variation); None: diffusion everywhere"
    )
    automatic_region: bool = option(
        True, help="leave out uniform dark background at the image border (air, no signal); false: whole image"
    )
    inverse_spacing_mm: float = option(2.0, above=0.0, help="grid on which the inverse field is solved, mm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.levels and self.optimise_iterations <= 0:
            raise BadInputError("the field needs at least one matching level or instance optimisation")

    def with_level_knobs(
        self, search_radius_mm: float | None = None, spacing_mm: float | None = None, smoothness_mm: float | None = None
    ) -> FieldOptions:
        """These options with the knobs a command line or panel offers over the levels: the largest
        motion searched for (the first level's radius), and the finest lattice and its smoothing (the
        last level's spacing and smoothness; an earlier level keeps a lattice at least that coarse).
        A knob left None keeps the levels' own value."""
        if not self.levels:
            return self
        levels = list(self.levels)
        if search_radius_mm is not None:
            levels[0] = dataclasses.replace(levels[0], search_radius_mm=search_radius_mm)
        if spacing_mm is not None:
            levels = [dataclasses.replace(level, spacing_mm=max(level.spacing_mm, spacing_mm)) for level in levels]
            levels[-1] = dataclasses.replace(levels[-1], spacing_mm=spacing_mm)
        if smoothness_mm is not None:
            levels[-1] = dataclasses.replace(levels[-1], smoothness_mm=smoothness_mm)
        return dataclasses.replace(self, levels=tuple(levels))
