"""Labelled point sets in LPS mm, read from and written to the formats users have.

Formats (chosen by extension):
- ``.mrk.json`` Slicer markups: read ``coordinateSystem`` LPS or RAS (default LPS), write LPS.
- ``.fcsv`` Slicer fiducial CSV: read ``CoordinateSystem`` LPS/RAS (0 = RAS, 1 = LPS; default RAS
  as in files older than Slicer 4.11), write LPS.
- ``.csv`` with a header: world columns ``l,p,s`` or ``r,a,s`` (mm), or voxel columns ``x,y,z``
  (0-based continuous ``ijk``, needs the volume geometry); optional ``label`` column.
- ``.txt`` DIR-Lab landmarks: three 1-based voxel indices per line, no header; needs the geometry.
Labels survive every round trip; points without a label get their 1-based row number.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from ..geometry import Geometry
from .atomic import atomic_output

RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
    "Schema/markups-schema-v1.0.3.json#"
)
UNRELIABLE_TAG = "UNRELIABLE"


@dataclass
class PointSet:
    """Points (N, 3) in LPS mm with one label each.

    ``descriptions`` is free text per point; ``unreliable`` flags matches below the confidence
    threshold (kept, never dropped); ``attributes`` holds named per-point numbers written as
    extra CSV columns (e.g. ``confidence``); ``notes`` says what a reader skipped (e.g. an
    unplaced markup), for the user.
    """

    points_lps_mm: np.ndarray
    labels: list[str]
    descriptions: list[str] = field(default_factory=list)
    unreliable: np.ndarray | None = None
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.points_lps_mm = np.asarray(self.points_lps_mm, float).reshape(-1, 3)
        count = len(self.points_lps_mm)
        self.labels = [str(label) for label in self.labels]
        if len(self.labels) != count:
            raise ValueError(f"{len(self.labels)} labels for {count} points")
        if not self.descriptions:
            self.descriptions = [""] * count
        if self.unreliable is None:
            self.unreliable = np.zeros(count, bool)

    def __len__(self) -> int:
        return len(self.points_lps_mm)


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".mrk.json" if name.endswith(".mrk.json") else path.suffix.lower()


def _default_labels(count: int) -> list[str]:
    return [str(n + 1) for n in range(count)]


def _require_points(points: PointSet, source: Path) -> PointSet:
    if len(points) == 0:
        raise BadInputError(f"{source}: the file holds no points")
    if not np.isfinite(points.points_lps_mm).all():
        raise BadInputError(f"{source}: some point coordinates are not finite numbers")
    seen: set[str] = set()
    repeated = sorted({label for label in points.labels if label in seen or seen.add(label)})
    if repeated:
        shown = ", ".join(repeated[:5]) + (" ..." if len(repeated) > 5 else "")
        raise BadInputError(
            f"{source}: labels must be unique, since they pair each input point with its output; repeated: {shown}"
        )
    return points


UNPLACED_STATUSES = ("undefined", "missing", "preview")


def _read_markups_json(source: Path) -> PointSet:
    try:
        document = json.loads(source.read_text(encoding="utf-8-sig"))
        markups = document["markups"]
        markup = markups[0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
        raise BadInputError(f"{source}: not a Slicer markups file ({error})") from None
    if len(markups) > 1:
        names = ", ".join(repr(str(m.get("name", n + 1))) for n, m in enumerate(markups) if isinstance(m, dict))
        raise BadInputError(f"{source}: holds {len(markups)} markup lists ({names}); save one list per file")
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise BadInputError(f"{source}: unknown coordinateSystem {system!r}")
    control_points, notes = [], []
    for n, point in enumerate(markup.get("controlPoints", [])):
        label = point.get("label") or str(n + 1)
        if "position" not in point or str(point.get("positionStatus", "defined")).lower() in UNPLACED_STATUSES:
            notes.append(f"skipped point {label!r}: not placed (positionStatus {point.get('positionStatus')!r})")
            continue
        control_points.append((label, point))
    positions = np.array([p["position"] for _, p in control_points], float).reshape(-1, 3)
    if system == "RAS":
        positions = positions * RAS_FROM_LPS
    labels = [label for label, _ in control_points]
    descriptions = [p.get("description", "") for _, p in control_points]
    return PointSet(positions, labels, descriptions, notes=notes)


def _read_fcsv(source: Path) -> PointSet:
    system = "RAS"
    rows = []
    for line in source.read_text(encoding="utf-8-sig").splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                value = value.strip().upper()
                system = {"0": "RAS", "1": "LPS"}.get(value, value)
            continue
        if line.strip():
            rows.append(line)
    if system not in ("LPS", "RAS"):
        raise BadInputError(f"{source}: unknown CoordinateSystem {system!r}")
    positions, labels, descriptions = [], [], []
    for n, row in enumerate(csv.reader(rows)):
        try:
            positions.append([float(v) for v in row[1:4]])
        except (ValueError, IndexError):
            raise BadInputError(f"{source}: line {n + 1} has no x,y,z numbers") from None
        labels.append(row[11] if len(row) > 11 and row[11] else str(n + 1))
        descriptions.append(row[12] if len(row) > 12 else "")
    points = np.array(positions, float).reshape(-1, 3)
    if system == "RAS":
        points = points * RAS_FROM_LPS
    return PointSet(points, labels, descriptions)


CSV_LAYOUTS = {("l", "p", "s"): "lps", ("r", "a", "s"): "ras", ("x", "y", "z"): "voxel"}


def _csv_columns(source: Path, rows: list[dict], columns: dict[str, str], names: tuple[str, ...]) -> np.ndarray:
    try:
        return np.array([[float(row[columns[name]]) for name in names] for row in rows], float).reshape(-1, 3)
    except (TypeError, ValueError):
        raise BadInputError(f"{source}: non-numeric coordinate in columns {','.join(names)}") from None


def _voxel_points(source: Path, ijk: np.ndarray, geometry: Geometry | None) -> np.ndarray:
    if geometry is None:
        raise BadInputError(f"{source}: voxel columns x,y,z need the volume they index")
    upper = np.asarray(geometry.shape_ijk) - 0.5
    outside = int(np.sum(np.any((ijk < -0.5) | (ijk > upper), axis=1)))
    if outside:
        raise BadInputError(
            f"{source}: {outside} of {len(ijk)} points in columns x,y,z lie outside the volume's voxel grid "
            f"{'x'.join(map(str, geometry.shape_ijk))}; x,y,z are 0-based voxel indices - for millimetres "
            "name the columns l,p,s (LPS) or r,a,s (RAS)"
        )
    return geometry.ijk_to_lps(ijk)


def _read_csv(source: Path, geometry: Geometry | None) -> PointSet:
    with source.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise BadInputError(f"{source}: empty CSV file")
        columns = {name.strip().lower(): name for name in reader.fieldnames}
        rows = list(reader)
    present = [names for names in CSV_LAYOUTS if all(name in columns for name in names)]
    if not present:
        raise BadInputError(
            f"{source}: CSV header needs columns l,p,s or r,a,s (mm) or x,y,z (voxel); got {reader.fieldnames}"
        )
    world = [names for names in present if CSV_LAYOUTS[names] != "voxel"]
    if len(world) > 1:
        raise BadInputError(f"{source}: give either l,p,s or r,a,s columns, not both")
    if world:
        values = _csv_columns(source, rows, columns, world[0])
        points = values * RAS_FROM_LPS if CSV_LAYOUTS[world[0]] == "ras" else values
        if ("x", "y", "z") in present and geometry is not None:
            from_voxels = geometry.ijk_to_lps(_csv_columns(source, rows, columns, ("x", "y", "z")))
            disagree = np.linalg.norm(from_voxels - points, axis=1) > 0.01 + 1e-3 * np.abs(points).max(axis=1)
            if disagree.any():
                raise BadInputError(
                    f"{source}: columns x,y,z (voxel indices) and {','.join(world[0])} (mm) disagree on "
                    f"{int(disagree.sum())} of {len(points)} points; keep one set of columns"
                )
    else:
        points = _voxel_points(source, _csv_columns(source, rows, columns, ("x", "y", "z")), geometry)
    label_column = columns.get("label")
    labels = [row[label_column] for row in rows] if label_column else _default_labels(len(rows))
    description_column = columns.get("description")
    descriptions = [row[description_column] or "" for row in rows] if description_column else []
    return PointSet(points, labels, descriptions)


def read_dirlab_points(path: str | os.PathLike, geometry: Geometry, index_base: int = 1) -> PointSet:
    """DIR-Lab landmarks: whitespace-separated voxel indices (1-based in the published files).

    ``geometry`` places the indices in the world: for a bare DIR-Lab case use
    ``Geometry.create(dims, spacing)`` (origin 0, identity direction), where distances are
    index x spacing as the DIR-Lab protocol defines them.
    """
    source = Path(path)
    if not source.is_file():
        raise BadInputError(f"{source}: no such file")
    rows = []
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append([float(v) for v in line.replace(",", " ").split()[:3]])
        except ValueError:
            raise BadInputError(f"{source}: line {n + 1} is not three voxel indices") from None
        if len(rows[-1]) != 3:
            raise BadInputError(f"{source}: line {n + 1} is not three voxel indices")
    ijk = np.array(rows, float).reshape(-1, 3) - index_base
    points = PointSet(geometry.ijk_to_lps(ijk), _default_labels(len(ijk)))
    return _require_points(points, source)


def read_points(path: str | os.PathLike, geometry: Geometry | None = None) -> PointSet:
    """Read a point file (format by extension) into LPS mm; ``geometry`` for voxel formats."""
    source = Path(path)
    if not source.is_file():
        raise BadInputError(f"{source}: no such file")
    extension = _extension(source)
    if extension == ".txt":
        if geometry is None:
            raise BadInputError(f"{source}: DIR-Lab voxel landmarks need the volume they index")
        return read_dirlab_points(source, geometry)
    readers = {".mrk.json": _read_markups_json, ".json": _read_markups_json, ".fcsv": _read_fcsv}
    try:
        if extension == ".csv":
            points = _read_csv(source, geometry)
        elif extension in readers:
            points = readers[extension](source)
        else:
            raise BadInputError(f"{source}: unknown point format (use .mrk.json, .fcsv, .csv or DIR-Lab .txt)")
    except UnicodeDecodeError:
        raise BadInputError(f"{source}: not a text point file") from None
    return _require_points(points, source)


def _markups_document(points: PointSet) -> dict:
    control_points = []
    for n, (label, position) in enumerate(zip(points.labels, points.points_lps_mm)):
        control_points.append(
            {
                "id": str(n + 1),
                "label": label,
                "description": points.descriptions[n],
                "associatedNodeID": "",
                "position": [float(v) for v in position],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": not bool(points.unreliable[n]),
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        )
    return {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control_points),
                "controlPoints": control_points,
                "measurements": [],
            }
        ],
    }


def _write_fcsv(points: PointSet, handle) -> None:
    handle.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n")
    handle.write("# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
    writer = csv.writer(handle, lineterminator="\n")
    for n, (label, position) in enumerate(zip(points.labels, points.points_lps_mm)):
        selected = 0 if points.unreliable[n] else 1
        writer.writerow([n + 1, *[f"{v:.6f}" for v in position], 0, 0, 0, 1, 1, selected, 0, label,
                         points.descriptions[n], ""])


def _write_csv(points: PointSet, handle) -> None:
    writer = csv.writer(handle, lineterminator="\n")
    names = list(points.attributes)
    writer.writerow(["label", "l", "p", "s", *names, "reliable", "description"])
    for n, (label, position) in enumerate(zip(points.labels, points.points_lps_mm)):
        extra = [f"{float(points.attributes[name][n]):.6g}" for name in names]
        writer.writerow([label, *[f"{v:.6f}" for v in position], *extra,
                         int(not points.unreliable[n]), points.descriptions[n]])


def write_points(points: PointSet, path: str | os.PathLike) -> None:
    """Write ``points`` atomically in LPS; the format follows the extension."""
    target = Path(path)
    extension = _extension(target)
    if extension not in (".mrk.json", ".json", ".fcsv", ".csv"):
        raise BadInputError(f"{target}: unknown point format (use .mrk.json, .fcsv or .csv)")
    with atomic_output(target) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        if extension in (".mrk.json", ".json"):
            json.dump(_markups_document(points), handle, indent=2)
        elif extension == ".fcsv":
            _write_fcsv(points, handle)
        else:
            _write_csv(points, handle)
