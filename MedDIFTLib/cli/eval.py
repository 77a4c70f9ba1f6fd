"""``meddift eval DATASET --methods ... --out DIR``: TRE of several methods on a benchmark, in mm.

Every (case, method) runs in its own fresh Python process (:mod:`MedDIFTLib.evaluation.runner`),
started by a task on the Dask engine that ``meddift batch`` uses (a local cluster of ``--workers``
processes, one by default, or ``--scheduler``; there the output and temporary folders must be
shared), so a crash, an out-of-memory kill or a timeout loses that run only and the time and peak
memory are the run's own; ``--in-process`` runs everything in this process instead (for debugging).

Outputs in ``--out``: ``results.json``, ``results.csv``, ``results.md`` (rewritten after every run,
so an interrupted evaluation keeps what was done and says that it was interrupted),
``points/<case>/<method>.csv`` (per point: fixed, true and predicted position in LPS mm, initial
distance, error and the method's confidence), ``logs/`` (each run's output) and ``plots/``. A folder
that already holds results is refused unless ``--resume`` (keep the successful runs of the same
dataset, run the rest) or ``--overwrite`` (replace the results) is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.options import DATASET_LAYOUTS, RunSettings
from ..evaluation.methods import IDENTITY
from .common import add_device_argument

LAYOUT_CHOICES = ("auto", *DATASET_LAYOUTS)
OUTPUTS = ("results.json", "results.csv", "results.md", "points", "logs", "plots")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="target registration error (mm) of MedDIFT and baselines on a benchmark or your own pairs",
        description="Evaluate correspondence methods on DATASET: a DIR-Lab 4DCT or COPDgene folder (raw .img + "
        "landmark txt; geometry from the published per-case tables), a Learn2Reg folder (dataset.json, imagesTr, "
        "keypointsTr, masksTr), a CSV manifest (fixed,moving,fixed_points,moving_points; see meddift simulate "
        "--manifest) or a folder of pair folders (each with fixed.nii.gz, moving.nii.gz, fixed_points.csv, "
        "moving_points.csv; any volume or point format). Per case and overall: mean, std, p50, p95 and max TRE "
        "in mm, folding fraction where a field exists, the correlation of a method's confidence with its error, "
        "time and peak memory, as CSV, JSON and Markdown, with plots. Methods: identity; BACKBONE (MedDIFT point "
        "matching with a registered backbone, e.g. mind); BACKBONE-field (MedDIFT's dense field, e.g. "
        "mind-field); bspline; convexadam (when installed). Options as NAME:KEY=VALUE,... with JSON values "
        "(e.g. mind:search_radius_mm=15). One failing case is recorded and the others go on.",
    )
    parser.add_argument("dataset", help="dataset folder, pair folder(s) or CSV manifest")
    methods = [IDENTITY, RunSettings.backbone]
    parser.add_argument("--methods", nargs="+", default=methods, metavar="METHOD",
                        help=f"methods to compare (default: {' '.join(methods)})")
    parser.add_argument("--out", required=True, help="output folder (created; new or empty unless --resume or "
                        "--overwrite)")
    parser.add_argument("--resume", action="store_true",
                        help="finish an earlier run in --out: keep its successful runs, run the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto", help="dataset layout (default: detect)")
    parser.add_argument("--split", choices=("val", "train", "test", "all"), default="val",
                        help="Learn2Reg pairs to use (default val)")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (default: all)")
    add_device_argument(parser)
    parser.add_argument("--weights-dir", help="folder holding the pretrained weights of backbones that need them")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="stop a (case, method) run after this many seconds (default 3600)")
    parser.add_argument("--worst", type=int, default=3, help="worst points shown per method (default 3)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (no isolation; for debugging)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at once: worker processes of the local Dask cluster, each starting one fresh "
                        "process per (case, method) (default 1, so times and memory are not shared)")
    parser.add_argument("--scheduler", default="local",
                        help="'local' (default) or the address or scheduler file of a Dask cluster to run on")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")
    parser.set_defaults(run=run)


def _prepare_out(out: Path, dataset_path: str, resume: bool, overwrite: bool) -> list[dict]:
    """Check ``out`` before any work; return the records of the earlier run to keep (``resume``)."""
    import json
    import shutil

    from ..core.errors import BadInputError
    from ..core.io import check_output_path

    if resume and overwrite:
        raise BadInputError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: is a file, not a folder")
    check_output_path(out / OUTPUTS[0])
    if not out.exists() or not any(out.iterdir()):
        return []
    earlier = out / "results.json"
    if overwrite:
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return []
    if not resume:
        raise BadInputError(f"{out}: already exists and is not an empty folder; choose a new output folder, "
                            "or give --resume to finish the run there or --overwrite to replace its results")
    try:
        payload = json.loads(earlier.read_text(encoding="utf-8"))
        records, path = payload["cases"], payload["dataset"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInputError(f"{out}: holds no results of meddift eval to resume ({earlier.name} unreadable)") from None
    if path != dataset_path:
        raise BadInputError(f"{out}: holds an evaluation of {path}, not of {dataset_path}; nothing to resume")
    return [record for record in records if record.get("status") == "ok"]


def _describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('error', '')}"
    text = f"mean {record['mean']:.2f} mm (p95 {record['p95']:.2f}, max {record['max']:.2f}); {record['seconds']:.1f} s"
    if record.get("peak_rss_mb"):
        text += f", {record['peak_rss_mb'] / 1024:.2f} GB"
    return text


def run(args: argparse.Namespace) -> int:
    import contextlib
    import datetime
    import tempfile

    from .. import __version__
    from ..core.devices import resolve_device
    from ..core.errors import BadInputError
    from ..evaluation.baselines import unavailable_reason
    from ..evaluation.datasets import load_case, open_dataset
    from ..evaluation.methods import parse_method
    from ..evaluation.report import make_plots, markdown_tables, read_point_table, summarise, write_tables
    from ..evaluation.runner import evaluate, run_isolated
    from .common import ProgressBar

    specs = [parse_method(text) for text in args.methods]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise BadInputError(f"a method is listed twice: {' '.join(labels)}")
    if args.worst < 0 or not args.timeout_s > 0 or args.workers < 1:
        raise BadInputError("--worst must be >= 0, --timeout-s > 0 and --workers >= 1")
    out = Path(args.out)
    dataset_path = str(Path(args.dataset).resolve())
    kept = _prepare_out(out, dataset_path, args.resume, args.overwrite)
    dataset = open_dataset(args.dataset, args.layout, args.split).select(args.cases)
    device = str(resolve_device(args.device))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"{out}: cannot write there ({error.strerror})") from None
    total = len(dataset.cases) * len(specs)
    payload = {
        "meddift_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": dataset_path, "layout": dataset.layout,
                    "split": args.split if dataset.layout == "learn2reg" else None,
                    "cases": [case.name for case in dataset.cases]},
        "methods": labels,
        "device": device,
        "isolation": "in-process" if args.in_process else "one fresh process per case and method, started by a Dask "
        f"task ({args.workers if args.scheduler == 'local' else 'cluster'} at once)",
        "memory": "peak RSS sampled every 50 ms in the evaluating process" if args.in_process
        else "peak RSS (VmHWM on Linux) of the fresh process that ran the case and method",
        "state": "running",
        "runs_planned": total,
        "cases": [],
        "overall": [],
        "notes": [],
    }
    skipped = {spec.label: unavailable_reason(spec.name) for spec in specs if unavailable_reason(spec.name)}
    payload["notes"] += [f"{label} skipped: {reason}" for label, reason in skipped.items()]
    earlier = {(record["case"], record["method"]): record for record in kept}
    tables = {}
    planned = [(case, spec) for case in dataset.cases for spec in specs]
    with ProgressBar(enabled=not args.quiet) as progress, tempfile.TemporaryDirectory() as scratch, \
            contextlib.ExitStack() as stack:

        def record_done(case, spec, record: dict) -> None:
            if record["status"] == "ok":
                tables[(case.name, spec.label)] = read_point_table(out / "points" / case.name / f"{spec.slug}.csv")
            payload["cases"].append(record)
            payload["overall"] = summarise(payload["cases"], tables, labels)
            write_tables(out, payload)
            progress(case.name, len(payload["cases"]) / total, spec.label)
            if not args.quiet:
                resumed = " (kept from the earlier run)" if record.get("resumed") else ""
                print(f"[{len(payload['cases'])}/{total}] {case.name} / {spec.label}: {_describe(record)}{resumed}",
                      flush=True)

        try:
            jobs = []
            for case, spec in planned:
                points_path = out / "points" / case.name / f"{spec.slug}.csv"
                record = earlier.get((case.name, spec.label)) if points_path.is_file() else None
                if record is not None:
                    record_done(case, spec, {**record, "resumed": True})
                elif spec.label in skipped:
                    record_done(case, spec, {"case": case.name, "method": spec.label, "status": "skipped",
                                             "error": skipped[spec.label],
                                             "published_initial_mm": case.published_initial_mm})
                else:
                    job = {"case": case.to_dict(), "method": spec.label, "device": device,
                           "weights_dir": args.weights_dir, "points_out": str(points_path)}
                    if args.in_process:
                        record_done(case, spec, evaluate(job, isolated=False))
                    else:
                        jobs.append((case, spec, job))
            if jobs:
                from distributed import as_completed

                from ..batch import dask_client

                client = stack.enter_context(dask_client(args.scheduler, args.workers))
                futures = {client.submit(run_isolated, job, Path(tempfile.mkdtemp(dir=scratch)),
                                         out / "logs" / f"{case.name}__{spec.slug}.log", args.timeout_s,
                                         pure=False): (case, spec) for case, spec, job in jobs}
                for future in as_completed(futures):
                    record_done(*futures[future], future.result())
        except KeyboardInterrupt:
            payload["state"] = "interrupted"
            write_tables(out, payload)
            raise
        order = {(case.name, spec.label): number for number, (case, spec) in enumerate(planned)}
        payload["cases"].sort(key=lambda record: order.get((record["case"], record["method"]), len(order)))
        progress("plots", 1.0, "")
        cache: dict[str, tuple] = {}

        def load_volumes(name: str) -> tuple:
            if name not in cache:
                cache.clear()
                data = load_case(next(case for case in dataset.cases if case.name == name))
                cache[name] = (data.fixed, data.moving)
            return cache[name]

        payload["notes"] += make_plots(out, payload["cases"], tables, labels, load_volumes,
                                       {spec.label: spec.slug for spec in specs}, args.worst)
    payload["state"] = "done"
    write_tables(out, payload)
    print(markdown_tables([], payload["overall"]).split("\n\n")[0])
    for note in payload["notes"]:
        print(f"note: {note}")
    failed = [r for r in payload["cases"] if r["status"] == "failed"]
    print(f"Wrote results.md, results.csv, results.json, points/ and plots/ to {out}")
    if failed:
        print(f"{len(failed)} of {total} runs failed; their errors are in {out / 'results.md'}", file=sys.stderr)
        return 1
    return 0
