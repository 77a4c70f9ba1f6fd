"""The correspondence engine's options: how it searches and scores (distances in mm)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Options, option

SEARCH_RADIUS_MM = 25.0


@dataclass(frozen=True)
class MatchOptions(Options):
    """How the correspondence engine searches and scores (distances in mm)."""

    search_radius_mm: float = option(SEARCH_RADIUS_MM, above=0.0, help="local search radius around the prior, mm")
    mode: str = option(
        "local", choices=("local", "global"), help="local: a sphere around the prior; global: the whole moving volume"
    )
    coarse_to_fine: bool = option(True, help="search a coarse lattice first, then refine at full resolution")
    coarse_step_mm: float = option(4.0, above=0.0, help="step of the coarse lattice, mm")
    exact: bool = option(False, help="interpolate features before the cosine (slower; for checks)")
    subvoxel: bool = option(
        True, help="sub-voxel refinement of the best candidate: a parabola through its lattice scores, then for "
        "points a pattern search on the finest level"
    )
    level_weights: tuple[float, ...] | None = option(
        None, minimum=0.0, help="per-level fusion weights (default: the backbone's)"
    )
    patch_radius: int | None = option(None, minimum=0, help="patch radius in level voxels (default: the backbone's)")
    patch_step: int = option(
        1,
        minimum=1,
        help="spacing of the patch's taps, level voxels (rounded down to a divisor of 2 x radius; "
        "2 scores about twice as fast, a little less accurately)",
    )
    backward_check: bool = option(True, help="match back from moving to fixed to measure consistency")
    fb_scale_mm: float = option(3.0, above=0.0, help="forward-backward distance at which confidence falls to 0.61x")
    confidence_threshold: float = option(
        0.5, minimum=0.0, maximum=1.0, help="matches below this confidence are flagged unreliable"
    )
    context_mm: float = option(
        8.0,
        minimum=0.0,
        help="an unreliable match is placed by the median motion of the reliable matches of 26 points this "
        "far around it (twice as far if fewer than 4 are reliable), mm; it stays flagged unreliable; 0: off",
    )
    memory_budget_mb: float = option(64.0, above=0.0, help="bound on the working tensors of one batch, MB")
