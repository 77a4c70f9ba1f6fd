"""Dense registration benchmark: MedDIFT's field and point matches against identity, B-spline and ConvexAdam,
on real image pairs and on real CTs warped by known synthetic motions, every method on the same pairs.

Pairs (the table's ``data`` column says which kind each is):

- real: ``liver``, the four liver MRI pairs of ../shared/data/liver4dmri_real_pairs (real free breathing,
  1.37 x 1.37 x 4 mm voxels, 52 landmarks: 32 in the liver, 20 outside it, where the liver slides along the
  abdominal wall), named ``liver-<pair folder>``; TRE over all landmarks, and over the ``liver-NN`` and
  ``outside-NN`` ones separately;
- synthetic: the real CTs ``popi`` (the thorax, resampled to ``--popi-spacing-mm`` isotropic to bound the
  CPU time), ``pulmonary`` (a 1.5 mm crop whose lungs touch the border) and ``elastix`` (a 2.73 x 2.73 x 5 mm
  thick-slice crop), warped by :func:`MedDIFTLib.evaluation.simulate.make_synthetic_pair` (density change,
  noise, a 1.1x coarser moving grid; TRE at its lung keypoints), one pair per motion and seed:
  ``breathing`` (the parametric model, ``--mean-motion-mm``; ``popi-seed0``) and ``dirlab1`` / ``dirlab2``
  (motions fitted to real DIR-Lab landmark displacements) times each ``--motion-scale``
  (``popi-dirlab1-seed0`` at x1, ``popi-dirlab1x2-seed0`` at x2). DIR-Lab displacements scaled x2-x3 may fold
  the synthetic map; for scales above 1 the fold is kept (``allow_folding``) and the notes name each pair
  whose ground truth folds, with its Jacobian determinant minimum.

Every method runs on each pair in its own fresh process, so wall time, CPU time (all threads) and peak
memory (the process's maximum resident set, pair included) are its own:

- ``identity``: no registration;
- ``bspline``: :func:`MedDIFTLib.evaluation.baselines.bspline`, 3 levels (control grid 64/32/16 mm),
  correlation metric, 50 000 random samples and 50 L-BFGS iterations per level, voxels of at least 2 mm;
- ``convexadam``: :func:`MedDIFTLib.evaluation.baselines.convexadam` with its defaults: run as its users run it
  well, on one isotropic grid over the fixed image of the pair's finest spacing where the voxels are not
  cubic (1.37 mm on the liver MRI, 2.73 mm on the elastix crop), else of 2 mm
  (:func:`MedDIFTLib.evaluation.baselines.convexadam_spacing_mm`); the notes give each pair's grid;
- ``meddift-<backbone>``: features of both volumes plus :func:`MedDIFTLib.field.register` with the
  default options (``meddift register``), for every backbone that runs here (MAISI needs ``--weights-dir``);
- ``match-<backbone>``: the same features plus :func:`MedDIFTLib.matching.match_points` at the points
  (default options, backward check on): the point engine at the points the field is scored at.

Per method and pair: mean and p95 TRE (mm), the liver and outside means on the real liver pairs, the
share of the true motion recovered (:func:`motion_recovered`), the share of voxels of its field with a
Jacobian determinant <= 0 (folding) and the determinant's range (a sliding break shrinks or stretches
without folding), wall and CPU seconds, peak memory, the ratios of its mean TRE, p95 TRE and wall time
to ConvexAdam's on the same pair (this run), and for the field, its mean and p95 TRE over the point
engine's at the same points. The Markdown
table goes to ``--results`` (default benchmarks/results/registration.json, the README's table) and,
with the rows and a box plot of the TREs, to ``--out``. A case whose data folder is absent is skipped
with a message. The README's table (about an hour on two cores)::

    python benchmarks/registration.py --cases liver pulmonary elastix popi --seeds 0 1 \\
        --motion breathing dirlab1 --motion-scale 1 2 3 --threads 2

``--device cuda`` runs ConvexAdam, the features and the field on the GPU (B-spline stays on the CPU) and adds
each method's peak GPU memory to the peak column (``benchmarks/gpu_checks.sh`` runs it on a GPU machine).

A quick subset, kept out of the README's results file::

    python benchmarks/registration.py --cases liver --methods identity match-mind --results /tmp/reg.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from real_cts import LIVER_DIR, case_folder, load_case, load_liver_pairs

SYNTHETIC_CASES = ("popi", "pulmonary", "elastix")
REAL_CASES = ("liver",)
REGISTRATION_CASES = (*REAL_CASES, *SYNTHETIC_CASES)
LANDMARK_GROUPS = ("liver", "outside")  # label prefixes of the real liver pairs' landmarks, reported apart
RESULTS = Path(__file__).resolve().parent / "results" / "registration.json"  # the README's table
BSPLINE_SETTINGS = {"control_spacing_mm": 16.0, "iterations": 50, "samples": 50_000, "metric": "correlation"}


@dataclass
class BenchmarkPair:
    """One pair: both volumes, the fixed points (LPS mm, labelled), their true moving positions (N, 3, LPS
    mm), whether it is ``real`` or ``synthetic``, and for a synthetic pair its true motion's Jacobian
    determinant minimum (<= 0: the ground truth folds)."""

    name: str
    data: str
    fixed: object
    moving: object
    labels: list[str]
    fixed_points_lps_mm: np.ndarray
    true_points_lps_mm: np.ndarray
    truth_jacobian_min: float | None = None


def _set_threads(threads: int) -> None:
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _peak_resident_gb() -> float:
    """This process's peak resident memory (GB). ``VmHWM`` starts afresh at exec, whereas
    ``ru_maxrss`` keeps the spawning parent's size; the latter is the fallback off Linux."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _run_method(method: str, pair_file: str, threads: int, weights_dir: str | None, device: str = "cpu") -> dict:
    """One method on one pair, in a fresh process: moved points, its field's Jacobian determinant (folding
    share, min, max; None without a field), seconds, peak memory, and ConvexAdam's grid spacing (mm).
    ``device`` (``cpu``, ``cuda``, ``cuda:N``) runs ConvexAdam, the features and the field there (B-spline
    is CPU only); on CUDA the timing waits for the device and the peak GPU memory is reported too."""
    import pickle

    import torch

    _set_threads(threads)
    from MedDIFTLib.field import jacobian_stats

    with open(pair_file, "rb") as handle:
        fixed, moving, points = pickle.load(handle)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    field = None
    if method == "identity":
        moved = points.copy()
    elif method in ("bspline", "convexadam"):
        from MedDIFTLib.evaluation import baselines

        output = (baselines.bspline(fixed, moving, points, **BSPLINE_SETTINGS) if method == "bspline"
                  else baselines.convexadam(fixed, moving, points, device=device))
        moved, field = output.points_lps_mm, output.field
    else:
        from MedDIFTLib.features import create_featurizer
        from MedDIFTLib.field import register
        from MedDIFTLib.matching import match_points

        kind, backbone = method.split("-", 1)
        featurizer = create_featurizer(backbone, device=device, **({"weights_dir": weights_dir} if weights_dir else {}))
        fixed_features, moving_features = featurizer.extract(fixed), featurizer.extract(moving)
        if kind == "match":
            moved = match_points(fixed_features, moving_features, points).points_lps_mm
        else:
            field = register(fixed_features, moving_features, fixed)
            moved = field.transform_points(points)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    jacobian = jacobian_stats(field) if field is not None else None
    return {"moved": np.asarray(moved).tolist(), "peak_gb": _peak_resident_gb(), **seconds,
            "folding": None if jacobian is None else jacobian["fraction_folding"],
            "jacobian_min": None if jacobian is None else jacobian["min"],
            "jacobian_max": None if jacobian is None else jacobian["max"],
            "grid_mm": float(field.geometry.spacing_mm[0]) if method == "convexadam" else None,
            "device": device, "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


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


def motion_tag(family: str, scale: float) -> str:
    """The motion's part of a synthetic pair's name: ``""`` (breathing), ``-dirlab1`` (x1), ``-dirlab1x2``."""
    if family == "breathing":
        return ""
    return f"-{family}" if scale == 1 else f"-{family}x{scale:g}"


def case_data_folder(case: str) -> Path:
    """The folder of ../shared/data that ``case`` reads."""
    return LIVER_DIR if case == "liver" else case_folder(case)


def real_pairs(case: str) -> Iterator[BenchmarkPair]:
    """The real pairs of ``case`` (``liver``: the four liver MRI pairs, 52 landmarks each)."""
    for pair in load_liver_pairs():
        yield BenchmarkPair(f"{case}-{pair.case.name}", "real", pair.fixed, pair.moving, pair.fixed_points.labels,
                            pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm)


def synthetic_pairs(case: str, seeds: list[int], families: list[str], scales: list[float],
                    mean_motion_mm: float, popi_spacing_mm: float) -> Iterator[BenchmarkPair]:
    """The CT of ``case`` warped by each motion (breathing once; each DIR-Lab family at each scale) and seed."""
    from MedDIFTLib.evaluation.simulate import make_synthetic_pair

    volume = load_case(case, popi_spacing_mm)
    motions = [(family, scale) for family in families
               for scale in ([1.0] if family == "breathing" else scales)]
    for (family, scale), seed in [(motion, seed) for motion in motions for seed in seeds]:
        pair = make_synthetic_pair(volume, seed=seed, mean_motion_mm=mean_motion_mm, motion=family,
                                   motion_scale=scale, allow_folding=scale > 1)
        yield BenchmarkPair(f"{case}{motion_tag(family, scale)}-seed{seed}", "synthetic", pair.fixed, pair.moving,
                            pair.fixed_points.labels, pair.fixed_points.points_lps_mm,
                            pair.moving_points.points_lps_mm, pair.jacobian_min)


def group_errors(labels: list[str], errors_mm: np.ndarray) -> dict[str, dict]:
    """Mean and p95 TRE (mm) and count of the points of each :data:`LANDMARK_GROUPS` label prefix present."""
    groups = {}
    for group in LANDMARK_GROUPS:
        chosen = np.array([label.startswith(f"{group}-") for label in labels], bool)
        if chosen.any():
            groups[group] = {"mean": float(errors_mm[chosen].mean()),
                             "p95": float(np.percentile(errors_mm[chosen], 95)), "points": int(chosen.sum())}
    return groups


def motion_recovered(fixed_lps_mm: np.ndarray, moved_lps_mm: np.ndarray, true_lps_mm: np.ndarray) -> float | None:
    """The share of the true motion a method recovers: the median over the points that move more than
    1 mm of the method's displacement projected on the true one, over the true one's length."""
    truth = true_lps_mm - fixed_lps_mm
    length = np.linalg.norm(truth, axis=1)
    moving = length > 1.0
    if not moving.any():
        return None
    found = moved_lps_mm - fixed_lps_mm
    return float(np.median(np.einsum("nk,nk->n", found[moving], truth[moving]) / length[moving] ** 2))


def _cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """The table, with each row's mean TRE, p95 TRE and wall time over ConvexAdam's on its pair."""
    groups = " | ".join(f"{group} mean mm" for group in LANDMARK_GROUPS)
    lines = [
        f"| pair | data | method | mean TRE mm | p95 TRE mm | {groups} | motion recovered % | folding % "
        "| Jacobian min / max | wall s | CPU s | peak GB | mean / CA | p95 / CA | wall / CA | mean / match "
        "| p95 / match |",
        "|---|---|---|" + "---:|" * (13 + len(LANDMARK_GROUPS)),
    ]
    peers = {row["pair"]: row for row in rows if row["method"] == "convexadam"}
    matches = {(row["pair"], row["method"].removeprefix("match-")): row for row in rows
               if row["method"].startswith("match-")}
    for row in rows:
        peer = peers.get(row["pair"])
        ratios = (
            " | ".join(f"{row[key] / peer[key]:.2f}" for key in ("mean", "p95", "wall"))
            if peer is not None and row["method"] not in ("identity", "convexadam")
            else " |  | "
        )
        match = matches.get((row["pair"], row["method"].removeprefix("meddift-")))
        to_match = (" | ".join(f"{row[key] / match[key]:.2f}" for key in ("mean", "p95"))
                    if match is not None and row["method"].startswith("meddift-") else " | ")
        recovered = "" if row.get("recovered") is None else f"{100 * row['recovered']:.0f}"
        group_cells = " | ".join(f"{row['groups'][g]['mean']:.2f}" if g in row["groups"] else ""
                                 for g in LANDMARK_GROUPS)
        folding = "–" if row["folding"] is None else f"{100 * row['folding']:.3f}"
        jacobian = "–" if row["jacobian_min"] is None else f"{row['jacobian_min']:.2f} / {row['jacobian_max']:.2f}"
        peak = f"{row['peak_gb']:.2f}" + ("" if row.get("peak_gpu_gb") is None else f" (GPU {row['peak_gpu_gb']:.2f})")
        lines.append(
            f"| {row['pair']} | {row['data']} | {row['method']} | {row['mean']:.2f} | {row['p95']:.2f} | "
            f"{group_cells} | {recovered} | {folding} | {jacobian} | {row['wall']:.1f} | {row['cpu']:.1f} | "
            f"{peak} | {ratios} | {to_match} |"
        )
    return "\n".join(lines)


def notes(rows: list[dict], folded: dict[str, float], skipped: dict[str, str], absent: list[str]) -> list[str]:
    """What the table does not show: ConvexAdam's grid per pair, folding ground truths, what was not run."""
    lines = []
    grids: dict[float, list[str]] = {}
    for row in rows:
        if row["method"] == "convexadam":
            grids.setdefault(round(row["grid_mm"], 3), []).append(row["pair"])
    for spacing, pairs in sorted(grids.items()):
        lines.append(f"- ConvexAdam on an isotropic {spacing:g} mm grid: {', '.join(pairs)}")
    if folded:
        listed = ", ".join(f"{name} (min {minimum:.2f})" for name, minimum in folded.items())
        lines.append(f"- The synthetic motion folds (Jacobian determinant <= 0 somewhere; kept, allow_folding): "
                     f"{listed}; there the ground truth is the inverse of a map that is not one-to-one.")
    lines += [f"- {method}: not run ({reason})" for method, reason in skipped.items()]
    lines += [f"- {case}: not run (data folder absent)" for case in absent]
    return lines


def _box_plot(errors: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.6 * len(errors) + 2, 4))
    axes.boxplot(list(errors.values()), showfliers=True)
    axes.set_xticks(range(1, len(errors) + 1), list(errors), rotation=20, ha="right")
    axes.set_ylabel("TRE (mm)")
    axes.set_title("Registration error at the points, real and synthetic pairs apart")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _header(args: argparse.Namespace, cases: list[str]) -> str:
    parts = []
    if "liver" in cases:
        parts.append("Real pairs: liver = 4 liver MRI pairs (ETH 4D MRI via pTVreg, real breathing, 1.37 x 1.37 x "
                     "4 mm voxels; 52 landmarks: 32 in the liver, 20 outside).")
    synthetic = [case for case in cases if case in SYNTHETIC_CASES]
    if synthetic:
        motions = ", ".join(
            f"breathing (mean {args.mean_motion_mm:g} mm)" if family == "breathing"
            else f"{family} (x{', x'.join(f'{scale:g}' for scale in args.motion_scale)})" for family in args.motion)
        popi = f"; POPI at {args.popi_spacing_mm:g} mm" if "popi" in synthetic else ""
        parts.append(f"Synthetic pairs: real CTs {', '.join(synthetic)} x seeds {args.seeds}, "
                     f"warped by {motions}{popi}.")
    parts.append(f"{args.threads} thread(s) per method, each method in its own process, device {args.device}.")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    parser.add_argument("--results", default=str(RESULTS),
                        help="results file with the Markdown table (default: the README's, "
                        "benchmarks/results/registration.json; give another path for a partial run)")
    parser.add_argument("--cases", nargs="+", default=list(REGISTRATION_CASES), choices=REGISTRATION_CASES,
                        help="liver: the real liver MRI pairs; popi, pulmonary, elastix: CTs warped synthetically")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="motion seeds (one synthetic pair each)")
    parser.add_argument("--popi-spacing-mm", type=float, default=2.0, help="isotropic spacing of the POPI volume")
    parser.add_argument("--mean-motion-mm", type=float, default=7.0, help="mean motion of the breathing model")
    parser.add_argument("--motion", nargs="+", default=["breathing"], choices=["breathing", "dirlab1", "dirlab2"],
                        help="motion families (SimulationOptions.motion), one synthetic pair per family, scale and "
                        "seed: breathing model or DIR-Lab case 1/2")
    parser.add_argument("--motion-scale", nargs="+", type=float, default=[1.0],
                        help="factors on the DIR-Lab displacements, one pair each (e.g. 1 2 3; above 1 a folding "
                        "motion is kept and named in the notes)")
    parser.add_argument("--threads", type=int, default=1, help="threads per method (torch and ITK), default 1")
    parser.add_argument("--weights-dir", help="MAISI weights, to include the maisi backbone")
    parser.add_argument("--methods", nargs="+", help="run only these methods (default: every one that runs here)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N: where ConvexAdam, the features and the field run (default cpu)")
    args = parser.parse_args(argv)
    from MedDIFTLib.core.devices import resolve_device
    from MedDIFTLib.core.errors import BadInputError

    try:
        args.device = str(resolve_device(args.device))
    except BadInputError as error:
        parser.error(f"--device: {error}")
    if any(scale <= 0 for scale in args.motion_scale):
        parser.error("--motion-scale: factors must be above 0")
    cases = [case for case in dict.fromkeys(args.cases) if case_data_folder(case).is_dir()]
    absent = [case for case in dict.fromkeys(args.cases) if case not in cases]
    for case in absent:
        print(f"{case}: {case_data_folder(case)} not found: skipped", file=sys.stderr)
    if not cases:
        print("no benchmark data found: nothing to run", file=sys.stderr)
        return 0
    import pickle

    from MedDIFTLib.evaluation.metrics import tre_mm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods, skipped = _methods(args.weights_dir)
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods) - set(skipped))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {methods + list(skipped)}")
        methods = [method for method in methods if method in args.methods]
        skipped = {method: reason for method, reason in skipped.items() if method in args.methods}
    rows, errors, folded = [], {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases:
            pairs = real_pairs(case) if case in REAL_CASES else synthetic_pairs(
                case, args.seeds, args.motion, args.motion_scale, args.mean_motion_mm, args.popi_spacing_mm)
            for pair in pairs:
                if pair.truth_jacobian_min is not None and pair.truth_jacobian_min <= 0:
                    folded[pair.name] = pair.truth_jacobian_min
                pair_file = Path(scratch) / f"{pair.name}.pkl"
                with open(pair_file, "wb") as handle:
                    pickle.dump((pair.fixed, pair.moving, pair.fixed_points_lps_mm), handle)
                for method in methods:
                    context = get_context("spawn")
                    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
                        result = pool.submit(_run_method, method, str(pair_file), args.threads,
                                             args.weights_dir, args.device).result()
                    error = tre_mm(np.asarray(result["moved"]), pair.true_points_lps_mm)
                    errors.setdefault(f"{method} ({pair.data})", []).extend(error.tolist())
                    recovered = motion_recovered(pair.fixed_points_lps_mm, np.asarray(result["moved"]),
                                                 pair.true_points_lps_mm)
                    row = {"pair": pair.name, "data": pair.data, "method": method, "mean": float(error.mean()),
                           "p95": float(np.percentile(error, 95)), "points": len(error), "recovered": recovered,
                           "groups": group_errors(pair.labels, error), "truth_jacobian_min": pair.truth_jacobian_min,
                           **{key: value for key, value in result.items() if key != "moved"}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                pair_file.unlink()
    if not rows:
        print("no method ran: nothing written", file=sys.stderr)
        return 0
    header = _header(args, cases)
    text = "\n".join([header, "", markdown(rows), "", *notes(rows, folded, skipped, absent)])
    (out / "registration.md").write_text(text + "\n", encoding="utf-8")
    (out / "registration.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1), encoding="utf-8")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"markdown": text, "figures": rows}, indent=1), encoding="utf-8")
    _box_plot(errors, out / "registration_tre.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
