"""Full-resolution benchmark (issue 30): ``register``, ``track`` and the worker's first points on the POPI CT
at the scanner's own grid, beside the issue's goals.

Pairs (both **synthetic**): the real POPI 4DCT phase (512 x 512 x 141, 0.98 x 0.98 x 2 mm, not resampled)
warped by :func:`MedDIFTLib.evaluation.simulate.make_synthetic_pair` with the motion fitted to the real DIR-Lab
case 1 landmark displacements (``dirlab1`` at its real size, ``--seed``; density change, noise, the moving
image on a 1.1x coarser grid; TRE at its lung keypoints), and for ``track`` the same CT, motion and seed with
``--nodules`` synthetic nodules inserted (:func:`MedDIFTLib.evaluation.synthetic_lesions.make_lesion_pair`).

Each step runs in its own fresh process (this script with ``--child``, MedDIFTLib from the engine's checkout
first on its ``PYTHONPATH``), so peak memory (``VmHWM``, the pair included) is the step's own; torch threads
and ``OMP_NUM_THREADS`` are ``--threads``:

- ``register``: MIND features of both volumes plus :func:`MedDIFTLib.field.register` (default options, what
  ``meddift register`` runs): wall and CPU seconds (all threads), peak RSS, mean and p95 TRE (mm) at the
  keypoints;
- ``track``: MIND features plus :func:`MedDIFTLib.lesions.track.track_lesions` (default options, what
  ``meddift track`` runs: it registers the pair itself, around each lesion with the features computed only
  where it reads them, or, on an engine before that, over the whole scan with whole features): wall and CPU
  seconds, peak RSS, centre error (mm) and Dice against the truth;
- ``worker``: the worker subprocess through :class:`MedDIFTLib.worker.client.WorkerClient` (MIND, default
  match options): the first ``match`` of the new pair (one keypoint near the keypoints' centre), then at once,
  while the idle worker fills the features behind, ``--new-points`` keypoints far from it and from each other,
  one request each (ms per point; the share of features filled when they are done); after the fill, cached
  re-matches, dragged a little on each of ``--repeats``, of those points one per request and of 10 spread
  keypoints (those among them) in one request (ms per point).

``--baseline PATH`` runs every step a second time on another checkout (e.g. ``git worktree add /tmp/old
<commit>``), each right after this checkout's on the same pair, and checks the accuracy goal (mean and p95
TRE not worse than the baseline's by more than 0.02 mm). Figures and the Markdown table go to ``--results``
(default benchmarks/results/full_resolution.json, the README's table). The README's run (17 minutes on
two cores busy with other work)::

    python benchmarks/full_resolution.py --threads 2
    python benchmarks/full_resolution.py --steps worker --results /tmp/full.json  # one step, kept out of the README
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from real_cts import image_path, load_case
from registration import _peak_resident_gb, _set_threads
from worker_latency import SHIFT_STEP_MM, _wait_for_fill

if TYPE_CHECKING:
    from MedDIFTLib.core.io import Volume

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "full_resolution.json"
STEPS = ("register", "track", "worker")
MOTION = "dirlab1"
ACCURACY_SLACK_MM = 0.02  # the bound on a worse mean or p95 TRE than the baseline's
BATCH_POINTS = 10  # points per request of the batched cached re-match

# (step, figure key, row label, digits, goal: the figure's upper bound, None without one)
ROWS: tuple[tuple[str, str, str, int, float | None], ...] = (
    ("register", "wall_s", "wall s", 1, 20.0),
    ("register", "cpu_s", "CPU s (all threads)", 1, None),
    ("register", "peak_gb", "peak RSS GB", 2, 4.0),
    ("register", "features_s", "of which features s", 1, None),
    ("register", "tre_mean_mm", "mean TRE mm", 2, None),
    ("register", "tre_p95_mm", "p95 TRE mm", 2, None),
    ("track", "wall_s", "wall s", 1, 15.0),
    ("track", "cpu_s", "CPU s (all threads)", 1, None),
    ("track", "peak_gb", "peak RSS GB", 2, None),
    ("track", "centre_error_mean_mm", "centre error mean mm", 2, None),
    ("track", "centre_error_max_mm", "centre error max mm", 2, None),
    ("track", "dice_median", "Dice median", 3, None),
    ("worker", "first_match_s", "first match of the new pair s", 2, None),
    ("worker", "new_point_ms", "new-region point, features filling behind, ms/pt (median)", 1, 20.0),
    ("worker", "new_point_max_ms", "new-region point ms/pt (slowest)", 1, None),
    ("worker", "filled_share", "features filled when those points were done %", 0, None),
    ("worker", "new_point_error_mean_mm", "new-region points' error mean mm", 2, None),
    ("worker", "fill_behind_s", "filled behind s", 0, None),
    ("worker", "cached_1_ms", "cached re-match, 1 pt per request, ms/pt", 1, 10.0),
    ("worker", f"cached_{BATCH_POINTS}_ms", f"cached re-match, {BATCH_POINTS} pt per request, ms/pt", 1, 10.0),
)
ACCURACY_KEYS = ("tre_mean_mm", "tre_p95_mm")
Figures = dict[str, dict[str, dict]]  # figures[engine][step][figure key]


def tre_summary(moved_lps_mm: np.ndarray, true_lps_mm: np.ndarray) -> dict[str, float]:
    """Mean and p95 of the distance (mm) between moved and true points, (N, 3) each."""
    error = np.linalg.norm(np.asarray(moved_lps_mm, float) - np.asarray(true_lps_mm, float), axis=1)
    return {"mean": float(error.mean()), "p95": float(np.percentile(error, 95))}


def spread_points(points: np.ndarray, count: int) -> list[int]:
    """Indices into ``points`` (N, 3): the one nearest their centroid, then ``count`` more, each the
    farthest from those chosen before (points in new regions of the volume)."""
    points = np.asarray(points, float)
    chosen = [int(np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1)))]
    distance = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(min(count, len(points) - 1)):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return chosen


def goal_cell(value: float | None, goal: float | None) -> str:
    """``yes`` or ``no`` for a figure against its upper bound; empty without a goal or a figure."""
    if goal is None or value is None:
        return ""
    return "yes" if value <= goal else "no"


def markdown(figures: Figures) -> str:
    """The table: one row per figure of :data:`ROWS` present, a column per engine (``figures[engine][step]``),
    the goal, and whether the first engine meets it; with two engines, the accuracy rows' goal is the
    second's figure plus :data:`ACCURACY_SLACK_MM`."""
    engines = list(figures)
    lines = ["| step | figure | " + " | ".join(engines) + " | goal (issue 30) | goal met |",
             "|---|---|" + "---:|" * len(engines) + "---|---|"]
    for step, key, label, digits, goal in ROWS:
        values = [figures[engine].get(step, {}).get(key) for engine in engines]
        if all(value is None for value in values):
            continue
        text = "" if goal is None else f"<= {goal:g}"
        if key in ACCURACY_KEYS and step == "register":
            if len(engines) > 1 and values[1] is not None:
                goal = values[1] + ACCURACY_SLACK_MM
                text = f"<= {engines[1]} + {ACCURACY_SLACK_MM:g}"
            else:
                text = f"<= before + {ACCURACY_SLACK_MM:g} (A/B)"
        scale = 100.0 if key == "filled_share" else 1.0
        cells = ["–" if value is None else f"{scale * value:.{digits}f}" for value in values]
        lines.append(f"| {step} | {label} | " + " | ".join(cells) + f" | {text} | {goal_cell(values[0], goal)} |")
    return "\n".join(lines)


def _git(*arguments: str) -> str:
    done = subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def commit_text() -> str:
    """This checkout's commit, marked where MedDIFTLib/ has uncommitted changes."""
    dirty = " (MedDIFTLib/ with uncommitted changes)" if _git("status", "--porcelain", "--", "MedDIFTLib") else ""
    return _git("rev-parse", "--short", "HEAD") + dirty


# ------------------------------------------------------------------ steps, each in its own process


def _timed_start() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float]) -> dict[str, float]:
    return {"wall_s": time.perf_counter() - start[0], "cpu_s": time.process_time() - start[1]}


def _register_step(inputs: dict) -> dict:
    """Features and field of the pair (``fixed``, ``moving``, ``points``): moved points and seconds."""
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.field import register

    start = _timed_start()
    featurizer = create_featurizer("mind", device="cpu")
    fixed_features, moving_features = featurizer.extract(inputs["fixed"]), featurizer.extract(inputs["moving"])
    features_s = time.perf_counter() - start[0]
    field = register(fixed_features, moving_features, inputs["fixed"])
    moved = field.transform_points(inputs["points"])
    return {**_elapsed(start), "features_s": features_s, "moved": np.asarray(moved).tolist()}


def _tracks_around_lesions() -> bool:
    """Whether the engine's ``meddift track`` computes its field around each lesion, and so its MIND features
    only where it reads them (``LesionOptions.field_margin_mm``); an engine before that computes both whole."""
    from MedDIFTLib.core.options import LesionOptions

    return getattr(LesionOptions(), "field_margin_mm", 0.0) > 0


def _track_step(inputs: dict) -> dict:
    """Features and tracking of the lesion pair (``pair``, a LesionPair): seconds and errors against its truth."""
    from MedDIFTLib.core.io.volumes import Volume
    from MedDIFTLib.evaluation.synthetic_lesions import lesion_metrics, summarise
    from MedDIFTLib.features import create_featurizer
    from MedDIFTLib.lesions.inputs import lesions_from_labelmap
    from MedDIFTLib.lesions.track import track_lesions

    pair = inputs["pair"]
    lesions = lesions_from_labelmap(Volume(pair.baseline_labelmap.astype(np.float32), pair.baseline.geometry),
                                    pair.baseline)
    start = _timed_start()
    featurizer = create_featurizer("mind", device="cpu")
    extract = featurizer.extract_regions if _tracks_around_lesions() else featurizer.extract
    baseline_features, followup_features = extract(pair.baseline), extract(pair.followup)
    features_s = time.perf_counter() - start[0]
    result = track_lesions(pair.baseline, pair.followup, lesions, baseline_features, followup_features)
    seconds = _elapsed(start)
    rows = lesion_metrics(pair, result.followup_labelmap, np.array([lesion.centre_lps_mm for lesion in result.lesions]))
    summary = summarise(rows)
    return {**seconds, "features_s": features_s, "track_seconds": result.seconds, "lesions": summary["lesions"],
            "centre_error_mean_mm": summary["centre_error_mean_mm"],
            "centre_error_max_mm": max(row["centre_error_mm"] for row in rows),
            "dice_median": summary["dice_median"], "statuses": [lesion.status for lesion in result.lesions]}


def _worker_step(inputs: dict) -> dict:
    """The worker on the pair's files (``fixed_path``, ``moving_path``): first match, new-region points
    while features fill behind, and cached re-matches (see the module notes); matched points returned."""
    from MedDIFTLib.worker.client import WorkerClient

    points, repeats = np.asarray(inputs["points"], float), inputs["repeats"]
    with WorkerClient(env=_thread_environment(inputs["threads"], os.environ.get("PYTHONPATH", ""))) as client:
        fixed_id = client.call("load", path=inputs["fixed_path"])["volume_id"]
        moving_id = client.call("load", path=inputs["moving_path"])["volume_id"]
        request = {"fixed_id": fixed_id, "moving_id": moving_id, "backbone": "mind", "backbone_options": {},
                   "device": "cpu", "options": {}}

        def timed(chosen: np.ndarray) -> tuple[float, dict]:
            begin = time.perf_counter()
            result = client.call("match", points_lps_mm=chosen, **request)
            return time.perf_counter() - begin, result

        first_s, first = timed(points[:1])
        new = [timed(point[None]) for point in points[1:]]
        cache = client.call("probe")["cache"]
        filled_share = cache.get("filled_bytes", cache["used_bytes"]) / max(cache["used_bytes"], 1)
        fill_s = _wait_for_fill(client)
        single = [timed(point[None] + SHIFT_STEP_MM * n)[0] for n in range(1, repeats + 1) for point in points[1:]]
        batch = np.asarray(inputs["batch"], float)
        batched = [timed(batch + SHIFT_STEP_MM * n)[0] for n in range(1, repeats + 1)]
    assert not first["features_cached"]
    new_ms = [1000 * seconds for seconds, _ in new]
    return {"first_match_s": first_s, "new_point_ms": statistics.median(new_ms), "new_point_max_ms": max(new_ms),
            "filled_share": filled_share, "fill_behind_s": fill_s, "cached_1_ms": 1000 * statistics.median(single),
            f"cached_{BATCH_POINTS}_ms": 1000 * statistics.median(batched) / BATCH_POINTS,
            "new_points_moved": [result["points_lps_mm"][0] for _, result in new]}


CHILD_STEPS = {"register": _register_step, "track": _track_step, "worker": _worker_step}


def _child(step: str, input_file: Path, threads: int) -> dict:
    """Run ``step`` on the pickled inputs; add its peak memory and where MedDIFTLib came from."""
    _set_threads(threads)
    import MedDIFTLib

    with open(input_file, "rb") as handle:
        inputs = pickle.load(handle)
    result = CHILD_STEPS[step]({**inputs, "threads": threads})
    return {**result, "peak_gb": _peak_resident_gb(), "engine": str(Path(MedDIFTLib.__file__).parent.parent)}


def _thread_environment(threads: int, pythonpath: str) -> dict[str, str]:
    """This environment with ``threads`` for OpenMP/MKL and ``pythonpath`` first on the path."""
    count = str(threads)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}


def _run_step(step: str, input_file: Path, engine: Path, threads: int) -> dict:
    """``step`` in a fresh process whose MedDIFTLib is ``engine``'s; its result (JSON, last stdout line)."""
    command = [sys.executable, __file__, "--child", step, "--input", str(input_file), "--threads", str(threads)]
    done = subprocess.run(command, env=_thread_environment(threads, str(engine)), cwd=engine, capture_output=True,
                          text=True, encoding="utf-8", check=False)
    if done.returncode != 0:
        raise SystemExit(f"{step} on {engine} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["engine"]).resolve() != engine.resolve():
        raise SystemExit(f"{step}: MedDIFTLib came from {result['engine']}, not {engine}")
    return result


def _dump(path: Path, inputs: dict) -> Path:
    with open(path, "wb") as handle:
        pickle.dump(inputs, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _register_and_worker_runs(ct: Volume, args: argparse.Namespace, engines: dict[str, Path], figures: Figures,
                              scratch: Path, seconds: dict[str, float]) -> str:
    """The ``register`` and ``worker`` steps of ``args.steps`` on the warped CT, each engine in turn; the
    header's sentence about the pair."""
    import SimpleITK as sitk

    from MedDIFTLib.evaluation.simulate import make_synthetic_pair

    mark = time.perf_counter()
    pair = make_synthetic_pair(ct, seed=args.seed, motion=MOTION)
    seconds["pair"] = time.perf_counter() - mark
    points, truth = pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm
    if "register" in args.steps:
        inputs = _dump(scratch / "register.pkl", {"fixed": pair.fixed, "moving": pair.moving, "points": points})
        for name, engine in engines.items():
            result = _run_step("register", inputs, engine, args.threads)
            tre = tre_summary(np.asarray(result.pop("moved")), truth)
            figures[name]["register"] = {**result, "tre_mean_mm": tre["mean"], "tre_p95_mm": tre["p95"]}
            print(f"register ({name}): {json.dumps(figures[name]['register'])}", flush=True)
    if "worker" in args.steps:
        chosen = spread_points(points, args.new_points)
        files = {role: scratch / f"{role}.mha" for role in ("fixed", "moving")}
        for role, path in files.items():
            sitk.WriteImage(getattr(pair, role).to_sitk(), str(path), False)
        inputs = _dump(scratch / "worker.pkl", {
            "fixed_path": str(files["fixed"]), "moving_path": str(files["moving"]), "points": points[chosen],
            "batch": points[spread_points(points, BATCH_POINTS - 1)], "repeats": args.repeats})
        for name, engine in engines.items():
            result = _run_step("worker", inputs, engine, args.threads)
            moved = np.asarray(result.pop("new_points_moved"))
            error = tre_summary(moved, truth[chosen[1:]])["mean"]
            figures[name]["worker"] = {**result, "new_point_error_mean_mm": error}
            print(f"worker ({name}): {json.dumps(figures[name]['worker'])}", flush=True)
    motion = tre_summary(points, truth)
    shape = " x ".join(map(str, pair.moving.geometry.shape_ijk))
    return (f" The register/worker pair's {len(points)} lung keypoints move {motion['mean']:.2f} mm mean and "
            f"{motion['p95']:.2f} mm p95; its moving image is {shape} voxels.")


def _track_runs(ct: Volume, args: argparse.Namespace, engines: dict[str, Path], figures: Figures, scratch: Path,
                seconds: dict[str, float]) -> None:
    """The ``track`` step on the CT with synthetic nodules, warped by the same motion, each engine in turn."""
    from MedDIFTLib.evaluation.synthetic_lesions import make_lesion_pair

    mark = time.perf_counter()
    lesion_pair = make_lesion_pair(ct, count=args.nodules, seed=args.seed, motion=MOTION)
    seconds["lesion_pair"] = time.perf_counter() - mark
    inputs = _dump(scratch / "track.pkl", {"pair": lesion_pair})
    for name, engine in engines.items():
        figures[name]["track"] = _run_step("track", inputs, engine, args.threads)
        print(f"track ({name}): {json.dumps(figures[name]['track'])}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="steps to run (default all)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of each step (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic pairs")
    parser.add_argument("--nodules", type=int, default=6, help="synthetic nodules of the track pair")
    parser.add_argument("--new-points", type=int, default=5, help="new-region points after the first match")
    parser.add_argument("--repeats", type=int, default=5, help="cached re-matches of each kind")
    parser.add_argument("--baseline", type=Path, help="another MedDIFT checkout, run beside this one (A/B)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default: the README's)")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.input, args.threads)))
        return 0
    if not image_path("popi").exists():
        print(f"popi: {image_path('popi')} not found: nothing to run", file=sys.stderr)
        return 0
    engines = {"this checkout": REPO} | ({f"baseline {args.baseline.name}": args.baseline.resolve()}
                                         if args.baseline else {})
    figures: Figures = {name: {} for name in engines}
    seconds: dict[str, float] = {}
    commit, load_start = commit_text(), os.getloadavg()[0]
    began = time.perf_counter()
    ct = load_case("popi")
    pair_text = ""
    with tempfile.TemporaryDirectory(prefix="meddift-full-") as folder:
        if {"register", "worker"} & set(args.steps):
            pair_text = _register_and_worker_runs(ct, args, engines, figures, Path(folder), seconds)
        if "track" in args.steps:
            _track_runs(ct, args, engines, figures, Path(folder), seconds)
    seconds["total"] = time.perf_counter() - began
    load_end = os.getloadavg()[0]
    header = (f"POPI 4DCT phase (real CT) at its own 512 x 512 x 141 grid (0.98 x 0.98 x 2 mm, not resampled), "
              f"warped by the DIR-Lab case 1 motion: **synthetic pairs** (seed {args.seed}; track: "
              f"{args.nodules} synthetic nodules inserted in the same CT, same motion).{pair_text} MIND features, CPU, "
              f"{args.threads} threads, each step in its own process; commit {commit}; machine load "
              f"average {load_start:.1f} at the start and {load_end:.1f} at the end (2 cores, shared).")
    text = f"{header}\n\n{markdown(figures)}"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"markdown": text, "commit": commit, "figures": figures,
                                        "seconds": seconds, "load_average": [load_start, load_end]}, indent=1),
                            encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
