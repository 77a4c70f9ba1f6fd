"""Evaluation datasets: find the image pairs and their corresponding points in a user's folder.

Layouts (see :func:`open_dataset`; ``detect_layout`` picks one from what is on disk):

- ``dirlab``: DIR-Lab 4DCT cases 1-10 as downloaded (``Case1Pack/Images/case1_T00_s.img``,
  ``Case1Pack/ExtremePhases/Case1_300_T00_xyz.txt``, ``Case8Deploy/.../case8_dirLab300_T50_xyz.txt``, ...):
  headerless little-endian int16 volumes whose size and spacing come from the published per-case
  tables (:mod:`.raw`); 300 landmarks per phase as 1-based voxel indices. Fixed = T00 (inhale), moving = T50.
- ``copdgene``: DIR-Lab COPDgene cases (``copd1/copd1_iBHCT.img``, ``copd1_300_iBH_xyz_r1.txt``, ...):
  the same raw format; fixed = iBH (inspiration), moving = eBH (expiration).
- ``learn2reg``: a Learn2Reg task folder: ``dataset.json`` (or ``<Task>_dataset.json``) listing the
  pairs, ``imagesTr``, keypoints in ``keypoints*Tr`` (CSV without header, 0-based voxel ``ijk`` of
  their image), optional masks in ``masks*Tr``.
- ``manifest``: a CSV file with columns ``fixed,moving,fixed_points,moving_points`` (optional
  ``case``, ``fixed_mask``), paths relative to the manifest; point files in any format of
  :func:`MedDIFTLib.core.io.read_points` (voxel formats use the geometry of their own image).
- ``pairs``: a folder of pair folders (or one pair folder), each one case named after its folder and
  holding ``fixed`` and ``moving`` images (any volume format of :data:`.cases.VOLUME_SUFFIXES`, e.g.
  ``fixed.nii.gz``), ``fixed_points`` and ``moving_points`` files (``.csv``, ``.fcsv`` or ``.mrk.json``,
  read like a manifest's) and optionally ``fixed_mask``; e.g. ``../shared/data/liver4dmri_real_pairs``.

World coordinates are LPS mm.

Discovery never reads images. A case whose files are missing or inconsistent is still listed;
loading it raises :class:`BadInputError` naming the file, so one bad case never stops the others.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError
from ..core.geometry import Geometry
from ..core.io.points import PointSet, read_dirlab_points, read_points
from ..core.io.volumes import read_volume
from ..core.options import DATASET_LAYOUTS
from .cases import POINT_SUFFIXES, VOLUME_SUFFIXES, Case, CaseData, Dataset, file_stem, walk_files
from .raw import dirlab_cases, read_raw_volume

LAYOUTS = DATASET_LAYOUTS
MANIFEST_COLUMNS = ("fixed", "moving", "fixed_points", "moving_points")
PAIR_FILES = {  # Case field: (file stem in a pair folder, accepted suffixes)
    "fixed_image": ("fixed", VOLUME_SUFFIXES),
    "moving_image": ("moving", VOLUME_SUFFIXES),
    "fixed_points": ("fixed_points", POINT_SUFFIXES),
    "moving_points": ("moving_points", POINT_SUFFIXES),
}
PAIR_MASK = "fixed_mask"


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
    names = [p.name.lower() for p in walk_files(source)]
    if any(re.search(r"copd\d+_[ie]bhct\.img$", n) for n in names):
        return "copdgene"
    if any(re.search(r"case\d+_t(00|50).*\.img$", n) for n in names):
        return "dirlab"
    if (source / "manifest.csv").is_file():
        return "manifest"
    if _pair_folders(source):
        return "pairs"
    raise BadInputError(
        f"{source}: unknown dataset layout; expected a DIR-Lab 4DCT folder (caseN_T00*.img + landmark txt), a "
        "COPDgene folder (copdN_iBHCT.img + copdN_300_iBH_xyz_r1.txt), a Learn2Reg folder (dataset.json, imagesTr, "
        "keypointsTr), a CSV manifest (fixed,moving,fixed_points,moving_points) or a folder of pair folders "
        "(each with fixed.nii.gz, moving.nii.gz, fixed_points.csv, moving_points.csv)"
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
    elif layout == "pairs":
        cases = [_pair_folder_case(folder) for folder in _pair_folders(source)]
    else:
        cases = dirlab_cases(source, layout)
    if not cases:
        raise BadInputError(f"{source}: no cases found for layout {layout}")
    return Dataset(source, layout, cases)


def _learn2reg_cases(root: Path, split: str) -> list[Case]:
    description = _learn2reg_json(root)
    try:
        document = json.loads(description.read_text(encoding="utf-8"))
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
        fixed_stem, moving_stem = file_stem(fixed), file_stem(moving)
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


def _pair_files(folder: Path, stem: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files ``stem + suffix`` in ``folder`` (exact names, one per accepted suffix)."""
    return [folder / (stem + suffix) for suffix in suffixes if (folder / (stem + suffix)).is_file()]


def _is_pair_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a fixed or a moving image of a pair."""
    return any(_pair_files(folder, PAIR_FILES[key][0], VOLUME_SUFFIXES) for key in ("fixed_image", "moving_image"))


def _pair_folders(root: Path) -> list[Path]:
    """``root`` when it is a pair folder itself, else its pair folders (sorted, hidden ones skipped)."""
    if not root.is_dir():
        return []
    if _is_pair_folder(root):
        return [root]
    return sorted(f for f in root.iterdir() if f.is_dir() and not f.name.startswith(".") and _is_pair_folder(f))


def _pair_folder_case(folder: Path) -> Case:
    """The case of one pair folder; a missing or doubled file is recorded as its problem."""
    paths, problems = {}, []
    for key, (stem, suffixes) in PAIR_FILES.items():
        found = _pair_files(folder, stem, suffixes)
        if len(found) > 1:
            problems.append(f"several {stem} files ({', '.join(p.name for p in found)}): keep one")
        elif not found:
            problems.append(f"no {stem} file (looked for {stem} with {', '.join(suffixes)})")
        paths[key] = str(found[0] if found else folder / (stem + suffixes[0]))
    masks = _pair_files(folder, PAIR_MASK, VOLUME_SUFFIXES)
    if len(masks) > 1:
        problems.append(f"several {PAIR_MASK} files ({', '.join(p.name for p in masks)}): keep one")
    return Case(name=folder.name, layout="pairs", **paths, fixed_mask=str(masks[0]) if masks else None,
                problem=f"{folder}: {'; '.join(problems)}" if problems else None)


def _manifest_cases(manifest: Path) -> list[Case]:
    if not manifest.is_file():
        raise BadInputError(f"{manifest}: no such manifest file")
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
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
        lines = source.read_text(encoding="utf-8").splitlines()
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
