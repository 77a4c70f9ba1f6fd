"""Worker latency: first ``match`` (feature extraction included) vs re-match on cached features.

Drives the real worker subprocess through :class:`MedDIFTLib.worker.client.WorkerClient`, as the
Slicer module does. Pair: the POPI 4DCT phase (512x512x141, ~0.98x0.98x2 mm) and a copy shifted
by a smooth known displacement (a few mm), written to a temporary folder; backbone ``mind``.

    python benchmarks/worker_latency.py [--volume PATH] [--points 10] [--repeats 5] [--device cpu]

Prints the client-side round trip, the worker-side ``seconds`` and the time inside
:func:`MedDIFTLib.matching.match_points` of each cached re-match, for the default match options and
for cheaper ones (no descriptor patch, no backward check).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from MedDIFTLib.core.io import read_volume  # noqa: E402
from MedDIFTLib.worker.client import WorkerClient  # noqa: E402

SHIFT_STEP_MM = np.array([1.0, -1.0, 2.0])  # each repeat moves the points, as when a landmark is dragged
CACHED_RUNS = (
    ("default options", {}),
    ("patch_radius 0", {"patch_radius": 0}),
    ("patch_radius 0, no backward check", {"patch_radius": 0, "backward_check": False}),
)
POPI = REPO.parent / "shared" / "data" / "chestct_single_real" / "popi_4dct_phase00" / "image.nii.gz"


def write_shifted_copy(source: Path, target: Path) -> None:
    """Resample ``source`` with a smooth displacement (up to ~4 mm along k) and write it uncompressed."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=Path, default=POPI)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--radius-mm", type=float, default=15.0)
    args = parser.parse_args()
    if not args.volume.exists():
        print(f"volume not found: {args.volume}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="meddift-bench-") as folder:
        moving_path = Path(folder) / "moving.mha"
        started = time.perf_counter()
        write_shifted_copy(args.volume, moving_path)
        print(f"built moving volume in {time.perf_counter() - started:.1f} s")

        with WorkerClient() as client:
            fixed = client.call("load", path=str(args.volume))
            moving = client.call("load", path=str(moving_path))
            print(f"volume {fixed['geometry']['shape_ijk']} voxels, spacing {fixed['geometry']['spacing_mm']} mm")
            geometry = read_volume(args.volume).geometry
            request = {
                "fixed_id": fixed["volume_id"],
                "moving_id": moving["volume_id"],
                "backbone": "mind",
                "backbone_options": {},
                "device": args.device,
                "options": {"search_radius_mm": args.radius_mm},
            }

            def timed_match(points: np.ndarray, **options) -> tuple[float, dict]:
                begin = time.perf_counter()
                merged = {**request, "options": {**request["options"], **options}}
                result = client.call("match", points_lps_mm=points, **merged)
                return time.perf_counter() - begin, result

            points = sample_points(geometry, args.points)
            first_wall, first = timed_match(points)
            runs = {}
            for title, options in CACHED_RUNS:
                runs[title] = [timed_match(points + SHIFT_STEP_MM * n, **options) for n in range(args.repeats)]
            cache = client.call("probe")["cache"]

    assert not first["features_cached"] and all(r["features_cached"] for rs in runs.values() for _, r in rs)
    print(f"device {args.device}, {args.points} points, search radius {args.radius_mm:g} mm, backbone mind")
    print(f"first match (features of both volumes + match): {first_wall * 1000:8.0f} ms round trip")
    for title, results in runs.items():
        walls = [wall for wall, _ in results]
        worker_side = [result["seconds"] for _, result in results]
        matcher = [result["match_seconds"] for _, result in results]
        print(
            f"cached re-match, {title:34s}: median {statistics.median(walls) * 1000:7.1f} ms round trip "
            f"(min {min(walls) * 1000:.1f}); in worker {statistics.median(worker_side) * 1000:.1f} ms, "
            f"of which match_points {statistics.median(matcher) * 1000:.1f} ms"
        )
    print(f"feature cache: {len(cache['entries'])} entries, {cache['used_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
