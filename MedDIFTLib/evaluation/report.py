"""Evaluation reports: per-point tables, summary tables (CSV, JSON, Markdown) and plots (PNG).

A run is a list of records, one per (case, method): ``status`` (``ok``, ``failed``, ``skipped``),
``error``, ``points``, TRE statistics in mm (``mean``, ``std``, ``p50``, ``p95``, ``max``), the
initial (no registration) mean, ``folding_fraction`` (share of field voxels with a Jacobian
determinant <= 0; None without a field), ``seconds`` (wall time of the method) and
``peak_rss_mb`` (peak resident memory of the process that ran it), and for a method that scores
its matches ``confidence_spearman`` / ``confidence_pearson`` (correlation of the per-point
confidence with the TRE: negative when the confidence follows the error). The overall row of a
method pools the TRE and the correlations over every point of its successful cases. Plots need
matplotlib (Agg backend, imported only here); without it the tables are still written and the plots
are skipped with a note. Slices are drawn in a window chosen from each image (:func:`display_window`):
the lung CT window for a CT in HU, the image's own robust range for any other modality.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError
from ..core.io import is_ct_in_hu
from ..core.io.atomic import atomic_output
from .metrics import confidence_correlation, error_stats

STATISTICS = ("mean", "std", "p50", "p95", "max")
CSV_COLUMNS = ("case", "method", "status", "points", "initial_mean_mm", "mean_mm", "std_mm", "p50_mm", "p95_mm",
               "max_mm", "folding_fraction", "confidence_spearman", "confidence_pearson", "seconds", "peak_rss_mb",
               "peak_gpu_mb", "error")
POINT_COLUMNS = ("label", "fixed_l", "fixed_p", "fixed_s", "true_l", "true_p", "true_s", "predicted_l",
                 "predicted_p", "predicted_s", "initial_mm", "error_mm", "confidence")
OVERALL = "ALL"
HU_WINDOW = (-1000.0, 400.0)
ROBUST_PERCENTILES = (1.0, 99.0)
WINDOW_SAMPLES = 1_000_000  # voxels the robust range is estimated from (an even stride through the volume)


@dataclass
class PointTable:
    """Per point of one case and method: label, fixed, true and predicted moving position (N, 3, LPS mm)
    and, for a method that scores its matches, the confidence (N,) in [0, 1]."""

    labels: list[str]
    fixed_lps_mm: np.ndarray
    true_lps_mm: np.ndarray
    predicted_lps_mm: np.ndarray
    confidence: np.ndarray | None = None

    @property
    def initial_mm(self) -> np.ndarray:
        return np.linalg.norm(self.true_lps_mm - self.fixed_lps_mm, axis=1)

    @property
    def error_mm(self) -> np.ndarray:
        return np.linalg.norm(self.predicted_lps_mm - self.true_lps_mm, axis=1)


def write_point_table(table: PointTable, path: str | os.PathLike) -> None:
    """Write a :class:`PointTable` as CSV (LPS mm, errors in mm), atomically."""
    with atomic_output(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(POINT_COLUMNS)
        for n, label in enumerate(table.labels):
            writer.writerow([label, *[f"{v:.4f}" for v in table.fixed_lps_mm[n]],
                             *[f"{v:.4f}" for v in table.true_lps_mm[n]],
                             *[f"{v:.4f}" for v in table.predicted_lps_mm[n]],
                             f"{table.initial_mm[n]:.4f}", f"{table.error_mm[n]:.4f}",
                             "" if table.confidence is None else f"{table.confidence[n]:.4f}"])


def read_point_table(path: str | os.PathLike) -> PointTable:
    """Read a table written by :func:`write_point_table`."""
    source = Path(path)
    try:
        with source.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        values = np.array([[float(row[c]) for c in POINT_COLUMNS[1:10]] for row in rows], float).reshape(-1, 9)
        scored = bool(rows) and all(row.get("confidence") for row in rows)
        confidence = np.array([float(row["confidence"]) for row in rows]) if scored else None
    except (OSError, KeyError, ValueError) as error:
        raise BadInputError(f"{source}: not a point table ({error})") from None
    return PointTable([row["label"] for row in rows], values[:, 0:3], values[:, 3:6], values[:, 6:9], confidence)


def summarise(records: list[dict], tables: dict[tuple[str, str], PointTable], methods: list[str]) -> list[dict]:
    """One overall record per method: TRE pooled over the points of its successful cases, mean of case
    means, mean folding fraction, the confidence-error correlation over the pooled points, mean seconds
    per case and the largest peak memory."""
    overall = []
    for method in methods:
        own = [r for r in records if r["method"] == method]
        done = [r for r in own if r["status"] == "ok"]
        entry = {"case": OVERALL, "method": method, "cases_ok": len(done), "cases": len(own),
                 "status": "ok" if done else (own[0]["status"] if own else "skipped"),
                 "error": "" if done else next((r["error"] for r in own if r.get("error")), "")}
        errors = [tables[(r["case"], method)].error_mm for r in done if (r["case"], method) in tables]
        initial = [tables[(r["case"], method)].initial_mm for r in done if (r["case"], method) in tables]
        if errors:
            pooled = np.concatenate(errors)
            entry.update(error_stats(pooled), points=int(len(pooled)),
                         initial_mean=float(np.concatenate(initial).mean()),
                         mean_of_case_means=float(np.mean([r["mean"] for r in done])))
        scored = [tables[(r["case"], method)] for r in done if (r["case"], method) in tables]
        scored = [t for t in scored if t.confidence is not None]
        if scored:
            correlation = confidence_correlation(np.concatenate([t.confidence for t in scored]),
                                                 np.concatenate([t.error_mm for t in scored]))
            entry.update(confidence_spearman=correlation["spearman"], confidence_pearson=correlation["pearson"])
        folds = [r["folding_fraction"] for r in done if r.get("folding_fraction") is not None]
        entry["folding_fraction"] = float(np.mean(folds)) if folds else None
        entry["seconds"] = float(np.mean([r["seconds"] for r in done])) if done else None
        memories = [r["peak_rss_mb"] for r in done if r.get("peak_rss_mb") is not None]
        entry["peak_rss_mb"] = float(max(memories)) if memories else None
        gpu = [r["peak_gpu_mb"] for r in done if r.get("peak_gpu_mb") is not None]
        entry["peak_gpu_mb"] = float(max(gpu)) if gpu else None
        overall.append(entry)
    return overall


def _number(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _csv_row(record: dict) -> list[str]:
    return [
        record["case"], record["method"], record["status"], str(record.get("points", "")),
        _number(record.get("initial_mean"), 4), *[_number(record.get(k), 4) for k in STATISTICS],
        _number(record.get("folding_fraction"), 6), _number(record.get("confidence_spearman"), 4),
        _number(record.get("confidence_pearson"), 4), _number(record.get("seconds"), 2),
        _number(record.get("peak_rss_mb"), 1), _number(record.get("peak_gpu_mb"), 1), record.get("error") or "",
    ]


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.3f}"


def _memory_gb(value) -> str:
    return "" if value is None else f"{value / 1024:.2f}"


def _cells(row: dict, seconds_digits: int = 1) -> str:
    """The numeric cells of a Markdown row: points, initial mean, statistics, folding, correlation, time, memory."""
    return (f"{row['points']} | {row['initial_mean']:.2f} | " + " | ".join(f"{row[k]:.2f}" for k in STATISTICS)
            + f" | {_percent(row.get('folding_fraction'))} | {_number(row.get('confidence_spearman'))} | "
            f"{_number(row.get('seconds'), seconds_digits)} | {_memory_gb(row.get('peak_rss_mb'))}")


def _note(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


EMPTY_CELLS = " | ".join([""] * 11)


def markdown_tables(records: list[dict], overall: list[dict]) -> str:
    """The overall table (one row per method) and the per-case table, in Markdown."""
    columns = ("points | initial mean | mean | std | p50 | p95 | max | folding % | conf. ρ | {time} | peak RSS GB "
               "| note |")
    rule = "|---" * 14 + "|"
    lines = ["| method | cases | " + columns.format(time="s / case"), rule]
    for row in overall:
        if "mean" not in row:
            note = f"{row['status']}: {row['error']}"
            lines.append(f"| {row['method']} | 0/{row['cases']} | {EMPTY_CELLS} | {_note(note)} |")
            continue
        failed = row["cases"] - row["cases_ok"]
        note = f"{failed} failed: {row['error']}" if failed and row.get("error") else ""
        lines.append(f"| {row['method']} | {row['cases_ok']}/{row['cases']} | {_cells(row)} | {_note(note)} |")
    lines += ["", "| case | method | " + columns.format(time="s"), rule]
    for row in records:
        if row["status"] != "ok":
            note = f"{row['status']}: {row.get('error', '')}"
            lines.append(f"| {row['case']} | {row['method']} | {EMPTY_CELLS} | {_note(note)} |")
            continue
        published = row.get("published_initial_mm")
        note = f"published initial {published:.2f}" if published is not None and row["method"] == "identity" else ""
        lines.append(f"| {row['case']} | {row['method']} | {_cells(row)} | {note} |")
    return "\n".join(lines) + "\n"


def _status_text(payload: dict) -> str:
    """What the Markdown says about an unfinished run and the notes (skipped methods, plots)."""
    lines = []
    if payload.get("state") == "interrupted":
        lines.append(f"**Interrupted**: the run was stopped after {len(payload['cases'])} of "
                     f"{payload.get('runs_planned', '?')} (case, method) runs; the tables show those. Rerun the "
                     "same command with --resume to finish it.")
    elif payload.get("state") == "running":
        lines.append(f"**In progress**: {len(payload['cases'])} of {payload.get('runs_planned', '?')} runs done.")
    lines += [f"Note: {note}" for note in payload.get("notes", [])]
    return "".join(f"{line}\n\n" for line in lines)


def write_tables(out: Path, payload: dict) -> None:
    """``results.json`` (``payload``), ``results.csv`` (per case, then ``ALL`` rows) and ``results.md``.

    ``payload["state"]`` (``running``, ``interrupted``, ``done``) and ``payload["notes"]`` are stated in
    the Markdown."""
    records, overall = payload["cases"], payload["overall"]
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_csv_row(r) for r in [*records, *overall])
    with atomic_output(out / "results.csv") as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    header = (f"# MedDIFT evaluation: {payload['dataset']['path']} ({payload['dataset']['layout']}, "
              f"{len({r['case'] for r in records})} cases)\n\nTarget registration error in mm over the points of "
              "each case; the overall rows pool all points of a method's successful cases. Folding: share of "
              "voxels of the method's displacement field with a Jacobian determinant <= 0 (– when the method "
              "makes no field). Conf. ρ: Spearman correlation of the method's per-point confidence with its "
              "error (negative: the confidence follows the error; Pearson in results.csv; empty when the method "
              "gives no confidence). Time: wall seconds of the method per case; memory: peak resident memory of "
              "the process that ran it.\n\n")
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(header + _status_text(payload) + markdown_tables(records, overall), encoding="utf-8")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(figure, path: Path) -> None:
    with atomic_output(path) as tmp:
        figure.savefig(tmp)


def plot_boxplots(path: Path, errors_by_method: dict[str, np.ndarray]) -> None:
    """Box plot of the point errors (mm) of each method, all cases pooled."""
    names = [m for m, e in errors_by_method.items() if len(e)]
    figure = _figure(max(4.0, 1.3 * len(names) + 1.5), 4.0)
    axes = figure.add_subplot()
    axes.boxplot([errors_by_method[m] for m in names], showfliers=True, flierprops={"markersize": 3})
    axes.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    axes.set_ylabel("target registration error (mm)")
    axes.set_title("Error per point, all cases")
    axes.grid(axis="y", alpha=0.3)
    _save(figure, path)


def plot_error_vs_initial(path: Path, points_by_method: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Scatter of each point's error against its initial displacement (mm), one colour per method; the
    dashed diagonal is no registration."""
    figure = _figure(6.0, 4.5)
    axes = figure.add_subplot()
    largest = 1.0
    for method, (initial, errors) in points_by_method.items():
        if len(initial):
            axes.scatter(initial, errors, s=8, alpha=0.6, label=method)
            largest = max(largest, float(initial.max()), float(errors.max()))
    axes.plot([0, largest], [0, largest], color="grey", linewidth=0.8, linestyle="--", label="no registration")
    axes.set_xlabel("initial displacement (mm)")
    axes.set_ylabel("target registration error (mm)")
    axes.set_title("Error vs initial displacement")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def display_window(volume) -> tuple[float, float]:
    """The grey-level window (low, high) to draw ``volume`` (:class:`Volume`) in: :data:`HU_WINDOW` for a
    CT in HU (:func:`~MedDIFTLib.core.io.is_ct_in_hu`: it holds air), else the image's own :data:`ROBUST_PERCENTILES`
    (1st to 99th percentile, so an MRI is not washed out by a CT window nor by a few bright voxels)."""
    if is_ct_in_hu(volume):
        return HU_WINDOW
    values = np.ravel(volume.voxels)
    values = values[:: max(1, values.size // WINDOW_SAMPLES)]
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _axial_slice(volume, point_lps_mm: np.ndarray):
    """The array slice ``k`` nearest to a point, its extent in mm (i, j scaled) and the point's (i, j, k)."""
    ijk = volume.geometry.lps_to_ijk(np.asarray(point_lps_mm, float)[None])[0]
    k = int(np.clip(np.round(ijk[2]), 0, volume.geometry.shape_ijk[2] - 1))
    spacing = volume.geometry.spacing_mm
    size_i, size_j = volume.geometry.shape_ijk[:2]
    extent = (-0.5 * spacing[0], (size_i - 0.5) * spacing[0], (size_j - 0.5) * spacing[1], -0.5 * spacing[1])
    return volume.voxels[k], extent, ijk, k


def _in_plane(volume, point_lps_mm: np.ndarray) -> tuple[float, float, float]:
    ijk = volume.geometry.lps_to_ijk(np.asarray(point_lps_mm, float)[None])[0]
    spacing = volume.geometry.spacing_mm
    return ijk[0] * spacing[0], ijk[1] * spacing[1], ijk[2]


def plot_worst_points(path: Path, method: str, worst: list[dict], load_volumes: Callable) -> None:
    """One row per worst point of ``method``: the fixed image through the fixed point, and the moving
    image through the true point with the true and predicted positions (axial array slices, each image
    in its own :func:`display_window`).

    ``worst`` items: ``case``, ``label``, ``error``, ``fixed``, ``true``, ``predicted`` (LPS mm);
    ``load_volumes(case)`` returns the case's (fixed, moving) :class:`Volume`.
    """
    figure = _figure(8.0, 3.6 * len(worst))
    for row, item in enumerate(worst):
        fixed, moving = load_volumes(item["case"])
        left = figure.add_subplot(len(worst), 2, 2 * row + 1)
        image, extent, _, k = _axial_slice(fixed, item["fixed"])
        low, high = display_window(fixed)
        left.imshow(image, cmap="gray", vmin=low, vmax=high, extent=extent)
        x, y, _ = _in_plane(fixed, item["fixed"])
        left.plot(x, y, "o", markersize=9, markerfacecolor="none", markeredgecolor="deepskyblue", label="fixed")
        left.set_title(f"{item['case']} · point {item['label']} · fixed slice {k}", fontsize=9)
        left.legend(fontsize=7, loc="lower right")
        right = figure.add_subplot(len(worst), 2, 2 * row + 2)
        image, extent, _, k = _axial_slice(moving, item["true"])
        low, high = display_window(moving)
        right.imshow(image, cmap="gray", vmin=low, vmax=high, extent=extent)
        x, y, _ = _in_plane(moving, item["true"])
        right.plot(x, y, "+", markersize=12, markeredgewidth=2, color="lime", label="true")
        x, y, depth = _in_plane(moving, item["predicted"])
        right.plot(x, y, "x", markersize=10, markeredgewidth=2, color="red",
                   label=f"{method} ({depth - k:+.1f} slices)")
        right.set_title(f"moving slice {k} · error {item['error']:.1f} mm", fontsize=9)
        right.legend(fontsize=7, loc="lower right")
        for axes in (left, right):
            axes.set_xticks([])
            axes.set_yticks([])
    _save(figure, path)


def make_plots(
    out: Path,
    records: list[dict],
    tables: dict[tuple[str, str], PointTable],
    methods: list[str],
    load_volumes: Callable,
    slugs: dict[str, str],
    worst_count: int = 3,
) -> list[str]:
    """Write ``plots/tre_boxplot.png``, ``plots/error_vs_initial.png`` and ``plots/worst_<method>.png``
    (the last two for methods other than identity).

    Returns notes for the user (e.g. matplotlib missing, a case whose images could not be shown).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["matplotlib is not installed: plots skipped (pip install matplotlib)"]
    notes = []
    folder = out / "plots"
    done = {m: [tables[(r["case"], m)] for r in records if r["method"] == m and r["status"] == "ok"
                and (r["case"], m) in tables] for m in methods}
    with_points = {m: t for m, t in done.items() if t}
    if not with_points:
        return ["no method succeeded on any case: no plots"]
    plot_boxplots(folder / "tre_boxplot.png", {m: np.concatenate([t.error_mm for t in ts])
                                               for m, ts in with_points.items()})
    registered = {m: ts for m, ts in with_points.items() if m != "identity"}
    if registered:
        plot_error_vs_initial(folder / "error_vs_initial.png", {
            m: (np.concatenate([t.initial_mm for t in ts]), np.concatenate([t.error_mm for t in ts]))
            for m, ts in registered.items()})
    for method in with_points:
        if method == "identity":
            continue
        candidates = []
        for record in records:
            table = tables.get((record["case"], method))
            if record["method"] != method or record["status"] != "ok" or table is None:
                continue
            for n in np.argsort(table.error_mm)[::-1][:worst_count]:
                candidates.append({"case": record["case"], "label": table.labels[n], "error": float(table.error_mm[n]),
                                   "fixed": table.fixed_lps_mm[n], "true": table.true_lps_mm[n],
                                   "predicted": table.predicted_lps_mm[n]})
        worst = sorted(candidates, key=lambda item: -item["error"])[:worst_count]
        try:
            plot_worst_points(folder / f"worst_{slugs[method]}.png", method, worst, load_volumes)
        except BadInputError as error:
            notes.append(f"worst-point view of {method} skipped: {error}")
    return notes
