"""One row of a batch, run as a Dask task: the single-pair command's library calls on shared features.

The outputs are those of ``meddift match`` (``matched.csv``), ``meddift register``
(``transform.nii.gz``; its summary ``transform.nii.gz.json``, naming the files of the row's folder;
``points.csv`` when the row has points; ``inverse.nii.gz`` and ``warped.nii.gz`` when asked) or
``meddift track`` (fixed = baseline, moving = follow-up: ``followup_lesions.nii.gz``, ``lesions.csv``,
``report.md``, ``lesions.png``; a row with several follow-ups, those of ``meddift track`` over a series:
:mod:`MedDIFTLib.lesions.series_outputs`, on the pyramids of its scans' feature tasks). They are
written into a staging folder ``OUT/.staging/<id>.<random>/`` with the row's record ``row.json`` last,
and the folder is renamed to ``OUT/<id>/`` only when complete: a row's folder holds all of its outputs
or does not exist. A failing row returns a record with its error and kind; nothing of it is left behind.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
import uuid
from pathlib import Path

from ..core.budget import Budget, check_memory, default_budget, estimate_match, estimate_register
from ..core.errors import BadInputError, MedDIFTError
from ..core.io import check_overlap, read_points, read_volume, write_points
from .features import VolumeFeatures, pyramid_for, this_worker
from .job import BatchJob
from .manifest import Row

STAGING = ".staging"
RECORD = "row.json"
MATCHED = "matched.csv"
TRANSFORM = "transform.nii.gz"
POINTS = "points.csv"
INVERSE = "inverse.nii.gz"
WARPED = "warped.nii.gz"


def _match(row: Row, job: BatchJob, fixed, moving, fixed_pyramid, moving_pyramid, device, folder: Path):
    from ..matching import check_points, match_points

    if not row.points:
        raise BadInputError(f"row {row.id}: the match task needs a points column")
    points = read_points(row.points, fixed.geometry)
    check_points(fixed.geometry, points.points_lps_mm)
    result = match_points(fixed_pyramid.to(device), moving_pyramid.to(device), points.points_lps_mm,
                          options=job.match_options)
    write_points(result.point_set(points.labels), folder / MATCHED)
    details = {"points": len(points), "reliable": int(result.reliable.sum()), "outputs": [MATCHED]}
    return points, result.points_lps_mm, details


def _register(row: Row, job: BatchJob, fixed, moving, fixed_pyramid, moving_pyramid, device, folder: Path):
    from ..core.options import to_json
    from ..field import carried_points, read_field, register_and_write, summary_path, write_summary

    mask = read_volume(row.mask) if row.mask else None
    points = read_points(row.points, fixed.geometry) if row.points else None
    names = {"transform": TRANSFORM, "inverse": INVERSE if job.write_inverse else None,
             "warped": WARPED if job.write_warped else None}
    summary = register_and_write(fixed, moving, fixed_pyramid.to("cpu"), moving_pyramid.to("cpu"),
                                 folder / TRANSFORM, names["inverse"] and folder / INVERSE,
                                 names["warped"] and folder / WARPED, job.field_options, mask=mask)
    predicted = None
    if points is not None:
        carried = carried_points(read_field(folder / TRANSFORM), points)
        write_points(carried, folder / POINTS)
        predicted = carried.points_lps_mm
    write_summary(folder / TRANSFORM, {**summary, **names}, POINTS if points is not None else None,
                  job.recipe.backbone, str(device), to_json(job.field_options))
    outputs = [name for name in (*names.values(), summary_path(TRANSFORM).name) if name]
    if points is not None:
        outputs.append(POINTS)
    details = {"points": len(points) if points is not None else None, "outputs": outputs,
               "jacobian_min": summary["jacobian"]["min"], "folding_fraction": summary["jacobian"]["fraction_folding"]}
    return points, predicted, details


def _lesions(row: Row, baseline):
    """The row's baseline lesions (:func:`MedDIFTLib.lesions.inputs.read_lesions`)."""
    from ..lesions.inputs import read_lesions

    if not row.lesions:
        raise BadInputError(f"row {row.id}: the track task needs a lesions column")
    return read_lesions(row.lesions, baseline)


def _track(row: Row, job: BatchJob, fixed, moving, fixed_pyramid, moving_pyramid, device, folder: Path):
    from ..lesions.outputs import write_outputs
    from ..lesions.track import track_lesions

    lesions = _lesions(row, fixed)
    result = track_lesions(fixed, moving, lesions, fixed_pyramid.to(device), moving_pyramid.to(device),
                           job.lesion_options, job.field_options)
    paths = write_outputs(result, fixed, moving, folder)
    statuses = [lesion.status for lesion in result.lesions]
    details = {"lesions": len(statuses), "lesions_ok": statuses.count("ok"),
               "outputs": [path.name for path in paths.values()]}
    return None, None, details


TASK_FUNCTIONS = {"match": _match, "register": _register, "track": _track}


def _track_series(row: Row, job: BatchJob, baseline, followups, pyramids, device, folder: Path) -> dict:
    """A series row (several follow-ups, ``track``): :func:`MedDIFTLib.lesions.series.track_series` on the
    scans' shared ``pyramids`` (baseline first); its record's details. ``lesions`` and ``lesions_ok`` count
    at the last follow-up; ``response`` is its RECIST 1.1 response."""
    from ..lesions.series import track_series
    from ..lesions.series_outputs import write_series_outputs

    scans = [baseline, *followups]
    by_scan = {id(scan): pyramid for scan, pyramid in zip(scans, pyramids)}
    result = track_series(baseline, followups, _lesions(row, baseline),
                          lambda volume, progress: by_scan[id(volume)].to(device), job.lesion_options,
                          job.series_options, job.field_options)
    paths = write_series_outputs(result, scans, folder)
    last = result.visits[-1]
    details = {"lesions": len(last), "lesions_ok": sum(visit.status == "ok" for visit in last),
               "response": result.responses[-1].category, "outputs": [path.name for path in paths.values()]}
    return details


def _tre(row: Row, moving, points, predicted) -> dict:
    """TRE (mm) against the row's ground-truth moving points, where it has them."""
    from ..evaluation.metrics import error_stats, tre_mm

    if not row.moving_points or points is None or predicted is None:
        return {}
    truth = read_points(row.moving_points, moving.geometry)
    if len(truth) != len(points):
        raise BadInputError(f"row {row.id}: {len(truth)} moving points for {len(points)} fixed points")
    stats = error_stats(tre_mm(predicted, truth.points_lps_mm))
    initial = tre_mm(points.points_lps_mm, truth.points_lps_mm)
    return {**{f"tre_{name}_mm": value for name, value in stats.items()}, "initial_mean_mm": float(initial.mean())}


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder onto ``target``, replacing an earlier (stale) one."""
    old = None
    if target.exists():
        old = staging.with_name(staging.name + ".old")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


FIELD_FLAGS = {"spacing_mm": "--grid-spacing-mm", "search_radius_mm": "--field-search-radius-mm"}


def _check_inputs(job: BatchJob, fixed, followups: list) -> None:
    """Refuse, before any work, volumes that do not overlap (a series: or not of the baseline's kind) and a
    row whose memory estimate (:mod:`MedDIFTLib.core.budget`) exceeds the budget: the engine's batches for
    ``match``, the field's lattice for ``register`` and ``track`` (whose fixed image is the follow-up; a
    series: its largest pair)."""
    from ..lesions.series import check_series, series_estimate

    if len(followups) > 1:
        check_series(fixed, followups)
        estimate = series_estimate([fixed, *followups], job.series_options.route, job.field_options, FIELD_FLAGS)
    else:
        moving = followups[0]
        check_overlap(fixed, moving)
        if job.task == "match":
            estimate = estimate_match(fixed.geometry, moving.geometry, job.match_options.memory_budget_mb)
        else:
            first, second = (moving, fixed) if job.task == "track" else (fixed, moving)
            estimate = estimate_register(first.geometry, second.geometry, job.field_options, FIELD_FLAGS, job.task)
    check_memory(estimate, _budget())


def _budget() -> Budget | None:
    """The machine's budget, or this Dask worker's memory limit when lower."""
    budget = default_budget()
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    if limit and (budget is None or limit < budget.limit_bytes):
        return Budget(int(limit), "this Dask worker's memory limit (--memory-limit)")
    return budget


def run_row(row: Row, job: BatchJob, input_hash: str, fixed_features: VolumeFeatures,
            moving_features: list[VolumeFeatures], out: str) -> dict:
    """The Dask task of one row (``moving_features``: one per moving volume, :attr:`Row.followups`): run
    it, publish its folder, return its record (never raises for the row's own failure; the record says
    ``failed`` with the error and its kind)."""
    import torch

    from ..core.devices import out_of_memory_as_error, resolve_device
    from ..evaluation.runner import PeakMemory

    record = {"id": row.id, "task": job.task, "status": "failed", "error": "", "kind": "", "input_hash": input_hash,
              "worker": this_worker(), "fixed": row.fixed, "moving": row.moving_cell}
    staging = Path(out) / STAGING / f"{row.id}.{uuid.uuid4().hex[:12]}"
    try:
        device = resolve_device(job.recipe.device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with PeakMemory() as memory, out_of_memory_as_error(device):
            started = time.perf_counter()
            fixed, followups = read_volume(row.fixed), [read_volume(path) for path in row.followups]
            _check_inputs(job, fixed, followups)
            features = [fixed_features, *moving_features]
            found = [pyramid_for(shared, path, job.recipe) for shared, path in zip(features, [row.fixed,
                                                                                              *row.followups])]
            pyramids = [pyramid for pyramid, _ in found]
            staging.mkdir(parents=True)
            pair_started = time.perf_counter()
            if row.later_moving:
                details = _track_series(row, job, fixed, followups, pyramids, device, staging)
            else:
                points, predicted, details = TASK_FUNCTIONS[job.task](row, job, fixed, followups[0], *pyramids,
                                                                      device, staging)
                record.update(_tre(row, followups[0], points, predicted))
            seconds_pair = time.perf_counter() - pair_started
        recomputed = [seconds for _, seconds in found]
        record.update(details, status="ok", seconds_pair=seconds_pair, seconds_row=time.perf_counter() - started,
                      seconds_features=sum(shared.seconds for shared in features) + sum(recomputed),
                      features_recomputed=sum(seconds > 0 for seconds in recomputed), peak_rss_mb=memory.peak_mb,
                      peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)
        (staging / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        _publish(staging, Path(out) / row.id)
    except MedDIFTError as error:
        record.update(error=str(error), kind=error.kind)
    except Exception as error:  # one failing row is recorded; the others go on
        traceback.print_exc()
        record.update(error=f"{type(error).__name__}: {error}", kind="internal")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return record
