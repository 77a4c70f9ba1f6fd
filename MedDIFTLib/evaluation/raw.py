"""DIR-Lab 4DCT and COPDgene: headerless int16 volumes on their published grids and 1-based voxel
landmarks, found by the case numbers in their file names.

A bare raw volume has origin 0 and identity direction, so the TRE is index difference times spacing,
as the DIR-Lab protocol defines it. Volumes stored as HU + 1024 (no voxel below 0) are shifted to HU.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..core.errors import BadInputError
from ..core.io.volumes import Volume
from .cases import Case, RawGeometry, walk_files

RAW_HU_OFFSET = 1024.0

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


def dirlab_cases(root: Path, layout: str) -> list[Case]:
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
    for path in walk_files(root):
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
