"""Cohorts on Dask: ``meddift batch`` runs a manifest of pairs with the single-pair commands' code.

:mod:`.manifest` reads the rows, :mod:`.job` says what is done to each and hashes its inputs,
:mod:`.graph` builds the task graph (features once per volume, one task per row; resumable),
:mod:`.features` and :mod:`.rows` are the tasks, :mod:`.summary` writes ``summary.csv`` and
:mod:`.cluster` connects to a local cluster or a scheduler.
"""

import importlib
from typing import Any

# The public names, imported on first use: the parser of ``meddift`` reads TASKS, and importing
# the package must not load dask or torch for that.
_EXPORTS = {
    "TASKS": ".job",
    "BatchJob": ".job",
    "FeatureRecipe": ".job",
    "Row": ".manifest",
    "read_manifest": ".manifest",
    "check_inputs_outside": ".manifest",
    "discard_staging": ".graph",
    "dask_client": ".cluster",
    "run_batch": ".graph",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = sorted(_EXPORTS)
