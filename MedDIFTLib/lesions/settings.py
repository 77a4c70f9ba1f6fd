"""The knobs of lesion tracking, typed and range-checked like :mod:`MedDIFTLib.core.options`
(torch- and numpy-free, so ``meddift track --help`` reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.options import Options, option


@dataclass(frozen=True)
class LesionOptions(Options):
    """How each lesion is found, segmented and flagged in the follow-up (distances in mm)."""

    refine: bool = option(True, help="fit each carried lesion to the follow-up image (off: the carried labelmap)")
    growth_margin_mm: float = option(4.0, minimum=0.0, help="the refined lesion may reach this far beyond "
                                     "the largest growth of the baseline lesion around its matched centre, mm")
    largest_volume_factor: float = option(3.0, above=0.0, help="the largest growth in volume the refined lesion "
                                          "may show (times the baseline volume)")
    seed_radius_mm: float = option(20.0, above=0.0, help="largest radius of a lesion segmented from a point, mm")
    confidence_threshold: float = option(0.5, minimum=0.0, maximum=1.0,
                                         help="a centre match below this confidence is flagged low_confidence")
    centre_search_radius_mm: float = option(15.0, above=0.0, help="the centre is searched this far around "
                                            "where the field carries it, mm")


STATUSES = ("ok", "not_found", "leaves_volume", "merges", "low_confidence", "touches_border", "unsupported_growth")

__all__ = ["STATUSES", "LesionOptions"]
