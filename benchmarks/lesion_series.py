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
  three); centre = the engine's match; response = the series result's.

Per time point and method: centre error mean (mm, over the nodules present: one gone has no centre),
Dice median and volume-change error median (percentage points of the baseline volume, against the truth
labelmaps' change: :func:`MedDIFTLib.evaluation.synthetic_lesions.lesion_metrics`; a nodule gone counts
here, with an empty truth: Dice 1 when the method finds nothing)
and the share of series whose response category is the true one; per method the last time point's centre
error over the first's and seconds per series (feature extraction counted in each MedDIFT route). Writes
``benchmarks/results/lesion_series.json`` (``markdown``, ``figures``, per-lesion ``series``). Run::

    python benchmarks/lesion_series.py --cases pulmonary elastix --seeds 0 1 --time-points 4
    python benchmarks/lesion_series.py --summarise benchmarks/results/lesion_series.json  # table only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
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


def meddift_routes(series) -> dict[str, dict]:
    """``track_series`` with every route of :data:`ROUTES`, each scan's MIND features extracted once for all."""
    from MedDIFTLib.core.io.volumes import Volume
    from MedDIFTLib.core.options import SeriesOptions
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.lesions.inputs import lesions_from_labelmap
    from MedDIFTLib.lesions.series import track_series

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

    methods = {}
    for route in ROUTES:
        start, extracted_before = time.perf_counter(), extraction_seconds
        result = track_series(baseline, series.scans[1:], lesions, extract, series_options=SeriesOptions(route=route))
        seconds = time.perf_counter() - start - (extraction_seconds - extracted_before)  # tracking only
        centres = [np.array([visit.centre_lps_mm for visit in visits]) for visits in result.visits]
        methods[f"meddift-{route}"] = scored(series, result.labelmaps, centres,
                                             [response.category for response in result.responses], seconds)
        methods[f"meddift-{route}"]["routes_kept"] = [[visit.route for visit in visits] for visits in result.visits[1:]]
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
    methods = {} if unavailable_reason("convexadam") else {"convexadam-carry": convexadam_carry(series)}
    methods.update(meddift_routes(series))
    return {"case": case, "seed": seed, "motion": motion, "labels": series.labels,
            "trajectories": series.trajectories, "radii_mm": series.radii_mm.tolist(),
            "motion_mm": series.motion_mm, "targets": series.targets,
            "true_categories": [response.category for response in series.responses], "methods": methods}


def method_figures(records: list[dict], method: str) -> dict:
    """``method``'s figures over ``records``: per follow-up (key ``"1"``, ``"2"``, ...) the summary of
    :func:`summarise` and ``response_correct`` (share of series), then ``last_over_first_centre_error``
    and ``seconds_per_series``."""
    from MedDIFTLib.evaluation.synthetic_lesions import summarise

    chosen = [record for record in records if method in record["methods"]]
    figures: dict = {}
    for index in range(len(chosen[0]["methods"][method]["rows"])):
        rows = [row for record in chosen for row in record["methods"][method]["rows"][index]]
        right = [record["methods"][method]["categories"][index + 1] == record["true_categories"][index + 1]
                 for record in chosen]
        figures[str(index + 1)] = {**summarise(rows), "response_correct": float(np.mean(right))}
    last, first = figures[str(len(figures))], figures["1"]
    figures["last_over_first_centre_error"] = last["centre_error_mean_mm"] / first["centre_error_mean_mm"]
    figures["seconds_per_series"] = float(np.mean([record["methods"][method]["seconds"] for record in chosen]))
    return figures


def table(records: list[dict]) -> tuple[str, dict]:
    """The Markdown table (one row per follow-up and method), its notes, and the figures ``figures[method]``."""
    methods = [method for method in METHODS if any(method in record["methods"] for record in records)]
    figures = {method: method_figures(records, method) for method in methods}
    followups = len(records[0]["true_categories"]) - 1
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
    return "\n".join(lines), figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["pulmonary", "elastix"], choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--time-points", type=int, default=4, choices=(3, 4, 5),
                        help="scans per series, the baseline included")
    parser.add_argument("--nodules", type=int, default=4)
    parser.add_argument("--motion", default="breathing", choices=("breathing", "dirlab1", "dirlab2"))
    parser.add_argument("--motion-mm", type=float, default=7.0, help="mean motion of the breathing model, mm")
    parser.add_argument("--popi-spacing-mm", type=float, default=2.0, help="isotropic spacing of the POPI volume")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summarise", type=Path,
                        help="rebuild the table of this results file from its stored series (runs nothing)")
    args = parser.parse_args(argv)
    if args.summarise:
        stored = json.loads(args.summarise.read_text(encoding="utf-8"))
        markdown, figures = table(stored["series"])
        write_results(args.out, stored["markdown"].split("\n\n")[0] + "\n\n" + markdown, figures,
                      {"series": stored["series"]})
        return 0
    cases = [case for case in args.cases if image_path(case).is_file()]
    for case in sorted(set(args.cases) - set(cases)):
        print(f"{image_path(case)} not found: {case} skipped", file=sys.stderr)
    if not cases:
        print("nothing to run", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    records = []
    for case in cases:
        for seed in args.seeds:
            record = run_series(case, seed, args.time_points, args.nodules, args.motion, args.motion_mm,
                                args.popi_spacing_mm)
            print(f"{case} seed {seed}: {len(record['labels'])} nodules {record['trajectories']}, true responses "
                  f"{record['true_categories'][1:]}, " + ", ".join(
                      f"{method} {found['categories'][1:]} {found['seconds']:.0f} s"
                      for method, found in record["methods"].items()), flush=True)
            records.append(record)
    markdown, figures = table(records)
    motion_text = (f"breathing motion, mean {args.motion_mm:g} mm x 0.6-1.4 per follow-up" if args.motion == "breathing"
                   else f"{args.motion} motion (fitted to real DIR-Lab displacements) x 0.6-1.4 per follow-up")
    popi_text = f", POPI at {args.popi_spacing_mm:g} mm" if "popi" in cases else ""
    header = (f"Lesion series: {len(records)} generated series of {args.time_points} time points ({', '.join(cases)}"
              f"{popi_text}; seeds {', '.join(map(str, args.seeds))}; up to {args.nodules} nodules each, 0.25x-3x "
              f"volume courses, one nodule gone in odd seeds; {motion_text}; MIND features, CPU). Real CTs with "
              "simulated changes, not real longitudinal scans.")
    write_results(args.out, header + "\n\n" + markdown, figures, {"series": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
