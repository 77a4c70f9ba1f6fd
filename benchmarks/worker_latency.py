"""Worker latency: first ``match`` of a new pair (features included) and cached re-matches.

Drives the real worker subprocess through :class:`MedDIFTLib.worker.client.WorkerClient`, as the
Slicer module does. Pair: the POPI 4DCT phase (512x512x141, ~0.98x0.98x2 mm) and a copy shifted
by a smooth known displacement (a few mm), written to a temporary folder; backbone ``mind``,
default match options (backward check on) and the given search radius. After the first match the
benchmark waits while the idle worker fills the rest of the features ("filled behind s"; "no" for
an engine that does not), then times re-matches of points dragged a little on every repeat.

    python benchmarks/worker_latency.py [--points 1 10] [--repeats 5] [--threads 2] [--baseline PATH]
    python benchmarks/worker_latency.py --points 300 --results /tmp/pulmonary_300.json \
        --volume ../shared/data/chestct_single_real/totalseg_pulmonary_crop/image.nii.gz

``--baseline`` is another checkout of MedDIFT (e.g. ``git worktree add /tmp/old <commit>``); each
engine runs in its own process with the same inputs and thread count, and the table gives the
ratios. Figures go to ``benchmarks/results/worker_latency.json`` (the README's table) unless
``--results`` names another file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from real_cts import image_path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "worker_latency.json"
POPI = image_path("popi")
SHIFT_STEP_MM = np.array([1.0, -1.0, 2.0])  # each repeat moves the points, as when a landmark is dragged


def write_shifted_copy(source: Path, target: Path) -> None:
    """Resample ``source`` with a smooth displacement (up to ~4 mm along k) and write it uncompressed."""
    import SimpleITK as sitk
    from scipy import ndimage

    from MedDIFTLib.core.io import read_volume

    volume = read_volume(source)
    shape = volume.voxels.shape
    k = np.arange(shape[0], dtype=np.float32)[:, None, None] / max(shape[0] - 1, 1)
    shift_k = np.broadcast_to(1.0 + 1.0 * np.sin(np.pi * k), shape)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = [grid[0] - shift_k, grid[1] - 2.0, grid[2] - 1.5]
    warped = ndimage.map_coordinates(volume.voxels, coords, order=1, mode="nearest").astype(np.float32)
    image = sitk.GetImageFromArray(warped)
    image.CopyInformation(volume.to_sitk())
    sitk.WriteImage(image, str(target), False)


def sample_points(geometry, count: int, seed: int = 0) -> np.ndarray:
    """``count`` LPS points spread over the central half of the grid."""
    rng = np.random.default_rng(seed)
    shape = np.asarray(geometry.shape_ijk, float)
    ijk = shape * 0.25 + rng.random((count, 3)) * shape * 0.5
    return geometry.ijk_to_lps(ijk)


def _child(volume: Path, moving: Path, counts: list[int], repeats: int, radius_mm: float, device: str) -> dict:
    """One engine (the MedDIFTLib on ``sys.path``): first match, then cached re-matches per point count."""
    from MedDIFTLib.core.io import read_volume
    from MedDIFTLib.worker.client import WorkerClient

    geometry = read_volume(volume).geometry
    with WorkerClient() as client:
        fixed_id = client.call("load", path=str(volume))["volume_id"]
        moving_id = client.call("load", path=str(moving))["volume_id"]
        request = {"fixed_id": fixed_id, "moving_id": moving_id, "backbone": "mind", "backbone_options": {},
                   "device": device, "options": {"search_radius_mm": radius_mm}}

        def timed(points: np.ndarray) -> tuple[float, dict]:
            begin = time.perf_counter()
            result = client.call("match", points_lps_mm=points, **request)
            return time.perf_counter() - begin, result

        first_s, first = timed(sample_points(geometry, 1))
        fill_s = _wait_for_fill(client)
        cached = {}
        for count in counts:
            points = sample_points(geometry, count, seed=count)
            runs = [timed(points + SHIFT_STEP_MM * n) for n in range(repeats)]
            assert all(result["features_cached"] for _, result in runs)
            cached[count] = {
                "round_trip_ms": statistics.median(wall for wall, _ in runs) * 1000,
                "match_points_ms": statistics.median(result["match_seconds"] for _, result in runs) * 1000,
            }
        cache = client.call("probe")["cache"]
    assert not first["features_cached"]
    computed = cache.get("filled_bytes", cache["used_bytes"])  # engines before on-demand features computed all
    return {"first_match_s": first_s, "fill_behind_s": fill_s, "cached": cached,
            "cache_gib": cache["used_bytes"] / 2**30, "computed_gib": computed / 2**30}


def _wait_for_fill(client, stall_s: float = 5.0) -> float | None:
    """Seconds until the idle worker has filled the features that the first match computed only in
    part (None: it does not fill them, as engines before background filling)."""
    begin = last_change = time.perf_counter()
    last = None
    while True:
        cache = client.call("probe")["cache"]
        filled = cache.get("filled_bytes", cache["used_bytes"])
        if filled >= cache["used_bytes"]:
            return time.perf_counter() - begin
        now = time.perf_counter()
        if filled != last:
            last, last_change = filled, now
        elif now - last_change > stall_s:
            return None
        time.sleep(0.1)


def _run_engine(repo: Path, args: argparse.Namespace, moving: Path) -> dict:
    threads = str(args.threads)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, __file__, "--child", str(moving), "--volume", str(args.volume), "--repeats",
               str(args.repeats), "--radius-mm", str(args.radius_mm), "--device", args.device,
               "--points", *map(str, args.points)]
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"engine at {repo} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _markdown(engines: dict[str, dict], counts: list[int]) -> str:
    header = ["engine", "first match s", "filled behind s", *[f"cached {n} pt ms/pt" for n in counts],
              "feature cache GiB", "features computed GiB"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, figures in engines.items():
        per_point = [figures["cached"][str(n)]["round_trip_ms"] / n for n in counts]
        fill = figures.get("fill_behind_s")
        cells = [name, f"{figures['first_match_s']:.1f}", "no" if fill is None else f"{fill:.0f}",
                 *[f"{v:.1f}" for v in per_point],
                 f"{figures['cache_gib']:.2f}", f"{figures['computed_gib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(engines) == 2:
        (_, new), (_, old) = engines.items()
        ratios = [old["cached"][str(n)]["round_trip_ms"] / new["cached"][str(n)]["round_trip_ms"] for n in counts]
        cells = ["speed-up (baseline / this)", f"{old['first_match_s'] / new['first_match_s']:.2f}x", "",
                 *[f"{r:.2f}x" for r in ratios], f"{old['cache_gib'] / new['cache_gib']:.2f}x",
                 f"{old['computed_gib'] / new['computed_gib']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=Path, default=POPI)
    parser.add_argument("--points", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--radius-mm", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each engine's worker")
    parser.add_argument("--baseline", type=Path, help="another MedDIFT checkout to compare against")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default: the README's)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = _child(args.volume, args.child, args.points, args.repeats, args.radius_mm, args.device)
        print(json.dumps(figures))
        return 0
    if not args.volume.exists():
        print(f"volume not found: {args.volume}", file=sys.stderr)
        return 1
    args.volume = args.volume.resolve()  # each engine runs in its own checkout
    sys.path.insert(0, str(REPO))
    engines = {"this checkout": REPO} | ({f"baseline {args.baseline.name}": args.baseline} if args.baseline else {})
    with tempfile.TemporaryDirectory(prefix="meddift-bench-") as folder:
        moving = Path(folder) / "moving.mha"
        write_shifted_copy(args.volume, moving)
        figures = {name: _run_engine(repo.resolve(), args, moving) for name, repo in engines.items()}
    table = _markdown(figures, args.points)
    header = (f"{args.volume.parent.name}/{args.volume.name}, backbone mind, default match options with backward "
              f"check, search radius {args.radius_mm:g} mm, {args.threads} threads, median of {args.repeats} "
              "re-matches (round trip)")
    markdown = f"{header}\n\n{table}"
    print(markdown)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"markdown": markdown, "figures": figures}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
