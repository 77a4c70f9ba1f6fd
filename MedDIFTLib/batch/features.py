"""Features of one volume, computed once per batch by one Dask task and shared by its pairs.

:func:`volume_features` is the task: it reads the volume, extracts its pyramid with the batch's
backbone and returns it (on the CPU) as the task's result, which Dask hands to every pair task that
uses the volume, moving it between workers when a pair runs elsewhere. A pyramid larger than
``share_limit_bytes`` is too large to move: the task keeps it in its worker's own cache and returns
only its key, and a pair task on another worker recomputes it there (:func:`pyramid_for`). Each
worker process keeps a few such pyramids and one featurizer per configuration (networks and weights
load once per worker).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..core.io import read_volume
from ..features.protocol import FeaturePyramid
from .job import FeatureRecipe

# Large pyramids each worker process keeps; the least recently stored goes first.
LOCAL_PYRAMIDS = 2


@dataclass
class VolumeFeatures:
    """A feature task's result: the pyramid (CPU), or None when it stayed on ``worker`` (too large)."""

    key: str
    pyramid: FeaturePyramid | None
    nbytes: int
    seconds: float
    worker: str


_lock = threading.Lock()
_featurizers: dict[str, Any] = {}
_local: OrderedDict[str, FeaturePyramid] = OrderedDict()


def _featurizer(recipe: FeatureRecipe):
    name = repr(recipe)
    with _lock:
        if name not in _featurizers:
            _featurizers[name] = recipe.featurizer()
        return _featurizers[name]


def this_worker() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


def _extract(path: str, recipe: FeatureRecipe) -> tuple[FeaturePyramid, float]:
    volume = read_volume(path)
    started = time.perf_counter()
    pyramid = _featurizer(recipe).extract(volume).to("cpu")
    return pyramid, time.perf_counter() - started


def _keep_local(key: str, pyramid: FeaturePyramid) -> None:
    with _lock:
        _local[key] = pyramid
        _local.move_to_end(key)
        while len(_local) > LOCAL_PYRAMIDS:
            _local.popitem(last=False)


def volume_features(path: str, key: str, recipe: FeatureRecipe, share_limit_bytes: int) -> VolumeFeatures:
    """The Dask task: features of the volume at ``path`` (``key``: its content hash and the recipe)."""
    pyramid, seconds = _extract(path, recipe)
    if pyramid.nbytes <= share_limit_bytes:
        return VolumeFeatures(key, pyramid, pyramid.nbytes, seconds, this_worker())
    _keep_local(key, pyramid)
    return VolumeFeatures(key, None, pyramid.nbytes, seconds, this_worker())


def pyramid_for(features: VolumeFeatures, path: str, recipe: FeatureRecipe) -> tuple[FeaturePyramid, float]:
    """The pyramid a pair task uses, and the seconds spent here: the shared one, this worker's
    cached one, or (too large to have moved, made on another worker) recomputed here."""
    if features.pyramid is not None:
        return features.pyramid, 0.0
    with _lock:
        cached = _local.get(features.key)
    if cached is not None:
        return cached, 0.0
    pyramid, seconds = _extract(path, recipe)
    _keep_local(features.key, pyramid)
    return pyramid, seconds
