"""Where a batch runs: a local Dask cluster of worker processes, or an existing scheduler.

``local`` starts a :class:`distributed.LocalCluster` on 127.0.0.1 (worker processes, no dashboard,
its HTTP endpoints on a free loopback port)
and stops it on exit. Any other value is a scheduler address (``tcp://host:8786``) or the path of
a scheduler file (``dask scheduler --scheduler-file F``, dask-jobqueue), whose workers are started
and stopped by their owner. Dask gives each worker process one thread for numerical libraries by
default; the local cluster instead gives each worker an equal share of this machine's cores for
torch (``OMP_NUM_THREADS``), since one pair keeps one worker thread busy.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..core.environment import child_environment
from ..core.errors import BadInputError

CONNECT_TIMEOUT_S = 30
# The scheduler always serves HTTP (health, metrics); the dashboard is off, and the server bound to loopback.
HTTP_ADDRESS = "127.0.0.1:0"


def torch_threads(workers: int, threads_per_worker: int) -> int:
    """The cores of this machine shared out to each worker thread (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers * threads_per_worker))


@contextlib.contextmanager
def dask_client(
    scheduler: str = "local", workers: int = 1, threads_per_worker: int = 1, memory_limit: str | None = "auto",
) -> Iterator:
    """A connected :class:`distributed.Client` (see the module notes for ``scheduler``)."""
    from distributed import Client, LocalCluster

    if workers < 1 or threads_per_worker < 1:
        raise BadInputError("--workers and --threads-per-worker must be >= 1")
    if scheduler != "local":
        target = {"scheduler_file": scheduler} if Path(scheduler).is_file() else {"address": scheduler}
        try:
            client = Client(**target, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as error:
            raise BadInputError(f"cannot reach the Dask scheduler {scheduler}: {error}") from None
        with client:
            yield client
        return
    threads = str(torch_threads(workers, threads_per_worker))
    environment = {**{name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
                   "PYTHONPATH": child_environment()["PYTHONPATH"]}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                           memory_limit=memory_limit, host="127.0.0.1", dashboard_address=HTTP_ADDRESS,
                           scheduler_kwargs={"dashboard": False}, silence_logs=logging.ERROR, env=environment)
    with cluster, Client(cluster) as client:
        yield client
