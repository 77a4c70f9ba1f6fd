"""The worker's feature cache: feature pyramids kept in CPU memory, least recently used first out.

A key is ``(volume content hash, backbone name, JSON of the featurizer config, device)``, so
the same image under another file name or volume id hits the cache, and any change of the
backbone configuration misses it. The bound is on the bytes of the feature tensors.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..features.protocol import FeaturePyramid

DEFAULT_CACHE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class CacheKey:
    content_hash: str
    backbone: str
    config_json: str
    device: str

    @staticmethod
    def create(content_hash: str, backbone: str, config: dict[str, Any], device: str) -> CacheKey:
        return CacheKey(content_hash, backbone, json.dumps(config, sort_keys=True, default=str), device)


@dataclass
class _Entry:
    pyramid: FeaturePyramid
    volume_name: str
    nbytes: int


class FeatureCache:
    """LRU map ``CacheKey -> FeaturePyramid`` holding at most ``max_bytes`` of features.

    A pyramid larger than the whole budget is not stored (the caller still uses it).
    Not thread-safe: the worker touches it from its job thread only.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey) -> FeaturePyramid | None:
        """The cached pyramid (now most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.pyramid

    def put(self, key: CacheKey, pyramid: FeaturePyramid, volume_name: str = "") -> bool:
        """Store ``pyramid``, evicting least recently used entries to fit; False if it cannot fit at all."""
        self._entries.pop(key, None)
        size = pyramid.nbytes
        if size > self.max_bytes:
            return False
        while self._entries and self.used_bytes + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = _Entry(pyramid, volume_name, size)
        return True

    def incomplete(self) -> FeaturePyramid | None:
        """The most recently used pyramid that is still filled on demand (None: all complete)."""
        for entry in reversed(self._entries.values()):
            if not entry.pyramid.complete:
                return entry.pyramid
        return None

    def clear(self) -> None:
        self._entries.clear()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: budget, bytes used (held for the whole pyramids), bytes computed so
        far (``filled_bytes``: less where features are filled on demand, until the idle worker has
        filled them) and the entries, least recently used first."""
        return {
            "max_bytes": self.max_bytes,
            "used_bytes": self.used_bytes,
            "filled_bytes": sum(entry.pyramid.filled_bytes for entry in self._entries.values()),
            "entries": [
                {
                    "volume": entry.volume_name,
                    "content_hash": key.content_hash,
                    "backbone": key.backbone,
                    "config": json.loads(key.config_json),
                    "device": key.device,
                    "bytes": entry.nbytes,
                    "filled_bytes": entry.pyramid.filled_bytes,
                }
                for key, entry in self._entries.items()
            ],
        }
