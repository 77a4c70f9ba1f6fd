"""Every user-facing knob, once: typed option dataclasses and the one parser that builds them.

The CLI, the worker, the evaluation methods and the Slicer panel all take their defaults from
these classes (matching, the field, a run, lesion tracking and series, synthetic pairs, the limits of
``meddift serve``, the evaluation's B-spline and ConvexAdam baselines) and build them through
:func:`parse_options`, which checks names, types and ranges and names the bad key. Distances are in
mm. This module imports neither torch nor numpy, so the Slicer side (and ``--help``) can read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import BadInputError, BadRequestError

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with its range: ``minimum``/``maximum`` inclusive, ``above`` exclusive.
    ``default_factory`` instead of ``default`` for a mutable or nested default."""
    metadata = {"minimum": minimum, "maximum": maximum, "above": above, "choices": choices, "help": help}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def describe(instance_or_class: Any, name: str) -> str:
    """The help text of option ``name`` with its default, e.g. for ``--help``."""
    cls = instance_or_class if isinstance(instance_or_class, type) else type(instance_or_class)
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f"{field.metadata.get('help', '')} (default {field.default})".strip()


class Options:
    """Base of the option classes: a value out of range is refused when the instance is made."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_range(type(self).__name__, field, getattr(self, field.name))


def _check_range(owner: str, field: dataclasses.Field, value: Any) -> None:
    meta = field.metadata
    if value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            if meta.get("choices") and item not in meta["choices"]:
                raise BadInputError(f"option {field.name!r}: {item!r} is not one of {', '.join(meta['choices'])}")
            continue
        if not math.isfinite(item):
            raise BadInputError(f"option {field.name!r} must be a finite number, got {item}")
        if meta.get("minimum") is not None and item < meta["minimum"]:
            raise BadInputError(f"option {field.name!r} must be >= {meta['minimum']}, got {item}")
        if meta.get("maximum") is not None and item > meta["maximum"]:
            raise BadInputError(f"option {field.name!r} must be <= {meta['maximum']}, got {item}")
        if meta.get("above") is not None and not item > meta["above"]:
            raise BadInputError(f"option {field.name!r} must be > {meta['above']}, got {item}")


def parse_options(cls: type[T], raw: Mapping[str, Any] | None, what: str = "") -> T:
    """Build option class ``cls`` from a JSON-like mapping.

    An unknown key or a wrong type raises :class:`BadRequestError`, a value out of range
    :class:`BadInputError`; both name the key. Lists become tuples; a nested option class comes
    as an object or as a list of its fields in order."""
    what = what or cls.__name__
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise BadRequestError(f"{what} must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BadRequestError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(value, hints[name], f"{what} option {name!r}") for name, value in raw.items()}
    return cls(**values)


def _convert(value: Any, annotation: Any, what: str) -> Any:
    """``value`` from JSON converted to ``annotation`` (a type, union, tuple or option class)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(value, member, what)
            except BadRequestError:
                continue
        raise BadRequestError(f"{what}: {value!r} does not fit {_type_name(annotation)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BadRequestError(f"{what}: {value!r} is not a list")
        element_types = typing.get_args(annotation)
        if len(element_types) == 2 and element_types[1] is Ellipsis:
            return tuple(_convert(item, element_types[0], what) for item in value)
        if len(value) != len(element_types):
            raise BadRequestError(f"{what}: needs {len(element_types)} values, got {len(value)}")
        return tuple(_convert(item, kind, what) for item, kind in zip(value, element_types))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise BadRequestError(f"{what}: {value!r} is not an object")
        return dict(value)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, (list, tuple)):
            names = [f.name for f in dataclasses.fields(annotation)]
            if len(value) > len(names):
                raise BadRequestError(f"{what}: {value!r} has more than {len(names)} values ({', '.join(names)})")
            value = dict(zip(names, value))
        return parse_options(annotation, value, what)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Any:
        return value
    raise BadRequestError(f"{what}: {value!r} is not {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    names = {bool: "true or false", float: "a number", int: "a whole number", str: "text"}
    if annotation in names:
        return names[annotation]
    return str(annotation).replace("typing.", "")


def parse_assignments(pairs: Iterable[str], what: str = "option") -> dict[str, Any]:
    """``["timestep=20", "precision=bf16"]`` -> ``{"timestep": 20, "precision": "bf16"}``: each
    VALUE is read as JSON, else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise BadInputError(f"{what} {pair!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


def to_json(instance: Any) -> dict[str, Any]:
    """An option instance as a JSON-ready dict (tuples become lists), the inverse of :func:`parse_options`."""
    return json.loads(json.dumps(dataclasses.asdict(instance)))


SEARCH_RADIUS_MM = 25.0


@dataclass(frozen=True)
class MatchOptions(Options):
    """How the correspondence engine searches and scores (distances in mm)."""

    search_radius_mm: float = option(SEARCH_RADIUS_MM, above=0.0, help="local search radius around the prior, mm")
    mode: str = option(
        "local", choices=("local", "global"), help="local: a sphere around the prior; global: the whole moving volume"
    )
    coarse_to_fine: bool = option(True, help="search a coarse lattice first, then refine at full resolution")
    coarse_step_mm: float = option(4.0, above=0.0, help="step of the coarse lattice, mm")
    exact: bool = option(False, help="interpolate features before the cosine (slower; for checks)")
    subvoxel: bool = option(
        True, help="sub-voxel refinement of the best candidate: a parabola through its lattice scores, then for "
        "points a pattern search on the finest level"
    )
    level_weights: tuple[float, ...] | None = option(
        None, minimum=0.0, help="per-level fusion weights (default: the backbone's)"
    )
    patch_radius: int | None = option(None, minimum=0, help="patch radius in level voxels (default: the backbone's)")
    patch_step: int = option(
        1,
        minimum=1,
        help="spacing of the patch's taps, level voxels (rounded down to a divisor of 2 x radius; "
        "2 scores about twice as fast, a little less accurately)",
    )
    backward_check: bool = option(True, help="match back from moving to fixed to measure consistency")
    fb_scale_mm: float = option(3.0, above=0.0, help="forward-backward distance at which confidence falls to 0.61x")
    confidence_threshold: float = option(
        0.5, minimum=0.0, maximum=1.0, help="matches below this confidence are flagged unreliable"
    )
    context_mm: float = option(
        8.0,
        minimum=0.0,
        help="an unreliable match is placed by the median motion of the reliable matches of 26 points this "
        "far around it (twice as far if fewer than 4 are reliable), mm; it stays flagged unreliable; 0: off",
    )
    memory_budget_mb: float = option(64.0, above=0.0, help="bound on the working tensors of one batch, MB")


@dataclass(frozen=True)
class FieldLevel(Options):
    """One coarse-to-fine level of the field: lattice step (mm), search radius around the field so
    far (mm), smoothness length of the fitted field (mm), and the half-width (lattice nodes) of the
    box over which similarities are averaged."""

    spacing_mm: float = option(6.0, above=0.0, help="lattice of searched points, mm")
    search_radius_mm: float = option(SEARCH_RADIUS_MM, above=0.0, help="largest motion searched for, mm")
    smoothness_mm: float = option(10.0, above=0.0, help="smoothing length of the fitted field, mm")
    aggregation_nodes: int = option(1, minimum=0, help="half-width of the similarity aggregation box, nodes")
    step_mm: float | None = option(None, above=0.0, help="step of the searched shifts, mm (default: spacing_mm)")

    def match_options(self) -> MatchOptions:
        """The correspondence engine's options for this level: its search radius (mm), candidates
        every ``step_mm`` (mm; default ``spacing_mm``), the other matching knobs at their defaults."""
        step_mm = self.spacing_mm if self.step_mm is None else self.step_mm
        return MatchOptions(search_radius_mm=self.search_radius_mm, coarse_step_mm=step_mm)


@dataclass(frozen=True)
class FieldOptions(Options):
    """How the dense field is built (distances in mm).

    ``levels``: coarse to fine; the first searches from identity, so its radius bounds the motion
    that can be found. ``automatic_region``: fit the field where the fixed image has content, leaving
    out uniform dark background connected to its border (:mod:`MedDIFTLib.field.region`; false: the
    whole image)."""

    levels: tuple[FieldLevel, ...] = option(
        (
            FieldLevel(spacing_mm=8.0, search_radius_mm=35.0, smoothness_mm=4.0),
            FieldLevel(spacing_mm=6.0, search_radius_mm=13.0, smoothness_mm=3.0),
        ),
        help="search levels, coarse to fine",
    )
    robust_iterations: int = option(3, minimum=0, help="reweighting passes of the robust fit")
    optimise_iterations: int = option(8, minimum=0, help="instance optimisation steps (0: off)")
    optimise_spacing_mm: float = option(3.0, above=0.0, help="node spacing of the instance optimisation, mm")
    optimise_regularisation: float = option(0.1, minimum=0.0, help="smoothness penalty of the instance optimisation")
    break_gradient: float | None = option(
        0.2, above=0.0, help="displacement gradient (mm/mm) above which the field may break where organs slide "
        "(total variation); None: diffusion everywhere"
    )
    automatic_region: bool = option(
        True, help="leave out uniform dark background at the image border (air, no signal); false: whole image"
    )
    inverse_spacing_mm: float = option(2.0, above=0.0, help="grid on which the inverse field is solved, mm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.levels and self.optimise_iterations <= 0:
            raise BadInputError("the field needs at least one matching level or instance optimisation")

    def with_level_knobs(
        self, search_radius_mm: float | None = None, spacing_mm: float | None = None, smoothness_mm: float | None = None
    ) -> FieldOptions:
        """These options with the knobs a command line or panel offers over the levels: the largest
        motion searched for (the first level's radius), and the finest lattice and its smoothing (the
        last level's spacing and smoothness; an earlier level keeps a lattice at least that coarse).
        A knob left None keeps the levels' own value."""
        if not self.levels:
            return self
        levels = list(self.levels)
        if search_radius_mm is not None:
            levels[0] = dataclasses.replace(levels[0], search_radius_mm=search_radius_mm)
        if spacing_mm is not None:
            levels = [dataclasses.replace(level, spacing_mm=max(level.spacing_mm, spacing_mm)) for level in levels]
            levels[-1] = dataclasses.replace(levels[-1], spacing_mm=spacing_mm)
        if smoothness_mm is not None:
            levels[-1] = dataclasses.replace(levels[-1], smoothness_mm=smoothness_mm)
        return dataclasses.replace(self, levels=tuple(levels))


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunSettings(Options):
    """How a job runs: backbone name and its options, device (``auto``, ``cpu``, ``cuda[:N]``),
    and the match and field options."""

    backbone: str = option("mind", help="feature backbone")
    backbone_options: dict[str, Any] = option(
        default_factory=dict, help="the backbone's own options, e.g. MAISI's timestep (each backbone checks its own)"
    )
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    match: MatchOptions = option(default_factory=MatchOptions, help="how the correspondence engine searches and scores")
    field: FieldOptions = option(default_factory=FieldOptions, help="how the dense field is built")


@dataclass(frozen=True)
class LesionOptions(Options):
    """How each lesion is found, segmented and flagged in the follow-up (distances in mm)."""

    refine: bool = option(True, help="fit each carried lesion to the follow-up image (off: the carried labelmap)")
    growth_margin_mm: float = option(4.0, minimum=0.0, help="the refined lesion may reach this far beyond "
                                     "the largest growth of the baseline lesion around its matched centre, mm")
    largest_volume_factor: float = option(3.0, above=0.0, help="the largest growth in volume the refined lesion "
                                          "may show (times the baseline volume)")
    seed_radius_mm: float = option(20.0, above=0.0, help="largest radius of a lesion segmented from a point, mm")
    confidence_threshold: float = option(0.5, minimum=0.0, maximum=1.0,
                                         help="a centre match below this confidence is flagged low_confidence")
    centre_search_radius_mm: float = option(15.0, above=0.0, help="the centre is searched this far around "
                                            "where the field carries it, mm")
    field_margin_mm: float = option(15.0, minimum=0.0, help="the field is computed only around each lesion, this "
                                    "far beyond it, mm (0: over the whole follow-up)")


STATUSES = ("ok", "not_found", "leaves_volume", "merges", "low_confidence", "touches_border", "unsupported_growth")

SERIES_ROUTES = ("chained", "direct", "auto")


@dataclass(frozen=True)
class SeriesOptions(Options):
    """How lesions are followed through several follow-ups and which of them the response (RECIST 1.1)
    is measured on (distances in mm)."""

    route: str = option("auto", choices=SERIES_ROUTES, help="how follow-up k is reached: chained (from follow-up "
                        "k-1's tracked lesions), direct (from the baseline), auto (both; direct where they agree, "
                        "else the more confident centre match)")
    agreement_mm: float = option(3.0, minimum=0.0, help="auto: the two routes agree on a lesion when their centres "
                                 "are at most this far apart or within the lesion's baseline equivalent radius, "
                                 "and both or neither segment it, mm")
    measurable_mm: float = option(10.0, above=0.0, help="a target lesion has a longest axial diameter of at least "
                                  "this at baseline, mm (RECIST 1.1: 10)")
    max_targets: int = option(5, minimum=1, help="at most this many target lesions, the largest measurable ones "
                              "(RECIST 1.1: 5)")


@dataclass(frozen=True)
class SimulationOptions(Options):
    """How a synthetic pair is made from a real CT (distances in mm)."""

    seed: int = option(0, minimum=0, help="motion and noise seed")
    motion: str = option("breathing", choices=("breathing", "dirlab1", "dirlab2"),
                         help="motion family: the parametric breathing model, or a thin-plate spline through the "
                         "real T00->T50 landmark displacements of DIR-Lab 4DCT case 1 or 2 mapped onto the CT's "
                         "lungs (needs ../shared/data/dirlab4dct_landmarks)")
    mean_motion_mm: float = option(7.0, minimum=0.0, help="mean motion at the points, mm (breathing motion only)")
    motion_scale: float = option(1.0, minimum=0.0, help="factor on the DIR-Lab displacements (DIR-Lab motions "
                                 "only; 2-3 reaches the motion of the harder 4DCT cases)")
    num_keypoints: int = option(200, minimum=1, help="automatic keypoints in the lungs (when no points are given)")
    noise_hu: float = option(20.0, minimum=0.0, help="Gaussian noise, HU")
    spacing_factor: float = option(1.1, above=0.0, help="moving voxel size relative to the CT")
    allow_folding: bool = option(False, help="keep a motion that folds (Jacobian determinant <= 0), which has "
                                 "no one-to-one ground truth")


DATASET_LAYOUTS = ("dirlab", "copdgene", "learn2reg", "manifest", "pairs")  # see MedDIFTLib.evaluation.datasets


@dataclass(frozen=True)
class ServeOptions(Options):
    """The limits of ``meddift serve``: uploads and memory in MiB, times in seconds."""

    max_upload_mb: float = option(2048.0, above=0.0, help="largest volume upload, MiB")
    max_sessions: int = option(8, minimum=1, help="sessions open at once")
    idle_timeout_s: float = option(1800.0, above=0.0, help="close a session and delete its data after this long "
                                   "unused, s")
    requests_per_minute: int = option(1200, minimum=1, help="requests per client address and minute")
    cache_mb: float = option(2048.0, above=0.0, help="feature cache of each session, MiB")
    session_memory_mb: float = option(16384.0, above=0.0, help="memory each session may use, MiB: the voxels it "
                                      "holds, and each job's memory estimate (refused up front when over it)")


BSPLINE_METRICS = ("meansquares", "correlation", "mattes")


@dataclass(frozen=True)
class BSplineOptions(Options):
    """SimpleITK B-spline registration settings, the ``bspline`` baseline of ``meddift eval``
    (distances in mm)."""

    control_spacing_mm: float = option(24.0, above=0.0, help="control point spacing at the finest level, mm")
    levels: int = option(3, minimum=1, help="resolution levels (the control grid doubles per coarser level)")
    iterations: int = option(30, minimum=1, help="L-BFGS iterations per level")
    samples: int = option(5000, minimum=100, help="random metric samples per level")
    working_spacing_mm: float = option(2.0, above=0.0, help="images are resampled to voxels of at least this, mm")
    seed: int = option(1, minimum=0, help="seed of the metric sampling")
    metric: str = option("meansquares", choices=BSPLINE_METRICS, help="similarity metric")


@dataclass(frozen=True)
class ConvexAdamOptions(Options):
    """ConvexAdam settings, the ``convexadam`` baseline of ``meddift eval``: the working grid (mm)
    and the keywords of ``convex_adam_pt``."""

    working_spacing_mm: float = option(2.0, above=0.0, help="isotropic working grid for cubic voxels, mm "
                                       "(never finer than the fixed image)")
    thick_slices_at_finest: bool = option(True, help="where the voxels are not cubic (thick slices), work on an "
                                          "isotropic grid of the pair's finest spacing instead of working_spacing_mm")
    mind_r: int = option(1, minimum=0, help="MIND radius, voxels")
    mind_d: int = option(2, minimum=1, help="MIND dilation, voxels")
    lambda_weight: float = option(1.25, minimum=0.0, help="regularisation of the convex step")
    grid_sp: int = option(6, minimum=1, help="grid spacing of the convex step, voxels")
    disp_hw: int = option(4, minimum=1, help="displacement search half-width, grid steps")
    selected_niter: int = option(80, minimum=0, help="Adam iterations")
    selected_smooth: int = option(0, minimum=0, help="smoothing kernel of the result (0: none)")
    grid_sp_adam: int = option(2, minimum=1, help="grid spacing of the Adam step, voxels")
    ic: bool = option(True, help="inverse consistency")


__all__ = [
    "BSPLINE_METRICS",
    "DATASET_LAYOUTS",
    "SEARCH_RADIUS_MM",
    "SERIES_ROUTES",
    "STATUSES",
    "BSplineOptions",
    "ConvexAdamOptions",
    "FieldLevel",
    "FieldOptions",
    "LesionOptions",
    "MatchOptions",
    "Options",
    "RunSettings",
    "SeriesOptions",
    "SimulationOptions",
    "describe",
    "option",
    "parse_assignments",
    "parse_options",
    "to_json",
]
