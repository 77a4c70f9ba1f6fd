"""Evaluation datasets: find the image pairs and their corresponding points in a user's folder.

Layouts (see :func:`open_dataset`; ``detect_layout`` picks one from what is on disk):

- ``dirlab``: DIR-Lab 4DCT cases 1-10 as downloaded (``Case1Pack/Images/case1_T00_s.img``,
  ``Case1Pack/ExtremePhases/Case1_300_T00_xyz.txt``, ``Case8Deploy/.../case8_dirLab300_T50_xyz.txt``, ...):
  headerless little-endian int16 volumes whose size and spacing come from the published per-case
  table below; 300 landmarks per phase as 1-based voxel indices. Fixed = T00 (inhale), moving = T50.
- ``copdgene``: DIR-Lab COPDgene cases (``copd1/copd1_iBHCT.img``, ``copd1_300_iBH_xyz_r1.txt``, ...):
  the same raw format; fixed = iBH (inspiration), moving = eBH (expiration).
- ``learn2reg``: a Learn2Reg task folder: ``dataset.json`` (or ``<Task>_dataset.json``) listing the
  pairs, ``imagesTr``, keypoints in ``keypoints*Tr`` (CSV without header, 0-based voxel ``ijk`` of
  their image), optional masks in ``masks*Tr``.
- ``manifest``: a CSV file with columns ``fixed,moving,fixed_points,moving_points`` (optional
  ``case``, ``fixed_mask``), paths relative to the manifest; point files in any format of
  :func:`MedDIFTLib.core.io.read_points` (voxel formats use the geometry of their own image).

World coordinates are LPS mm. A bare raw DIR-Lab volume has origin 0 and identity direction, so
the TRE is index difference times spacing, as the DIR-Lab protocol defines it. Raw volumes
stored as HU + 1024 (no voxel below 0) are shifted to HU.

Discovery never reads images. A case whose files are missing or inconsistent is still listed;
loading it raises :class:`BadInputError` naming the file, so one bad case never stops the others.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.points import PointSet, read_dirlab_points, read_points
from ..core.io.volumes import Volume, read_volume

LAYOUTS = ("dirlab", "copdgene", "learn2reg", "manifest")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
POINT_SUFFIXES = (".mrk.json", ".fcsv", ".csv")
RAW_HU_OFFSET = 1024.0
MANIFEST_COLUMNS = ("fixed", "moving", "fixed_points", "moving_points")
SEARCH_DEPTH = 4


@dataclass(frozen=True)
class RawGeometry:
    """Published geometry of a headerless volume: sizes along i, j, k and spacing in mm."""

    shape_ijk: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    published_initial_mm: float | None = None

    def geometry(self) -> Geometry:
        return Geometry.create(self.shape_ijk, self.spacing_mm)


# DIR-Lab 4DCT (Castillo et al., PMB 2009): dims, spacing and mean initial landmark distance (T00-T50), as
# published on the DIR-Lab site; ../shared/data/dirlab4dct_landmarks reproduces all ten initial distances.
DIRLAB_4DCT: dict[int, RawGeometry] = {
    1: RawGeometry((256, 256, 94), (0.97, 0.97, 2.5), 3.89),
    2: RawGeometry((256, 256, 112), (1.16, 1.16, 2.5), 4.34),
    3: RawGeometry((256, 256, 104), (1.15, 1.15, 2.5), 6.94),
    4: RawGeometry((256, 256, 99), (1.13, 1.13, 2.5), 9.83),
    5: RawGeometry((256, 256, 106), (1.10, 1.10, 2.5), 7.48),
    6: RawGeometry((512, 512, 128), (0.97, 0.97, 2.5), 10.89),
    7: RawGeometry((512, 512, 136), (0.97, 0.97, 2.5), 11.03),
    8: RawGeometry((512, 512, 128), (0.97, 0.97, 2.5), 14.99),
    9: RawGeometry((512, 512, 128), (0.97, 0.97, 2.5), 7.92),
    10: RawGeometry((512, 512, 120), (0.97, 0.97, 2.5), 7.30),
}

# DIR-Lab COPDgene (Castillo et al., PMB 2013): dims and spacing as listed by several independent public
# code bases that read the raw files (one lists 0.644 mm for copd9; most list 0.664). The initial distances
# could not be checked offline, so none are given.
DIRLAB_COPDGENE: dict[int, RawGeometry] = {
    1: RawGeometry((512, 512, 121), (0.625, 0.625, 2.5)),
    2: RawGeometry((512, 512, 102), (0.645, 0.645, 2.5)),
    3: RawGeometry((512, 512, 126), (0.652, 0.652, 2.5)),
    4: RawGeometry((512, 512, 126), (0.590, 0.590, 2.5)),
    5: RawGeometry((512, 512, 131), (0.647, 0.647, 2.5)),
    6: RawGeometry((512, 512, 119), (0.633, 0.633, 2.5)),
    7: RawGeometry((512, 512, 112), (0.625, 0.625, 2.5)),
    8: RawGeometry((512, 512, 115), (0.586, 0.586, 2.5)),
    9: RawGeometry((512, 512, 116), (0.664, 0.664, 2.5)),
    10: RawGeometry((512, 512, 135), (0.742, 0.742, 2.5)),
}


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


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES + POINT_SUFFIXES + (".img", ".txt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _walk(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Files under ``root`` down to ``depth`` folder levels, sorted (hidden entries skipped)."""
    found: list[Path] = []
    for current, folders, files in os.walk(root):
        level = len(Path(current).relative_to(root).parts)
        folders[:] = sorted(f for f in folders if not f.startswith(".")) if level < depth else []
        found.extend(Path(current) / name for name in files if not name.startswith("."))
    return sorted(found)


def _learn2reg_json(root: Path) -> Path | None:
    candidates = sorted(root.glob("*dataset.json"))
    return candidates[0] if candidates else None


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of ``path`` (one of :data:`LAYOUTS`); an unknown layout is a :class:`BadInputError`."""
    source = Path(path)
    if not source.exists():
        raise BadInputError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return "manifest"
        raise BadInputError(f"{source}: a dataset file must be a CSV manifest ({','.join(MANIFEST_COLUMNS)})")
    if _learn2reg_json(source) is not None:
        return "learn2reg"
    names = [p.name.lower() for p in _walk(source)]
    if any(re.search(r"copd\d+_[ie]bhct\.img$", n) for n in names):
        return "copdgene"
    if any(re.search(r"case\d+_t(00|50).*\.img$", n) for n in names):
        return "dirlab"
    if (source / "manifest.csv").is_file():
        return "manifest"
    raise BadInputError(
        f"{source}: unknown dataset layout; expected a DIR-Lab 4DCT folder (caseN_T00*.img + landmark txt), a "
        "COPDgene folder (copdN_iBHCT.img + copdN_300_iBH_xyz_r1.txt), a Learn2Reg folder (dataset.json, imagesTr, "
        "keypointsTr) or a CSV manifest (fixed,moving,fixed_points,moving_points)"
    )


def open_dataset(path: str | os.PathLike, layout: str = "auto", split: str = "val") -> Dataset:
    """Find the cases of the dataset at ``path``. ``split`` (Learn2Reg only): ``val``, ``train``, ``test``
    or ``all`` pairs of ``dataset.json``."""
    source = Path(path)
    if layout == "auto":
        layout = detect_layout(source)
    elif layout not in LAYOUTS:
        raise BadInputError(f"unknown dataset layout {layout!r}; choose auto or one of: {', '.join(LAYOUTS)}")
    if not source.exists():
        raise BadInputError(f"{source}: no such file or folder")
    if layout == "manifest":
        manifest = source / "manifest.csv" if source.is_dir() else source
        cases = _manifest_cases(manifest)
    elif layout == "learn2reg":
        cases = _learn2reg_cases(source, split)
    else:
        cases = _dirlab_cases(source, layout)
    if not cases:
        raise BadInputError(f"{source}: no cases found for layout {layout}")
    return Dataset(source, layout, cases)


def _dirlab_cases(root: Path, layout: str) -> list[Case]:
    """DIR-Lab 4DCT or COPDgene cases: files grouped by the case number in their names."""
    if layout == "dirlab":
        table, prefix, phases = DIRLAB_4DCT, "case", ("t00", "t50")
        image_pattern = re.compile(r"case(\d+)_(t00|t50)(_s|-ssm)?\.img$")
        points_pattern = re.compile(r"case(\d+)_(?:300|dirlab300)_(t00|t50)_xyz\.txt$")
    else:
        table, prefix, phases = DIRLAB_COPDGENE, "copd", ("ibh", "ebh")
        image_pattern = re.compile(r"copd(\d+)_(ibh|ebh)ct\.img$")
        points_pattern = re.compile(r"copd(\d+)_300_(ibh|ebh)_xyz_r\d+\.txt$")
    found: dict[int, dict[str, Path]] = {}
    for path in _walk(root):
        name = path.name.lower()
        for kind, pattern in (("image", image_pattern), ("points", points_pattern)):
            match = pattern.search(name)
            if match:
                found.setdefault(int(match.group(1)), {}).setdefault(f"{kind}_{match.group(2)}", path)
    cases = []
    for number in sorted(found):
        files = found[number]
        name = f"{prefix}{number}"
        problem = None
        wanted = [f"{kind}_{phase}" for phase in phases for kind in ("image", "points")]
        missing = [key for key in wanted if key not in files]
        if number not in table:
            problem = f"{name}: no published geometry for this case number (known: {', '.join(map(str, table))})"
        elif missing:
            problem = f"{root}: {name} has no " + ", ".join(_describe_missing(key, layout) for key in missing)
        paths = {key: str(files.get(key, root / f"<missing {key}>")) for key in wanted}
        fixed_phase, moving_phase = phases
        cases.append(
            Case(
                name=name,
                layout=layout,
                fixed_image=paths[f"image_{fixed_phase}"],
                moving_image=paths[f"image_{moving_phase}"],
                fixed_points=paths[f"points_{fixed_phase}"],
                moving_points=paths[f"points_{moving_phase}"],
                points_format="dirlab",
                raw_geometry=table.get(number),
                problem=problem,
            )
        )
    return cases


def _describe_missing(key: str, layout: str) -> str:
    kind, phase = key.split("_")
    phase = phase.upper() if layout == "dirlab" else phase[0] + phase[1:].upper()
    return f"{phase} {'image (.img)' if kind == 'image' else 'landmark file (.txt)'}"


def _learn2reg_cases(root: Path, split: str) -> list[Case]:
    description = _learn2reg_json(root)
    try:
        document = json.loads(description.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError(f"{description}: not a readable Learn2Reg dataset.json ({error})") from None
    keys = {"val": ["registration_val"], "train": ["training_paired_images"], "test": ["registration_test"]}
    keys["all"] = keys["train"] + keys["val"] + keys["test"]
    if split not in keys:
        raise BadInputError(f"unknown Learn2Reg split {split!r}; choose one of: {', '.join(keys)}")
    pairs = []
    for key in keys[split]:
        entries = document.get(key) or []
        if not isinstance(entries, list):
            raise BadInputError(f"{description}: {key!r} is not a list of fixed/moving pairs")
        pairs.extend(entries)
    if not pairs:
        raise BadInputError(f"{description}: no {split} pairs (looked for {', '.join(keys[split])})")
    point_folders = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"(keypoints|landmarks)", p.name, re.I))
    mask_folders = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"masks", p.name, re.I))
    cases = []
    for number, pair in enumerate(pairs):
        if not isinstance(pair, dict) or "fixed" not in pair or "moving" not in pair:
            raise BadInputError(f"{description}: pair {number + 1} of the {split} split has no fixed/moving entries")
        fixed, moving = root / pair["fixed"], root / pair["moving"]
        fixed_stem, moving_stem = _stem(fixed), _stem(moving)
        problem = next((f"{p}: no such image (listed in {description.name})" for p in (fixed, moving)
                        if not p.is_file()), None)
        folder = next((f for f in point_folders if (f / f"{fixed_stem}.csv").is_file()
                       and (f / f"{moving_stem}.csv").is_file()), None)
        if folder is None and problem is None:
            looked = ", ".join(f.name for f in point_folders) or "no keypoints*/landmarks* folder"
            problem = f"{root}: no keypoint files {fixed_stem}.csv and {moving_stem}.csv in one folder ({looked})"
        point_folder = folder or root / "keypointsTr"
        mask = next((f / f"{fixed_stem}.nii.gz" for f in mask_folders if (f / f"{fixed_stem}.nii.gz").is_file()), None)
        cases.append(
            Case(
                name=_pair_name(fixed_stem, moving_stem),
                layout="learn2reg",
                fixed_image=str(fixed),
                moving_image=str(moving),
                fixed_points=str(point_folder / f"{fixed_stem}.csv"),
                moving_points=str(point_folder / f"{moving_stem}.csv"),
                points_format="voxel_csv",
                fixed_mask=None if mask is None else str(mask),
                problem=problem,
            )
        )
    return cases


def _pair_name(fixed_stem: str, moving_stem: str) -> str:
    """``NLST_0101_0000`` and ``NLST_0101_0001`` -> ``NLST_0101_0000-0001``."""
    fixed_prefix, _, fixed_tail = fixed_stem.rpartition("_")
    moving_prefix, _, moving_tail = moving_stem.rpartition("_")
    if fixed_prefix and fixed_prefix == moving_prefix:
        return f"{fixed_prefix}_{fixed_tail}-{moving_tail}"
    return f"{fixed_stem}-{moving_stem}"


def _manifest_cases(manifest: Path) -> list[Case]:
    if not manifest.is_file():
        raise BadInputError(f"{manifest}: no such manifest file")
    try:
        with manifest.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadInputError(f"{manifest}: not a readable CSV manifest ({error})") from None
    missing = [name for name in MANIFEST_COLUMNS if name not in header]
    if missing:
        raise BadInputError(f"{manifest}: manifest lacks column(s) {', '.join(missing)}; "
                            f"it needs {','.join(MANIFEST_COLUMNS)} (optional case, fixed_mask)")
    base = manifest.parent
    cases, names = [], set()
    for number, row in enumerate(rows, start=2):
        empty = [name for name in MANIFEST_COLUMNS if not row.get(name)]
        name = row.get("case") or f"case{number - 1}"
        if name in names:
            raise BadInputError(f"{manifest}: line {number}: case name {name!r} is used twice")
        names.add(name)
        paths = {column: str(base / row[column]) if row.get(column) else "" for column in MANIFEST_COLUMNS}
        problem = f"{manifest}: line {number} has no {', '.join(empty)}" if empty else None
        cases.append(
            Case(
                name=name,
                layout="manifest",
                fixed_image=paths["fixed"],
                moving_image=paths["moving"],
                fixed_points=paths["fixed_points"],
                moving_points=paths["moving_points"],
                fixed_mask=str(base / row["fixed_mask"]) if row.get("fixed_mask") else None,
                problem=problem,
            )
        )
    return cases


def read_raw_volume(path: str | os.PathLike, raw: RawGeometry) -> Volume:
    """A headerless little-endian int16 volume (DIR-Lab layout: i fastest) on its published grid, in HU."""
    source = Path(path)
    if not source.is_file():
        raise BadInputError(f"{source}: no such file")
    expected = int(np.prod(raw.shape_ijk)) * 2
    actual = source.stat().st_size
    if actual != expected:
        dims = "x".join(map(str, raw.shape_ijk))
        raise BadInputError(f"{source}: {actual} bytes, but the published {dims} int16 volume has {expected}")
    voxels = np.fromfile(source, dtype="<i2").reshape(raw.shape_ijk[::-1]).astype(np.float32)
    if voxels.min() >= 0:
        voxels -= RAW_HU_OFFSET
    return Volume(voxels, raw.geometry(), name=source.name)


def read_image_geometry(path: str | os.PathLike) -> Geometry:
    """The grid of an image file or DICOM folder without reading its voxels."""
    import SimpleITK as sitk

    source = Path(path)
    if not source.exists():
        raise BadInputError(f"{source}: no such file or folder")
    if source.is_dir():
        return read_volume(source).geometry
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unknown error"
        raise BadInputError(f"{source}: cannot read as an image ({first_line})") from None
    if reader.GetDimension() != 3:
        raise BadInputError(f"{source}: expected a 3D volume, got a {reader.GetDimension()}D image")
    return Geometry.create(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def read_voxel_csv(path: str | os.PathLike, geometry: Geometry) -> PointSet:
    """Learn2Reg keypoints: CSV rows of 0-based voxel ``i,j,k`` of ``geometry`` (an ``x,y,z`` header is allowed)."""
    source = Path(path)
    if not source.is_file():
        raise BadInputError(f"{source}: no such file")
    rows = []
    try:
        lines = source.read_text().splitlines()
    except UnicodeDecodeError:
        raise BadInputError(f"{source}: not a text keypoint file") from None
    for number, line in enumerate(lines, start=1):
        values = [v for v in re.split(r"[,\s;]+", line.strip()) if v]
        if not values:
            continue
        try:
            rows.append([float(v) for v in values[:3]])
        except ValueError:
            if rows or number > 1:
                raise BadInputError(f"{source}: line {number} is not three voxel coordinates") from None
            continue
        if len(rows[-1]) != 3:
            raise BadInputError(f"{source}: line {number} is not three voxel coordinates")
    if not rows:
        raise BadInputError(f"{source}: the file holds no points")
    ijk = np.asarray(rows, float)
    return PointSet(geometry.ijk_to_lps(ijk), [str(n + 1) for n in range(len(ijk))])


def _read_case_points(case: Case, path: str, geometry: Geometry) -> PointSet:
    if case.points_format == "dirlab":
        return read_dirlab_points(path, geometry, index_base=1)
    if case.points_format == "voxel_csv":
        return read_voxel_csv(path, geometry)
    return read_points(path, geometry)


def pair_points(fixed: PointSet, moving: PointSet, fixed_source: str, moving_source: str) -> PointSet:
    """``moving`` reordered to pair with ``fixed``: by label when both carry the same labels, else by row.

    Different counts are a :class:`BadInputError` naming both files.
    """
    if len(fixed) != len(moving):
        raise BadInputError(
            f"{moving_source}: {len(moving)} points, but {fixed_source} has {len(fixed)}; corresponding point "
            "files need one point per row each"
        )
    if fixed.labels != moving.labels and sorted(fixed.labels) == sorted(moving.labels) \
            and len(set(fixed.labels)) == len(fixed.labels):
        order = {label: n for n, label in enumerate(moving.labels)}
        index = [order[label] for label in fixed.labels]
        return PointSet(moving.points_lps_mm[index], list(fixed.labels))
    return PointSet(moving.points_lps_mm, list(fixed.labels))


def load_case(case: Case, images: bool = True) -> CaseData:
    """Read a case: points in LPS mm paired by label (or row), and the volumes when ``images``.

    Any missing or unreadable file raises :class:`BadInputError` naming it.
    """
    if case.problem:
        raise BadInputError(case.problem)
    for path in (case.fixed_image, case.moving_image, case.fixed_points, case.moving_points):
        if not Path(path).exists():
            raise BadInputError(f"{path}: no such file")
    fixed = moving = None
    if case.raw_geometry is not None:
        if images:
            fixed = read_raw_volume(case.fixed_image, case.raw_geometry)
            moving = read_raw_volume(case.moving_image, case.raw_geometry)
        fixed_geometry = moving_geometry = case.raw_geometry.geometry()
    elif images:
        fixed, moving = read_volume(case.fixed_image), read_volume(case.moving_image)
        fixed_geometry, moving_geometry = fixed.geometry, moving.geometry
    else:
        fixed_geometry, moving_geometry = read_image_geometry(case.fixed_image), read_image_geometry(case.moving_image)
    fixed_points = _read_case_points(case, case.fixed_points, fixed_geometry)
    moving_points = pair_points(
        fixed_points, _read_case_points(case, case.moving_points, moving_geometry), case.fixed_points,
        case.moving_points,
    )
    outside = ~fixed_geometry.contains_lps(fixed_points.points_lps_mm)
    if outside.any():
        raise BadInputError(f"{case.fixed_points}: {int(outside.sum())} of {len(fixed_points)} points lie outside "
                            f"the fixed image {case.fixed_image}")
    mask = read_volume(case.fixed_mask) if images and case.fixed_mask else None
    return CaseData(case, fixed_geometry, moving_geometry, fixed_points, moving_points, fixed, moving, mask)


def find_cts(folder: str | os.PathLike) -> list[tuple[str, Path, Path | None]]:
    """Single CTs in ``folder`` for :func:`build_synthetic_manifest`: ``(case name, CT, landmarks or None)``.

    A CT is a volume file directly in ``folder`` (landmarks: ``<stem>_landmarks.csv|.mrk.json|.fcsv``
    beside it), or a subfolder holding one volume file (landmarks: the one point file there) or a
    DICOM series (landmarks: the one point file in the subfolder).
    """
    root = Path(folder)
    if not root.is_dir():
        raise BadInputError(f"{root}: not a folder of CT volumes")
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if _is_volume_file(entry):
            stem = _stem(entry)
            landmarks = next((entry.with_name(f"{stem}_landmarks{s}") for s in POINT_SUFFIXES
                              if entry.with_name(f"{stem}_landmarks{s}").is_file()), None)
            found.append((stem, entry, landmarks))
        elif entry.is_dir():
            volumes = [p for p in sorted(entry.iterdir()) if _is_volume_file(p)]
            points = [p for p in sorted(entry.iterdir()) if p.is_file() and p.name.lower().endswith(POINT_SUFFIXES)]
            dicom = any(p.suffix.lower() == ".dcm" for p in entry.iterdir())
            if len(volumes) > 1:
                raise BadInputError(f"{entry}: holds {len(volumes)} volumes; put one CT per subfolder")
            if len(points) > 1:
                raise BadInputError(f"{entry}: holds {len(points)} point files; keep one landmark file per CT")
            if volumes or dicom:
                found.append((entry.name, volumes[0] if volumes else entry, points[0] if points else None))
    if not found:
        raise BadInputError(f"{root}: no CT volumes found (NIfTI, NRRD, MHA files or subfolders with one)")
    return found


def write_synthetic_pair(pair, folder: Path, summary: dict) -> None:
    """Write a :class:`MedDIFTLib.evaluation.simulate.SyntheticPair` as ``fixed.nii.gz``, ``moving.nii.gz`` (int16 HU),
    ``fixed_points.csv``, ``moving_points_true.csv`` (LPS mm, same labels) and ``pair.json`` (``summary``)."""
    import SimpleITK as sitk

    from ..core.io import write_points, write_volume

    folder.mkdir(parents=True, exist_ok=True)
    write_volume(pair.fixed, folder / "fixed.nii.gz", sitk.sitkInt16)
    write_volume(pair.moving, folder / "moving.nii.gz", sitk.sitkInt16)
    write_points(pair.fixed_points, folder / "fixed_points.csv")
    write_points(pair.moving_points, folder / "moving_points_true.csv")
    (folder / "pair.json").write_text(json.dumps(summary, indent=2))


def build_synthetic_manifest(
    folder: str | os.PathLike,
    out: Path,
    make_pair: Callable[..., object],
    settings: dict | None = None,
    report: Callable[[str, int, int], None] = lambda name, done, total: None,
) -> tuple[list[dict], list[str]]:
    """Make one synthetic pair per CT of ``folder`` under ``out/<case>/`` and ``out/manifest.csv``.

    ``make_pair(volume, points_lps_mm, labels)`` returns a ``SyntheticPair``; a CT's landmarks are
    used when found (else the pair maker picks keypoints). ``settings`` (e.g. the seed) are added to each
    ``pair.json``. A CT that fails is reported in the returned problems and left out of the manifest; the
    others go on. Returns (summaries, problems).
    """
    from .metrics import tre_stats

    cts = find_cts(folder)
    summaries, problems, rows = [], [], []
    for number, (name, ct, landmarks) in enumerate(cts):
        report(name, number, len(cts))
        try:
            volume = read_volume(ct)
            points = read_points(landmarks, volume.geometry) if landmarks else None
            pair = make_pair(volume, None if points is None else points.points_lps_mm,
                             None if points is None else points.labels)
        except BadInputError as error:
            problems.append(f"{name}: {error}")
            continue
        motion = tre_stats(pair.fixed_points.points_lps_mm, pair.moving_points.points_lps_mm)
        summary = {"case": name, "source": str(Path(ct).resolve()), "landmarks": None if landmarks is None
                   else str(Path(landmarks).resolve()), "points": len(pair.fixed_points), "motion_mm": motion,
                   "jacobian_min": pair.jacobian_min, **(settings or {})}
        write_synthetic_pair(pair, out / name, summary)
        summaries.append(summary)
        rows.append([name, f"{name}/fixed.nii.gz", f"{name}/moving.nii.gz", f"{name}/fixed_points.csv",
                     f"{name}/moving_points_true.csv"])
    report("", len(cts), len(cts))
    if rows:
        with (out / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["case", *MANIFEST_COLUMNS])
            writer.writerows(rows)
    return summaries, problems
