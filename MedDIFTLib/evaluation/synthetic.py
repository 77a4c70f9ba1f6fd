"""A folder of real CTs -> one synthetic pair per CT (known motion) and a manifest for ``meddift eval``."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

from ..core.errors import BadInputError
from ..core.io.points import read_points
from ..core.io.volumes import read_volume
from .cases import POINT_SUFFIXES, file_stem, is_volume_file
from .datasets import MANIFEST_COLUMNS


def find_cts(folder: str | os.PathLike) -> list[tuple[str, Path, Path | None]]:
    """Single CTs in ``folder`` for :func:`build_synthetic_manifest`: ``(case name, CT, landmarks or None)``.

    A CT is a volume file directly in ``folder`` (landmarks: ``<stem>_landmarks.csv|.mrk.json|.fcsv``
    beside it), or a subfolder holding one volume file (landmarks: the one point file there) or a
    DICOM series (landmarks: the one point file in the subfolder).
    """
    root = Path(folder)
    if not root.is_dir():
        raise BadInputError(f"{root}: not a folder of CT volumes")
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if is_volume_file(entry):
            stem = file_stem(entry)
            landmarks = next((entry.with_name(f"{stem}_landmarks{s}") for s in POINT_SUFFIXES
                              if entry.with_name(f"{stem}_landmarks{s}").is_file()), None)
            found.append((stem, entry, landmarks))
        elif entry.is_dir():
            volumes = [p for p in sorted(entry.iterdir()) if is_volume_file(p)]
            points = [p for p in sorted(entry.iterdir()) if p.is_file() and p.name.lower().endswith(POINT_SUFFIXES)]
            dicom = any(p.suffix.lower() == ".dcm" for p in entry.iterdir())
            if len(volumes) > 1:
                raise BadInputError(f"{entry}: holds {len(volumes)} volumes; put one CT per subfolder")
            if len(points) > 1:
                raise BadInputError(f"{entry}: holds {len(points)} point files; keep one landmark file per CT")
            if volumes or dicom:
                found.append((entry.name, volumes[0] if volumes else entry, points[0] if points else None))
    if not found:
        raise BadInputError(f"{root}: no CT volumes found (NIfTI, NRRD, MHA files or subfolders with one)")
    return found


def write_synthetic_pair(pair, folder: Path, summary: dict) -> None:
    """Write a :class:`MedDIFTLib.evaluation.simulate.SyntheticPair` as ``fixed.nii.gz``, ``moving.nii.gz`` (int16 HU),
    ``fixed_points.csv``, ``moving_points_true.csv`` (LPS mm, same labels) and ``pair.json`` (``summary``)."""
    import SimpleITK as sitk

    from ..core.io import write_points, write_volume

    folder.mkdir(parents=True, exist_ok=True)
    write_volume(pair.fixed, folder / "fixed.nii.gz", sitk.sitkInt16)
    write_volume(pair.moving, folder / "moving.nii.gz", sitk.sitkInt16)
    write_points(pair.fixed_points, folder / "fixed_points.csv")
    write_points(pair.moving_points, folder / "moving_points_true.csv")
    (folder / "pair.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def build_synthetic_manifest(
    folder: str | os.PathLike,
    out: Path,
    make_pair: Callable[..., object],
    settings: dict | None = None,
    report: Callable[[str, int, int], None] = lambda name, done, total: None,
) -> tuple[list[dict], list[str]]:
    """Make one synthetic pair per CT of ``folder`` under ``out/<case>/`` and ``out/manifest.csv``.

    ``make_pair(volume, points_lps_mm, labels)`` returns a ``SyntheticPair``; a CT's landmarks are
    used when found (else the pair maker picks keypoints). ``settings`` (e.g. the seed) are added to each
    ``pair.json``. A CT that fails is reported in the returned problems and left out of the manifest; the
    others go on. Returns (summaries, problems).
    """
    from .metrics import tre_stats

    cts = find_cts(folder)
    summaries, problems, rows = [], [], []
    for number, (name, ct, landmarks) in enumerate(cts):
        report(name, number, len(cts))
        try:
            volume = read_volume(ct)
            points = read_points(landmarks, volume.geometry) if landmarks else None
            pair = make_pair(volume, None if points is None else points.points_lps_mm,
                             None if points is None else points.labels)
        except BadInputError as error:
            problems.append(f"{name}: {error}")
            continue
        motion = tre_stats(pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm)
        summary = {"case": name, "source": str(Path(ct).resolve()), "landmarks": None if landmarks is None
                   else str(Path(landmarks).resolve()), "points": len(pair.fixed_points), "motion_mm": motion,
                   "jacobian_min": pair.jacobian_min, **(settings or {})}
        write_synthetic_pair(pair, out / name, summary)
        summaries.append(summary)
        rows.append([name, f"{name}/fixed.nii.gz", f"{name}/moving.nii.gz", f"{name}/fixed_points.csv",
                     f"{name}/moving_points_true.csv"])
    report("", len(cts), len(cts))
    if rows:
        with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["case", *MANIFEST_COLUMNS])
            writer.writerows(rows)
    return summaries, problems
