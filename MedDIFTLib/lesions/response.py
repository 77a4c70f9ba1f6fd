"""Tumour response over a series of scans: the RECIST 1.1 rules on the sum of longest diameters.

Eisenhauer EA et al., "New response evaluation criteria in solid tumours: Revised RECIST guideline
(version 1.1)", Eur J Cancer 2009;45:228-247. The sum of the longest diameters (SLD, mm) of the
target lesions at each time point is compared with the baseline SLD and with the nadir, the
smallest SLD so far (baseline included, the time point itself not):

- **CR** (complete response): every target lesion has disappeared (SLD 0);
- **PD** (progressive disease): the SLD is at least 20 % above the nadir *and* at least 5 mm above it;
- **PR** (partial response): the SLD is at least 30 % below the baseline SLD;
- **SD** (stable disease): none of these.

PD is checked before PR (a sum 30 % below baseline but 20 % and 5 mm above a smaller nadir is
progression). A time point at which a target lesion cannot be measured is **NE** (not evaluable)
and does not update the nadir; so is every time point when there is no target lesion (baseline
SLD 0). Only the target lesions' diameters are assessed here: the rules on non-target and new
lesions and on lymph nodes' short axes are the reader's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CATEGORIES = ("CR", "PR", "SD", "PD", "NE")
PR_DECREASE = 0.30
"""Least decrease of the SLD from baseline for a partial response (fraction)."""
PD_INCREASE = 0.20
"""Least increase of the SLD over the nadir for progression (fraction), with :data:`PD_INCREASE_MM`."""
PD_INCREASE_MM = 5.0
"""Least absolute increase of the SLD over the nadir for progression, mm."""
TOLERANCE_MM = 1e-6
"""Diameters this close to a threshold count as on it (exactly 30 % is PR): floating-point slack."""


@dataclass(frozen=True)
class Response:
    """The response at one time point: ``sld_mm`` (sum of the target lesions' longest diameters),
    ``nadir_mm`` (the smallest evaluable SLD before this time point, baseline included; the baseline
    SLD at baseline), the changes from baseline and from the nadir (%; NaN where the reference is 0)
    and ``category`` (one of :data:`CATEGORIES`; None at baseline)."""

    time_point: int
    sld_mm: float
    nadir_mm: float
    change_from_baseline_pct: float
    change_from_nadir_pct: float
    category: str | None


def classify(sld_mm: float, baseline_mm: float, nadir_mm: float, evaluable: bool = True) -> str:
    """The RECIST 1.1 category of a follow-up with sum ``sld_mm`` against ``baseline_mm`` and
    ``nadir_mm`` (all mm); ``evaluable`` False when a target lesion could not be measured."""
    if not evaluable or not baseline_mm > 0:
        return "NE"
    if sld_mm <= TOLERANCE_MM:
        return "CR"
    increase_mm = sld_mm - nadir_mm
    if increase_mm >= PD_INCREASE_MM - TOLERANCE_MM and increase_mm >= PD_INCREASE * nadir_mm - TOLERANCE_MM:
        return "PD"
    if baseline_mm - sld_mm >= PR_DECREASE * baseline_mm - TOLERANCE_MM:
        return "PR"
    return "SD"


def _change_pct(reference_mm: float, value_mm: float) -> float:
    return 100.0 * (value_mm / reference_mm - 1.0) if reference_mm > 0 else math.nan


def assess(sld_mm: Sequence[float], evaluable: Sequence[bool] | None = None) -> list[Response]:
    """The response at every time point of a series of sums ``sld_mm`` (baseline first, mm);
    ``evaluable[k]`` False when a target lesion could not be measured at time point ``k``."""
    if not sld_mm:
        raise ValueError("a series needs the baseline sum")
    evaluable = [True] * len(sld_mm) if evaluable is None else list(evaluable)
    baseline_mm = float(sld_mm[0])
    nadir_mm = baseline_mm
    responses = [Response(0, baseline_mm, baseline_mm, 0.0 if baseline_mm > 0 else math.nan,
                          0.0 if baseline_mm > 0 else math.nan, None)]
    for time_point, (value, measured) in enumerate(zip(sld_mm[1:], evaluable[1:]), start=1):
        value = float(value)
        responses.append(Response(time_point, value, nadir_mm, _change_pct(baseline_mm, value),
                                  _change_pct(nadir_mm, value), classify(value, baseline_mm, nadir_mm, measured)))
        if measured:
            nadir_mm = min(nadir_mm, value)
    return responses
