"""The up-front memory estimate (core/budget.py): its lattice counts follow the engine's own grids, it
grows with the lattice as the engine's tables do (4.0 mm on 2.73 mm voxels costs ~15x 4.1 mm), and a
refusal names the option to change; sizes are never printed as equal when they differ."""

import numpy as np
import pytest

from MedDIFTLib.core import budget
from MedDIFTLib.core.errors import OutOfMemoryError
from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.core.options import FieldLevel, FieldOptions
from MedDIFTLib.grid.nodes import node_grid
from MedDIFTLib.matching.candidates import CandidateLattice

ELASTIX = Geometry.create((57, 78, 64), (2.732, 2.732, 5.0))  # the elastix crop's grid
GRIDS = [ELASTIX, Geometry.create((122, 102, 112), (1.5, 1.5, 1.5)),
         Geometry.create((64, 60, 40), (0.8, 0.8, 2.5), direction=np.diag([-1.0, 1.0, -1.0]))]


@pytest.mark.parametrize("geometry", GRIDS)
@pytest.mark.parametrize("spacing_mm, radius_mm", [(3.0, 25.0), (4.0, 25.0), (4.1, 25.0), (6.0, 13.0), (8.0, 40.0)])
def test_lattice_counts_follow_the_engines_grids(geometry, spacing_mm, radius_mm):
    assert budget.lattice_nodes(geometry, spacing_mm) == node_grid(geometry, spacing_mm).num_voxels
    lattice = CandidateLattice.around(geometry, radius_mm, spacing_mm)
    kept = int((np.linalg.norm(lattice.offsets_mm(geometry), axis=1) <= radius_mm + 1e-6).sum())
    assert budget.lattice_shifts(geometry, radius_mm, spacing_mm) == pytest.approx(kept, rel=0.2, abs=15)


def test_a_lattice_of_4_mm_on_the_elastix_grid_costs_about_15_times_one_of_4_1_mm():
    """round(4.0 / 2.732) = 1 voxel, round(4.1 / 2.732) = 2: 3.8x the nodes and 3.8x the shifts."""
    tables = [budget.level_table_bytes(ELASTIX, FieldLevel(spacing_mm=spacing)) for spacing in (4.0, 4.1)]
    assert 12 < tables[0] / tables[1] < 18
    assert tables[0] > 7 * 2**30 > tables[1]  # 4 tables of 284,544 nodes x ~1,750 shifts x 4 bytes


def test_over_the_budget_the_refusal_names_the_largest_parts_and_the_options():
    options = FieldOptions(levels=(FieldLevel(spacing_mm=8.0), FieldLevel(spacing_mm=4.0, search_radius_mm=20.0)))
    estimate = budget.estimate_register(ELASTIX, ELASTIX, options, {"spacing_mm": "--grid", "search_radius_mm": "--r"})
    with pytest.raises(OutOfMemoryError) as refused:
        budget.check_memory(estimate, budget.Budget(2**30, "a test budget"))
    message = str(refused.value)
    assert message.startswith(f"register would need about {budget.describe_bytes(estimate.total_bytes)} of memory "
                              "(lattice similarity tables ")
    assert "more than the 1.0 GiB of a test budget" in message
    assert ": use a coarser lattice (--grid, now 4 mm); or run it" in message  # the finest lattice's knob
    first_largest = FieldOptions(levels=(FieldLevel(spacing_mm=4.0, search_radius_mm=30.0), FieldLevel(spacing_mm=8.0)))
    advice = budget.estimate_register(ELASTIX, ELASTIX, first_largest, {"spacing_mm": "-g", "search_radius_mm": "-r"})
    assert advice.advice == "use a smaller search radius (-r, now 30 mm)"  # the largest motion's knob
    budget.check_memory(estimate, budget.Budget(estimate.total_bytes, "enough"))
    budget.check_memory(estimate, None)


def test_describe_bytes_shows_enough_digits_to_tell_two_sizes_apart():
    assert budget.describe_bytes(5.2 * 2**20, 5 * 2**20) == "5.2 MiB"
    assert budget.describe_bytes(5 * 2**20, 5.2 * 2**20) == "5.0 MiB"
    assert budget.describe_bytes(5 * 2**20 + 4, 5 * 2**20) == "5.000004 MiB"
    assert budget.describe_bytes(3 * 2**30) == "3.0 GiB"


def test_the_budget_comes_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv(budget.BUDGET_ENVIRONMENT, "1536")
    assert budget.default_budget() == budget.Budget(1536 * 2**20, budget.BUDGET_ENVIRONMENT)
    monkeypatch.setenv(budget.BUDGET_ENVIRONMENT, "lots")
    with pytest.raises(OutOfMemoryError, match="must be a number of MB > 0"):
        budget.default_budget()
    monkeypatch.delenv(budget.BUDGET_ENVIRONMENT)
    found = budget.default_budget()
    assert found is None or (found.limit_bytes > 0 and "available memory" in found.source)
