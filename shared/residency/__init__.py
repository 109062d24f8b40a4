"""The residency protocol, written once: what workers, cachestate, gateways and the simulator all import.

- ``index``: ``ResidencyIndex``, the exact index (user -> workers with covered length, worker -> EMB items,
  item -> worker bitmask) under one memory cap, ``DEFAULT_MAX_ENTRIES``. cachestate keeps the cluster's;
  every gateway keeps a replica of it.
- ``delta``: ``ResidencyDelta`` and ``ResidencySnapshot``, what a worker's pool reports.
- ``parts``: messages sent in parts: their numbering, the one splitter (``PartPacker``, each part within
  ``DEFAULT_PART_BYTES``) and the one assembler of snapshots (``SnapshotAssembler``).
- ``digest``: a worker's residency as the lists of its ``WorkerDigest`` parts (``digest_parts``), and back
  (``snapshot_residency``).
- ``view``: the routing view as ``ViewUpdate`` parts (``pack_updates``).

The wire schemas themselves stay in ``shared/schemas.py``. Pure: no asyncio, nats, aiohttp or torch
(``tests/test_architecture.py`` checks it).
"""

from __future__ import annotations

from shared.residency.delta import ResidencyDelta, ResidencySnapshot
from shared.residency.digest import DigestResidency, digest_parts, snapshot_residency
from shared.residency.index import (
    DEFAULT_MAX_ENTRIES,
    DENSE_MAX_ITEMS,
    Evictions,
    IndexSizes,
    ResidencyDiff,
    ResidencyIndex,
)
from shared.residency.parts import (
    DEFAULT_PART_BYTES,
    Assembled,
    PartOutcome,
    PartPacker,
    PartVerdict,
    SnapshotAssembler,
    part_numbers,
)
from shared.residency.view import pack_updates

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_PART_BYTES",
    "DENSE_MAX_ITEMS",
    "Assembled",
    "DigestResidency",
    "Evictions",
    "IndexSizes",
    "PartOutcome",
    "PartPacker",
    "PartVerdict",
    "ResidencyDelta",
    "ResidencyDiff",
    "ResidencyIndex",
    "ResidencySnapshot",
    "SnapshotAssembler",
    "digest_parts",
    "pack_updates",
    "part_numbers",
    "snapshot_residency",
]
