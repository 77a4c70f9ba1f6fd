"""Accuracy, time and memory of ``match`` on realistic synthetic pairs from the real CTs.

Each case is a real CT from ../shared/data warped by a known breathing-like motion (mean 7 mm at
the points, or with ``--motion dirlab1|dirlab2`` a motion fitted to real DIR-Lab landmark displacements;
lung density change, noise, a 1.1x coarser moving grid; see MedDIFTLib.evaluation.simulate).
Points: the 51 real anatomical landmarks of the elastix crop; Förstner keypoints in the lungs of
the pulmonary crop and of the POPI thorax. Every case runs in its own process so its peak memory
(RSS) is its own. Printed: a Markdown table with the identity error (no registration) beside.

    python benchmarks/matching_accuracy.py                         # all cases, seed 0
    python benchmarks/matching_accuracy.py --cases elastix --seeds 0 1 2
    python benchmarks/matching_accuracy.py --cases pulmonary --keypoints 300 --results /tmp/300.json

``--keypoints`` caps the Förstner keypoints (cases without landmarks; the detector may find fewer); ``--results`` writes
the figures somewhere else than the README's results file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_cts import CASES, CT_DIR, case_folder

from MedDIFTLib.core.options import SimulationOptions

RESULTS = Path(__file__).resolve().parent / "results" / "matching_accuracy.json"  # the README's table


def _child(case: str, seed: int, backbone: str, radius_mm: float, motion: str, keypoints: int) -> dict:
    from MedDIFTLib.core.io import read_points, read_volume
    from MedDIFTLib.core.options import MatchOptions
    from MedDIFTLib.evaluation.metrics import tre_stats
    from MedDIFTLib.evaluation.simulate import make_synthetic_pair
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.matching import match_points

    folder = case_folder(case)
    volume = read_volume(folder / "image.nii.gz")
    landmarks = folder / "landmarks.csv"
    if landmarks.exists():
        points = read_points(landmarks, volume.geometry)
        pair = make_synthetic_pair(volume, seed=seed, points_lps_mm=points.points_lps_mm, labels=points.labels,
                                   motion=motion)
    else:
        pair = make_synthetic_pair(volume, seed=seed, motion=motion, num_keypoints=keypoints)
    featurizer = create_featurizer(backbone)
    started = time.perf_counter()
    fixed, moving = featurizer.extract(pair.fixed), featurizer.extract(pair.moving)
    features_seconds = time.perf_counter() - started
    result = match_points(fixed, moving, pair.fixed_points.points_lps_mm,
                          options=MatchOptions(search_radius_mm=radius_mm))
    match_seconds = time.perf_counter() - started - features_seconds
    truth = pair.moving_points.points_lps_mm
    return {
        "case": case,
        "seed": seed,
        "motion": motion,
        "points": len(truth),
        "grid": list(volume.geometry.shape_ijk),
        "identity": tre_stats(pair.fixed_points.points_lps_mm, truth),
        "matched": tre_stats(result.points_lps_mm, truth),
        "reliable": float(result.reliable.mean()),
        "features_seconds": features_seconds,
        "match_seconds": match_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["elastix", "pulmonary", "popi"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--backbone", default="mind")
    parser.add_argument("--radius-mm", type=float, default=25.0)
    parser.add_argument("--motion", default="breathing", choices=["breathing", "dirlab1", "dirlab2"],
                        help="motion family (SimulationOptions.motion): breathing model or DIR-Lab case 1/2")
    parser.add_argument("--keypoints", type=int, default=SimulationOptions.num_keypoints,
                        help="at most this many Förstner keypoints per case without landmarks")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default: the README's)")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        record = _child(args.child[0], int(args.child[1]), args.backbone, args.radius_mm, args.motion, args.keypoints)
        Path(args.out).write_text(json.dumps(record), encoding="utf-8")
        return
    if not CT_DIR.exists():
        sys.exit(f"shared data not found at {CT_DIR}")
    records = []
    for case in args.cases:
        for seed in args.seeds:
            with tempfile.NamedTemporaryFile(suffix=".json") as handle:
                subprocess.run([sys.executable, __file__, "--child", case, str(seed), "--backbone", args.backbone,
                                "--radius-mm", str(args.radius_mm), "--motion", args.motion,
                                "--keypoints", str(args.keypoints), "--out", handle.name],
                               check=True)
                records.append(json.loads(Path(handle.name).read_text(encoding="utf-8")))
    lines = [
        f"backbone {args.backbone}, search radius {args.radius_mm} mm, {args.motion} motion, errors in mm",
        "",
        "| case | seed | points | identity mean | mean | p50 | p95 | max | reliable | features s | match s | "
        "peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["matched"]
        lines.append(f"| {r['case']} {'x'.join(map(str, r['grid']))} | {r['seed']} | {r['points']} | "
                     f"{r['identity']['mean']:.2f} | {m['mean']:.2f} | {m['p50']:.2f} | {m['p95']:.2f} | "
                     f"{m['max']:.2f} | {r['reliable']:.0%} | {r['features_seconds']:.1f} | "
                     f"{r['match_seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
    print("\n".join(lines))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"markdown": "\n".join(lines), "figures": records}, indent=1), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
