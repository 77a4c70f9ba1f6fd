"""The README's results section, made by one command from ../shared/data.

1. ``meddift simulate --manifest``: a realistic synthetic pair (known breathing-like motion, lung density
   change, noise, a 1.1x coarser moving grid) from each real CT in ``chestct_single_real`` (the 51
   anatomical landmarks of the elastix crop; automatic keypoints in the lungs of the others).
2. ``meddift eval`` on that manifest with identity, MedDIFT (weight-free MIND backbone), SimpleITK
   B-spline and ConvexAdam: ``OUT/synthetic/results.md`` (the table), ``results.csv``, ``results.json``
   and ``plots/``.
3. The DIR-Lab landmark reader against the published initial errors: the real DIR-Lab landmark files
   (cases 1 and 2, back in their published 1-based text form) in the DIR-Lab folder layout, on blank
   images of the published size (the images are not available offline), evaluated with ``identity``:
   ``OUT/dirlab_check/results.md`` must show 3.89 mm and 4.34 mm.

    python benchmarks/evaluation_results.py --out results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from real_cts import DATA_DIR

from MedDIFTLib.cli import main as meddift
from MedDIFTLib.evaluation.raw import DIRLAB_4DCT

METHODS = ["identity", "mind", "bspline", "convexadam"]


def dirlab_landmark_folder(landmarks: Path, out: Path) -> None:
    """The DIR-Lab download layout for every case in ``landmarks``: 1-based ``xyz`` text files and blank
    (sparse) ``.img`` files of the published size."""
    for case_folder in sorted(landmarks.glob("case*")):
        number = int(case_folder.name.removeprefix("case"))
        pack = out / f"Case{number}Pack"
        (pack / "ExtremePhases").mkdir(parents=True)
        (pack / "Images").mkdir()
        for phase in ("T00", "T50"):
            rows = np.loadtxt(case_folder / f"case{number}_{phase}_landmarks.csv", delimiter=",", skiprows=1)
            one_based = rows.astype(int) + 1
            text = "".join("\t".join(str(v) for v in row) + "\n" for row in one_based)
            (pack / "ExtremePhases" / f"Case{number}_300_{phase}_xyz.txt").write_text(text, encoding="utf-8")
            with (pack / "Images" / f"case{number}_{phase}_s.img").open("wb") as handle:
                handle.truncate(int(np.prod(DIRLAB_4DCT[number].shape_ijk)) * 2)


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output folder (new or empty; default results)")
    parser.add_argument("--data", default=str(DATA_DIR), help="the shared data folder (default ../shared/data)")
    parser.add_argument("--methods", nargs="+", default=METHODS, help=f"methods (default: {' '.join(METHODS)})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "chestct_single_real").is_dir():
        sys.exit(f"shared data not found at {data}")
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out}: already exists and is not empty; choose a new output folder")
    if meddift(["simulate", "--manifest", str(data / "chestct_single_real"), str(out / "pairs")]) != 0:
        return 1
    code = meddift(["eval", str(out / "pairs" / "manifest.csv"), "--methods", *args.methods, "--out",
                    str(out / "synthetic"), "--device", args.device])
    if (data / "dirlab4dct_landmarks").is_dir():
        dirlab_landmark_folder(data / "dirlab4dct_landmarks", out / "dirlab_landmarks")
        code |= meddift(["eval", str(out / "dirlab_landmarks"), "--methods", "identity", "--out",
                         str(out / "dirlab_check"), "--in-process", "--quiet"])
        print((out / "dirlab_check" / "results.md").read_text(encoding="utf-8").split("\n\n")[-1])
    return code


if __name__ == "__main__":
    sys.exit(run())
