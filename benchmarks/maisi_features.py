"""Time and peak memory of MAISI feature extraction (full-size v1 networks, random weights).

Cases: a synthetic 192x192x208 CT-like volume at 1.75 mm (the Learn2Reg lung CT size) and the POPI
thorax (512x512x141, ../shared/data) at its own spacing and at coarser model spacings. Each case
runs in a fresh subprocess so its peak memory is its own: host peak (VmHWM) above the resident
size before extraction on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. A case whose estimated
peak exceeds the available memory is reported as refused (the backbone's own check).

    python benchmarks/maisi_features.py --precisions fp32 bf16 --device cpu
    python benchmarks/maisi_features.py --cases 64 --precisions fp32      # quick look

Weights: random full-size checkpoints in the official layouts are written to ``--weights-dir``
(default: a temporary folder) unless the files are already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from real_cts import image_path

POPI = image_path("popi")


def write_random_weights(folder: Path, config_name: str = "ddpm-ct", seed: int = 0) -> None:
    """Full-size networks of ``config_name`` with random weights, saved in the official layouts."""
    import torch

    from MedDIFTLib.features import maisi

    config = maisi.load_config(config_name)
    autoencoder_path = folder / config["autoencoder_file"]
    unet_path = folder / config["unet_file"]
    if autoencoder_path.exists() and unet_path.exists():
        return
    torch.manual_seed(seed)
    autoencoder, unet = maisi.build_networks(config)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():  # MONAI zero-initialises some output convolutions
                parameter.normal_(0.0, 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(autoencoder.state_dict(), autoencoder_path)
    checkpoint = {"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0), "num_train_timesteps": 1000}
    torch.save(checkpoint, unet_path)


def _case_volume(case: str):
    from MedDIFTLib.core.geometry import Geometry
    from MedDIFTLib.core.io import Volume, read_volume

    if case == "popi":
        return read_volume(POPI)
    size = [int(n) for n in case.split("x")] if "x" in case else [int(case)] * 3
    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    body = (i**2 + j**2 < 0.8).astype(np.float32)
    voxels = -1000.0 + body * (1000.0 + 40.0 * np.sin(8 * k)) + rng.normal(0, 20, size[::-1])
    return Volume(voxels.astype(np.float32), Geometry.create(size, (1.75, 1.75, 1.75)))


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_one(case: str, precision: str, device: str, spacing: float | None, weights_dir: Path) -> dict:
    """Extract features once and report time and memory (runs inside the subprocess)."""
    import torch

    from MedDIFTLib.core.errors import OutOfMemoryError
    from MedDIFTLib.features.maisi import MaisiFeaturizer

    volume = _case_volume(case)
    featurizer = MaisiFeaturizer(weights_dir=weights_dir, device=device, precision=precision, spacing_mm=spacing)
    grid = featurizer.model_grid(volume.geometry)
    record = {
        "case": case,
        "image": "x".join(map(str, volume.geometry.shape_ijk)),
        "model_grid": "x".join(map(str, grid.shape_ijk)),
        "model_spacing_mm": [round(s, 3) for s in grid.spacing_mm],
        "precision": precision,
        "device": device,
        "threads": torch.get_num_threads(),
        "estimated_peak_gib": round(featurizer.estimated_peak_bytes(grid) / 2**30, 2),
    }
    baseline_kib = _memory_kib("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        pyramid = featurizer.extract(volume)
    except OutOfMemoryError as error:
        record["refused"] = str(error)
        return record
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["host_peak_above_start_gib"] = round((_memory_kib("VmHWM") - baseline_kib) / 2**20, 2)
    record["host_peak_total_gib"] = round(_memory_kib("VmHWM") / 2**20, 2)
    record["bytes_per_model_voxel"] = round((_memory_kib("VmHWM") - baseline_kib) * 1024 / grid.num_voxels)
    if device.startswith("cuda"):
        record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    record["features_mib"] = round(pyramid.nbytes / 2**20, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["192x192x208", "popi"], help="NxNxN, N or popi")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--popi-spacings", nargs="+", default=["native", "2.5"], help="model spacings (mm) for popi")
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    parser.add_argument(
        "--run-one", nargs=5, metavar=("CASE", "PRECISION", "DEVICE", "SPACING", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.run_one:
        case, precision, device, spacing, folder = args.run_one
        record = run_one(case, precision, device, None if spacing == "native" else float(spacing), Path(folder))
        print(json.dumps(record))
        return 0

    with tempfile.TemporaryDirectory(prefix="meddift-bench-") as scratch:
        weights_dir = args.weights_dir or Path(scratch)
        write_random_weights(weights_dir)
        records = []
        for case in args.cases:
            if case == "popi" and not POPI.exists():
                print(f"skipping popi: {POPI} not found", file=sys.stderr)
                continue
            spacings = args.popi_spacings if case == "popi" else ["native"]
            for spacing in spacings:
                for precision in args.precisions:
                    command = [
                        sys.executable,
                        __file__,
                        "--run-one",
                        case,
                        precision,
                        args.device,
                        spacing,
                        str(weights_dir),
                    ]
                    finished = subprocess.run(command, capture_output=True, text=True)
                    if finished.returncode != 0:
                        tail = finished.stderr.strip().splitlines()[-1:] or ["no output"]
                        record = {"case": case, "precision": precision, "spacing": spacing, "failed": tail[0]}
                    else:
                        record = json.loads(finished.stdout.strip().splitlines()[-1])
                    records.append(record)
                    print(json.dumps(record), flush=True)
        if args.json:
            args.json.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
