"""``meddift demo``: the main job on an embedded default, end to end, with a readable report.

It builds a realistic synthetic pair (known breathing-like motion) from the real elastix lung CT
crop and its 51 anatomical landmarks in ../shared/data when that folder is beside the checkout,
else from a built-in phantom, matches the landmarks with the weight-free backbone and reports
the error against the known motion.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..core.options import SimulationOptions
from .common import add_device_argument, add_option, options_from_args

ELASTIX_CASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "chestct_single_real" / \
    "elastix_lung_baseline_small"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="match landmarks on a built-in synthetic pair and report the error (no input needed)",
        description="Build a synthetic pair with known motion (from the real elastix lung CT in "
        "../shared/data when present, else a built-in phantom), match its landmarks and report the error.",
    )
    parser.add_argument("--out", help="also write the matched points here (.mrk.json, .fcsv or .csv)")
    add_device_argument(parser)
    add_option(parser, SimulationOptions, "seed")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.devices import resolve_device
    from ..core.io import PointSet, read_points, read_volume, write_points
    from ..core.options import MatchOptions, RunSettings
    from ..core.progress import scaled
    from ..evaluation.metrics import tre_stats
    from ..evaluation.simulate import make_synthetic_pair, phantom_ct
    from ..features import create_featurizer
    from ..matching import match_points
    from .common import ProgressBar, check_point_output

    output = check_point_output(args.out) if args.out else None
    seed = options_from_args(args, SimulationOptions).seed
    device = resolve_device(args.device)
    if (ELASTIX_CASE / "image.nii.gz").exists():
        volume = read_volume(ELASTIX_CASE / "image.nii.gz")
        landmarks = read_points(ELASTIX_CASE / "landmarks.csv", volume.geometry)
        pair = make_synthetic_pair(volume, seed=seed, points_lps_mm=landmarks.points_lps_mm,
                                   labels=landmarks.labels)
        source = "real elastix lung CT crop with its 51 anatomical landmarks"
    else:
        pair = make_synthetic_pair(phantom_ct(seed), seed=seed, num_keypoints=40)
        source = "built-in phantom (../shared/data not found) with automatic keypoints"
    initial = tre_stats(pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm)
    featurizer = create_featurizer(RunSettings.backbone, device=str(device))
    started = time.perf_counter()
    with ProgressBar() as progress:
        fixed = featurizer.extract(pair.fixed, scaled(progress, 0.0, 0.2)).to(device)
        moving = featurizer.extract(pair.moving, scaled(progress, 0.2, 0.4)).to(device)
        result = match_points(fixed, moving, pair.fixed_points.points_lps_mm,
                              options=MatchOptions(), progress=scaled(progress, 0.4, 1.0))
    seconds = time.perf_counter() - started
    final = tre_stats(result.points_lps_mm, pair.moving_points.points_lps_mm)
    print(f"MedDIFT demo: {source}.")
    spacing = tuple(round(s, 2) for s in pair.moving.geometry.spacing_mm)
    print(f"Synthetic breathing motion, seed {seed}: {len(pair.fixed_points)} points, "
          f"moving grid {pair.moving.geometry.shape_ijk} at {spacing} mm.")
    for name, stats in (("before matching:", initial), ("after matching: ", final)):
        print(f"  error {name} mean {stats['mean']:.2f} mm, p95 {stats['p95']:.2f} mm, max {stats['max']:.2f} mm")
    print(f"  reliable matches: {int(result.reliable.sum())}/{len(result.reliable)}; "
          f"backbone '{featurizer.name}' on {device}; {seconds:.1f} s")
    if output is not None:
        write_points(PointSet(result.points_lps_mm, pair.fixed_points.labels, unreliable=~result.reliable,
                              attributes={"confidence": result.confidence}), output)
        print(f"Wrote {output}")
    return 0
