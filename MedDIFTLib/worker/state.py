"""What the worker keeps between requests: loaded volumes, the displacement fields uploaded to
``meddift serve``, the last featurizer, the feature cache (CPU, see :mod:`.cache`) and the copies of
recent pyramids on a GPU.

Touched from the job thread only, but for the fields, which a server's upload adds from another thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import devices
from ..core.budget import Budget, MemoryEstimate, check_memory, default_budget
from ..core.errors import BadInputError, BadRequestError
from ..core.io import Volume, read_volume
from ..core.options import RunSettings
from ..core.progress import ProgressFn
from ..features import FeaturePyramid, Featurizer, create_featurizer
from ..features.protocol import region_extractor
from ..features.registry import RUN_OPTIONS
from ..grid.displacement_field import DisplacementField
from .cache import CacheKey, FeatureCache
from .protocol.requests import Limits

DEVICE_COPIES = 2
FIELDS_KEPT = 2  # uploaded displacement fields held for overlays requests, the most recent ones
FILL_STEP_VOXELS = 2**18  # working-grid voxels of one background fill step: a fraction of a second on the CPU


def device_name(name: str) -> str:
    """``auto | cpu | cuda | cuda:N`` -> ``cpu`` or ``cuda:N`` (checked to exist; auto prefers CUDA)."""
    device = devices.resolve_device(name)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return "cpu"


@dataclass(frozen=True)
class Features:
    """A volume's pyramid (CPU), its cache key, whether it came from the cache, and the seconds it took."""

    pyramid: FeaturePyramid
    key: CacheKey
    cached: bool
    seconds: float


@dataclass(frozen=True)
class Pair:
    """Fixed and moving volumes with their pyramids on the job's device."""

    fixed: Volume
    moving: Volume
    fixed_pyramid: FeaturePyramid
    moving_pyramid: FeaturePyramid
    cached: bool


class WorkerState:
    """Volumes by id, featurizer reuse, the feature cache and device copies.

    ``log(level, message)`` reports what the user should know (e.g. features too large to
    cache); ``limits`` are the request limits, reported by ``probe``.
    """

    def __init__(self, cache_bytes: int, limits: Limits, log: Callable[[str, str], None],
                 memory_budget: Budget | None = None) -> None:
        self.cache = FeatureCache(cache_bytes)
        self.limits = limits
        self.memory_budget = memory_budget
        self.volumes: dict[str, Volume] = {}
        self._fields: OrderedDict[str, DisplacementField] = OrderedDict()
        self._fields_lock = threading.Lock()
        self._log = log
        self._volume_count = 0
        self._featurizer_key: tuple | None = None
        self._featurizer: Featurizer | None = None
        self._device_copies: OrderedDict[tuple[CacheKey, str], FeaturePyramid] = OrderedDict()

    # ------------------------------------------------------------------ volumes

    def load(self, path: str) -> str:
        """Read a volume file or DICOM folder; the same content loaded twice keeps its id."""
        return self.add(read_volume(path))

    def add(self, volume: Volume) -> str:
        """Keep a volume read elsewhere (e.g. uploaded); the same content added twice keeps its id."""
        digest = volume.content_hash()
        volume_id = next((vid for vid, known in self.volumes.items() if known.content_hash() == digest), None)
        if volume_id is None:
            self._volume_count += 1
            volume_id = f"v{self._volume_count}"
        self.volumes[volume_id] = volume
        return volume_id

    def unload(self, volume_id: str) -> bool:
        """Forget a loaded volume (its cached features stay until evicted); False if it was unknown."""
        return self.volumes.pop(volume_id, None) is not None

    def volume(self, volume_id: str, field: str) -> Volume:
        """The loaded volume ``volume_id`` (``field`` names the request field in the error)."""
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise BadRequestError(f"{field}: unknown volume id {volume_id!r}; load the volume first")
        return volume

    # ------------------------------------------------------------------ uploaded fields

    def add_field(self, field_id: str, field: DisplacementField) -> None:
        """Hold a displacement field uploaded to ``meddift serve`` as ``field_id`` (its hash), for the
        ``transform_id`` of an overlays request; only the last :data:`FIELDS_KEPT` are kept."""
        with self._fields_lock:
            self._fields[field_id] = field
            self._fields.move_to_end(field_id)
            while len(self._fields) > FIELDS_KEPT:
                self._fields.popitem(last=False)

    def field(self, field_id: str) -> DisplacementField:
        """The uploaded field ``field_id``."""
        with self._fields_lock:
            found = self._fields.get(field_id)
        if found is None:
            raise BadRequestError(f"transform_id: no uploaded field {field_id!r}; upload it first (a server keeps "
                                  f"its session's last {FIELDS_KEPT})")
        return found

    def held_field_bytes(self) -> int:
        """Bytes of the uploaded fields held."""
        with self._fields_lock:
            return sum(field.displacement_lps_mm.nbytes for field in self._fields.values())

    def check_memory(self, estimate: MemoryEstimate) -> None:
        """Refuse a job whose estimate exceeds this worker's budget or the machine's (:mod:`MedDIFTLib.core.budget`)."""
        for budget in (self.memory_budget, default_budget()):
            check_memory(estimate, budget)

    # ------------------------------------------------------------------ features

    def featurizer(self, settings: RunSettings, device: str) -> Featurizer:
        """The featurizer of ``settings``' backbone and options on ``device`` (the last one is reused)."""
        backbone, options = settings.backbone, settings.backbone_options
        for name in RUN_OPTIONS:
            if name in options:
                raise BadRequestError(f"give the {name} in the request's '{name}' field, not in 'backbone_options'")
        key = (backbone, json.dumps(options, sort_keys=True), device)
        if key == self._featurizer_key:
            return self._featurizer
        self._featurizer_key = self._featurizer = None
        try:
            featurizer = create_featurizer(backbone, device=device, **options)
        except ImportError as error:
            raise BadRequestError(f"backbone {backbone!r} is not available in this installation ({error})") from None
        except TypeError as error:
            raise BadRequestError(f"backbone {backbone!r}: unsupported options ({error})") from None
        except ValueError as error:
            raise BadInputError(f"backbone {backbone!r}: {error}") from None
        self._featurizer_key, self._featurizer = key, featurizer
        return featurizer

    def features(
        self,
        settings: RunSettings,
        volume: Volume,
        device: str,
        progress: ProgressFn,
        role: str = "",
        regions: bool = False,
    ) -> Features:
        """Features of ``volume`` (kept on the CPU), from the cache when possible.

        ``role`` (e.g. ``fixed``) prefixes the progress messages. With ``regions`` the pyramid may
        be one that the point matcher fills where it reads (a backbone with local descriptors, on
        the CPU: :mod:`MedDIFTLib.features.regions`); otherwise it is complete.
        """
        featurizer = self.featurizer(settings, device)
        key = CacheKey.create(volume.content_hash(), featurizer.name, featurizer.config, device)
        prefix = f"{role}: " if role else ""

        def report(stage: str, fraction: float, message: str = "") -> None:
            progress(stage, fraction, prefix + message)

        started = time.perf_counter()
        pyramid = self.cache.get(key)
        if pyramid is not None:
            if pyramid.complete or regions:
                return Features(pyramid, key, True, 0.0)
            pyramid.fill(report)
            return Features(pyramid, key, False, time.perf_counter() - started)
        extract_regions = region_extractor(featurizer, device) if regions else None
        what = f"{prefix}{featurizer.name} features of {volume.name or 'volume'}"
        if extract_regions is not None:
            progress("features", 0.0, f"{what}, computed where the search reads them")
            pyramid = extract_regions(volume)
        else:
            progress("features", 0.0, what)
            pyramid = featurizer.extract(volume, report).to("cpu")
        seconds = time.perf_counter() - started
        if not self.cache.put(key, pyramid, volume.name):
            self._log(
                "warning",
                f"features of {volume.name or 'volume'} ({pyramid.nbytes / 2**20:.0f} MiB) exceed the feature cache "
                f"({self.cache.max_bytes / 2**20:.0f} MiB) and were not cached",
            )
        return Features(pyramid, key, False, seconds)

    def fill_behind(self, voxels: int = FILL_STEP_VOXELS) -> bool:
        """One bounded step of filling the rest of the most recently used pyramid that searches
        computed only in part; False when every cached pyramid is complete."""
        pyramid = self.cache.incomplete()
        return pyramid is not None and pyramid.fill_some(voxels)

    def on_device(self, features: Features, device: str) -> FeaturePyramid:
        """The pyramid on ``device``; copies on a GPU are kept for the last pair of volumes."""
        if device == "cpu":
            return features.pyramid
        slot = (features.key, device)
        copy = self._device_copies.get(slot)
        if copy is None:
            while len(self._device_copies) >= DEVICE_COPIES:
                self._device_copies.popitem(last=False)
            copy = self._device_copies[slot] = features.pyramid.to(device)
        else:
            self._device_copies.move_to_end(slot)
        return copy

    def pair(
        self,
        settings: RunSettings,
        fixed_id: str,
        moving_id: str,
        device: str,
        progress: ProgressFn,
        regions: bool = False,
    ) -> Pair:
        """Fixed and moving volumes and their pyramids on ``device`` (``regions``: see :meth:`features`)."""
        fixed = self.volume(fixed_id, "fixed_id")
        moving = self.volume(moving_id, "moving_id")
        fixed_features = self.features(settings, fixed, device, progress, "fixed", regions)
        moving_features = self.features(settings, moving, device, progress, "moving", regions)
        return Pair(
            fixed,
            moving,
            self.on_device(fixed_features, device),
            self.on_device(moving_features, device),
            fixed_features.cached and moving_features.cached,
        )

    def release_device_memory(self) -> None:
        """Drop the GPU copies and return cached GPU memory (after running out of memory)."""
        self._device_copies.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
