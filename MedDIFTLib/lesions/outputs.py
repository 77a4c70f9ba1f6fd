"""The files of ``meddift track`` (other tools read them; the names and columns are fixed):

- ``followup_lesions.nii.gz``: the labelmap on the follow-up grid, same label values as the input;
- ``lesions.csv``: :data:`CSV_COLUMNS`, one row per lesion (``l,p,s``: follow-up centre, LPS mm);
- ``report.md``: the table and each lesion's flags in words;
- ``lesions.png``: the lesion sheet (:mod:`.sheet`).

Every path is checked before any work (:func:`check_outputs`), every file is made in memory
first and then written atomically, so a failure leaves no partial output.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.io import atomic_output, check_output_path, write_volume
from ..core.io.volumes import Volume
from .sheet import lesion_sheet

FILES = {"labelmap": "followup_lesions.nii.gz", "csv": "lesions.csv", "report": "report.md", "sheet": "lesions.png"}
CSV_COLUMNS = ("label,l,p,s,confidence,volume_baseline_ml,volume_followup_ml,volume_change_pct,"
               "diameter_baseline_mm,diameter_followup_mm,status").split(",")
STATUS_TEXT = {
    "not_found": "not found in the follow-up",
    "leaves_volume": "reaches or leaves the follow-up volume (measurements cover the part inside)",
    "merges": "meets another tracked lesion",
    "low_confidence": "the centre match has low confidence: check it",
    "touches_border": "touches the baseline volume border (baseline measurements may be incomplete)",
    "unsupported_growth": "refinement grew it until its limits, not an edge in the image, stopped it: the follow-up "
    "size is not the lesion's (check it, or track with --no-refine)",
}


def output_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The four output paths in ``out_dir``."""
    return {key: Path(out_dir) / name for key, name in FILES.items()}


def check_outputs(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Refuse, before any work, an output folder that cannot be written."""
    paths = output_paths(out_dir)
    for path in paths.values():
        check_output_path(path)
    return paths


def csv_number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, ``nan`` where it is not finite: how the output files write numbers."""
    return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"


def csv_text(result) -> str:
    """``lesions.csv`` of a :class:`~.track.TrackResult`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for lesion in result.lesions:
        writer.writerow([lesion.label, *(csv_number(v, 3) for v in lesion.centre_lps_mm),
                         csv_number(lesion.confidence, 3),
                         csv_number(lesion.baseline.volume_ml, 4), csv_number(lesion.followup.volume_ml, 4),
                         csv_number(lesion.volume_change_pct, 1), csv_number(lesion.baseline.long_mm, 2),
                         csv_number(lesion.followup.long_mm, 2), lesion.status])
    return buffer.getvalue()


def report_text(result, baseline_name: str, followup_name: str) -> str:
    """``report.md``: what was tracked, one table row per lesion, the flags in words."""
    lines = [f"# Lesion tracking: {baseline_name} -> {followup_name}", "",
             "Volumes in mL, diameters in mm (longest axial / perpendicular short axis, RECIST-style), "
             "centre in LPS mm (follow-up), confidence of the centre match in [0, 1].", "",
             "| lesion | status | volume baseline | volume follow-up | change % | diameters baseline | "
             "diameters follow-up | change % | mean HU baseline / follow-up | confidence | centre (L, P, S) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lesion in result.lesions:
        before, after = lesion.baseline, lesion.followup
        centre = ", ".join(csv_number(v, 1) for v in lesion.centre_lps_mm)
        lines.append(
            f"| {lesion.name} ({lesion.label}) | {lesion.status} | {csv_number(before.volume_ml, 3)} | "
            f"{csv_number(after.volume_ml, 3)} | {csv_number(lesion.volume_change_pct, 1)} | "
            f"{csv_number(before.long_mm, 1)} x {csv_number(before.short_mm, 1)} | "
            f"{csv_number(after.long_mm, 1)} x {csv_number(after.short_mm, 1)} | "
            f"{csv_number(lesion.diameter_change_pct, 1)} | "
            f"{csv_number(before.mean_hu, 0)} / {csv_number(after.mean_hu, 0)} | {csv_number(lesion.confidence, 2)} | "
            f"{centre} |")
    flagged = [lesion for lesion in result.lesions if lesion.flags]
    if flagged:
        lines += ["", "## Flags", ""]
        lines += [f"- {lesion.name}: " + "; ".join(STATUS_TEXT[flag] for flag in lesion.flags) for lesion in flagged]
    seconds = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    lines += ["", f"Times: {seconds}.", ""]
    return "\n".join(lines)


def write_outputs(result, baseline: Volume, followup: Volume, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the four files of ``result`` into ``out_dir``; returns their paths."""
    paths = check_outputs(out_dir)
    labelmap = Volume(result.followup_labelmap.astype(np.float32), followup.geometry, "followup_lesions")
    texts = {"csv": csv_text(result), "report": report_text(result, baseline.name or "baseline",
                                                             followup.name or "follow-up")}
    sheet = lesion_sheet(result, baseline, followup)
    write_volume(labelmap, paths["labelmap"], sitk.sitkUInt16 if result.followup_labelmap.max() < 65536
                 else sitk.sitkInt32)
    for key, text in texts.items():
        with atomic_output(paths[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    with atomic_output(paths["sheet"]) as tmp:
        tmp.write_bytes(sheet)
    return paths
