"""``meddift simulate CT OUT``: a realistic synthetic pair with known motion from one real CT."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

FILES = ("fixed.nii.gz", "moving.nii.gz", "fixed_points.csv", "moving_points_true.csv", "pair.json")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="warp a real CT with a known breathing-like motion into a test pair",
        description="Write OUT/fixed.nii.gz (the CT), OUT/moving.nii.gz (warped, with lung density change, "
        "noise and a slightly coarser grid), OUT/fixed_points.csv, OUT/moving_points_true.csv (ground truth, "
        "LPS mm, same labels) and OUT/pair.json. OUT must not exist yet or be empty.",
    )
    parser.add_argument("ct", help="a real CT volume in HU (NIfTI, NRRD, MHA or DICOM folder)")
    parser.add_argument("out", help="output folder (created; must be new or empty)")
    parser.add_argument("--points", help="fixed points to use (default: automatic keypoints in the lungs)")
    parser.add_argument("--seed", type=int, default=0, help="motion and noise seed (default 0)")
    parser.add_argument("--mean-motion-mm", type=float, default=7.0, help="mean motion at the points (default 7)")
    parser.add_argument("--num-keypoints", type=int, default=200, help="automatic keypoints (default 200)")
    parser.add_argument("--noise-hu", type=float, default=20.0, help="Gaussian noise in HU (default 20)")
    parser.add_argument("--spacing-factor", type=float, default=1.1,
                        help="moving voxel size relative to the CT (default 1.1)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from ..errors import BadInputError
    from ..evaluation import tre_stats
    from ..io import read_points, read_volume, write_points, write_volume
    from ..simulate import make_synthetic_pair

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    volume = read_volume(args.ct)
    points = read_points(args.points, volume.geometry) if args.points else None
    pair = make_synthetic_pair(
        volume,
        seed=args.seed,
        mean_motion_mm=args.mean_motion_mm,
        points_lps_mm=None if points is None else points.points_lps_mm,
        labels=None if points is None else points.labels,
        num_keypoints=args.num_keypoints,
        noise_hu=args.noise_hu,
        moving_spacing_factor=args.spacing_factor,
    )
    motion = tre_stats(pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        write_volume(pair.fixed, staging / "fixed.nii.gz", sitk.sitkInt16)
        write_volume(pair.moving, staging / "moving.nii.gz", sitk.sitkInt16)
        write_points(pair.fixed_points, staging / "fixed_points.csv")
        write_points(pair.moving_points, staging / "moving_points_true.csv")
        summary = {
            "source": str(Path(args.ct).resolve()),
            "seed": args.seed,
            "points": len(pair.fixed_points),
            "motion_mm": motion,
            "jacobian_min": pair.jacobian_min,
            "noise_hu": args.noise_hu,
            "spacing_factor": args.spacing_factor,
        }
        (staging / "pair.json").write_text(json.dumps(summary, indent=2))
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Synthetic pair from {volume.name}: {len(pair.fixed_points)} points, "
          f"motion mean {motion['mean']:.2f} mm (max {motion['max']:.2f}), Jacobian min {pair.jacobian_min:.2f}")
    print(f"Wrote {', '.join(FILES)} to {out}")
    return 0
