"""Dense registration benchmark: MedDIFT's field against identity, B-spline and ConvexAdam.

Pairs are real CTs from ../shared/data warped by the project's breathing simulation
(:func:`MedDIFTLib.evaluation.simulate.make_synthetic_pair`: mean motion 7 mm at lung keypoints, density change,
noise, 1.1x coarser moving grid; ``--motion dirlab1 dirlab2`` for motions fitted to real DIR-Lab landmark
displacements, several families in one run), one per motion family and seed: the POPI thorax (resampled to
``--popi-spacing-mm`` isotropic to bound the CPU time) and the pulmonary crop (native 1.5 mm).
Every method runs on the same pairs in its own fresh process, so wall time, CPU time (all threads)
and peak memory (the process's maximum resident set, pair included) are its own:

- ``identity``: no registration;
- ``bspline``: SimpleITK B-spline, 3 levels (shrink 4/2/1, control grid doubling to 16 mm),
  correlation metric on HU clipped to [-1000, 1500], 50 000 random samples per level, L-BFGS 50
  iterations per level, images resampled to the fixed grid's voxels of at least 2 mm;
- ``convexadam``: :func:`MedDIFTLib.evaluation.baselines.convexadam` (the pip package, both images on one
  isotropic 2 mm grid, its voxel field turned into LPS mm);
- ``meddift-<backbone>``: features of both volumes plus :func:`MedDIFTLib.field.register` with the
  default options, for every backbone that runs here (MAISI needs ``--weights-dir``);
- ``match-<backbone>``: the same features plus :func:`MedDIFTLib.matching.match_points` at the keypoints
  (default options, backward check on): the point engine at the points the field is scored at.

Per method: mean and p95 TRE (mm) at the pair's keypoints, the fraction of voxels of its field with
a Jacobian determinant <= 0, wall and CPU seconds, peak memory, and the ratios of its mean TRE, p95
TRE and wall time to ConvexAdam's on the same pair (this run). The Markdown table is printed and
written with a box plot of the TREs under ``--out``. Run (about 10 min on two cores)::

    python benchmarks/registration.py --out benchmarks/out
    python benchmarks/registration.py --cases popi --methods convexadam meddift-mind match-mind --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from real_cts import CT_DIR, load_case

REGISTRATION_CASES = ("popi", "pulmonary")
CLIP_HU = (-1000.0, 1500.0)
SHRINK_FACTORS = [4, 2, 1]
RESULTS = Path(__file__).resolve().parent / "results" / "registration.json"  # the README's table
BSPLINE_SAMPLES = 50_000


def _set_threads(threads: int) -> None:
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _bspline(fixed, moving, points: np.ndarray):
    """SimpleITK B-spline (correlation, 3 levels); returns moved points and the field on a fixed grid."""
    import SimpleITK as sitk

    from MedDIFTLib.field import DisplacementField

    def prepared(volume):
        grid = volume.geometry.working_grid(2.0, isotropic=False)
        image = sitk.Clamp(volume.to_sitk(sitk.sitkFloat32), sitk.sitkFloat32, *CLIP_HU)
        image = sitk.Resample(image, [int(n) for n in grid.shape_ijk], sitk.Transform(), sitk.sitkLinear,
                              grid.origin_lps_mm, grid.spacing_mm, grid.direction, CLIP_HU[0], sitk.sitkFloat32)
        return image, grid

    fixed_image, grid = prepared(fixed)
    moving_image, _ = prepared(moving)
    extent = np.asarray(grid.spacing_mm) * (np.asarray(grid.shape_ijk) - 1)
    mesh = [max(1, int(round(e / 64.0))) for e in extent]
    transform = sitk.BSplineTransformInitializer(fixed_image, mesh, 3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    level_voxels = [np.prod(np.ceil(np.asarray(fixed_image.GetSize()) / f)) for f in SHRINK_FACTORS]
    method.SetMetricSamplingPercentagePerLevel([float(min(1.0, BSPLINE_SAMPLES / n)) for n in level_voxels], 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=50, deltaConvergenceTolerance=1e-6)
    method.SetShrinkFactorsPerLevel(SHRINK_FACTORS)
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransformAsBSpline(transform, inPlace=True, scaleFactors=[1, 2, 4])
    method.Execute(fixed_image, moving_image)
    moved = np.array([transform.TransformPoint([float(v) for v in p]) for p in points])
    image = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, [int(n) for n in grid.shape_ijk],
                                              grid.origin_lps_mm, grid.spacing_mm, grid.direction)
    return moved, DisplacementField(sitk.GetArrayFromImage(image).astype(np.float32), grid)


def _peak_resident_gb() -> float:
    """This process's peak resident memory (GB). ``VmHWM`` starts afresh at exec, whereas
    ``ru_maxrss`` keeps the spawning parent's size; the latter is the fallback off Linux."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _run_method(method: str, pair_file: str, threads: int, weights_dir: str | None) -> dict:
    """One method on one pair, in a fresh process: moved points, folding, seconds, peak memory."""
    import pickle

    _set_threads(threads)
    from MedDIFTLib.field import jacobian_stats

    with open(pair_file, "rb") as handle:
        fixed, moving, points = pickle.load(handle)
    wall, cpu = time.perf_counter(), time.process_time()
    field = None
    if method == "identity":
        moved = points.copy()
    elif method == "bspline":
        moved, field = _bspline(fixed, moving, points)
    elif method == "convexadam":
        from MedDIFTLib.evaluation.baselines import convexadam

        output = convexadam(fixed, moving, points)
        moved, field = output.points_lps_mm, output.field
    else:
        from MedDIFTLib.features import create_featurizer
        from MedDIFTLib.field import register
        from MedDIFTLib.matching import match_points

        kind, backbone = method.split("-", 1)
        featurizer = create_featurizer(backbone, **({"weights_dir": weights_dir} if weights_dir else {}))
        fixed_features, moving_features = featurizer.extract(fixed), featurizer.extract(moving)
        if kind == "match":
            moved = match_points(fixed_features, moving_features, points).points_lps_mm
        else:
            field = register(fixed_features, moving_features, fixed)
            moved = field.transform_points(points)
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    folding = jacobian_stats(field)["fraction_folding"] if field is not None else 0.0
    peak_gb = _peak_resident_gb()
    return {"moved": moved.tolist(), "folding": folding, "peak_gb": peak_gb, **seconds}


def _methods(weights_dir: str | None) -> tuple[list[str], dict[str, str]]:
    """Methods that can run here, and the reason each other one is left out."""
    import importlib.util

    from MedDIFTLib.features import available_backbones, backbone_spec

    methods, skipped = ["identity", "bspline"], {}
    if importlib.util.find_spec("convexAdam") is None:
        skipped["convexadam"] = "pip package convexAdam not installed (pip install meddift[convexadam])"
    else:
        methods.append("convexadam")
    for backbone in available_backbones():
        if backbone_spec(backbone).requires_weights and not weights_dir:
            skipped[f"meddift-{backbone}"] = "needs pretrained weights (give --weights-dir)"
            continue
        methods.extend([f"meddift-{backbone}", f"match-{backbone}"])
    return methods, skipped


def _markdown(rows: list[dict]) -> str:
    """The table, with each row's mean TRE, p95 TRE and wall time over ConvexAdam's on its pair."""
    lines = [
        "| pair | method | mean TRE mm | p95 TRE mm | folding % | wall s | CPU s | peak GB "
        "| mean / CA | p95 / CA | wall / CA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers = {row["pair"]: row for row in rows if row["method"] == "convexadam"}
    for row in rows:
        peer = peers.get(row["pair"])
        ratios = (
            " | ".join(f"{row[key] / peer[key]:.2f}" for key in ("mean", "p95", "wall"))
            if peer is not None and row["method"] not in ("identity", "convexadam")
            else " |  | "
        )
        lines.append(
            f"| {row['pair']} | {row['method']} | {row['mean']:.2f} | {row['p95']:.2f} | {100 * row['folding']:.3f} "
            f"| {row['wall']:.1f} | {row['cpu']:.1f} | {row['peak_gb']:.2f} | {ratios} |"
        )
    return "\n".join(lines)


def _box_plot(errors: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.6 * len(errors) + 2, 4))
    axes.boxplot(list(errors.values()), showfliers=True)
    axes.set_xticks(range(1, len(errors) + 1), list(errors), rotation=20)
    axes.set_ylabel("TRE (mm)")
    axes.set_title("Registration error at keypoints, all pairs")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    parser.add_argument("--cases", nargs="+", default=["popi", "pulmonary"], choices=REGISTRATION_CASES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="motion seeds (one pair each)")
    parser.add_argument("--popi-spacing-mm", type=float, default=2.0, help="isotropic spacing of the POPI volume")
    parser.add_argument("--mean-motion-mm", type=float, default=7.0, help="mean motion of the breathing model")
    parser.add_argument("--motion", nargs="+", default=["breathing"], choices=["breathing", "dirlab1", "dirlab2"],
                        help="motion families (SimulationOptions.motion), one pair per family and seed: "
                        "breathing model or DIR-Lab case 1/2")
    parser.add_argument("--motion-scale", type=float, default=1.0, help="factor on the DIR-Lab displacements")
    parser.add_argument("--threads", type=int, default=1, help="threads per method (torch and ITK), default 1")
    parser.add_argument("--weights-dir", help="MAISI weights, to include the maisi backbone")
    parser.add_argument("--methods", nargs="+", help="run only these methods (default: every one that runs here)")
    args = parser.parse_args(argv)
    if not CT_DIR.exists():
        print(f"shared data not found at {CT_DIR}: nothing to benchmark", file=sys.stderr)
        return 0
    import pickle

    from MedDIFTLib.evaluation.metrics import tre_mm
    from MedDIFTLib.evaluation.simulate import make_synthetic_pair

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods, skipped = _methods(args.weights_dir)
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods) - set(skipped))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {methods + list(skipped)}")
        methods = [method for method in methods if method in args.methods]
        skipped = {method: reason for method, reason in skipped.items() if method in args.methods}
    rows, errors = [], {method: [] for method in methods}
    with tempfile.TemporaryDirectory() as scratch:
        for case in args.cases:
            volume = load_case(case, args.popi_spacing_mm)
            for motion_family, seed in [(family, seed) for family in args.motion for seed in args.seeds]:
                pair = make_synthetic_pair(volume, seed=seed, mean_motion_mm=args.mean_motion_mm, motion=motion_family,
                                           motion_scale=args.motion_scale)
                family_tag = "" if motion_family == "breathing" else f"-{motion_family}"
                pair_name = f"{case}{family_tag}-seed{seed}"
                pair_file = Path(scratch) / f"{pair_name}.pkl"
                with open(pair_file, "wb") as handle:
                    pickle.dump((pair.fixed, pair.moving, pair.fixed_points.points_lps_mm), handle)
                truth = pair.moving_points.points_lps_mm
                for method in methods:
                    context = get_context("spawn")
                    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
                        result = pool.submit(_run_method, method, str(pair_file), args.threads,
                                             args.weights_dir).result()
                    error = tre_mm(np.asarray(result["moved"]), truth)
                    errors[method].extend(error.tolist())
                    row = {"pair": pair_name, "method": method, "mean": float(error.mean()),
                           "p95": float(np.percentile(error, 95)), "points": len(error),
                           **{key: result[key] for key in ("folding", "wall", "cpu", "peak_gb")}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = _markdown(rows)
    notes = [f"- {method}: not run ({reason})" for method, reason in skipped.items()]
    motion = " and ".join(f"breathing motion, mean {args.mean_motion_mm} mm" if family == "breathing"
                          else f"{family} motion x{args.motion_scale:g}" for family in args.motion)
    header = (f"Pairs: {', '.join(args.cases)} x seeds {args.seeds}, {motion}, "
              f"POPI at {args.popi_spacing_mm} mm, {args.threads} thread(s) per method.")
    (out / "registration.md").write_text("\n".join([header, "", table, "", *notes]) + "\n", encoding="utf-8")
    (out / "registration.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1), encoding="utf-8")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join([header, "", table, "", *notes])
    RESULTS.write_text(json.dumps({"markdown": markdown, "figures": rows}, indent=1), encoding="utf-8")
    _box_plot({method: values for method, values in errors.items() if values}, out / "registration_tre.png")
    print(header)
    print(table)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
