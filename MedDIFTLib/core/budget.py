"""How much one job may take: the point cap, and the memory a job will need, estimated from shapes
before any work and refused when it exceeds the budget (torch-free).

The estimate is an upper bound built from the volume sizes and the options alone, never from a
run: voxels of the volumes, their feature pyramids, the dense field, and, for a registration, the
similarity tables of the lattice layout, one value per (lattice node, candidate shift) pair. Those
tables grow as ``radius**3 / spacing**6`` and are what makes a fine lattice expensive; their node
and shift counts follow from the geometry (:func:`lattice_nodes`, :func:`lattice_shifts`).
The knobs are the constants below; each says what it counts.

The budget is this machine's available memory, or ``MEDDIFT_MEMORY_BUDGET_MB`` when set (a shared
machine, a test), or what the caller gives (``meddift serve --session-memory-mb``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import OutOfMemoryError
from .geometry import FINEST_WORKING_MM, Geometry
from .options import FieldLevel, FieldOptions

MAX_POINTS = 100_000
"""Points one job may carry (a match request, a point file of the command line)."""

BUDGET_ENVIRONMENT = "MEDDIFT_MEMORY_BUDGET_MB"
VOLUME_BYTES_PER_VOXEL = 8
"""A volume's float32 voxels and one more copy of them (the file's own type while reading, a warped
or resampled copy)."""
FEATURE_BYTES_PER_VOXEL = 32
"""A feature pyramid per image voxel: MIND-SSC, the default backbone, takes about 27 (12
half-precision channels at full resolution plus coarser scales); MAISI's levels are coarser."""
FIELD_BYTES_PER_VOXEL = 48
"""The dense field on the fixed grid: float32 tensor and float64 array of 3 components, and its
Jacobian determinant."""
SIMILARITY_TABLES = 4
"""Float32 tables of (candidate shifts x lattice nodes) alive at once while a field level is matched:
the fused forward and backward similarities, and one feature level's pair being added in."""
BASE_BYTES = 512 * 2**20
"""The process itself: interpreter, torch and the other libraries."""
DEFLATE_MAX_RATIO = 1032
"""The largest expansion deflate (gzip, zlib) can reach: more declared voxel bytes than this times
the bytes of a compressed file cannot be in it."""


def describe_bytes(count: float, other: float | None = None) -> str:
    """``count`` bytes in MiB or GiB, with enough decimals to differ from ``other`` when given
    ("5.2 MiB", not "5 MiB", beside a limit of 5 MiB)."""
    unit, size = ("GiB", 2**30) if max(count, other or 0) >= 2**30 else ("MiB", 2**20)
    for decimals in range(1, 7):
        text = f"{count / size:.{decimals}f}"
        if other is None or text != f"{other / size:.{decimals}f}" or count == other:
            return f"{text} {unit}"
    return f"{int(count)} bytes"


def machine_memory_bytes() -> int | None:
    """Memory available to a new job on this machine (Linux ``MemAvailable``; else the physical
    memory); None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class Budget:
    """``limit_bytes`` of memory a job may use, and where that limit comes from (for the message)."""

    limit_bytes: int
    source: str


def default_budget() -> Budget | None:
    """``MEDDIFT_MEMORY_BUDGET_MB`` when set, else this machine's available memory (None: unknown)."""
    configured = os.environ.get(BUDGET_ENVIRONMENT)
    if configured:
        try:
            megabytes = float(configured)
        except ValueError:
            megabytes = float("nan")
        if not megabytes > 0 or not math.isfinite(megabytes):
            raise OutOfMemoryError(f"{BUDGET_ENVIRONMENT}={configured!r} must be a number of MB > 0")
        return Budget(int(megabytes * 2**20), BUDGET_ENVIRONMENT)
    available = machine_memory_bytes()
    return None if available is None else Budget(available, "this machine's available memory")


def lattice_strides(geometry: Geometry, step_mm: float) -> list[int]:
    """The whole-voxel step per axis (ijk) of a lattice every ``step_mm``: ``step_mm / spacing``
    rounded, at least 1, as the engine's node grid and candidate lattice take it. Rounding is why
    a lattice of 4.0 mm on 2.73 mm voxels has 1-voxel steps and one of 4.1 mm 2-voxel steps."""
    return [max(1, round(step_mm / spacing)) for spacing in geometry.spacing_mm]


def lattice_nodes(geometry: Geometry, spacing_mm: float) -> int:
    """The nodes of a lattice of ``spacing_mm`` covering ``geometry`` (first and last voxel included)."""
    strides = lattice_strides(geometry, spacing_mm)
    return math.prod(math.ceil((size - 1) / stride) + 1 for size, stride in zip(geometry.shape_ijk, strides))


def lattice_shifts(geometry: Geometry, radius_mm: float, step_mm: float) -> int:
    """The candidate shifts every ``step_mm`` within ``radius_mm``: the volume of that ellipsoid in
    lattice cells, never more than the box of shifts the volume's extent allows."""
    strides = lattice_strides(geometry, step_mm)
    semi_axes = [radius_mm / (spacing * stride) for spacing, stride in zip(geometry.spacing_mm, strides)]
    reach = [math.ceil((size - 1) / stride) for size, stride in zip(geometry.shape_ijk, strides)]
    box = math.prod(2 * min(math.ceil(axis), most) + 1 for axis, most in zip(semi_axes, reach))
    return min(math.ceil(4.0 / 3.0 * math.pi * math.prod(semi_axes)) + 1, box)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job will need, by what holds them; ``advice`` says which option lowers the largest part."""

    what: str
    parts: dict[str, int]
    advice: str

    @property
    def total_bytes(self) -> int:
        return BASE_BYTES + sum(self.parts.values())


def _volumes_and_features(fixed: Geometry, moving: Geometry) -> dict[str, int]:
    """Volumes on their grids; features on the isotropic working grid of the finest spacing where the
    voxels are not cubic (as MIND computes them), which holds more voxels than a thick-slice grid."""
    voxels = fixed.num_voxels + moving.num_voxels
    grids = (fixed, moving)
    feature_voxels = sum(max(grid.num_voxels, grid.working_grid(FINEST_WORKING_MM).num_voxels) for grid in grids)
    return {"volumes": VOLUME_BYTES_PER_VOXEL * voxels, "features": FEATURE_BYTES_PER_VOXEL * feature_voxels}


def level_table_bytes(fixed: Geometry, level: FieldLevel) -> int:
    """The similarity tables of one field level: nodes x shifts x 4 bytes x :data:`SIMILARITY_TABLES`."""
    nodes = lattice_nodes(fixed, level.spacing_mm)
    shifts = lattice_shifts(fixed, level.search_radius_mm, level.spacing_mm if level.step_mm is None else level.step_mm)
    return SIMILARITY_TABLES * 4 * nodes * shifts


OPTION_NAMES = {"spacing_mm": "spacing_mm", "search_radius_mm": "search_radius_mm"}
"""How a caller spells the options the advice names (the command line passes its flags)."""


def estimate_register(fixed: Geometry, moving: Geometry, options: FieldOptions,
                      names: Mapping[str, str] = OPTION_NAMES, what: str = "register") -> MemoryEstimate:
    """The memory of a registration of ``moving`` onto ``fixed`` with ``options`` (its largest
    field level's similarity tables: levels are matched one after another)."""
    parts = _volumes_and_features(fixed, moving)
    parts["field"] = FIELD_BYTES_PER_VOXEL * fixed.num_voxels
    advice = ""
    if options.levels:
        tables = [level_table_bytes(fixed, level) for level in options.levels]
        index = tables.index(max(tables))
        largest = options.levels[index]
        parts["lattice similarity tables"] = max(tables)
        knobs = []  # the command line's level knobs: the last level's lattice, the first level's radius
        if index == len(options.levels) - 1:
            knobs.append(f"a coarser lattice ({names['spacing_mm']}, now {largest.spacing_mm:g} mm)")
        if index == 0:
            knobs.append(f"a smaller search radius ({names['search_radius_mm']}, now {largest.search_radius_mm:g} mm)")
        advice = "use " + " or ".join(knobs)
    return MemoryEstimate(what, parts, advice)


def estimate_match(fixed: Geometry, moving: Geometry, memory_budget_mb: float,
                   names: Mapping[str, str] = OPTION_NAMES, what: str = "match") -> MemoryEstimate:
    """The memory of a point match: volumes, features and the engine's batches (bounded by the
    match options' ``memory_budget_mb``)."""
    parts = {**_volumes_and_features(fixed, moving), "match batches": int(memory_budget_mb * 2**20)}
    return MemoryEstimate(what, parts, "use smaller volumes (crop or resample them)")


def check_memory(estimate: MemoryEstimate, budget: Budget | None) -> None:
    """Refuse ``estimate`` over ``budget`` (None: no known budget) with an :class:`OutOfMemoryError`
    naming the largest parts and what to change."""
    if budget is None or estimate.total_bytes <= budget.limit_bytes:
        return
    largest = sorted(estimate.parts.items(), key=lambda item: -item[1])[:2]
    shown = ", ".join(f"{name} {describe_bytes(size)}" for name, size in largest)
    advice = "; ".join(filter(None, [estimate.advice, "or run it where more memory is available"]))
    raise OutOfMemoryError(
        f"{estimate.what} would need about {describe_bytes(estimate.total_bytes, budget.limit_bytes)} of memory "
        f"({shown}), more than the {describe_bytes(budget.limit_bytes, estimate.total_bytes)} of {budget.source}: "
        f"{advice}"
    )
