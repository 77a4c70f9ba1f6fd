"""Peak memory and time of MedDIFT's matcher against the naive full-resolution matcher.

The naive matcher is the reference implementation's: every level of both volumes is upsampled
to the image grid (all channels), normalised, and the cosine is taken there. Both run on the
same MAISI-shaped feature pyramids (512/256/128/64 channels at 1/16, 1/8, 1/4, 1/4 of the
grid; random values, as memory and time do not depend on them) and the same points. Each run
is a fresh process, so its peak RSS is its own; the figure reported is the peak above the
RSS once the pyramids are built.

    python benchmarks/matching_memory.py                 # measured size 64x64x80, 10 points
    python benchmarks/matching_memory.py --shape 96 96 112

Then MedDIFT runs at 192x192x208 (the paper's size), where the naive figure is extrapolated
from its measured bytes per channel-voxel. Printed: a table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

LEVELS = ((16, 512), (8, 256), (4, 128), (4, 64))
PAPER_SHAPE = (192, 192, 208)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pyramids(shape_ijk, seed: int, num_points: int):
    import torch

    from MedDIFTLib.core.geometry import Geometry
    from MedDIFTLib.features import FeatureLevel, FeaturePyramid

    image = Geometry.create(shape_ijk, (1.5, 1.5, 1.5), (-100.0, -120.0, 40.0))
    generator = torch.Generator().manual_seed(seed)
    pyramids = []
    for _ in range(2):
        levels = []
        for scale, channels in LEVELS:
            geometry = image.downsampled(scale)
            features = torch.rand((channels, *geometry.shape_kji), generator=generator) - 0.5
            levels.append(FeatureLevel(f"{channels}@1/{scale}", features, geometry))
        pyramids.append(FeaturePyramid(levels, image, "random"))
    rng = np.random.default_rng(seed)
    ijk = np.floor(rng.uniform(0.2, 0.8, (num_points, 3)) * np.asarray(shape_ijk))
    return pyramids[0], pyramids[1], ijk


def _child(method: str, shape_ijk, seed: int, num_points: int, radius_mm: float) -> dict:
    import torch

    from MedDIFTLib.core.options import MatchOptions
    from MedDIFTLib.evaluation.metrics import naive_full_resolution_similarity
    from MedDIFTLib.matching import match_points

    torch.set_grad_enabled(False)
    fixed, moving, ijk = _pyramids(shape_ijk, seed, num_points)
    points = fixed.image_geometry.ijk_to_lps(ijk)
    baseline = _rss_bytes()
    started = time.perf_counter()
    if method == "naive":
        geometry = moving.image_geometry
        k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape_kji], indexing="ij")
        voxels_lps = geometry.ijk_to_lps(np.stack([i, j, k], -1).reshape(-1, 3))
        positions, similarities = [], []
        for point, voxel in zip(points, ijk):
            similarity = naive_full_resolution_similarity(fixed, moving, voxel).numpy().ravel()
            window = np.linalg.norm(voxels_lps - point, axis=1) <= radius_mm
            best = int(np.argmax(np.where(window, similarity, -np.inf)))
            positions.append(voxels_lps[best])
            similarities.append(float(similarity[best]))
    else:
        options = MatchOptions(search_radius_mm=radius_mm, exact=method == "exact", subvoxel=False,
                               backward_check=False, coarse_to_fine=False)
        result = match_points(fixed, moving, points, options=options)
        positions, similarities = result.points_lps_mm, result.similarity
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "shape": list(shape_ijk),
        "seconds": seconds,
        "peak_extra_bytes": max(peak - baseline, 0),
        "positions": np.asarray(positions).tolist(),
        "similarity": np.asarray(similarities).tolist(),
    }


def _run(method: str, shape_ijk, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        subprocess.run([sys.executable, __file__, "--child", method, "--shape", *map(str, shape_ijk), "--seed",
                        str(args.seed), "--points", str(args.points), "--radius-mm", str(args.radius_mm),
                        "--json", handle.name], check=True)
        return json.loads(open(handle.name).read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 80), help="measured image grid (ijk)")
    parser.add_argument("--radius-mm", type=float, default=15.0, help="search window radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=10, help="number of points matched")
    parser.add_argument("--child", choices=("naive", "native", "exact"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with open(args.json, "w") as handle:
            json.dump(_child(args.child, tuple(args.shape), args.seed, args.points, args.radius_mm), handle)
        return

    shape = tuple(args.shape)
    runs = {method: _run(method, shape, args) for method in ("naive", "exact", "native")}
    paper = {method: _run(method, PAPER_SHAPE, args) for method in ("exact", "native")}
    channels = sum(c for _, c in LEVELS)
    naive_per_channel_voxel = runs["naive"]["peak_extra_bytes"] / (channels * np.prod(shape))
    naive_paper_bytes = naive_per_channel_voxel * channels * np.prod(PAPER_SHAPE)
    naive_paper_seconds = runs["naive"]["seconds"] * np.prod(PAPER_SHAPE) / np.prod(shape)

    def same(a, b):
        position = np.abs(np.asarray(a["positions"]) - np.asarray(b["positions"])).max()
        similarity = np.abs(np.asarray(a["similarity"]) - np.asarray(b["similarity"])).max()
        return position, similarity

    print(f"Matching {args.points} points, window radius {args.radius_mm} mm, {channels} channels "
          f"({'/'.join(str(c) for _, c in LEVELS)} at 1/{'/1/'.join(str(s) for s, _ in LEVELS)})")
    print()
    print("| grid | method | peak memory above features (MB) | time (s) | vs naive: memory | vs naive: time |")
    print("|---|---|---|---|---|---|")
    naive = runs["naive"]
    for method in ("naive", "exact", "native"):
        run = runs[method]
        grid = "x".join(map(str, shape))
        print(f"| {grid} | {method} | {run['peak_extra_bytes'] / 2**20:.0f} | {run['seconds']:.2f} | "
              f"1/{naive['peak_extra_bytes'] / max(run['peak_extra_bytes'], 1):.0f} | "
              f"{naive['seconds'] / run['seconds']:.1f}x faster |")
    print(f"| {'x'.join(map(str, PAPER_SHAPE))} | naive (extrapolated) | {naive_paper_bytes / 2**20:.0f} | "
          f"{naive_paper_seconds:.1f} | | |")
    for method in ("exact", "native"):
        run = paper[method]
        print(f"| {'x'.join(map(str, PAPER_SHAPE))} | {method} | {run['peak_extra_bytes'] / 2**20:.0f} | "
              f"{run['seconds']:.2f} | 1/{naive_paper_bytes / max(run['peak_extra_bytes'], 1):.0f} | "
              f"{naive_paper_seconds / run['seconds']:.1f}x faster |")
    print()
    position, similarity = same(runs["exact"], naive)
    print(f"exact vs naive: max position difference {position:.3g} mm, max similarity difference {similarity:.2g}")
    position, similarity = same(runs["native"], naive)
    print(f"native vs naive: max position difference {position:.3g} mm, max similarity difference {similarity:.2g} "
          "(native interpolates the similarity, not the features)")


if __name__ == "__main__":
    main()
