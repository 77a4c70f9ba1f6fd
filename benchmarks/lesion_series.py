"""Lesion series benchmark (issue 29): following nodules through 3-5 scans, by each route of ``track_series``
against carrying the labelmap over with ConvexAdam from scan to scan.

Series (:func:`MedDIFTLib.evaluation.synthetic_lesions.make_lesion_series`): solid nodules (5-12 mm radius
where the lungs have room) inserted in a real CT of ../shared/data, each following a volume course over
the follow-ups (grows, shrinks, shrinks then grows, 0.25x-3x its baseline volume; in the series of odd
seeds one nodule disappears), each follow-up warped by its own draw of the motion family (breathing
model of mean ``--motion-mm`` times 0.6-1.4, or the motion fitted to DIR-Lab displacements times
0.6-1.4). The truth response per time point is RECIST 1.1 on the truth labelmaps. Real CTs with
simulated changes, not real longitudinal scans. Methods, on the same series:

- ``convexadam-carry``: ConvexAdam's field from scan k-1 to scan k (fixed = k, moving = k-1) carries
  time point k-1's carried labelmap (:func:`MedDIFTLib.lesions.carry.carry_labelmap`; chained, as a
  registration-only workflow would); centre = the carried lesion's centre of mass; response = RECIST 1.1
  on the carried labelmaps;
- ``meddift-chained``, ``meddift-direct``, ``meddift-auto``: :func:`MedDIFTLib.lesions.series.track_series`
  with that route (MIND features, default options; each scan's features extracted once and shared by the
  three, and so is each pair the routes have in common, :class:`MedDIFTLib.lesions.series.PairRuns`:
  baseline -> T1 in all three, the direct pairs in ``direct`` and ``auto``, T1 -> T2 in ``chained`` and
  ``auto``); centre = the engine's match; response = the series result's.

Per time point and method: centre error mean (mm, over the nodules present: one gone has no centre),
Dice median and volume-change error median (percentage points of the baseline volume, against the truth
labelmaps' change: :func:`MedDIFTLib.evaluation.synthetic_lesions.lesion_metrics`; a nodule gone counts
here, with an empty truth: Dice 1 when the method finds nothing)
and the share of series whose response category is the true one; per method the last time point's centre
error over the first's and seconds per series (feature extraction and every pair a route uses counted in
that route, as if it ran alone), and per MedDIFT route the issue's done-when checks. Several motion
families in one run (``--motion breathing dirlab1``): one series per case, motion and seed. Progress goes
to stderr; the results file (``--out``, default ``benchmarks/results/lesion_series.json``: ``markdown``,
``figures``, per-lesion ``series`` with each route's kept route and status per lesion and follow-up) is
rewritten after each series, so a run stopped early keeps what it finished. Run::

    python benchmarks/lesion_series.py --cases elastix pulmonary --seeds 0 1 --time-points 4 --motion breathing dirlab1
    python benchmarks/lesion_series.py --summarise part1.json part2.json  # the table of these runs' series
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from lesion_tracking import carried_centres, field_on, write_results
from real_cts import CASES, image_path, load_case

METHODS = ("convexadam-carry", "meddift-chained", "meddift-direct", "meddift-auto")
ROUTES = ("chained", "direct", "auto")
RESULTS = Path(__file__).parent / "results" / "lesion_series.json"


def scored(series, labelmaps: list[np.ndarray], centres: list[np.ndarray], categories: list[str | None],
           seconds: float) -> dict:
    """One method on one series: the rows of :func:`lesion_metrics` per follow-up (``rows[t - 1]``, each
    with its ``time_point``), its response categories (baseline first) and seconds. A nodule gone has no
    centre to find: its centre error is NaN (left out of the mean) and the distance from the method's
    centre to where the motion took its old centre is ``gone_site_error_mm``."""
    from MedDIFTLib.evaluation.synthetic_lesions import lesion_metrics

    rows = []
    for time_point in range(1, len(series.scans)):
        found = lesion_metrics(series.pair(time_point), labelmaps[time_point], centres[time_point])
        for n, row in enumerate(found):
            row.update(time_point=time_point, truth_gone=bool(series.radii_mm[time_point, n] == 0))
            if row["truth_gone"]:
                row["gone_site_error_mm"], row["centre_error_mm"] = row["centre_error_mm"], float("nan")
        rows.append(found)
    return {"rows": rows, "categories": categories, "seconds": seconds}


def convexadam_carry(series) -> dict:
    """ConvexAdam from each scan to the next, carrying the previous time point's carried labelmap."""
    from MedDIFTLib.evaluation.baselines import convexadam
    from MedDIFTLib.evaluation.synthetic_lesions import labelmap_responses
    from MedDIFTLib.lesions.carry import carry_labelmap

    start = time.perf_counter()
    carried = [series.labelmaps[0]]
    for previous, scan in zip(series.scans, series.scans[1:]):
        output = convexadam(scan, previous, np.zeros((1, 3)))
        carried.append(carry_labelmap(carried[-1], previous.geometry, series.labels,
                                      field_on(output.field, scan.geometry)))
    seconds = time.perf_counter() - start
    _, responses = labelmap_responses(series.scans, carried, series.labels)
    centres = [carried_centres(labelmap, series.labels, scan.geometry) for scan, labelmap in zip(series.scans, carried)]
    return scored(series, carried, centres, [response.category for response in responses], seconds)


def log(message: str) -> None:
    """A progress line on stderr (the run is long: which series, which step)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def meddift_routes(series) -> dict[str, dict]:
    """``track_series`` with every route of :data:`ROUTES`, each scan's MIND features extracted once and
    each pair the routes share run once (:class:`~MedDIFTLib.lesions.series.PairRuns`); a route's seconds
    count every pair it used and the features, as if it ran alone."""
    from MedDIFTLib.core.io.volumes import Volume
    from MedDIFTLib.core.options import SeriesOptions
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.lesions.inputs import lesions_from_labelmap
    from MedDIFTLib.lesions.series import PairRuns, track_series

    baseline = series.scans[0]
    lesions = lesions_from_labelmap(Volume(series.labelmaps[0].astype(np.float32), baseline.geometry), baseline)
    featurizer = create_featurizer("mind", device="cpu")
    pyramids: dict[int, object] = {}
    extraction_seconds = 0.0

    def extract(volume, progress):
        nonlocal extraction_seconds
        if id(volume) not in pyramids:
            start = time.perf_counter()
            pyramids[id(volume)] = featurizer.extract(volume, progress)
            extraction_seconds += time.perf_counter() - start
        return pyramids[id(volume)]

    def report(route: str) -> Callable[..., None]:
        """A progress callback logging each time point the route starts."""
        reported: set[int] = set()

        def progress(stage: str, fraction: float, message: str = "") -> None:
            time_point = min(int(fraction * (len(series.scans) - 1)) + 1, len(series.scans) - 1)
            if time_point not in reported:
                reported.add(time_point)
                log(f"  meddift-{route}: T{time_point}")
        return progress

    pairs = PairRuns()
    methods = {}
    for route in ROUTES:
        start, extracted_before, reused_before = time.perf_counter(), extraction_seconds, pairs.reused_seconds
        result = track_series(baseline, series.scans[1:], lesions, extract, series_options=SeriesOptions(route=route),
                              progress=report(route), pairs=pairs)
        seconds = (time.perf_counter() - start - (extraction_seconds - extracted_before)  # tracking only
                   + pairs.reused_seconds - reused_before)
        log(f"  meddift-{route}: {[response.category for response in result.responses[1:]]}, {seconds:.0f} s "
            f"tracking ({pairs.reused_seconds - reused_before:.0f} s of it in pairs shared with an earlier route)")
        centres = [np.array([visit.centre_lps_mm for visit in visits]) for visits in result.visits]
        methods[f"meddift-{route}"] = scored(series, result.labelmaps, centres,
                                             [response.category for response in result.responses], seconds)
        methods[f"meddift-{route}"]["routes_kept"] = [[visit.route for visit in visits] for visits in result.visits[1:]]
        methods[f"meddift-{route}"]["statuses"] = [[visit.status for visit in visits] for visits in result.visits[1:]]
    for found in methods.values():
        found["seconds"] += extraction_seconds
    return methods


def run_series(case: str, seed: int, time_points: int, count: int, motion: str, motion_mm: float,
               popi_spacing_mm: float) -> dict:
    """One series of ``case`` and every method on it (ConvexAdam where it is installed)."""
    from MedDIFTLib.evaluation.baselines import unavailable_reason
    from MedDIFTLib.evaluation.synthetic_lesions import make_lesion_series

    series = make_lesion_series(load_case(case, popi_spacing_mm), seed=seed, time_points=time_points, motion=motion,
                                mean_motion_mm=motion_mm, count=count, disappears=seed % 2 == 1)
    log(f"  made: {len(series.labels)} nodules {series.trajectories}, true responses "
        f"{[response.category for response in series.responses[1:]]}")
    methods = {}
    if not unavailable_reason("convexadam"):
        log("  convexadam-carry")
        methods["convexadam-carry"] = convexadam_carry(series)
    methods.update(meddift_routes(series))
    return {"case": case, "seed": seed, "motion": motion, "mean_motion_mm": motion_mm, "nodules": count,
            "popi_spacing_mm": popi_spacing_mm if case == "popi" else None, "labels": series.labels,
            "trajectories": series.trajectories, "radii_mm": series.radii_mm.tolist(),
            "motion_mm": series.motion_mm, "targets": series.targets,
            "true_categories": [response.category for response in series.responses], "methods": methods}


def method_figures(records: list[dict], method: str) -> dict:
    """``method``'s figures over ``records``: per follow-up (key ``"1"``, ``"2"``, ...) the summary of
    :func:`summarise` and ``response_correct`` (share of series), then ``response_correct_all`` (share
    of (series, follow-up)), ``last_over_first_centre_error`` and ``seconds_per_series``."""
    from MedDIFTLib.evaluation.synthetic_lesions import summarise

    chosen = [record for record in records if method in record["methods"]]
    figures: dict = {}
    right_all = []
    for index in range(len(chosen[0]["methods"][method]["rows"])):
        rows = [row for record in chosen for row in record["methods"][method]["rows"][index]]
        right = [record["methods"][method]["categories"][index + 1] == record["true_categories"][index + 1]
                 for record in chosen]
        right_all += right
        figures[str(index + 1)] = {**summarise(rows), "response_correct": float(np.mean(right))}
    last, first = figures[str(len(figures))], figures["1"]
    figures["response_correct_all"] = float(np.mean(right_all))
    figures["last_over_first_centre_error"] = last["centre_error_mean_mm"] / first["centre_error_mean_mm"]
    figures["seconds_per_series"] = float(np.mean([record["methods"][method]["seconds"] for record in chosen]))
    return figures


def done_when(figures: dict, method: str, followups: int) -> dict[str, str]:
    """Issue 29's done-when checks of ``method`` (``figures`` of :func:`table`): per check ``met`` or
    ``unmet: `` and where it fails. At every follow-up: centre error mean <= 0.6 mm, Dice median >= 0.88,
    volume-change error median <= 8 points, and each better than ``convexadam-carry``; response right
    for >= 95 % of (series, follow-up); last follow-up's centre error <= 1.2 x the first's."""
    found = figures[method]
    points = [str(time_point) for time_point in range(1, followups + 1)]

    def check(fails: list[str]) -> str:
        return "unmet: " + ", ".join(fails) if fails else "met"

    checks = {
        "centre error mean <= 0.6 mm": check([f"T{t} {found[t]['centre_error_mean_mm']:.2f}" for t in points
                                              if found[t]["centre_error_mean_mm"] > 0.6]),
        "Dice median >= 0.88": check([f"T{t} {found[t]['dice_median']:.3f}" for t in points
                                      if found[t]["dice_median"] < 0.88]),
        "volume-change error median <= 8 points": check(
            [f"T{t} {found[t]['volume_change_error_median_points']:.1f}" for t in points
             if found[t]["volume_change_error_median_points"] > 8]),
    }
    if "convexadam-carry" in figures:
        carry = figures["convexadam-carry"]
        worse = [f"T{t} {name}" for t in points for name, key, sign in (
            ("centre", "centre_error_mean_mm", 1), ("Dice", "dice_median", -1),
            ("volume change", "volume_change_error_median_points", 1))
            if sign * found[t][key] >= sign * carry[t][key]]
        checks["better than convexadam-carry on each"] = check(worse)
    share = found["response_correct_all"]
    checks["response right >= 95 %"] = check([] if share >= 0.95 else [f"{100 * share:.0f} %"])
    ratio = found["last_over_first_centre_error"]
    checks["last/first centre error <= 1.2"] = check([] if ratio <= 1.2 else [f"{ratio:.2f}"])
    return checks


def group_table(records: list[dict], methods: list[str]) -> list[str]:
    """Per CT and motion family, every follow-up pooled: centre error mean / Dice median / volume-change
    error median of each method (Markdown lines)."""
    from MedDIFTLib.evaluation.synthetic_lesions import summarise

    groups = list(dict.fromkeys((record["case"], record["motion"]) for record in records))
    lines = ["| CT | motion | series | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for case, motion in groups:
        chosen = [record for record in records if (record["case"], record["motion"]) == (case, motion)]
        cells = []
        for method in methods:
            found = summarise([row for record in chosen for rows in record["methods"].get(method, {}).get("rows", [])
                               for row in rows])
            cells.append(f"{found['centre_error_mean_mm']:.2f} / {found['dice_median']:.3f} / "
                         f"{found['volume_change_error_median_points']:.1f}" if found else "-")
        lines.append(f"| {case} | {motion} | {len(chosen)} | " + " | ".join(cells) + " |")
    return lines


def table(records: list[dict]) -> tuple[str, dict]:
    """The Markdown table (one row per follow-up and method), its notes, and the figures ``figures[method]``
    (each MedDIFT route's with its ``done_when`` checks)."""
    methods = [method for method in METHODS if any(method in record["methods"] for record in records)]
    figures = {method: method_figures(records, method) for method in methods}
    followups = len(records[0]["true_categories"]) - 1
    for method in methods:
        if method.startswith("meddift-"):
            figures[method]["done_when"] = done_when(figures, method, followups)
    lines = ["| time point | method | lesions | centre error mean (mm) | Dice median | "
             "volume-change error median (points) | response right |", "|---|---|---|---|---|---|---|"]
    for time_point in range(1, followups + 1):
        for method in methods:
            found = figures[method][str(time_point)]
            lines.append(f"| T{time_point} | {method} | {found['lesions']} | {found['centre_error_mean_mm']:.2f} | "
                         f"{found['dice_median']:.3f} | {found['volume_change_error_median_points']:.1f} | "
                         f"{100 * found['response_correct']:.0f} % |")
    truth = [Counter(record["true_categories"][time_point] for record in records)
             for time_point in range(1, followups + 1)]
    gone = [(row["time_point"], row["dice"] == 1.0) for record in records
            for rows in record["methods"].get("meddift-auto", {}).get("rows", []) for row in rows if row["truth_gone"]]
    lines += ["", "True responses: " + "; ".join(
        f"T{time_point} " + ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        for time_point, counts in enumerate(truth, start=1)) + ".",
        "", "Centre error at the last time point over the first, and seconds per series: " + "; ".join(
        f"{method} {figures[method]['last_over_first_centre_error']:.2f}, {figures[method]['seconds_per_series']:.0f} s"
        for method in methods) + "."]
    if gone:
        lines += ["", f"Nodules gone (empty truth): meddift-auto reported {sum(right for _, right in gone)} of "
                  f"{len(gone)} (lesion, time point) gone."]
    if len({(record["case"], record["motion"]) for record in records}) > 1:
        lines += ["", "Per CT and motion, every follow-up pooled: centre error mean (mm) / Dice median / "
                  "volume-change error median (points).", "", *group_table(records, methods)]
    checked = [method for method in methods if "done_when" in figures[method]]
    if checked:
        lines += ["", "Issue 29's done-when checks (every follow-up; response over all (series, follow-up)):", ""]
        lines += [f"- {method}: " + "; ".join(f"{name} {verdict}" for name, verdict in
                                                figures[method]["done_when"].items()) + "." for method in checked]
    return "\n".join(lines), figures


def header(records: list[dict]) -> str:
    """The table's first line: what was run, from the stored series."""
    cases = list(dict.fromkeys(record["case"] for record in records))
    motions = []
    for motion in dict.fromkeys(record["motion"] for record in records):
        if motion == "breathing":
            means = sorted({record.get("mean_motion_mm", 7.0) for record in records if record["motion"] == motion})
            motions.append(f"breathing motion, mean {'/'.join(f'{mean:g}' for mean in means)} mm x 0.6-1.4 per "
                           "follow-up")
        else:
            motions.append(f"{motion} motion (fitted to real DIR-Lab displacements) x 0.6-1.4 per follow-up")
    popi = sorted({record["popi_spacing_mm"] for record in records if record.get("popi_spacing_mm")})
    popi_text = f", POPI at {'/'.join(f'{spacing:g}' for spacing in popi)} mm" if popi else ""
    seeds = sorted({record["seed"] for record in records})
    nodules = max(record.get("nodules", len(record["labels"])) for record in records)
    return (f"Lesion series: {len(records)} generated series of {len(records[0]['true_categories'])} time points "
            f"({', '.join(cases)}{popi_text}; seeds {', '.join(map(str, seeds))}; up to {nodules} nodules each, "
            f"0.25x-3x volume courses, one nodule gone in odd seeds; {'; '.join(motions)}; MIND features, CPU). "
            "Real CTs with simulated changes, not real longitudinal scans.")


def merged(paths: list[Path]) -> list[dict]:
    """The stored series of several results files, each (case, motion, seed) once."""
    records, seen = [], set()
    for path in paths:
        for record in json.loads(path.read_text(encoding="utf-8"))["series"]:
            key = (record["case"], record["motion"], record["seed"])
            if key in seen:
                raise SystemExit(f"{path}: series {key} is in an earlier file too")
            seen.add(key)
            records.append(record)
    if len({len(record["true_categories"]) for record in records}) > 1:
        raise SystemExit("the files hold series of different lengths: one table needs one number of time points")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["pulmonary", "elastix"], choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--time-points", type=int, default=4, choices=(3, 4, 5),
                        help="scans per series, the baseline included")
    parser.add_argument("--nodules", type=int, default=4)
    parser.add_argument("--motion", nargs="+", default=["breathing"], choices=("breathing", "dirlab1", "dirlab2"),
                        help="motion families, one series per case, family and seed")
    parser.add_argument("--motion-mm", type=float, default=7.0, help="mean motion of the breathing model, mm")
    parser.add_argument("--popi-spacing-mm", type=float, default=2.0, help="isotropic spacing of the POPI volume")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results file, rewritten after each series (default: %(default)s)")
    parser.add_argument("--summarise", type=Path, nargs="+",
                        help="rebuild the table of these results files' stored series into --out (runs nothing)")
    args = parser.parse_args(argv)
    if args.summarise:
        records = merged(args.summarise)
        markdown, figures = table(records)
        write_results(args.out, header(records) + "\n\n" + markdown, figures, {"series": records})
        return 0
    cases = [case for case in args.cases if image_path(case).is_file()]
    for case in sorted(set(args.cases) - set(cases)):
        print(f"{image_path(case)} not found: {case} skipped", file=sys.stderr)
    if not cases:
        print("nothing to run", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    runs = [(case, motion, seed) for motion in args.motion for case in cases for seed in args.seeds]  # family first
    records = []
    for number, (case, motion, seed) in enumerate(runs, start=1):
        log(f"series {number} of {len(runs)}: {case}, {motion} motion, seed {seed}")
        record = run_series(case, seed, args.time_points, args.nodules, motion, args.motion_mm, args.popi_spacing_mm)
        log(f"series {number} of {len(runs)} done: " + ", ".join(
            f"{method} {found['categories'][1:]} {found['seconds']:.0f} s"
            for method, found in record["methods"].items()))
        records.append(record)
        markdown, figures = table(records)
        write_results(args.out, header(records) + "\n\n" + markdown, figures, {"series": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
