"""What a batch does to every row (:class:`BatchJob`), and the content hash that makes it resumable.

A row's hash covers the bytes of each of its input files (a DICOM folder: every file in it, by
name), the task, the options (:func:`~MedDIFTLib.core.options.to_json`), the backbone recipe
and the package version; the device is left out (it changes speed, not the answer). A row whose
output folder holds a finished record with the same hash is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.errors import BadInputError
from ..core.options import FieldOptions, LesionOptions, MatchOptions, SeriesOptions, to_json
from .manifest import Row

TASKS = ("match", "register", "track")
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FeatureRecipe:
    """How features are made: backbone name, its options (``weights_dir`` included) and the device."""

    backbone: str
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def featurizer(self):
        from ..features import create_featurizer

        return create_featurizer(self.backbone, **{**self.options, "device": self.device})


@dataclass(frozen=True)
class BatchJob:
    """The task (``match``, ``register`` or ``track``), its options, the backbone recipe and register's extra
    outputs. ``track`` reads ``field_options`` and ``lesion_options``, and ``series_options`` for a row
    with several follow-ups."""

    task: str
    recipe: FeatureRecipe
    match_options: MatchOptions = field(default_factory=MatchOptions)
    field_options: FieldOptions = field(default_factory=FieldOptions)
    lesion_options: LesionOptions = field(default_factory=LesionOptions)
    series_options: SeriesOptions = field(default_factory=SeriesOptions)
    write_inverse: bool = False
    write_warped: bool = False
    share_limit_bytes: int = 1 << 31

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BadInputError(f"unknown batch task {self.task!r}; choose one of: {', '.join(TASKS)}")

    def describe(self, series: bool = False) -> dict:
        """The settings that decide the outputs of a row, a ``series`` or a pair (what the row hash
        covers besides the inputs)."""
        if self.task == "match":
            options = to_json(self.match_options)
        elif self.task == "register":
            options = to_json(self.field_options)
        else:
            options = {"field": to_json(self.field_options), "lesions": to_json(self.lesion_options)}
            if series:
                options["series"] = to_json(self.series_options)
        extra = {"inverse": self.write_inverse, "warped": self.write_warped} if self.task == "register" else {}
        recipe = {"backbone": self.recipe.backbone, "options": self.recipe.options}
        return {"task": self.task, "options": options, "backbone": recipe, **extra, "meddift_version": __version__}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of every file of a folder (names and bytes, sorted by name)."""
    source = Path(path)
    digest = hashlib.sha256()
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        if not files:
            raise BadInputError(f"{source}: the folder is empty")
    elif source.is_file():
        files = [source]
    else:
        raise BadInputError(f"{source}: no such file or folder")
    for item in files:
        digest.update(str(item.relative_to(source)).encode() if item != source else b"")
        with item.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def row_hash(row: Row, job: BatchJob, digests: dict[str, str]) -> str:
    """The row's content hash; ``digests`` maps each input path to its :func:`file_digest`."""
    inputs = {column: digests[path] for column, path in row.input_paths().items()}
    text = json.dumps({"inputs": inputs, "job": job.describe(series=bool(row.later_moving))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
