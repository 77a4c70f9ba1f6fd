"""The batch's Dask task graph: one feature task per distinct volume, one task per row (a pair or a
series) fed by them.

Before anything runs, each row's inputs are hashed (:func:`~.job.row_hash`); a row whose folder
``OUT/<id>/row.json`` has that hash and status ``ok`` is done and kept. For the others, each distinct
volume (one baseline against its follow-ups, an atlas against many subjects, the scans of a series)
gets one feature task, keyed by its content and the backbone recipe, whose result feeds each row's
task that uses it (:mod:`.features`). A worker that dies takes its tasks with it; the scheduler
reruns them (and the feature tasks whose results were lost) on the others. Rows finish in any order;
``summary.csv`` is rewritten after each. An interrupted run cancels what has not started; once its
workers have stopped, :func:`discard_staging` deletes the unfinished rows' staging folders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..core.errors import BadInputError, MedDIFTError
from ..core.progress import ProgressFn, no_progress
from .features import volume_features
from .job import BatchJob, file_digest, row_hash
from .manifest import Row
from .rows import RECORD, STAGING, run_row
from .summary import write_summary


def discard_staging(out: str | Path) -> None:
    """Delete ``out/.staging``: the unfinished rows of an interrupted run (its workers stopped)."""
    shutil.rmtree(Path(out) / STAGING, ignore_errors=True)


def finished_record(out: Path, row: Row, input_hash: str) -> dict | None:
    """The record of ``row`` from an earlier run with the same hash, if its folder is complete."""
    try:
        record = json.loads((out / row.id / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("status") != "ok" or record.get("input_hash") != input_hash:
        return None
    if not all((out / row.id / name).is_file() for name in record.get("outputs", [])):
        return None
    return {**record, "status": "done"}


def _failed(row: Row, job: BatchJob, error: BaseException) -> dict:
    kind = error.kind if isinstance(error, MedDIFTError) else "internal"
    text = str(error) if isinstance(error, MedDIFTError) else f"{type(error).__name__}: {error}"
    return {"id": row.id, "task": job.task, "status": "failed", "error": text, "kind": kind,
            "fixed": row.fixed, "moving": row.moving_cell}


def run_batch(
    rows: list[Row],
    job: BatchJob,
    out: str | Path,
    client,
    progress: ProgressFn = no_progress,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every row of ``rows`` not already done on the Dask ``client``; return the records in manifest order.

    ``on_record`` is called with each row's record as it finishes (kept rows first). Interrupted, it
    writes the summary of what is finished (unfinished rows ``pending``) and re-raises.
    """
    from distributed import as_completed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    discard_staging(out)
    records: dict[str, dict] = {row.id: {"id": row.id, "task": job.task, "status": "pending", "fixed": row.fixed,
                                          "moving": row.moving_cell} for row in rows}
    digests: dict[str, str] = {}
    todo: list[tuple[Row, str]] = []
    for row in rows:
        if row.later_moving and job.task != "track":
            records[row.id] = _failed(row, job, BadInputError(
                f"row {row.id}: several moving volumes (a series) are for --task track only"))
            continue
        try:
            for path in row.input_paths().values():
                if path not in digests:
                    digests[path] = file_digest(path)
        except MedDIFTError as error:
            records[row.id] = _failed(row, job, error)
            continue
        input_hash = row_hash(row, job, digests)
        earlier = finished_record(out, row, input_hash)
        if earlier is not None:
            records[row.id] = earlier
        else:
            todo.append((row, input_hash))
    for record in records.values():
        if record["status"] != "pending" and on_record is not None:
            on_record(record)
    write_summary(out, list(records.values()))
    recipe_hash = hashlib.sha256(repr(job.recipe).encode()).hexdigest()[:12]
    feature_futures: dict[str, object] = {}

    def features_of(path: str):
        key = f"meddift-features-{digests[path][:16]}-{recipe_hash}"
        if key not in feature_futures:
            feature_futures[key] = client.submit(volume_features, path, key, job.recipe, job.share_limit_bytes,
                                                 key=key, pure=False)
        return feature_futures[key]

    futures = {}
    for row, input_hash in todo:
        future = client.submit(run_row, row, job, input_hash, features_of(row.fixed),
                               [features_of(path) for path in row.followups], str(out),
                               key=f"meddift-row-{row.id}-{input_hash[:12]}", pure=False)
        futures[future] = row
    feature_futures.clear()
    finished = len(rows) - len(todo)
    progress("rows", finished / len(rows), f"{finished}/{len(rows)} rows")
    try:
        for future in as_completed(futures):
            row = futures.pop(future)
            try:
                record = future.result()
            except Exception as error:  # a feature task's failure, or a task the engine gave up on (KilledWorker)
                record = _failed(row, job, error)
            records[row.id] = record
            write_summary(out, list(records.values()))
            finished += 1
            progress("rows", finished / len(rows), f"{finished}/{len(rows)} rows")
            if on_record is not None:
                on_record(record)
    except KeyboardInterrupt:
        client.cancel(list(futures))
        for row, input_hash in todo:
            published = finished_record(out, row, input_hash) if records[row.id]["status"] == "pending" else None
            if published is not None:
                records[row.id] = {**published, "status": "ok"}
        write_summary(out, list(records.values()))
        raise
    return list(records.values())
