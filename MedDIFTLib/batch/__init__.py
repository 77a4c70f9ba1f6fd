"""Cohorts on Dask: ``meddift batch`` runs a manifest of pairs with the single-pair commands' code.

:mod:`.manifest` reads the rows, :mod:`.job` says what is done to each and hashes its inputs,
:mod:`.graph` builds the task graph (features once per volume, one task per row; resumable),
:mod:`.features` and :mod:`.rows` are the tasks, :mod:`.summary` writes ``summary.csv`` and
:mod:`.cluster` connects to a local cluster or a scheduler.
"""

from .cluster import dask_client
from .features import FeatureRecipe
from .graph import run_batch
from .job import TASKS, BatchJob
from .manifest import Row, read_manifest

__all__ = ["TASKS", "BatchJob", "FeatureRecipe", "Row", "dask_client", "read_manifest", "run_batch"]
