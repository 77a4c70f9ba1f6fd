"""``meddift eval DATASET --methods ... --out DIR``: TRE of several methods on a benchmark, in mm.

Every (case, method) runs in its own Python process (``python -m MedDIFTLib.cli.eval JOB``), so a
crash, an out-of-memory kill or a timeout loses that run only, and the peak memory reported is that
run's own (peak RSS of the fresh process, ``VmHWM`` on Linux: interpreter, libraries, both volumes and
the method). ``--in-process`` runs everything in this process instead (for debugging; memory is then
sampled with psutil every 50 ms and includes what earlier runs left behind).

Outputs in ``--out`` (new or empty): ``results.json``, ``results.csv``, ``results.md`` (rewritten
after every run, so an interrupted evaluation keeps what was done), ``points/<case>/<method>.csv``
(per point: fixed, true and predicted position in LPS mm, initial distance and error), ``logs/``
(each run's output) and ``plots/`` (box plots, error vs initial displacement, worst points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

LAYOUT_CHOICES = ("auto", "dirlab", "copdgene", "learn2reg", "manifest")
SAMPLE_SECONDS = 0.05


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="target registration error (mm) of MedDIFT and baselines on a benchmark or your own pairs",
        description="Evaluate correspondence methods on DATASET: a DIR-Lab 4DCT or COPDgene folder (raw .img + "
        "landmark txt; geometry from the published per-case tables), a Learn2Reg folder (dataset.json, imagesTr, "
        "keypointsTr, masksTr) or a CSV manifest (fixed,moving,fixed_points,moving_points; see meddift simulate "
        "--manifest). Per case and overall: mean, std, p50, p95 and max TRE in mm, folding fraction where a "
        "field exists, time and peak memory, as CSV, JSON and Markdown, with plots. Methods: identity, mind, "
        "maisi, mind-field, maisi-field, bspline, convexadam (when installed); options as NAME:KEY=VALUE,... "
        "(e.g. mind:search_radius_mm=15). One failing case is recorded and the others go on.",
    )
    parser.add_argument("dataset", help="dataset folder or CSV manifest")
    parser.add_argument("--methods", nargs="+", default=["identity", "mind"], metavar="METHOD",
                        help="methods to compare (default: identity mind)")
    parser.add_argument("--out", required=True, help="output folder (created; must be new or empty)")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto", help="dataset layout (default: detect)")
    parser.add_argument("--split", choices=("val", "train", "test", "all"), default="val",
                        help="Learn2Reg pairs to use (default val)")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--weights-dir", help="folder holding the MAISI weights (for maisi methods)")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="stop a (case, method) run after this many seconds (default 3600)")
    parser.add_argument("--worst", type=int, default=3, help="worst points shown per method (default 3)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (no isolation; for debugging)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")
    parser.set_defaults(run=run)


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled in a thread (psutil)."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, process) -> None:
        while True:
            self.peak_mb = max(self.peak_mb or 0.0, process.memory_info().rss / 2**20)
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def __enter__(self) -> PeakMemory:
        try:
            import psutil
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._sample, args=(psutil.Process(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _process_peak_rss_mb() -> float | None:
    """Peak RSS (MB) of this process image: ``VmHWM`` on Linux (``getrusage`` would report the parent's
    peak, which survives fork and exec there), else ``getrusage`` where the platform has it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 2**10
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _folding(field, mask) -> tuple[float, float]:
    """Folding fraction and minimum Jacobian determinant of ``field`` (inside ``mask`` when given)."""
    import SimpleITK as sitk

    from ..field import jacobian_stats

    inside = None
    if mask is not None:
        geometry = field.geometry
        resampled = sitk.Resample(sitk.Cast(mask.to_sitk() != 0, sitk.sitkUInt8), [int(n) for n in geometry.shape_ijk],
                                  sitk.Transform(), sitk.sitkNearestNeighbor, geometry.origin_lps_mm,
                                  geometry.spacing_mm, geometry.direction, 0)
        inside = sitk.GetArrayFromImage(resampled) > 0
        if not inside.any():
            inside = None
    stats = jacobian_stats(field, inside)
    return stats["fraction_folding"], stats["min"]


def evaluate(job: dict, isolated: bool) -> dict:
    """Run one (case, method) job; return its record (status ``ok`` or ``failed`` with the error).

    ``job``: ``case`` (:meth:`Case.to_dict`), ``method`` (spec text), ``device``, ``weights_dir``,
    ``points_out`` (where the per-point table goes).
    """
    from ..core.errors import MedDIFTError
    from ..evaluation.baselines import parse_method, run_method
    from ..evaluation.datasets import Case, load_case
    from ..evaluation.metrics import error_stats
    from ..evaluation.report import PointTable, write_point_table

    case = Case.from_dict(job["case"])
    spec = parse_method(job["method"])
    record = {"case": case.name, "method": spec.label, "status": "failed", "error": "",
              "published_initial_mm": case.published_initial_mm}
    try:
        data = load_case(case, images=spec.name != "identity")
        cuda = str(job["device"]).startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as memory:
            started = time.perf_counter()
            output = run_method(spec, data, job["device"], job.get("weights_dir"))
            seconds = time.perf_counter() - started
        predicted = output.points_lps_mm
        if predicted.shape != data.fixed_points.points_lps_mm.shape:
            raise RuntimeError(f"{spec.label} returned {predicted.shape} points for {len(data.fixed_points)}")
        table = PointTable(data.fixed_points.labels, data.fixed_points.points_lps_mm,
                           data.moving_points.points_lps_mm, predicted)
        write_point_table(table, job["points_out"])
        folding = jacobian_min = None
        if output.field is not None:
            folding, jacobian_min = _folding(output.field, data.fixed_mask)
        peak = _process_peak_rss_mb() if isolated else memory.peak_mb
        record.update(error_stats(table.error_mm), status="ok", points=len(table.labels),
                      initial_mean=float(table.initial_mm.mean()), folding_fraction=folding,
                      jacobian_min=jacobian_min, seconds=seconds, peak_rss_mb=peak or memory.peak_mb,
                      peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None, **output.details)
    except MedDIFTError as error:
        record.update(error=str(error), kind=error.kind)
    except MemoryError:
        record.update(error="out of memory", kind="out_of_memory")
    except Exception as error:  # any failure of one case is recorded; the others go on
        traceback.print_exc()
        record.update(error=f"{type(error).__name__}: {error}", kind="internal")
    return record


def _child_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    record = evaluate(job, isolated=True)
    Path(job["result"]).write_text(json.dumps(record))
    return 0


def _run_isolated(job: dict, folder: Path, log_path: Path, timeout_s: float) -> dict:
    """Run ``job`` in a fresh Python process; a crash or timeout becomes a failed record."""
    import subprocess

    from ..core.io import atomic_output

    job_path, result_path = folder / "job.json", folder / "result.json"
    job = {**job, "result": str(result_path)}
    job_path.write_text(json.dumps(job))
    package_parent = str(Path(__file__).resolve().parents[2])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent,
                                                                             os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "MedDIFTLib.cli.eval", str(job_path)]
    failure = None
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment)
        output = completed.stdout + completed.stderr
        if completed.returncode != 0:
            killed = completed.returncode < 0 or completed.returncode == 137
            failure = (f"the run's process ended with code {completed.returncode}"
                       + (" (killed: out of memory?)" if killed else ""))
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        failure = f"timed out after {timeout_s:.0f} s"
    with atomic_output(log_path) as tmp:
        tmp.write_text(output)
    base = {"case": job["case"]["name"], "method": job["method"], "status": "failed",
            "published_initial_mm": (job["case"].get("raw_geometry") or {}).get("published_initial_mm")}
    if failure is None and result_path.is_file():
        return json.loads(result_path.read_text())
    last_line = next((line for line in reversed(output.strip().splitlines()) if line.strip()), "")
    return {**base, "error": f"{failure or 'no result'}; last output: {last_line[:200]}", "kind": "internal"}


def _check_out(out: Path) -> None:
    from ..core.errors import BadInputError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: already exists and is not an empty folder; choose a new output folder")


def _describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('error', '')}"
    text = f"mean {record['mean']:.2f} mm (p95 {record['p95']:.2f}, max {record['max']:.2f}); {record['seconds']:.1f} s"
    if record.get("peak_rss_mb"):
        text += f", {record['peak_rss_mb'] / 1024:.2f} GB"
    return text


def run(args: argparse.Namespace) -> int:
    import datetime
    import tempfile

    from .. import __version__
    from ..core.devices import resolve_device
    from ..core.errors import BadInputError
    from ..evaluation.baselines import parse_method, unavailable_reason
    from ..evaluation.datasets import open_dataset
    from ..evaluation.report import make_plots, markdown_tables, read_point_table, summarise, write_tables
    from .common import ProgressBar

    specs = [parse_method(text) for text in args.methods]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise BadInputError(f"a method is listed twice: {' '.join(labels)}")
    if args.worst < 0 or not args.timeout_s > 0:
        raise BadInputError("--worst must be >= 0 and --timeout-s > 0")
    out = Path(args.out)
    _check_out(out)
    dataset = open_dataset(args.dataset, args.layout, args.split).select(args.cases)
    device = str(resolve_device(args.device))
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meddift_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(Path(args.dataset).resolve()), "layout": dataset.layout,
                    "split": args.split if dataset.layout == "learn2reg" else None,
                    "cases": [case.name for case in dataset.cases]},
        "methods": labels,
        "device": device,
        "isolation": "in-process" if args.in_process else "one process per case and method",
        "memory": "peak RSS sampled every 50 ms in the evaluating process" if args.in_process
        else "peak RSS (VmHWM on Linux) of the fresh process that ran the case and method",
        "cases": [],
        "overall": [],
        "notes": [],
    }
    skipped = {spec.label: unavailable_reason(spec.name) for spec in specs if unavailable_reason(spec.name)}
    payload["notes"] += [f"{label} skipped: {reason}" for label, reason in skipped.items()]
    tables = {}
    total = len(dataset.cases) * len(specs)
    with ProgressBar(enabled=not args.quiet) as progress, tempfile.TemporaryDirectory() as scratch:
        for case_number, case in enumerate(dataset.cases):
            for method_number, spec in enumerate(specs):
                done = case_number * len(specs) + method_number
                progress(case.name, done / total, spec.label)
                points_path = out / "points" / case.name / f"{spec.slug}.csv"
                if spec.label in skipped:
                    record = {"case": case.name, "method": spec.label, "status": "skipped",
                              "error": skipped[spec.label], "published_initial_mm": case.published_initial_mm}
                else:
                    job = {"case": case.to_dict(), "method": spec.label, "device": device,
                           "weights_dir": args.weights_dir, "points_out": str(points_path)}
                    if args.in_process:
                        record = evaluate(job, isolated=False)
                    else:
                        folder = Path(tempfile.mkdtemp(dir=scratch))
                        record = _run_isolated(job, folder, out / "logs" / f"{case.name}__{spec.slug}.log",
                                               args.timeout_s)
                if record["status"] == "ok":
                    tables[(case.name, spec.label)] = read_point_table(points_path)
                payload["cases"].append(record)
                payload["overall"] = summarise(payload["cases"], tables, labels)
                write_tables(out, payload)
                if not args.quiet:
                    print(f"[{done + 1}/{total}] {case.name} / {spec.label}: {_describe(record)}", flush=True)
        progress("plots", 1.0, "")
        cache: dict[str, tuple] = {}

        def load_volumes(name: str) -> tuple:
            from ..evaluation.datasets import load_case

            if name not in cache:
                cache.clear()
                data = load_case(next(case for case in dataset.cases if case.name == name))
                cache[name] = (data.fixed, data.moving)
            return cache[name]

        payload["notes"] += make_plots(out, payload["cases"], tables, labels, load_volumes,
                                       {spec.label: spec.slug for spec in specs}, args.worst)
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


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
