"""Render the README's visual-QA pictures from a synthetic pair (never from real scans).

A phantom chest CT (``evaluation.simulate.phantom_ct``) is warped with a known breathing-like motion
(``make_synthetic_pair``); the worker's own handlers register the pair with the weight-free backbone
and write the QA overlays (``overlays`` request), and one axial slice of each overlay is drawn over
the fixed image with the colour tables the Slicer module uses (``MedDIFTLib.slicer.overlays``).

    python scripts/qa_pictures.py             # writes docs/qa_overlays.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDIFTLib.core.io import atomic_output, read_volume  # noqa: E402
from MedDIFTLib.evaluation.simulate import make_synthetic_pair, phantom_ct  # noqa: E402
from MedDIFTLib.slicer import overlays  # noqa: E402
from MedDIFTLib.worker import handlers  # noqa: E402
from MedDIFTLib.worker.protocol.requests import Limits, parse_request  # noqa: E402
from MedDIFTLib.worker.state import WorkerState  # noqa: E402

HU_WINDOW = (-1000.0, 400.0)


def compute_overlays(folder: Path) -> dict[str, Path]:
    """Register a synthetic pair and write its overlays into ``folder``; returns the fixed image and overlay paths."""
    pair = make_synthetic_pair(phantom_ct(seed=1), seed=1)
    state = WorkerState(0, Limits(), log=lambda level, message: None)
    ids = {"fixed_id": state.add(pair.fixed), "moving_id": state.add(pair.moving), "backbone": "mind", "device": "cpu"}
    quiet = lambda *args: None  # noqa: E731
    transform = folder / "field.nrrd"
    handlers.HANDLERS["register"](state, parse_request("register", {**ids, "out_transform": str(transform)}), quiet)
    paths = {name: folder / f"{name}.nrrd" for name in overlays.KINDS}
    request = parse_request("overlays", {**ids, "transform": str(transform),
                                         **{f"out_{name}": str(path) for name, path in paths.items()}})
    handlers.HANDLERS["overlays"](state, request, quiet)
    fixed_path = folder / "fixed.nrrd"
    from MedDIFTLib.core.io import write_volume

    write_volume(pair.fixed, fixed_path)
    return {"fixed": fixed_path, **paths}


def render(paths: dict[str, Path], out: Path) -> None:
    """One axial slice through the middle: the fixed image, then each overlay over it with its legend."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fixed = read_volume(paths["fixed"])
    k = fixed.geometry.shape_ijk[2] // 2
    spacing = fixed.geometry.spacing_mm
    extent = (0.0, fixed.geometry.shape_ijk[0] * spacing[0], fixed.geometry.shape_ijk[1] * spacing[1], 0.0)
    figure = Figure(figsize=(11.0, 3.2), dpi=90, layout="constrained")
    axes = figure.subplots(1, 4)
    axes[0].imshow(fixed.voxels[k], cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], extent=extent)
    axes[0].set_title("fixed (synthetic CT)", fontsize=9)
    for panel, kind in zip(axes[1:], overlays.KINDS.values()):
        values = read_volume(paths[kind.name]).voxels[k]
        high = kind.high if kind.high is not None else max(float(values.max()), 1e-3)
        panel.imshow(fixed.voxels[k], cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], extent=extent)
        shown = panel.imshow(values, cmap=ListedColormap(overlays.color_rows(kind)), vmin=kind.low, vmax=high,
                             alpha=overlays.OVERLAY_OPACITY + 0.2, extent=extent)
        figure.colorbar(shown, ax=panel, shrink=0.8)
        panel.set_title(kind.title, fontsize=9)
    for panel in axes:
        panel.set_xticks([])
        panel.set_yticks([])
    with atomic_output(out) as tmp:
        figure.savefig(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "qa_overlays.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meddift-qa-") as folder:
        render(compute_overlays(Path(folder)), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
