"""The one source of options (MedDIFTLib.core.options): one parser that names the bad key, and the
command line taking every default from the option classes."""

import subprocess
import sys

import pytest

from MedDIFTLib.cli import build_parser
from MedDIFTLib.cli.common import field_options_from_args, options_from_args
from MedDIFTLib.core.errors import BadInputError, BadRequestError
from MedDIFTLib.core.options import (
    BSplineOptions,
    ConvexAdamOptions,
    FieldLevel,
    FieldOptions,
    MatchOptions,
    RunSettings,
    SimulationOptions,
    describe,
    parse_assignments,
    parse_options,
    to_json,
)


def test_unknown_key_and_wrong_type_are_bad_requests_naming_the_key():
    with pytest.raises(BadRequestError, match=r"unknown MatchOptions option\(s\) radius; known: .*search_radius_mm"):
        parse_options(MatchOptions, {"radius": 10})
    with pytest.raises(BadRequestError, match=r"option 'search_radius_mm': 'far' is not a number"):
        parse_options(MatchOptions, {"search_radius_mm": "far"})
    with pytest.raises(BadRequestError, match=r"option 'exact': 1 is not true or false"):
        parse_options(MatchOptions, {"exact": 1})
    with pytest.raises(BadRequestError, match=r"option 'iterations': 2.5 is not a whole number"):
        parse_options(BSplineOptions, {"iterations": 2.5})


def test_out_of_range_names_the_key_without_a_dataclass_repr():
    with pytest.raises(BadInputError) as caught:
        parse_options(FieldOptions, {"levels": [{"spacing_mm": 0}]})
    assert "option 'spacing_mm' must be > 0" in str(caught.value) and "FieldLevel(" not in str(caught.value)
    assert not isinstance(caught.value, BadRequestError)
    with pytest.raises(BadInputError, match=r"option 'confidence_threshold' must be <= 1"):
        parse_options(MatchOptions, {"confidence_threshold": 1.5})
    with pytest.raises(BadInputError, match=r"option 'mean_motion_mm' must be >= 0"):
        parse_options(SimulationOptions, {"mean_motion_mm": -1})
    with pytest.raises(BadInputError, match=r"option 'metric': 'ssd' is not one of meansquares, correlation"):
        parse_options(BSplineOptions, {"metric": "ssd"})


@pytest.mark.parametrize("instance", [
    RunSettings(backbone="maisi", backbone_options={"timestep": 20}, device="cpu",
                match=MatchOptions(search_radius_mm=12.0, level_weights=(1.0, 0.5)),
                field=FieldOptions(levels=(FieldLevel(8.0, 20.0), FieldLevel(4.0, 6.0)), optimise_iterations=0)),
    ConvexAdamOptions(grid_sp=4, ic=False),
    SimulationOptions(seed=3, allow_folding=True),
])
def test_to_json_and_parse_options_round_trip(instance):
    assert parse_options(type(instance), to_json(instance)) == instance


def test_assignments_are_json_values_else_text():
    assert parse_assignments(["timestep=20", "precision=bf16", "weights=[1, 0.5]", "exact=true"]) == {
        "timestep": 20, "precision": "bf16", "weights": [1, 0.5], "exact": True}
    with pytest.raises(BadInputError, match="is not KEY=VALUE"):
        parse_assignments(["timestep"])


def test_describe_gives_the_help_with_the_default():
    assert describe(MatchOptions, "search_radius_mm").endswith(f"(default {MatchOptions.search_radius_mm})")
    assert describe(MatchOptions(), "mode") == describe(MatchOptions, "mode")


def test_the_command_line_defaults_are_the_classes_defaults():
    parser = build_parser()
    match = parser.parse_args(["match", "f.nii.gz", "m.nii.gz", "--points", "p.csv", "--out", "o.csv"])
    assert options_from_args(match, MatchOptions) == MatchOptions()
    assert match.backbone == RunSettings.backbone and match.device == RunSettings.device
    register = parser.parse_args(["register", "f.nii.gz", "m.nii.gz", "--out-transform", "t.h5"])
    assert field_options_from_args(register) == FieldOptions()
    assert FieldLevel.search_radius_mm == MatchOptions.search_radius_mm
    simulate = parser.parse_args(["simulate", "ct.nii.gz", "out"])
    assert options_from_args(simulate, SimulationOptions) == SimulationOptions()
    given = parser.parse_args(["match", "f", "m", "--points", "p", "--out", "o", "--full-search", "--exact",
                               "--mode", "global", "--search-radius-mm", "12"])
    assert options_from_args(given, MatchOptions) == MatchOptions(search_radius_mm=12.0, mode="global",
                                                                  coarse_to_fine=False, exact=True)


def test_options_module_imports_neither_torch_nor_numpy():
    code = ("import sys, MedDIFTLib.core.options; "
            "assert not {'torch', 'numpy'} & set(sys.modules), sorted({'torch', 'numpy'} & set(sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_the_options_package_exports_every_public_name_of_its_modules():
    import importlib
    import pkgutil

    from MedDIFTLib.core import options

    for module_info in pkgutil.iter_modules(options.__path__):
        module = importlib.import_module(f"{options.__name__}.{module_info.name}")
        defined_here = {name for name, value in vars(module).items() if not name.startswith("_")
                        and getattr(value, "__module__", module.__name__) == module.__name__
                        and not isinstance(value, type(options)) and name not in ("T", "annotations")}
        assert defined_here <= set(options.__all__), (module_info.name, defined_here - set(options.__all__))
    assert all(getattr(options, name) is not None for name in options.__all__)
