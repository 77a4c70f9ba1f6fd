"""Load on ``meddift serve`` over loopback: CLIENTS concurrent sessions, each doing REPEATS cached
re-matches (points moved each time, as when landmarks are dragged), against the local worker
doing the same re-matches one after another in the same run.

The server runs in this process (uvicorn in a thread, 127.0.0.1, an ephemeral port, a token);
the local worker is a subprocess (:class:`MedDIFTLib.worker.client.WorkerClient`). Every remote
answer is compared with the local worker's answer for the same points; a lost request or a
different answer is counted and fails the run. Bounded: ``--timeout-s`` for the whole load.

    python benchmarks/serve_load.py [--clients 4] [--repeats 20] [--points 10] [--volume PATH]

Writes benchmarks/results/serve_load.json (keys ``markdown`` and ``figures``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from real_cts import image_path  # noqa: E402

from MedDIFTLib.core.io import Volume, read_volume, write_volume  # noqa: E402
from MedDIFTLib.core.options import ServeOptions  # noqa: E402
from MedDIFTLib.worker.client import WorkerClient  # noqa: E402
from MedDIFTLib.worker.remote.app import ServeConfig, create_app  # noqa: E402
from MedDIFTLib.worker.remote_client import RemoteWorkerClient  # noqa: E402

VOLUME = image_path("elastix")
TOKEN = "serve-load-benchmark-token-0123456789"
STEP_MM = np.array([0.7, -0.4, 0.9])
REQUEST = {"backbone": "mind", "device": "cpu", "options": {"search_radius_mm": 8}}


def points_of(geometry, count: int, client: int, repeat: int) -> np.ndarray:
    """``count`` LPS points in the central half of the grid, moved by ``repeat`` steps."""
    rng = np.random.default_rng(client)
    shape = np.asarray(geometry.shape_ijk, float)
    base = geometry.ijk_to_lps(shape * 0.25 + rng.random((count, 3)) * shape * 0.5)
    return base + repeat * STEP_MM / 10.0


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 99)} | {"max_ms": float(values.max())}


def start_server(folder: Path) -> tuple[uvicorn.Server, threading.Thread, str]:
    config = ServeConfig(cache_dir=folder, options=ServeOptions(max_sessions=16, cache_mb=512.0), token=TOKEN)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def same(remote: dict, local: dict) -> bool:
    close = all(np.allclose(np.asarray(remote[key], float), np.asarray(local[key], float), atol=1e-6, equal_nan=True)
                for key in ("points_lps_mm", "confidence", "forward_backward_mm"))
    return close and remote["reliable"] == local["reliable"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default=str(VOLUME))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args()

    fixed = read_volume(args.volume)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        folder = Path(tmp)
        moving = Volume(ndimage.shift(fixed.voxels, (1, -1, 2), order=0, mode="nearest"), fixed.geometry, "moving")
        write_volume(moving, folder / "moving.nii.gz")
        paths = {"fixed": args.volume, "moving": str(folder / "moving.nii.gz")}
        (folder / "cache").mkdir()
        server, thread, url = start_server(folder / "cache")
        local = WorkerClient()
        local.start(timeout=120)
        try:
            figures = run(args, fixed.geometry, paths, url, local)
        finally:
            local.stop()
            server.should_exit = True
            thread.join(60)
    table = [
        "| worker | requests | answered right | throughput (req/s) | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("remote", "local"):
        row = figures[name]
        table.append(f"| {row['label']} | {row['requests']} | {row['right']} | {row['throughput_per_s']:.1f} | "
                     f"{row['p50_ms']:.0f} | {row['p90_ms']:.0f} | {row['p99_ms']:.0f} | {row['max_ms']:.0f} |")
    markdown = "\n".join(table)
    print(markdown)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"markdown": markdown, "figures": figures}, indent=2), encoding="utf-8")
    print(f"Wrote {args.out}")
    ok = figures["remote"]["right"] == figures["remote"]["requests"] == args.clients * args.repeats
    return 0 if ok else 1


def run(args, geometry, paths: dict, url: str, local: WorkerClient) -> dict:
    clients = [RemoteWorkerClient(url, token=TOKEN, timeout_s=120) for _ in range(args.clients)]
    sessions = []
    for client in clients:
        client.start()
        ids = {"fixed_id": client.call("load", path=paths["fixed"])["volume_id"],
               "moving_id": client.call("load", path=paths["moving"])["volume_id"]}
        client.call("match", points_lps_mm=points_of(geometry, args.points, 0, 0), **ids, **REQUEST)  # features
        sessions.append(ids)
    answers: dict[tuple[int, int], dict] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + args.timeout_s

    def load(index: int) -> None:
        for repeat in range(1, args.repeats + 1):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            answer = clients[index].call("match", timeout=120, points_lps_mm=points_of(geometry, args.points, index,
                                         repeat), **sessions[index], **REQUEST)
            latencies.append(time.perf_counter() - started)
            answers[(index, repeat)] = answer

    started = time.perf_counter()
    threads = [threading.Thread(target=load, args=(index,)) for index in range(args.clients)]
    for worker in threads:
        worker.start()
    for worker in threads:
        worker.join(args.timeout_s)
    remote_wall = time.perf_counter() - started
    for client in clients:
        client.stop()

    ids = {"fixed_id": local.call("load", path=paths["fixed"])["volume_id"],
           "moving_id": local.call("load", path=paths["moving"])["volume_id"]}
    local.call("match", points_lps_mm=points_of(geometry, args.points, 0, 0), **ids, **REQUEST)
    local_latencies, right = [], 0
    started = time.perf_counter()
    for index in range(args.clients):
        for repeat in range(1, args.repeats + 1):
            begun = time.perf_counter()
            expected = local.call("match", timeout=120, points_lps_mm=points_of(geometry, args.points, index, repeat),
                                  **ids, **REQUEST)
            local_latencies.append(time.perf_counter() - begun)
            right += (index, repeat) in answers and same(answers[(index, repeat)], expected)
    local_wall = time.perf_counter() - started
    requests = args.clients * args.repeats
    return {
        "setup": {"clients": args.clients, "repeats": args.repeats, "points": args.points,
                  "volume_shape_ijk": list(geometry.shape_ijk), "backbone": "mind", "device": "cpu"},
        "remote": {"label": f"meddift serve, {args.clients} concurrent sessions", "requests": requests,
                   "answered": len(answers), "right": right, "wall_s": remote_wall,
                   "throughput_per_s": len(answers) / remote_wall, **percentiles(latencies or [float("nan")])},
        "local": {"label": "local worker, one after another", "requests": requests, "answered": requests,
                  "right": requests, "wall_s": local_wall, "throughput_per_s": requests / local_wall,
                  "mean_ms": 1000 * statistics.mean(local_latencies), **percentiles(local_latencies)},
    }


if __name__ == "__main__":
    raise SystemExit(main())
