"""One (case, method) run of ``meddift eval``, in this process or in a fresh one.

In a fresh Python process (``python -m MedDIFTLib.evaluation.runner RUN_SPEC``) a crash, an out-of-memory
kill or a timeout (which ends the process and everything it started) loses that run only, and the
peak memory reported is that run's own (peak RSS of the process, ``VmHWM`` on Linux: interpreter,
libraries, both volumes and the method). In this process, memory is sampled with psutil and includes
what earlier runs left behind.

A run spec is a dict: ``case`` (:meth:`Case.to_dict`), ``method`` (spec text), ``device``,
``weights_dir`` and ``points_out`` (where the per-point table goes). A run returns its record:
status ``ok`` (with TRE statistics, folding, confidence correlation, time and memory) or ``failed``
(with the error).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path

from ..core.child import ChildProcess
from ..core.environment import child_environment
from ..core.errors import MedDIFTError
from ..core.io import atomic_output

SAMPLE_SECONDS = 0.05


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


def process_peak_rss_mb() -> float | None:
    """Peak RSS (MB) of this process image: ``VmHWM`` on Linux (``getrusage`` would report the parent's
    peak, which survives fork and exec there), else ``getrusage`` where the platform has it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
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


def evaluate(run_spec: dict, isolated: bool) -> dict:
    """Run one (case, method) run spec; return its record (status ``ok`` or ``failed`` with the error)."""
    from .cases import Case
    from .datasets import load_case
    from .methods import parse_method, run_method
    from .metrics import confidence_correlation, error_stats
    from .report import PointTable, write_point_table

    case = Case.from_dict(run_spec["case"])
    spec = parse_method(run_spec["method"])
    record = {"case": case.name, "method": spec.label, "status": "failed", "error": "",
              "published_initial_mm": case.published_initial_mm}
    try:
        data = load_case(case, images=spec.needs_images)
        cuda = str(run_spec["device"]).startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as memory:
            started = time.perf_counter()
            output = run_method(spec, data, run_spec["device"], run_spec.get("weights_dir"))
            seconds = time.perf_counter() - started
        predicted = output.points_lps_mm
        if predicted.shape != data.fixed_points.points_lps_mm.shape:
            raise RuntimeError(f"{spec.label} returned {predicted.shape} points for {len(data.fixed_points)}")
        table = PointTable(data.fixed_points.labels, data.fixed_points.points_lps_mm,
                           data.moving_points.points_lps_mm, predicted, output.confidence)
        write_point_table(table, run_spec["points_out"])
        folding = jacobian_min = None
        if output.field is not None:
            folding, jacobian_min = _folding(output.field, data.fixed_mask)
        if output.confidence is not None:
            correlation = confidence_correlation(output.confidence, table.error_mm)
            record.update(confidence_spearman=correlation["spearman"], confidence_pearson=correlation["pearson"])
        peak = process_peak_rss_mb() if isolated else memory.peak_mb
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


def isolated_command(spec_path: Path) -> list[str]:
    """The command that runs the run spec in ``spec_path`` in a fresh Python process."""
    return [sys.executable, "-m", __name__, str(spec_path)]


def run_isolated(run_spec: dict, folder: Path, log_path: Path, timeout_s: float) -> dict:
    """Run ``run_spec`` in a fresh Python process; a crash or timeout becomes a failed record. On a timeout
    the process is cancelled with everything it started (:class:`~MedDIFTLib.core.child.ChildProcess`).
    The run's output (stdout and stderr) goes to ``log_path``; ``folder`` holds the run spec and result files."""
    spec_path, result_path = folder / "run_spec.json", folder / "result.json"
    run_spec = {**run_spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(run_spec), encoding="utf-8")
    lines: list[str] = []

    def keep(line: str) -> bool:
        lines.append(line)
        return True

    child = ChildProcess(isolated_command(spec_path), keep, env=child_environment(), merge_stderr=True,
                         name="meddift-eval-run")
    child.start()
    failure = None
    code = child.wait(timeout_s)
    if code is None:
        child.cancel()
        failure = f"timed out after {timeout_s:.0f} s"
    else:
        child.join()
        if code != 0:
            killed = code < 0 or code == 137
            failure = f"the run's process ended with code {code}" + (" (killed: out of memory?)" if killed else "")
    output = "".join(line + "\n" for line in lines)
    with atomic_output(log_path) as tmp:
        tmp.write_text(output, encoding="utf-8")
    base = {"case": run_spec["case"]["name"], "method": run_spec["method"], "status": "failed",
            "published_initial_mm": (run_spec["case"].get("raw_geometry") or {}).get("published_initial_mm")}
    if failure is None and result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    last_line = next((line for line in reversed(lines) if line.strip()), "")
    return {**base, "error": f"{failure or 'no result'}; last output: {last_line[:200]}", "kind": "internal"}


def _child_main(spec_path: str) -> int:
    run_spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    record = evaluate(run_spec, isolated=True)
    Path(run_spec["result"]).write_text(json.dumps(record), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
