"""Batch throughput on Dask: rows per hour with 1 and 2 local workers, and the gain of sharing features.

A longitudinal series is written to a temporary folder: one baseline (smoothed noise in HU on a
``--size``^3 grid of 1.5 mm voxels) and ``--followups`` follow-ups (the baseline's voxels placed a few
mm away, plus noise), a manifest of baseline -> follow-up pairs with 20 points and their true
positions. ``meddift batch --task match`` (backbone ``mind``, CPU) runs it on a local cluster of 1
and of 2 worker processes, then once more on 1 worker with a manifest whose rows each use their own
copy of the baseline (a one-voxel change makes each copy's content, and so its features, distinct):
the feature-sharing gain is that run's wall time over the shared run's on the same worker count.

    python benchmarks/batch_throughput.py [--size 64] [--followups 4]

Prints a Markdown table and writes benchmarks/results/batch_throughput.json (keys ``markdown`` and
``figures``). Wall times include starting the cluster's workers (importing torch in each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from MedDIFTLib.cli import main  # noqa: E402
from MedDIFTLib.core.geometry import Geometry  # noqa: E402
from MedDIFTLib.core.io import PointSet, Volume, write_points, write_volume  # noqa: E402

SPACING_MM = 1.5
POINTS = 20
RESULTS = REPO / "benchmarks" / "results" / "batch_throughput.json"


def write_series(folder: Path, size: int, followups: int) -> tuple[Path, Path]:
    """The shared-baseline manifest and the one with a distinct baseline copy per row."""
    rng = np.random.default_rng(0)
    voxels = (ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 2.0) * 6000.0 - 300.0).astype(np.float32)
    geometry = Geometry.create((size,) * 3, (SPACING_MM,) * 3, (0.0, 0.0, 0.0), np.eye(3))
    write_volume(Volume(voxels, geometry), folder / "baseline.nii.gz")
    ijk = rng.uniform(size * 0.25, size * 0.75, size=(POINTS, 3))
    points = PointSet(geometry.ijk_to_lps(ijk), [f"P{n}" for n in range(POINTS)])
    write_points(points, folder / "points.csv")
    shared, distinct = ["id,fixed,moving,points,moving_points"], ["id,fixed,moving,points,moving_points"]
    for number in range(followups):
        shift = rng.uniform(-3.0, 3.0, size=3)
        noisy = voxels + rng.normal(0, 20, voxels.shape).astype(np.float32)
        write_volume(Volume(noisy, Geometry.create((size,) * 3, (SPACING_MM,) * 3, shift, np.eye(3))),
                     folder / f"followup{number}.nii.gz")
        write_points(PointSet(points.points_lps_mm + shift, points.labels), folder / f"truth{number}.csv")
        copy = voxels.copy()
        copy[0, 0, 0] += number + 1.0
        write_volume(Volume(copy, geometry), folder / f"baseline_copy{number}.nii.gz")
        shared.append(f"pair{number},baseline.nii.gz,followup{number}.nii.gz,points.csv,truth{number}.csv")
        distinct.append(f"pair{number},baseline_copy{number}.nii.gz,followup{number}.nii.gz,points.csv,"
                        f"truth{number}.csv")
    (folder / "shared.csv").write_text("\n".join(shared) + "\n", encoding="utf-8")
    (folder / "distinct.csv").write_text("\n".join(distinct) + "\n", encoding="utf-8")
    return folder / "shared.csv", folder / "distinct.csv"


def run(manifest: Path, out: Path, workers: int) -> float:
    started = time.perf_counter()
    code = main(["batch", str(manifest), "--out", str(out), "--workers", str(workers), "--backbone", "mind",
                 "--device", "cpu", "--quiet"])
    if code != 0:
        raise SystemExit(f"batch failed on {manifest} with {workers} workers")
    return time.perf_counter() - started


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="voxels per axis (default 64)")
    parser.add_argument("--followups", type=int, default=4, help="follow-ups of the baseline (default 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shared, distinct = write_series(folder, args.size, args.followups)
        seconds = {
            "shared, 1 worker": run(shared, folder / "out1", 1),
            "shared, 2 workers": run(shared, folder / "out2", 2),
            "one baseline copy per row, 1 worker": run(distinct, folder / "out3", 1),
        }
    rows = args.followups
    per_hour = {name: 3600.0 * rows / wall for name, wall in seconds.items()}
    gain = seconds["one baseline copy per row, 1 worker"] / seconds["shared, 1 worker"]
    scaling = seconds["shared, 1 worker"] / seconds["shared, 2 workers"]
    lines = [f"Series: 1 baseline and {rows} follow-ups, {args.size}^3 voxels, {POINTS} points per row; "
             f"backbone mind on the CPU ({os.cpu_count()} cores); wall times include starting the workers.", "",
             "| run | wall s | rows/hour |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds[name]:.1f} | {per_hour[name]:.0f} |" for name in seconds]
    lines += ["", f"Feature sharing: {gain:.2f}x faster than extracting the baseline once per row (1 worker). "
              f"2 workers vs 1: {scaling:.2f}x."]
    markdown = "\n".join(lines)
    print(markdown)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"markdown": markdown, "figures": {
        "rows_per_hour": per_hour, "wall_s": seconds, "feature_sharing_gain": gain, "two_worker_speedup": scaling,
        "size": args.size, "followups": rows, "cpu_count": os.cpu_count()}}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main_benchmark()
