"""An evaluation campaign (``meddift eval``): every (case, method) run on a dataset, resumable, and its report.

:func:`prepare_campaign` checks everything before any work (methods, arguments, the output folder,
the dataset, the device) and returns a :class:`Campaign`; :meth:`Campaign.run` then runs what is
left to run and writes the report. Every (case, method) runs in its own fresh Python process
(:func:`.runner.run_isolated`), started by a task on a Dask client the caller opens (``meddift eval``
gives the engine of ``meddift batch``), so a crash, an out-of-memory kill or a timeout loses that
run only and the time and peak memory are the run's own; ``in_process`` runs everything in this
process instead (for debugging).

Outputs in ``out`` (:data:`OUTPUTS`): ``results.json`` (the payload: see :meth:`Campaign.new_payload`),
``results.csv``, ``results.md`` (rewritten after every run, so an interrupted campaign keeps what was
done and says that it was interrupted), ``points/<case>/<method>.csv`` (per point: fixed, true and
predicted position in LPS mm, initial distance, error and the method's confidence), ``logs/`` (each
isolated run's output) and ``plots/``. A folder that already holds results is refused unless
``resume`` (keep the successful runs of the same dataset, run the rest) or ``overwrite`` (replace the
results) is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..core.options import RunSettings

# runner and baselines are used through their modules, so that tests can replace runner.evaluate
# and baselines.unavailable_reason
from . import baselines, runner
from .datasets import Dataset, load_case, open_dataset
from .methods import IDENTITY, MethodSpec, parse_method
from .report import make_plots, read_point_table, summarise, write_tables

OUTPUTS = ("results.json", "results.csv", "results.md", "points", "logs", "plots")

Progress = Callable[[str, float, str], None]
# (case name, method label, record, runs done, runs planned), after each run's record is written
OnRecord = Callable[[str, str, dict, int, int], None]


@dataclasses.dataclass(frozen=True)
class CampaignSettings:
    """What to evaluate and how (the arguments of ``meddift eval``)."""

    dataset: str
    out: str | Path
    methods: Sequence[str] = (IDENTITY, RunSettings.backbone)
    resume: bool = False
    overwrite: bool = False
    layout: str = "auto"
    split: str = "val"
    cases: Sequence[str] | None = None
    device: str = RunSettings.device
    weights_dir: str | None = None
    timeout_s: float = 3600.0
    worst: int = 3
    in_process: bool = False
    workers: int = 1
    scheduler: str = "local"


def prepare_out(out: Path, dataset_path: str, resume: bool, overwrite: bool) -> list[dict]:
    """Check ``out`` before any work; return the records of the earlier run to keep (``resume``)."""
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


def describe_record(record: dict) -> str:
    """One line about a run's record: its TRE, time and memory, or why it did not succeed."""
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('error', '')}"
    text = f"mean {record['mean']:.2f} mm (p95 {record['p95']:.2f}, max {record['max']:.2f}); {record['seconds']:.1f} s"
    if record.get("peak_rss_mb"):
        text += f", {record['peak_rss_mb'] / 1024:.2f} GB"
    return text


def prepare_campaign(settings: CampaignSettings) -> Campaign:
    """Check the methods, the arguments, the output folder, the dataset and the device, and create the
    output folder: every refusal comes before any work."""
    from ..core.devices import resolve_device
    from ..core.errors import BadInputError

    specs = [parse_method(text) for text in settings.methods]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise BadInputError(f"a method is listed twice: {' '.join(labels)}")
    if settings.worst < 0 or not settings.timeout_s > 0 or settings.workers < 1:
        raise BadInputError("--worst must be >= 0, --timeout-s > 0 and --workers >= 1")
    out = Path(settings.out)
    dataset_path = str(Path(settings.dataset).resolve())
    kept = prepare_out(out, dataset_path, settings.resume, settings.overwrite)
    dataset = open_dataset(settings.dataset, settings.layout, settings.split).select(settings.cases)
    device = str(resolve_device(settings.device))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"{out}: cannot write there ({error.strerror})") from None
    return Campaign(settings, out, dataset_path, dataset, specs, device, kept)


@dataclasses.dataclass
class Campaign:
    """A checked campaign (from :func:`prepare_campaign`): the planned runs, and the earlier ones kept."""

    settings: CampaignSettings
    out: Path
    dataset_path: str
    dataset: Dataset
    specs: list[MethodSpec]
    device: str
    kept: list[dict]

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.specs]

    def points_path(self, case: Any, spec: MethodSpec) -> Path:
        return self.out / "points" / case.name / f"{spec.slug}.csv"

    def new_payload(self) -> dict:
        """The schema of ``results.json``: what was evaluated, where and how; ``state`` (running,
        interrupted, done); ``cases`` (one record per run) and ``overall`` (per method); ``notes``."""
        from .. import __version__

        settings, dataset = self.settings, self.dataset
        return {
            "meddift_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dataset": {"path": self.dataset_path, "layout": dataset.layout,
                        "split": settings.split if dataset.layout == "learn2reg" else None,
                        "cases": [case.name for case in dataset.cases]},
            "methods": self.labels,
            "device": self.device,
            "isolation": "in-process" if settings.in_process else "one fresh process per case and method, started "
            f"by a Dask task ({settings.workers if settings.scheduler == 'local' else 'cluster'} at once)",
            "memory": "peak RSS sampled every 50 ms in the evaluating process" if settings.in_process
            else "peak RSS (VmHWM on Linux) of the fresh process that ran the case and method",
            "state": "running",
            "runs_planned": len(dataset.cases) * len(self.specs),
            "cases": [],
            "overall": [],
            "notes": [],
        }

    def run(
        self,
        open_client: Callable[[], AbstractContextManager] | None = None,
        progress: Progress | None = None,
        on_record: OnRecord | None = None,
    ) -> dict:
        """Run every planned (case, method) not kept from an earlier run, writing the report after each,
        then the plots; return the payload (``state`` done). ``open_client`` opens the Dask client that
        runs the isolated runs (needed unless ``in_process``). On KeyboardInterrupt the report says
        ``interrupted`` and the interrupt goes on."""
        settings, out, labels = self.settings, self.out, self.labels
        progress = progress or (lambda stage, fraction, message="": None)
        payload = self.new_payload()
        total = payload["runs_planned"]
        skipped = {spec.label: reason for spec in self.specs if (reason := baselines.unavailable_reason(spec.name))}
        payload["notes"] += [f"{label} skipped: {reason}" for label, reason in skipped.items()]
        earlier = {(record["case"], record["method"]): record for record in self.kept}
        tables = {}
        planned = [(case, spec) for case in self.dataset.cases for spec in self.specs]

        def record_done(case, spec, record: dict) -> None:
            if record["status"] == "ok":
                tables[(case.name, spec.label)] = read_point_table(self.points_path(case, spec))
            payload["cases"].append(record)
            payload["overall"] = summarise(payload["cases"], tables, labels)
            write_tables(out, payload)
            progress(case.name, len(payload["cases"]) / total, spec.label)
            if on_record is not None:
                on_record(case.name, spec.label, record, len(payload["cases"]), total)

        with tempfile.TemporaryDirectory() as scratch:
            try:
                isolated = []
                for case, spec in planned:
                    points_path = self.points_path(case, spec)
                    record = earlier.get((case.name, spec.label)) if points_path.is_file() else None
                    if record is not None:
                        record_done(case, spec, {**record, "resumed": True})
                    elif spec.label in skipped:
                        record_done(case, spec, {"case": case.name, "method": spec.label, "status": "skipped",
                                                 "error": skipped[spec.label],
                                                 "published_initial_mm": case.published_initial_mm})
                    else:
                        run_spec = {"case": case.to_dict(), "method": spec.label, "device": self.device,
                                    "weights_dir": settings.weights_dir, "points_out": str(points_path)}
                        if settings.in_process:
                            record_done(case, spec, runner.evaluate(run_spec, isolated=False))
                        else:
                            isolated.append((case, spec, run_spec))
                if isolated:
                    for case, spec, record in self._run_on_dask(isolated, open_client, Path(scratch)):
                        record_done(case, spec, record)
            except KeyboardInterrupt:
                payload["state"] = "interrupted"
                write_tables(out, payload)
                raise
            order = {(case.name, spec.label): number for number, (case, spec) in enumerate(planned)}
            payload["cases"].sort(key=lambda record: order.get((record["case"], record["method"]), len(order)))
            progress("plots", 1.0, "")
            payload["notes"] += self._plot(payload["cases"], tables)
        payload["state"] = "done"
        write_tables(out, payload)
        return payload

    def _run_on_dask(
        self, isolated: list[tuple[Any, MethodSpec, dict]], open_client: Callable[[], AbstractContextManager] | None,
        scratch: Path,
    ) -> Iterator[tuple[Any, MethodSpec, dict]]:
        """Submit each run spec as a Dask task that runs it in a fresh process; yield (case, spec, record)
        as they complete."""
        from distributed import as_completed

        if open_client is None:
            raise ValueError("isolated runs need open_client (a Dask client); or set in_process")
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(open_client())
            futures = {client.submit(runner.run_isolated, run_spec, Path(tempfile.mkdtemp(dir=scratch)),
                                     self.out / "logs" / f"{case.name}__{spec.slug}.log", self.settings.timeout_s,
                                     pure=False): (case, spec) for case, spec, run_spec in isolated}
            for future in as_completed(futures):
                yield (*futures[future], future.result())

    def _plot(self, records: list[dict], tables: dict) -> list[str]:
        """Write the plots (reading one case's volumes at a time); return their notes."""
        cache: dict[str, tuple] = {}

        def load_volumes(name: str) -> tuple:
            if name not in cache:
                cache.clear()
                data = load_case(next(case for case in self.dataset.cases if case.name == name))
                cache[name] = (data.fixed, data.moving)
            return cache[name]

        return make_plots(self.out, records, tables, self.labels, load_volumes,
                          {spec.label: spec.slug for spec in self.specs}, self.settings.worst)
