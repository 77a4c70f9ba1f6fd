"""The files of ``meddift track`` over two or more follow-ups (other tools read them; names and columns are
fixed; with one follow-up the pair's files of :mod:`.outputs` are written instead):

- ``followup_<k>_lesions.nii.gz`` (k = 1..N): the labelmap on follow-up k's grid, same label values;
- ``lesions.csv``: :data:`CSV_COLUMNS`, one row per lesion and time point (long form, time point 0 =
  baseline; ``l,p,s``: centre, LPS mm);
- ``response.csv``: :data:`RESPONSE_COLUMNS`, one row per time point: the sum of the target lesions'
  longest diameters and the RECIST 1.1 response (:mod:`.response`);
- ``report.md``: the response table, the rules and their source, one row per lesion and time point;
- ``growth.png``: the growth curves (:mod:`.growth`); ``lesions.png``: the lesion sheet (:mod:`.sheet`).

Every path is checked before any work (:func:`check_series_outputs`), every file is made in memory
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
from .growth import growth_figure
from .outputs import STATUS_TEXT, csv_number
from .response import PD_INCREASE, PD_INCREASE_MM, PR_DECREASE
from .sheet import series_sheet

FILES = {"csv": "lesions.csv", "response": "response.csv", "report": "report.md", "growth": "growth.png",
         "sheet": "lesions.png"}
CSV_COLUMNS = ("label,name,time_point,scan,l,p,s,confidence,forward_backward_mm,volume_ml,volume_change_pct,"
               "diameter_long_mm,diameter_short_mm,mean_hu,target,status,route,routes_apart_mm").split(",")
RESPONSE_COLUMNS = ("time_point,scan,sld_mm,change_from_baseline_pct,nadir_mm,change_from_nadir_pct,"
                    "response").split(",")
RECIST_SOURCE = ('Eisenhauer EA et al., "New response evaluation criteria in solid tumours: Revised RECIST '
                 'guideline (version 1.1)", Eur J Cancer 2009;45:228-247')


def labelmap_name(time_point: int) -> str:
    """The labelmap file of follow-up ``time_point`` (1-based)."""
    return f"followup_{time_point}_lesions.nii.gz"


def series_output_paths(out_dir: str | os.PathLike, followups: int) -> dict[str, Path]:
    """The output paths in ``out_dir`` for ``followups`` follow-ups: ``labelmap_<k>`` and :data:`FILES`."""
    paths = {f"labelmap_{k}": Path(out_dir) / labelmap_name(k) for k in range(1, followups + 1)}
    return {**paths, **{key: Path(out_dir) / name for key, name in FILES.items()}}


def check_series_outputs(out_dir: str | os.PathLike, followups: int) -> dict[str, Path]:
    """Refuse, before any work, an output folder that cannot be written."""
    paths = series_output_paths(out_dir, followups)
    for path in paths.values():
        check_output_path(path)
    return paths


def csv_text(result) -> str:
    """``lesions.csv`` of a :class:`~.series.SeriesResult`: lesion by lesion, each through time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for label in [visit.label for visit in result.visits[0]]:
        for visit in result.timeline(label):
            measured = visit.measurement
            writer.writerow([
                visit.label, visit.name, visit.time_point, result.scan_names[visit.time_point],
                *(csv_number(v, 3) for v in visit.centre_lps_mm), csv_number(visit.confidence, 3),
                csv_number(visit.forward_backward_mm, 3), csv_number(measured.volume_ml, 4),
                csv_number(result.volume_change_pct(visit), 1), csv_number(measured.long_mm, 2),
                csv_number(measured.short_mm, 2), csv_number(measured.mean_hu, 1), int(label in result.targets),
                visit.status, visit.route, csv_number(visit.routes_apart_mm, 2)])
    return buffer.getvalue()


def response_csv_text(result) -> str:
    """``response.csv`` of a :class:`~.series.SeriesResult`: one row per time point."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESPONSE_COLUMNS)
    for response in result.responses:
        writer.writerow([response.time_point, result.scan_names[response.time_point], csv_number(response.sld_mm, 2),
                         csv_number(response.change_from_baseline_pct, 1), csv_number(response.nadir_mm, 2),
                         csv_number(response.change_from_nadir_pct, 1), response.category or "baseline"])
    return buffer.getvalue()


def _when(time_point: int) -> str:
    return "baseline" if time_point == 0 else f"T{time_point}"


def report_text(result) -> str:
    """``report.md``: the scans, the response per time point with its rules, one row per lesion and time
    point, the flags in words."""
    names = result.scan_names
    target_names = [visit.name for visit in result.visits[0] if visit.label in result.targets]
    lines = [f"# Lesion series: {' -> '.join(names)}", "",
             f"Route to each follow-up: {result.route} (follow-up 1 is reached from the baseline). Volumes in mL, "
             "diameters in mm (longest axial / perpendicular short axis), centre in LPS mm (baseline: centre of "
             "mass; follow-up: the engine's match), confidence of the centre match in [0, 1].", "",
             "## Response (RECIST 1.1, target lesions)", "",
             f"Target lesions: {', '.join(target_names) or 'none'}. SLD: sum of their longest diameters (a lesion "
             "gone counts 0 mm). Nadir: the smallest SLD before the time point, baseline included.", "",
             "| time point | scan | SLD (mm) | change from baseline % | nadir (mm) | change from nadir % | response |",
             "|---|---|---|---|---|---|---|"]
    for response in result.responses:
        lines.append(f"| {_when(response.time_point)} | {names[response.time_point]} | "
                     f"{csv_number(response.sld_mm, 1)} | {csv_number(response.change_from_baseline_pct, 1)} | "
                     f"{csv_number(response.nadir_mm, 1)} | "
                     f"{csv_number(response.change_from_nadir_pct, 1)} | {response.category or '-'} |")
    lines += ["", f"CR: every target lesion gone. PD: SLD at least {100 * PD_INCREASE:g} % and at least "
              f"{PD_INCREASE_MM:g} mm above the nadir. PR: SLD at least {100 * PR_DECREASE:g} % below baseline. SD: "
              "none of these. NE: a target lesion could not be measured (it reaches or leaves the field of view, "
              "or the image does not support its size). Non-target and new lesions are not assessed here. "
              f"Source: {RECIST_SOURCE}.", "", "## Lesions", "",
              "| lesion | target | time point | status | volume | change % | diameters | mean HU | confidence | "
              "route | centre (L, P, S) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    flagged = []
    for label in [visit.label for visit in result.visits[0]]:
        for visit in result.timeline(label):
            measured = visit.measurement
            centre = ", ".join(csv_number(v, 1) for v in visit.centre_lps_mm)
            target = "yes" if label in result.targets else "no"
            lines.append(f"| {visit.name} ({label}) | {target} | {_when(visit.time_point)} | {visit.status} | "
                         f"{csv_number(measured.volume_ml, 3)} | {csv_number(result.volume_change_pct(visit), 1)} | "
                         f"{csv_number(measured.long_mm, 1)} x {csv_number(measured.short_mm, 1)} | "
                         f"{csv_number(measured.mean_hu, 0)} | {csv_number(visit.confidence, 2)} | "
                         f"{visit.route or '-'} | "
                         f"{centre} |")
            if visit.flags:
                flagged.append(f"- {visit.name} at {_when(visit.time_point)}: "
                               + "; ".join(STATUS_TEXT[flag] for flag in visit.flags))
    if flagged:
        lines += ["", "## Flags", "", *flagged]
    seconds = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    lines += ["", f"Times: {seconds}.", ""]
    return "\n".join(lines)


def write_series_outputs(result, scans: list[Volume], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the files of ``result`` (its ``scans``, baseline first) into ``out_dir``; returns their paths."""
    paths = check_series_outputs(out_dir, len(scans) - 1)
    texts = {"csv": csv_text(result), "response": response_csv_text(result), "report": report_text(result)}
    pictures = {"growth": growth_figure(result), "sheet": series_sheet(result, scans)}
    for time_point in range(1, len(scans)):
        labelmap = result.labelmaps[time_point]
        write_volume(Volume(labelmap.astype(np.float32), scans[time_point].geometry, labelmap_name(time_point)),
                     paths[f"labelmap_{time_point}"], sitk.sitkUInt16 if labelmap.max() < 65536 else sitk.sitkInt32)
    for key, text in texts.items():
        with atomic_output(paths[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    for key, picture in pictures.items():
        with atomic_output(paths[key]) as tmp:
            tmp.write_bytes(picture)
    return paths
