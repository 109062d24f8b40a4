"""Monotonic event counters of one pool (exported as metrics by the worker)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["PoolCounters"]


@dataclass
class PoolCounters:
    emb_hits: int = 0
    emb_misses: int = 0
    emb_admits: int = 0
    emb_rejects: int = 0  # misses refused by the TinyLFU filter
    emb_evictions: int = 0
    kv_hits: int = 0
    kv_misses: int = 0
    kv_evictions: int = 0  # entries dropped to make room (not stale-entry invalidations)
    kv_rejects: int = 0  # commits that could not fit at all
    chunks_moved: int = 0
    relocations: int = 0
    emb_miss_bytes: int = 0  # ordinary misses x emb_entry_bytes
    prefetch_bytes: int = 0  # asynchronous (incremental mode) refill
    critical_refill_bytes: int = 0  # synchronous refill on reallocation (naive mode)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
