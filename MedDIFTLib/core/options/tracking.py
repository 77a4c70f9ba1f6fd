"""Lesion tracking's options: how each lesion is found, segmented and flagged, and how a series is
followed and measured (distances in mm).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Options, option


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
    field_margin_mm: float = option(15.0, minimum=0.0, help="the field is computed only around each lesion, this "
                                    "far beyond it, mm (0: over the whole follow-up)")


STATUSES = ("ok", "not_found", "leaves_volume", "merges", "low_confidence", "touches_border", "unsupported_growth")

SERIES_ROUTES = ("chained", "direct", "auto")


@dataclass(frozen=True)
class SeriesOptions(Options):
    """How lesions are followed through several follow-ups and which of them the response (RECIST 1.1)
    is measured on (distances in mm)."""

    route: str = option("auto", choices=SERIES_ROUTES, help="how follow-up k is reached: chained (from follow-up "
                        "k-1's tracked lesions), direct (from the baseline), auto (both; direct where they agree, "
                        "else the more confident centre match)")
    agreement_mm: float = option(3.0, minimum=0.0, help="auto: the two routes agree on a lesion when their centres "
                                 "are at most this far apart or within the lesion's baseline equivalent radius, "
                                 "and both or neither segment it, mm")
    measurable_mm: float = option(10.0, above=0.0, help="a target lesion has a longest axial diameter of at least "
                                  "this at baseline, mm (RECIST 1.1: 10)")
    max_targets: int = option(5, minimum=1, help="at most this many target lesions, the largest measurable ones "
                              "(RECIST 1.1: 5)")
