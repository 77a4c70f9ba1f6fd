"""Lesions over a series of scans: each lesion followed from the baseline through every follow-up.

Time point 0 is the baseline, 1..N the follow-ups in the order given. Follow-up k is reached by one
of two routes, each one :func:`.track.track_lesions` pair:

- ``chained``: from time point k-1, whose tracked labelmap and centres are the pair's lesions;
- ``direct``: from the baseline and its lesions.

At follow-up 1 the two are the same pair (baseline -> 1), run once and recorded as ``direct``.
``auto`` (:class:`~MedDIFTLib.core.options.SeriesOptions`) runs both, the chained one from auto's
own result at k-1, and per lesion keeps the direct result where the two agree and the one whose
centre match (the correspondence engine's confidence) is more confident where they disagree: their
centres are further apart than the lesion's baseline equivalent radius and ``agreement_mm``, or one
route segments the lesion and the other finds nothing. The kept lesions make follow-up k's
labelmap (a voxel claimed by two lesions stays with the lower label; both are flagged ``merges``).

Each scan's features are extracted once (``extract``); at most the baseline's, the previous and the
current follow-up's are held at a time (a route that no longer needs one lets it go). Several calls
on the same scans (e.g. the routes compared) can share their pairs through :class:`PairRuns`: a pair
with the same input lesions is run once and its result reused, as a fresh run would give it.

Per lesion and time point (:class:`LesionVisit`): the centre (LPS mm: at baseline the lesion's centre
of mass, at a follow-up the engine's match, which exists even where the lesion is gone), the match's
confidence, the measurement (:mod:`.measure`), the flags of the pair (``touches_border`` only at
baseline: at a follow-up the border is ``leaves_volume``) and the route kept. Per time point: the sum
of the longest diameters (SLD) of the target lesions and the RECIST 1.1 response (:mod:`.response`).
Target lesions: the baseline lesions with a longest axial diameter of at least ``measurable_mm`` that
do not touch the baseline border, the largest ``max_targets``. A lesion that is gone (``not_found``)
counts 0 mm; one that reaches or leaves the field of view (``leaves_volume``) or whose follow-up
size the image does not support (``unsupported_growth``) makes its time point not evaluable.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.budget import OPTION_NAMES, MemoryEstimate, estimate_register
from ..core.errors import BadInputError
from ..core.io import check_overlap, check_same_modality
from ..core.io.volumes import Volume
from ..core.options import FieldOptions, LesionOptions, SeriesOptions
from ..core.progress import ProgressFn, no_progress, scaled
from ..features.protocol import FeaturePyramid
from .inputs import Lesions
from .measure import EMPTY, Measurement, change_pct, measure
from .refine import equivalent_radius_mm
from .response import Response, assess
from .track import LesionResult, TrackResult, track_lesions

ExtractFn = Callable[[Volume, ProgressFn], FeaturePyramid]
"""Features of one scan (e.g. a featurizer's ``extract``), called once per scan."""

NOT_EVALUABLE = ("leaves_volume", "unsupported_growth")
"""Flags with which a target lesion's diameter is not the lesion's: its time point is not evaluable."""


@dataclass
class LesionVisit:
    """One lesion at one time point: label and name, ``time_point`` (0 = baseline), centre (LPS mm),
    the centre match's confidence and forward-backward distance (mm; NaN at baseline), the
    measurement, flags, the ``route`` kept (``""`` at baseline) and, with ``auto``, how far apart
    the two routes put the centre (``routes_apart_mm``; NaN otherwise)."""

    label: int
    name: str
    time_point: int
    centre_lps_mm: np.ndarray
    confidence: float
    forward_backward_mm: float
    measurement: Measurement
    flags: list[str] = field(default_factory=list)
    route: str = ""
    routes_apart_mm: float = math.nan
    color: tuple[float, float, float] | None = None

    @property
    def status(self) -> str:
        """``ok`` or the flags joined by ``;``."""
        return ";".join(self.flags) or "ok"

    @property
    def gone(self) -> bool:
        """Nothing of the lesion is segmented here."""
        return self.measurement.volume_ml == 0

    @property
    def evaluable(self) -> bool:
        """Its longest diameter is the lesion's (no flag of :data:`NOT_EVALUABLE`)."""
        return not any(flag in NOT_EVALUABLE for flag in self.flags)

    @property
    def diameter_mm(self) -> float:
        """The longest axial diameter that counts in a sum, mm: 0 for a lesion gone."""
        return 0.0 if self.gone else self.measurement.long_mm


@dataclass
class SeriesResult:
    """The series: ``scan_names`` (baseline first), ``visits[t][n]`` (time point ``t``, lesion ``n`` in
    label order), ``labelmaps[t]`` (``[k, j, i]`` int32 on scan ``t``'s grid, baseline first), the
    target lesions' labels, the response per time point, the ``route`` option and seconds per step."""

    scan_names: list[str]
    visits: list[list[LesionVisit]]
    labelmaps: list[np.ndarray]
    targets: list[int]
    responses: list[Response]
    route: str
    seconds: dict[str, float]

    def timeline(self, label: int) -> list[LesionVisit]:
        """Lesion ``label`` at every time point, baseline first."""
        return [visit for visits in self.visits for visit in visits if visit.label == label]

    def volume_change_pct(self, visit: LesionVisit) -> float:
        """The change of ``visit``'s volume from the lesion's baseline volume, %."""
        return change_pct(self.timeline(visit.label)[0].measurement.volume_ml, visit.measurement.volume_ml)


PairKey = tuple[int, int, str]
"""A pair of a series: (from-scan index, to-scan index, fingerprint of its input lesions and options)."""


@dataclass
class PairRuns:
    """Pair results (:func:`.track.track_lesions`) shared by :func:`track_series` calls on the same
    scans (the same objects, in the same order), e.g. each route of one series: a pair is run once per
    :data:`PairKey` and later calls get a copy of its result (it holds every pair's labelmaps until
    dropped). ``seconds[key]`` is the pair's run time (s) and ``reused_seconds`` adds those of the
    pairs served from here instead of run again."""

    results: dict[PairKey, TrackResult] = field(default_factory=dict)
    seconds: dict[PairKey, float] = field(default_factory=dict)
    reused_seconds: float = 0.0
    scans: tuple[Volume, ...] = ()

    def bind(self, scans: Sequence[Volume]) -> None:
        """Refuse scans other than those of the first call (their pairs are not these)."""
        if not self.scans:
            self.scans = tuple(scans)
        elif len(scans) != len(self.scans) or any(a is not b for a, b in zip(scans, self.scans)):
            raise ValueError("PairRuns holds the pairs of other scans: use one PairRuns per series")

    def run(self, key: PairKey, track: Callable[[], TrackResult]) -> TrackResult:
        """The result of pair ``key``: ``track()``'s, run here the first time, a copy of it later."""
        if key in self.results:
            self.reused_seconds += self.seconds[key]
            return copy.deepcopy(self.results[key])
        start = time.perf_counter()
        result = track()
        self.seconds[key] = time.perf_counter() - start
        self.results[key] = copy.deepcopy(result)
        return result


def pair_key(from_index: int, to_index: int, lesions: Lesions, *options: object) -> PairKey:
    """The :data:`PairKey` of a pair from scan ``from_index`` to ``to_index`` with input ``lesions``
    (labelmap, labels, names, seeds, colours) and ``options`` (by their ``repr``)."""
    digest = hashlib.sha1(np.ascontiguousarray(lesions.labelmap).tobytes())
    digest.update(np.ascontiguousarray(lesions.seeds_lps_mm, dtype=float).tobytes())
    digest.update(repr((lesions.labels, lesions.names, lesions.from_points, sorted(lesions.colors.items()),
                        lesions.labelmap.shape, lesions.labelmap.dtype.str, options)).encode())
    return from_index, to_index, digest.hexdigest()


def check_series(baseline: Volume, followups: Sequence[Volume]) -> None:
    """Refuse, before any work, a series without follow-up, or a follow-up of another modality than the
    baseline or that does not show the baseline's region."""
    if not followups:
        raise BadInputError("a series needs at least one follow-up scan")
    for followup in followups:
        check_same_modality(baseline, followup)
        check_overlap(baseline, followup)


def series_estimate(scans: Sequence[Volume], route: str, field_options: FieldOptions,
                    names: Mapping[str, str] = OPTION_NAMES) -> MemoryEstimate:
    """The memory of :func:`track_series` over ``scans`` (baseline first) by ``route``: its largest pair
    (pairs run one after another: baseline -> 1, then each later follow-up from the baseline (``direct``,
    ``auto``) and from the follow-up before (``chained``, ``auto``)), plus the other scans' volumes (every
    scan is read before the work) and, with ``auto`` over two follow-ups or more, the features of a
    third scan (auto holds the baseline's, the previous and the current follow-up's). ``names``: the
    option names the advice gives (:func:`MedDIFTLib.core.budget.estimate_register`)."""
    pairs = [(1, 0)]  # (fixed = follow-up, moving = where its lesions come from), scan indices
    if route != "chained":
        pairs += [(k, 0) for k in range(2, len(scans))]
    if route != "direct":
        pairs += [(k, k - 1) for k in range(2, len(scans))]
    estimates = {pair: estimate_register(scans[pair[0]].geometry, scans[pair[1]].geometry, field_options, names,
                                         "track") for pair in pairs}
    largest_pair, largest = max(estimates.items(), key=lambda item: item[1].total_bytes)
    others = [_scan_bytes(scan, field_options) for n, scan in enumerate(scans) if n not in largest_pair]
    parts = dict(largest.parts)
    if others:
        parts["other scans' volumes"] = sum(other["volumes"] for other in others)
    if route == "auto" and others:
        parts["a third scan's features"] = max(other["features"] for other in others)
    return MemoryEstimate(largest.what, parts, largest.advice)


def _scan_bytes(scan: Volume, field_options: FieldOptions) -> dict[str, int]:
    """One scan's ``volumes`` and ``features`` bytes: half those of a pair of the scan with itself (one
    formula, :func:`~MedDIFTLib.core.budget.estimate_register`'s)."""
    parts = estimate_register(scan.geometry, scan.geometry, field_options).parts
    return {"volumes": parts["volumes"] // 2, "features": parts["features"] // 2}


def _baseline_visits(result: TrackResult, seeds_lps_mm: np.ndarray) -> list[LesionVisit]:
    """Time point 0 from the first pair: the baseline measurements, centred on each lesion's centre of
    mass (its seed point when it has no voxel)."""
    visits = []
    for lesion, seed in zip(result.lesions, seeds_lps_mm):
        before = lesion.baseline
        centre = np.asarray(before.centre_lps_mm if before.volume_ml > 0 else seed, float)
        flags = ["touches_border"] if "touches_border" in lesion.flags else []
        visits.append(LesionVisit(lesion.label, lesion.name, 0, centre, math.nan, math.nan, before, flags,
                                  color=lesion.color))
    return visits


def _lesions_at(visits: list[LesionVisit], labelmap: np.ndarray, fallback_lps_mm: np.ndarray) -> Lesions:
    """The lesions of one time point as a pair's input: its labelmap, seeded at each lesion's centre of
    mass, else its reported centre (a lesion gone), else ``fallback_lps_mm``'s row."""
    seeds = []
    for visit, fallback in zip(visits, fallback_lps_mm):
        centre = visit.centre_lps_mm if visit.gone else np.asarray(visit.measurement.centre_lps_mm, float)
        seeds.append(centre if np.all(np.isfinite(centre)) else fallback)
    colors = {visit.label: visit.color for visit in visits if visit.color is not None}
    return Lesions(labelmap, [v.label for v in visits], [v.name for v in visits], np.asarray(seeds, float),
                   colors=colors)


def choose_route(chained: LesionResult, direct: LesionResult, radius_mm: float, agreement_mm: float) -> str:
    """``auto``'s choice for one lesion: ``direct`` where the routes agree (its error does not add up
    over the series), else the more confident centre match (``direct`` on a tie). They disagree when
    their centres are more than ``radius_mm`` and ``agreement_mm`` apart, or only one of them
    segments the lesion."""
    apart_mm = float(np.linalg.norm(chained.centre_lps_mm - direct.centre_lps_mm))
    found = (chained.followup.volume_ml > 0, direct.followup.volume_ml > 0)
    disagree = apart_mm > max(radius_mm, agreement_mm) or found[0] != found[1]
    return "chained" if disagree and chained.confidence > direct.confidence else "direct"


def _followup_visits(runs: dict[str, TrackResult], kept: list[str], time_point: int, followup: Volume
                     ) -> tuple[list[LesionVisit], np.ndarray]:
    """Follow-up ``time_point``'s visits and labelmap from the route ``kept[n]`` of each lesion ``n``."""
    labelmap = np.zeros(followup.geometry.shape_kji, np.int32)
    visits: list[LesionVisit] = []
    for n, route in enumerate(kept):
        lesion = runs[route].lesions[n]
        mask = runs[route].followup_labelmap == lesion.label
        flags = [flag for flag in lesion.flags if flag != "touches_border"]
        claimed = set(np.unique(labelmap[mask]).tolist()) - {0}
        if claimed:
            for visit in visits:
                if visit.label in claimed and "merges" not in visit.flags:
                    visit.flags.append("merges")
            if "merges" not in flags:
                flags.append("merges")
        free = mask & (labelmap == 0)
        labelmap[free] = lesion.label
        after = lesion.followup if free.sum() == mask.sum() else (
            measure(free, followup.voxels, followup.geometry) if free.any() else EMPTY)
        apart_mm = math.nan
        if len(runs) == 2:
            apart_mm = float(np.linalg.norm(runs["chained"].lesions[n].centre_lps_mm
                                            - runs["direct"].lesions[n].centre_lps_mm))
        visits.append(LesionVisit(lesion.label, lesion.name, time_point, np.asarray(lesion.centre_lps_mm, float),
                                  lesion.confidence, lesion.forward_backward_mm, after, flags, route, apart_mm,
                                  lesion.color))
    return visits, labelmap


def choose_targets(baseline_visits: list[LesionVisit], options: SeriesOptions) -> list[int]:
    """The target lesions' labels (ascending): measurable at baseline (longest diameter at least
    ``measurable_mm``, not touching the border), the ``max_targets`` largest."""
    measurable = [visit for visit in baseline_visits if not visit.gone and "touches_border" not in visit.flags
                  and visit.measurement.long_mm >= options.measurable_mm]
    largest = sorted(measurable, key=lambda visit: -visit.measurement.long_mm)[: options.max_targets]
    return sorted(visit.label for visit in largest)


def responses_of(visits: list[list[LesionVisit]], targets: list[int]) -> list[Response]:
    """The SLD of the ``targets`` and the RECIST 1.1 response at every time point of ``visits``."""
    sums, evaluable = [], []
    for time_point in visits:
        chosen = [visit for visit in time_point if visit.label in targets]
        sums.append(float(sum(visit.diameter_mm for visit in chosen)))
        evaluable.append(all(visit.evaluable for visit in chosen))
    return assess(sums, evaluable)


def track_series(
    baseline: Volume,
    followups: Sequence[Volume],
    lesions: Lesions,
    extract: ExtractFn,
    options: LesionOptions | None = None,
    series_options: SeriesOptions | None = None,
    field_options: FieldOptions | None = None,
    progress: ProgressFn = no_progress,
    pairs: PairRuns | None = None,
) -> SeriesResult:
    """Follow ``lesions`` of ``baseline`` through ``followups`` (HU volumes, in time order); ``extract``
    gives a scan's features and is called once per scan (not for a scan whose pairs all come from
    ``pairs``, the pair results shared with other calls on these scans)."""
    check_series(baseline, followups)
    series_options = series_options or SeriesOptions()
    route = series_options.route
    scans = [baseline, *followups]
    if pairs is not None:
        pairs.bind(scans)
    start = time.perf_counter()
    pyramids: dict[int, FeaturePyramid] = {}
    seconds: dict[str, float] = {}

    def features(index: int, step_progress: ProgressFn) -> FeaturePyramid:
        if index not in pyramids:
            pyramids[index] = extract(scans[index], step_progress)
        return pyramids[index]

    def pair(origin: int, target: int, pair_lesions: Lesions, step_progress: ProgressFn) -> TrackResult:
        """Scan ``origin``'s ``pair_lesions`` tracked into scan ``target`` (or ``pairs``' result)."""
        def track() -> TrackResult:
            return track_lesions(scans[origin], scans[target], pair_lesions,
                                 features(origin, scaled(step_progress, 0.0, 0.1)),
                                 features(target, scaled(step_progress, 0.1, 0.2)), options, field_options,
                                 progress=scaled(step_progress, 0.2, 1.0))

        if pairs is None:
            return track()
        return pairs.run(pair_key(origin, target, pair_lesions, options, field_options), track)

    visits: list[list[LesionVisit]] = []
    labelmaps: list[np.ndarray] = []
    direct_input = lesions
    radii_mm: list[float] = []
    for time_point in range(1, len(scans)):
        mark = time.perf_counter()
        step = scaled(progress, (time_point - 1) / len(followups), time_point / len(followups))
        followup = scans[time_point]
        run_direct = time_point == 1 or route in ("direct", "auto")
        run_chained = time_point > 1 and route in ("chained", "auto")
        runs: dict[str, TrackResult] = {}
        if run_chained:
            runs["chained"] = pair(time_point - 1, time_point,
                                   _lesions_at(visits[-1], labelmaps[-1], direct_input.seeds_lps_mm),
                                   scaled(step, 0.0, 0.5 if route == "auto" else 1.0))
        if run_direct:
            runs["direct"] = pair(0, time_point, direct_input, scaled(step, 0.5 if "chained" in runs else 0.0, 1.0))
        if time_point == 1:
            first = runs["direct"]
            visits.append(_baseline_visits(first, lesions.seeds_lps_mm))
            labelmaps.append(first.baseline_labelmap)
            direct_input = _lesions_at(visits[0], first.baseline_labelmap, lesions.seeds_lps_mm)
            radii_mm = [equivalent_radius_mm(first.baseline_labelmap == label, baseline.geometry)
                        for label in lesions.labels]
        if len(runs) == 2:
            kept = [choose_route(chained, direct, radius, series_options.agreement_mm)
                    for chained, direct, radius in zip(runs["chained"].lesions, runs["direct"].lesions, radii_mm)]
        else:
            kept = [next(iter(runs))] * len(lesions.labels)
        step_visits, labelmap = _followup_visits(runs, kept, time_point, followup)
        visits.append(step_visits)
        labelmaps.append(labelmap)
        needed = {0} if route != "chained" else set()  # the next step's origins: baseline, this follow-up
        needed |= {time_point} if route != "direct" else set()
        for index in set(pyramids) - needed:
            del pyramids[index]
        seconds[f"follow-up {time_point}"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start
    targets = choose_targets(visits[0], series_options)
    return SeriesResult([scan.name for scan in scans], visits, labelmaps, targets, responses_of(visits, targets),
                        route, {name: round(value, 3) for name, value in seconds.items()})
