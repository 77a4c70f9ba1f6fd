"""What an evaluation runs on: cases described by paths, loaded cases, datasets, and the file
helpers that find them (LPS mm throughout)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.points import PointSet
from ..core.io.volumes import Volume

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
POINT_SUFFIXES = (".mrk.json", ".fcsv", ".csv")
SEARCH_DEPTH = 4


@dataclass(frozen=True)
class RawGeometry:
    """Published geometry of a headerless volume: sizes along i, j, k and spacing in mm."""

    shape_ijk: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    published_initial_mm: float | None = None

    def geometry(self) -> Geometry:
        return Geometry.create(self.shape_ijk, self.spacing_mm)


@dataclass(frozen=True)
class Case:
    """One image pair with corresponding points, described by paths (nothing is read yet).

    ``points_format``: ``auto`` (:func:`read_points`), ``dirlab`` (1-based voxel txt) or ``voxel_csv``
    (0-based voxel CSV without header, Learn2Reg). ``raw_geometry`` is set for headerless volumes.
    ``problem`` records why discovery could not complete the case; loading then raises it.
    """

    name: str
    layout: str
    fixed_image: str
    moving_image: str
    fixed_points: str
    moving_points: str
    points_format: str = "auto"
    raw_geometry: RawGeometry | None = None
    fixed_mask: str | None = None
    problem: str | None = None

    @property
    def published_initial_mm(self) -> float | None:
        return None if self.raw_geometry is None else self.raw_geometry.published_initial_mm

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> Case:
        values = dict(values)
        raw = values.get("raw_geometry")
        if raw is not None:
            values["raw_geometry"] = RawGeometry(tuple(raw["shape_ijk"]), tuple(raw["spacing_mm"]),
                                                 raw.get("published_initial_mm"))
        return Case(**values)


@dataclass
class CaseData:
    """A loaded case: volumes (None when only points were asked for), paired points (same labels), LPS mm."""

    case: Case
    fixed_geometry: Geometry
    moving_geometry: Geometry
    fixed_points: PointSet
    moving_points: PointSet
    fixed: Volume | None = None
    moving: Volume | None = None
    fixed_mask: Volume | None = None


@dataclass
class Dataset:
    """Cases found under ``root`` in one layout."""

    root: Path
    layout: str
    cases: list[Case] = field(default_factory=list)

    def select(self, names: list[str] | None) -> Dataset:
        """Only the cases named in ``names`` (all when None); unknown names are an error."""
        if not names:
            return self
        known = {case.name for case in self.cases}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise BadInputError(f"{self.root}: no case named {', '.join(unknown)}; cases: {', '.join(sorted(known))}")
        return Dataset(self.root, self.layout, [case for case in self.cases if case.name in names])


def is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def file_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES + POINT_SUFFIXES + (".img", ".txt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def walk_files(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Files under ``root`` down to ``depth`` folder levels, sorted (hidden entries skipped)."""
    found: list[Path] = []
    for current, folders, files in os.walk(root):
        level = len(Path(current).relative_to(root).parts)
        folders[:] = sorted(f for f in folders if not f.startswith(".")) if level < depth else []
        found.extend(Path(current) / name for name in files if not name.startswith("."))
    return sorted(found)
