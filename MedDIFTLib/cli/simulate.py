"""``meddift simulate CT OUT``: a realistic synthetic pair with known motion from one real CT.

``meddift simulate --manifest FOLDER OUT``: one pair per CT of a folder and ``OUT/manifest.csv`` for
``meddift eval`` (see :func:`MedDIFTLib.evaluation.synthetic.build_synthetic_manifest`)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from ..core.options import SimulationOptions, to_json
from .common import add_option, options_from_args, read_input_points

FILES = ("fixed.nii.gz", "moving.nii.gz", "fixed_points.csv", "moving_points_true.csv", "pair.json")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="warp a real CT with a known breathing-like or DIR-Lab-derived motion into a test pair",
        description="Write OUT/fixed.nii.gz (the CT), OUT/moving.nii.gz (warped, with lung density change, "
        "noise and a slightly coarser grid), OUT/fixed_points.csv, OUT/moving_points_true.csv (ground truth, "
        "LPS mm, same labels) and OUT/pair.json. OUT must not exist yet or be empty. With --manifest, CT is a "
        "folder of CTs (volume files, or subfolders with one volume or DICOM series and optionally one landmark "
        "file): each becomes OUT/<case>/ as above, and OUT/manifest.csv lists them for meddift eval.",
    )
    parser.add_argument("ct", help="a real CT volume in HU (NIfTI, NRRD, MHA or DICOM folder); with --manifest, "
                        "a folder of CTs")
    parser.add_argument("out", help="output folder (created; must be new or empty)")
    parser.add_argument("--points", help="fixed points to use (default: automatic keypoints in the lungs)")
    for name in ("motion", "seed", "mean_motion_mm", "motion_scale", "num_keypoints", "noise_hu", "spacing_factor",
                 "allow_folding"):
        add_option(parser, SimulationOptions, name)
    parser.add_argument("--manifest", action="store_true",
                        help="CT is a folder of CTs: write one pair per CT and OUT/manifest.csv")
    parser.set_defaults(run=run)


def _pair_maker(options: SimulationOptions):
    """``(volume, points_lps_mm, labels) -> SyntheticPair`` with the command's settings."""
    from ..evaluation.simulate import make_synthetic_pair

    def make_pair(volume, points_lps_mm, labels):
        return make_synthetic_pair(
            volume,
            seed=options.seed,
            mean_motion_mm=options.mean_motion_mm,
            points_lps_mm=points_lps_mm,
            labels=labels,
            num_keypoints=options.num_keypoints,
            noise_hu=options.noise_hu,
            moving_spacing_factor=options.spacing_factor,
            allow_folding=options.allow_folding,
            motion=options.motion,
            motion_scale=options.motion_scale,
        )

    return make_pair


def _warn_folding(name: str, jacobian_min: float) -> None:
    import sys

    if jacobian_min <= 0:
        print(f"meddift: warning: {name}: the ground truth folds (Jacobian determinant min {jacobian_min:.2f}); "
              "its points are not a one-to-one correspondence", file=sys.stderr)


def _settings(options: SimulationOptions) -> dict:
    """What ``pair.json`` records of the settings (the mean motion is measured there instead)."""
    settings = to_json(options)
    del settings["mean_motion_mm"], settings["num_keypoints"]
    return settings


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder onto ``out`` (new or empty)."""
    if out.exists():
        out.rmdir()
    os.replace(staging, out)


def _run_manifest(args: argparse.Namespace, options: SimulationOptions, out: Path, staging: Path) -> int:
    import sys

    from ..core.errors import BadInputError
    from ..evaluation.synthetic import build_synthetic_manifest
    from .common import ProgressBar

    if args.points:
        raise BadInputError("--points cannot be used with --manifest: put a landmark file beside each CT instead")
    with ProgressBar() as progress:
        summaries, problems = build_synthetic_manifest(
            args.ct, staging, _pair_maker(options), _settings(options),
            lambda name, done, total: progress("simulate", done / max(total, 1), name),
        )
    if not summaries:
        raise BadInputError(f"{args.ct}: no synthetic pair could be made: " + "; ".join(problems))
    _publish(staging, out)
    for summary in summaries:
        _warn_folding(summary["case"], summary["jacobian_min"])
        motion = summary["motion_mm"]
        print(f"{summary['case']}: {summary['points']} points{' (landmarks)' if summary['landmarks'] else ''}, "
              f"motion mean {motion['mean']:.2f} mm (max {motion['max']:.2f}), "
              f"Jacobian min {summary['jacobian_min']:.2f}")
    print(f"Wrote {len(summaries)} pairs and manifest.csv to {out}; evaluate with: "
          f"meddift eval {out / 'manifest.csv'} --methods identity mind --out RESULTS")
    for problem in problems:
        print(f"meddift: skipped {problem}", file=sys.stderr)
    return 1 if problems else 0


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` with the mode the umask gives (not ``mkdtemp``'s private one)."""
    from ..core.errors import BadInputError
    from ..core.io import check_output_path

    check_output_path(out / FILES[-1])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise BadInputError(f"{out}: cannot write there ({error.strerror})") from None
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)
    return staging


def run(args: argparse.Namespace) -> int:
    from ..core.errors import BadInputError
    from ..core.io import read_volume
    from ..evaluation.metrics import tre_stats
    from ..evaluation.synthetic import write_synthetic_pair

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    options = options_from_args(args, SimulationOptions)
    staging = _staging_folder(out)
    try:
        if args.manifest:
            return _run_manifest(args, options, out, staging)
        volume = read_volume(args.ct)
        points = read_input_points(args.points, volume.geometry) if args.points else None
        pair = _pair_maker(options)(volume, None if points is None else points.points_lps_mm,
                                 None if points is None else points.labels)
        motion = tre_stats(pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm)
        summary = {
            "source": str(Path(args.ct).resolve()),
            "points": len(pair.fixed_points),
            "motion_mm": motion,
            "jacobian_min": pair.jacobian_min,
            **_settings(options),
        }
        write_synthetic_pair(pair, staging, summary)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _warn_folding(volume.name or str(args.ct), pair.jacobian_min)
    print(f"Synthetic pair from {volume.name}: {len(pair.fixed_points)} points, "
          f"motion mean {motion['mean']:.2f} mm (max {motion['max']:.2f}), Jacobian min {pair.jacobian_min:.2f}")
    print(f"Wrote {', '.join(FILES)} to {out}")
    return 0
