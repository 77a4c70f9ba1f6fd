"""Lesion tracking over scene nodes, as worker steps like :class:`~.scene_run.SceneRun`'s (torch-free).

:func:`track_steps` checks its inputs at once, then: the baseline and follow-up volume nodes are
loaded into the worker (through the session's :class:`~.scene_run.WorkerFiles`, so unchanged nodes are
not sent again), the baseline lesions (a segmentation or markups node) are written as the
``--lesions`` file (:func:`~.lesion_nodes.write_baseline_lesions`), the worker's ``track`` request writes
the files of ``meddift track`` into the worker files' folder, and only then are the follow-up segmentation node
(filled in place when given: same segment IDs, names and colours; from the result's labelmap file) and the
lesion table node (from the result's lesions) filled.
A failed or cancelled run leaves both nodes as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import BadInputError
from ..core.options import LesionOptions, RunSettings
from ..worker.protocol.requests import TrackRequest
from ..worker.protocol.results import TrackResult
from .lesion_nodes import (
    LesionRow,
    LesionSegment,
    fill_followup_segmentation,
    fill_lesion_table,
    lesion_rows,
    write_baseline_lesions,
)
from .nodes import node_label, set_input_references
from .scene_run import Steps, WorkerFiles, request_settings


@dataclass
class TrackInputs:
    """Scene nodes of one tracking run: the two volumes, the baseline lesions (segmentation or
    markups node), and the follow-up segmentation and table nodes to fill (None: created)."""

    baseline_volume: Any
    followup_volume: Any
    baseline_lesions: Any
    followup_lesions: Any = None
    table: Any = None


@dataclass
class TrackOutputs:
    """What a run put into the scene: the follow-up segmentation and table nodes, one row per lesion
    (with its baseline segment), the worker's typed result (``summary``) and the job's files by key."""

    followup_lesions: Any = None
    table: Any = None
    rows: list[LesionRow] = field(default_factory=list)
    segments: list[LesionSegment] = field(default_factory=list)
    summary: TrackResult | None = None
    files: dict[str, str] = field(default_factory=dict)


def check_baseline_lesions(lesions) -> None:
    """Refuse baseline lesions that are neither a segmentation nor a markups node."""
    if lesions is None:
        raise BadInputError("choose the baseline lesions (a segmentation or markups node)")
    if not (lesions.IsA("vtkMRMLSegmentationNode") or lesions.IsA("vtkMRMLMarkupsNode")):
        raise BadInputError(f"the baseline lesions {node_label(lesions)} are neither a segmentation nor markups")


def check_table_node(node) -> None:
    """Refuse a node given as an output table that is not a table node (None: created)."""
    if node is not None and not node.IsA("vtkMRMLTableNode"):
        raise BadInputError(f"{node_label(node)} is not a table node")


def write_lesions_file(scene, lesions_node, baseline_volume, folder: WorkerFiles) -> tuple[Path, list[LesionSegment]]:
    """Write the baseline lesions as the job's ``--lesions`` file in ``folder`` (a labelmap for a
    segmentation, points for markups); the file's path and one segment per lesion."""
    is_points = lesions_node.IsA("vtkMRMLMarkupsNode")
    path = folder.new_path("lesions", ".mrk.json" if is_points else ".nii.gz")
    return path, write_baseline_lesions(scene, lesions_node, baseline_volume, path)


def _check(inputs: TrackInputs) -> None:
    if inputs.baseline_volume is None or inputs.followup_volume is None:
        raise BadInputError("choose the baseline (fixed) and follow-up (moving) volumes")
    if inputs.baseline_volume is inputs.followup_volume:
        raise BadInputError("the baseline and follow-up volumes must be two different nodes")
    check_baseline_lesions(inputs.baseline_lesions)
    lesions = inputs.baseline_lesions
    output = inputs.followup_lesions
    if output is not None and not output.IsA("vtkMRMLSegmentationNode"):
        raise BadInputError(f"the follow-up lesions {node_label(output)} are not a segmentation node")
    if output is not None and output is lesions:
        raise BadInputError("the follow-up segmentation must be another node than the baseline lesions")
    check_table_node(inputs.table)


def track_steps(
    scene, inputs: TrackInputs, settings: RunSettings, folder: WorkerFiles, options: LesionOptions | None = None
) -> Steps:
    """Check ``inputs`` now (raising :class:`BadInputError`), then return the run's steps; drive them
    with :func:`~.session.run_blocking` or a session. ``settings.field`` is the registration."""
    if not isinstance(settings, RunSettings):
        raise BadInputError(f"run settings must be a RunSettings, got {type(settings).__name__}")
    _check(inputs)
    return _track(scene, inputs, settings, folder, options or LesionOptions())


def _track(scene, inputs: TrackInputs, settings: RunSettings, folder: WorkerFiles, options: LesionOptions) -> Steps:
    baseline_id = yield from folder.volume_id(inputs.baseline_volume)
    followup_id = yield from folder.volume_id(inputs.followup_volume)
    lesions_path, segments = write_lesions_file(scene, inputs.baseline_lesions, inputs.baseline_volume, folder)
    out_dir = folder.new_path("track", "")
    summary = yield TrackRequest(
        baseline_id=baseline_id,
        followup_id=followup_id,
        lesions=str(lesions_path),
        out_dir=str(out_dir),
        lesion_options=options,
        settings=request_settings(settings, field=settings.field),
    )
    rows = lesion_rows(summary.lesions, segments)
    followup_name = inputs.followup_volume.GetName() or "follow-up"
    followup_lesions = fill_followup_segmentation(
        scene,
        summary.files["labelmap"],
        segments,
        inputs.followup_lesions,
        inputs.followup_volume,
        name=f"{inputs.baseline_lesions.GetName()} in {followup_name}",
    )
    set_input_references(followup_lesions, inputs.baseline_volume, inputs.followup_volume)
    table = fill_lesion_table(scene, rows, inputs.table, name=f"Lesions {followup_name}")
    lesions_path.unlink(missing_ok=True)
    return TrackOutputs(followup_lesions, table, rows, segments, summary, summary.output_files)
