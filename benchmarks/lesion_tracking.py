"""Lesion tracking benchmark: our tracking against carrying the baseline labelmap over with a field.

Pairs (:func:`MedDIFTLib.evaluation.synthetic_lesions.make_lesion_pair`): solid nodules (4-12 mm radius where the
lungs have room) inserted in a real CT of ../shared/data, grown or shrunk by a known volume factor
(0.5x-2x) in the follow-up, which is also warped by the breathing simulation (mean motion
``--motion-mm`` at the nodule centres) or, with ``--motion dirlab1|dirlab2``, by the motion fitted to
real DIR-Lab landmark displacements (several families in one run: ``--motion breathing dirlab1``,
one table row per method and family). Cases: the elastix right-lung crop, the pulmonary crop and
the POPI thorax (resampled to ``--popi-spacing-mm`` by ``benchmarks/real_cts.py``), one
pair per seed and motion. Methods, on the same pairs:

- ``convexadam-carry``: ConvexAdam's field (fixed = follow-up, moving = baseline) carries the baseline
  labelmap (:func:`MedDIFTLib.lesions.carry.carry_labelmap`); centre = the carried lesion's centre of mass;
- ``meddift-carry``: the same with MedDIFT's field (:func:`MedDIFTLib.field.register`, default options,
  MIND features), before refinement;
- ``meddift-track``: :func:`MedDIFTLib.lesions.track.track_lesions` as ``meddift track`` runs it (default
  options: its own field around each lesion, MIND features computed only where it reads them; centre = the
  engine's match; segmentation refined to the follow-up). ``centre (segmentation)`` reports the refined
  lesion's centre of mass as well.

Per method: centre error mean (mm), hit rate within the lesion radius and within 10 mm, Dice median
of the follow-up segmentation, volume-change error median (percentage points, against the truth
labelmaps' change: :func:`MedDIFTLib.evaluation.synthetic_lesions.lesion_metrics`) and seconds per pair
(``meddift-carry``: features and the whole field; ``meddift-track``: its own features and fields). Writes
``benchmarks/results/lesion_tracking.json`` (``markdown``, ``figures`` and the per-lesion ``pairs``). Run::

    python benchmarks/lesion_tracking.py --seeds 0 1 --motion breathing dirlab1 --cases elastix pulmonary popi
    python benchmarks/lesion_tracking.py --summarise benchmarks/results/lesion_tracking.json  # table only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from real_cts import CASES, load_case

METHODS = ("convexadam-carry", "meddift-carry", "meddift-track")
METRICS = {"centre_error_mean_mm": "centre error mean (mm)", "hit_rate_radius": "hit within radius",
           "hit_rate_10mm": "hit within 10 mm", "dice_median": "Dice median",
           "volume_change_error_median_points": "volume-change error median (points)"}


def field_on(field, geometry):
    """``field`` resampled (trilinear) onto ``geometry``."""
    from MedDIFTLib.grid.displacement_field import DisplacementField
    from MedDIFTLib.grid.sampling import resample

    return DisplacementField.from_tensor(resample(field.as_tensor(), field.geometry, geometry), geometry)


def carried_centres(labelmap: np.ndarray, labels: list[int], geometry) -> np.ndarray:
    """The centre of mass (LPS mm) of each of ``labels`` in ``labelmap`` (on ``geometry``); NaN where absent."""
    from MedDIFTLib.lesions.inputs import centroids_lps_mm

    present = [label for label in labels if (labelmap == label).any()]
    centres = np.full((len(labels), 3), np.nan)
    for label, centre in zip(present, centroids_lps_mm(labelmap, present, geometry)):
        centres[labels.index(label)] = centre
    return centres


def run_pair(case: str, seed: int, count: int, motion_mm: float, motion: str, popi_spacing_mm: float) -> dict:
    from MedDIFTLib.core.io.volumes import Volume
    from MedDIFTLib.core.options import LesionOptions
    from MedDIFTLib.evaluation.baselines import convexadam, unavailable_reason
    from MedDIFTLib.evaluation.synthetic_lesions import lesion_metrics, make_lesion_pair
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.field import register
    from MedDIFTLib.lesions.carry import carry_labelmap
    from MedDIFTLib.lesions.inputs import lesions_from_labelmap
    from MedDIFTLib.lesions.track import track_lesions

    ct = load_case(case, popi_spacing_mm)
    pair = make_lesion_pair(ct, count=count, seed=seed, mean_motion_mm=motion_mm, motion=motion)
    lesions = lesions_from_labelmap(Volume(pair.baseline_labelmap.astype(np.float32), pair.baseline.geometry),
                                    pair.baseline)
    rows: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}

    def carried_rows(labelmap):
        return lesion_metrics(pair, labelmap, carried_centres(labelmap, pair.labels, pair.followup.geometry))

    if unavailable_reason("convexadam") is None:
        start = time.perf_counter()
        output = convexadam(pair.followup, pair.baseline, np.zeros((1, 3)))
        field = field_on(output.field, pair.followup.geometry)
        carried = carry_labelmap(pair.baseline_labelmap, pair.baseline.geometry, pair.labels, field)
        seconds["convexadam-carry"] = time.perf_counter() - start
        rows["convexadam-carry"] = carried_rows(carried)
    start = time.perf_counter()
    featurizer = create_featurizer("mind", device="cpu")
    baseline_features, followup_features = featurizer.extract(pair.baseline), featurizer.extract(pair.followup)
    field = register(followup_features, baseline_features, pair.followup)
    field_seconds = time.perf_counter() - start
    for method, refine in (("meddift-carry", False), ("meddift-track", True)):
        start = time.perf_counter()
        if refine:  # what meddift track runs: its own field around each lesion, features read only there
            baseline_regions, followup_regions = (featurizer.extract_regions(pair.baseline),
                                                  featurizer.extract_regions(pair.followup))
            result = track_lesions(pair.baseline, pair.followup, lesions, baseline_regions, followup_regions,
                                   LesionOptions())
            seconds[method] = time.perf_counter() - start
        else:
            result = track_lesions(pair.baseline, pair.followup, lesions, baseline_features, followup_features,
                                   LesionOptions(refine=False), displacement=field)
            seconds[method] = field_seconds + time.perf_counter() - start
        if refine:
            rows[method] = lesion_metrics(pair, result.followup_labelmap,
                                          np.array([lesion.centre_lps_mm for lesion in result.lesions]))
            segmented = lesion_metrics(pair, result.followup_labelmap,
                                       np.array([lesion.segmented_centre_lps_mm for lesion in result.lesions]))
            for row, other in zip(rows[method], segmented):
                row["segmented_centre_error_mm"] = other["centre_error_mm"]
            statuses = [lesion.status for lesion in result.lesions]
        else:
            rows[method] = carried_rows(result.followup_labelmap)
    return {"case": case, "seed": seed, "motion": motion, "motion_mm": motion_mm, "rows": rows, "seconds": seconds,
            "statuses": statuses}


def _table(pairs: list[dict], motions: list[str]) -> tuple[str, dict]:
    """The Markdown table (one row per motion family and method) and its figures, ``figures[motion][method]``."""
    from MedDIFTLib.evaluation.synthetic_lesions import summarise

    figures: dict[str, dict] = {}
    lines = ["| motion | method | lesions | " + " | ".join(METRICS.values()) + " | seconds per pair |",
             "|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for motion in motions:
        chosen = [pair for pair in pairs if pair["motion"] == motion]
        for method in METHODS:
            rows = [row for pair in chosen for row in pair["rows"].get(method, [])]
            if not rows:
                continue
            summary = summarise(rows)
            summary["seconds_mean"] = float(np.mean([pair["seconds"][method] for pair in chosen]))
            if method == "meddift-track":
                summary["segmented_centre_error_mean_mm"] = float(
                    np.mean([r["segmented_centre_error_mm"] for r in rows]))
            figures.setdefault(motion, {})[method] = summary
            lines.append(f"| {motion} | {method} | {summary['lesions']} | {summary['centre_error_mean_mm']:.2f} | "
                         f"{100 * summary['hit_rate_radius']:.0f} % | {100 * summary['hit_rate_10mm']:.0f} % | "
                         f"{summary['dice_median']:.3f} | {summary['volume_change_error_median_points']:.1f} | "
                         f"{summary['seconds_mean']:.0f} |")
    tracked = {motion: found["meddift-track"] for motion, found in figures.items() if "meddift-track" in found}
    if tracked:
        lines.append("")
        lines.append("meddift-track centre (segmentation's centre of mass instead of the engine's match): " + ", ".join(
            f"{motion} {summary['segmented_centre_error_mean_mm']:.2f} mm mean" for motion, summary in tracked.items())
            + ".")
    cases = list(dict.fromkeys(pair["case"] for pair in pairs))
    if len(cases) > 1:
        cells = []
        for case in cases:
            per_method = {method: summarise([row for pair in pairs if pair["case"] == case
                                             for row in pair["rows"].get(method, [])])
                          for method in (METHODS[2], METHODS[0])}
            cells.append(f"{case} " + " against ".join(
                f"{found['centre_error_mean_mm']:.2f} mm / {found['dice_median']:.3f} / "
                f"{found['volume_change_error_median_points']:.1f}" for found in per_method.values()))
        lines.append("")
        lines.append("Per CT (all motions), centre error mean / Dice median / volume-change error median of "
                     f"{METHODS[2]} against {METHODS[0]}: " + "; ".join(cells) + ".")
    return "\n".join(lines), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--nodules", type=int, default=4)
    parser.add_argument("--motion-mm", type=float, default=7.0, help="mean motion of the breathing model")
    parser.add_argument("--motion", nargs="+", default=["breathing"], choices=("breathing", "dirlab1", "dirlab2"),
                        help="motion families: the breathing model and/or the fit to DIR-Lab case 1/2 displacements")
    parser.add_argument("--popi-spacing-mm", type=float, default=2.0, help="isotropic spacing of the POPI volume")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lesion_tracking.json"))
    parser.add_argument("--summarise", type=Path,
                        help="rebuild the table of this results file from its stored pairs (runs nothing)")
    args = parser.parse_args()
    if args.summarise:
        stored = json.loads(args.summarise.read_text(encoding="utf-8"))
        motions = list(dict.fromkeys(pair["motion"] for pair in stored["pairs"]))
        markdown, figures = _table(stored["pairs"], motions)
        header = stored["markdown"].split("\n\n")[0] + "\n\n"
        write_results(Path(args.out), header + markdown, figures, {"pairs": stored["pairs"]})
        return
    pairs = []
    for motion in args.motion:
        for case in args.cases:
            for seed in args.seeds:
                pair = run_pair(case, seed, args.nodules, args.motion_mm, motion, args.popi_spacing_mm)
                print(f"{motion} {case} seed {seed}: {len(pair['rows']['meddift-track'])} nodules, statuses "
                      f"{pair['statuses']}, seconds {', '.join(f'{k} {v:.0f}' for k, v in pair['seconds'].items())}",
                      flush=True)
                pairs.append(pair)
    markdown, figures = _table(pairs, args.motion)
    motion_text = "; ".join(f"breathing motion, mean {args.motion_mm:g} mm" if motion == "breathing"
                            else f"{motion} motion (fitted to real DIR-Lab displacements)" for motion in args.motion)
    popi_text = f", POPI at {args.popi_spacing_mm:g} mm" if "popi" in args.cases else ""
    header = (f"Lesion tracking on {len(pairs)} generated pairs ({', '.join(args.cases)}{popi_text}; seeds "
              f"{', '.join(map(str, args.seeds))}; up to {args.nodules} nodules each; {motion_text}; "
              f"0.5x-2x volume change; MIND features, CPU).\n\n")
    write_results(Path(args.out), header + markdown, figures, {"pairs": pairs})


def write_results(out: Path, markdown: str, figures: dict, records: dict[str, list[dict]]) -> None:
    """Print ``markdown`` and write it to ``out`` (JSON) with the ``figures`` and the per-case ``records``
    (e.g. ``{"pairs": [...]}``)."""
    print(markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"markdown": markdown, "figures": figures, **records}, indent=2, default=float),
                   encoding="utf-8")


if __name__ == "__main__":
    main()
