"""The residency protocol, written once: what producers, consumers and the simulator all import.

- ``index``: ``ResidencyIndex``, the exact index (user -> workers with covered length, worker -> EMB items,
  item -> worker bitmask) under one memory cap, ``DEFAULT_MAX_ENTRIES``. cachestate keeps the cluster's;
  every gateway keeps a replica of it.
- ``delta``: ``ResidencyDelta`` and ``ResidencySnapshot``, what a worker's pool reports.

Pure: no asyncio, nats, aiohttp or torch (``tests/test_architecture.py`` checks it).
"""

from __future__ import annotations

from shared.residency.delta import ResidencyDelta, ResidencySnapshot
from shared.residency.index import (
    DEFAULT_MAX_ENTRIES,
    DENSE_MAX_ITEMS,
    Evictions,
    IndexSizes,
    ResidencyDiff,
    ResidencyIndex,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DENSE_MAX_ITEMS",
    "Evictions",
    "IndexSizes",
    "ResidencyDelta",
    "ResidencyDiff",
    "ResidencyIndex",
    "ResidencySnapshot",
]
