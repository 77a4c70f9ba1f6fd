"""Every user-facing knob, once: typed option dataclasses and the one parser that builds them.

The CLI, the worker, the evaluation methods and the Slicer panel all take their defaults from
these classes and build them through :func:`parse_options`, which checks names, types and ranges
and names the bad key. One module per concern: :mod:`.base` (the base class, :func:`option`, the
parser), :mod:`.matching`, :mod:`.field`, :mod:`.run` (a run's settings), :mod:`.tracking` (lesion tracking
and series), :mod:`.evaluation` (synthetic pairs), :mod:`.serve` (the limits of ``meddift serve``)
and :mod:`.peers` (the evaluation's B-spline and ConvexAdam baselines). Every name is imported from
here. Distances are in mm. The package imports neither torch nor numpy, so the Slicer side (and
``--help``) can read it.
"""

from .base import Options, describe, option, parse_assignments, parse_options, to_json
from .evaluation import DATASET_LAYOUTS, SimulationOptions
from .field import FieldLevel, FieldOptions
from .matching import SEARCH_RADIUS_MM, MatchOptions
from .peers import BSPLINE_METRICS, BSplineOptions, ConvexAdamOptions
from .run import RunSettings
from .serve import ServeOptions
from .tracking import SERIES_ROUTES, STATUSES, LesionOptions, SeriesOptions

# The option classes in the pipeline's order (the README's table of knobs follows it), then the rest.
__all__ = [
    "Options",
    "MatchOptions",
    "FieldLevel",
    "FieldOptions",
    "RunSettings",
    "LesionOptions",
    "SeriesOptions",
    "SimulationOptions",
    "ServeOptions",
    "BSplineOptions",
    "ConvexAdamOptions",
    "BSPLINE_METRICS",
    "DATASET_LAYOUTS",
    "SEARCH_RADIUS_MM",
    "SERIES_ROUTES",
    "STATUSES",
    "describe",
    "option",
    "parse_assignments",
    "parse_options",
    "to_json",
]
