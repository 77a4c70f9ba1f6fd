"""``OUT/summary.csv``: one line per manifest row, in manifest order, rewritten (atomically) after every row.

``status`` is ``ok`` (run now), ``done`` (finished by an earlier run with the same inputs and options,
kept), ``failed`` (``error`` and ``kind`` say why) or ``pending`` (not finished: the batch was stopped).
Times in seconds: ``seconds_features`` is the feature extraction of the row's two volumes (shared with
the other rows of the same volume, so summed over rows it counts a shared volume more than once),
``seconds_pair`` the matching or registration and its outputs, ``seconds_row`` the whole task on its
worker. ``peak_rss_mb`` is the peak resident memory of the worker process while it ran the row (it
includes what the worker held already: its cached features and networks); ``peak_gpu_mb`` the peak
allocated on the GPU. TRE columns (mm) are filled where the manifest has ``moving_points``;
``lesions`` and ``lesions_ok`` count a ``track`` row's lesions and those tracked without a flag (a
series: at its last follow-up, whose RECIST 1.1 response is ``response``); ``moving`` lists a series'
follow-ups joined by ``;``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..core.io import atomic_output

FILE_NAME = "summary.csv"
COLUMNS = (
    "id", "task", "status", "error", "kind", "points", "reliable", "lesions", "lesions_ok", "response",
    "tre_mean_mm", "tre_p50_mm", "tre_p95_mm", "tre_max_mm", "initial_mean_mm", "jacobian_min", "folding_fraction",
    "seconds_features", "seconds_pair", "seconds_row", "features_recomputed", "peak_rss_mb", "peak_gpu_mb",
    "worker", "fixed", "moving", "input_hash",
)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_summary(out: Path, records: list[dict]) -> Path:
    """Write ``records`` (one per row, in manifest order) as ``out/summary.csv``; return its path."""
    target = out / FILE_NAME
    with atomic_output(target) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for record in records:
            writer.writerow([_cell(record.get(column)) for column in COLUMNS])
    return target


def read_summary(path: Path) -> list[dict[str, str]]:
    """The lines of a ``summary.csv`` as dicts of text."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
