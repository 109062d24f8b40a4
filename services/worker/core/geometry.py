"""Address space of one worker's memory pool.

The pool is ONE device allocation of ``total_chunks * chunk_bytes`` bytes, split into equal
chunks; each chunk is owned by the embedding cache (EMB), the KV cache (KV) or nobody (FREE).
Both caches use GLOBAL ids into that allocation: EMB slot ``s`` lives at byte
``s * emb_entry_bytes`` and KV page ``p`` at byte ``p * kv_page_bytes``. Handing a chunk from one
cache to the other therefore never moves the rest of the pool; only ownership changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Owner", "PoolGeometry"]


class Owner(enum.IntEnum):
    """Which cache may use a chunk's bytes."""

    FREE = 0
    EMB = 1
    KV = 2


@dataclass(frozen=True)
class PoolGeometry:
    """Sizes that fix the pool layout; validated on construction."""

    budget_bytes: int
    chunk_bytes: int
    emb_entry_bytes: int
    kv_page_bytes: int
    kv_page_tokens: int

    def __post_init__(self) -> None:
        for name in ("budget_bytes", "chunk_bytes", "emb_entry_bytes", "kv_page_bytes", "kv_page_tokens"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"PoolGeometry.{name} must be > 0, got {value}")
        # A chunk must hold a whole number of entries/pages, or ids would straddle chunks.
        if self.chunk_bytes % self.emb_entry_bytes != 0:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must be a multiple of emb_entry_bytes "
                f"({self.emb_entry_bytes})"
            )
        if self.chunk_bytes % self.kv_page_bytes != 0:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must be a multiple of kv_page_bytes ({self.kv_page_bytes})"
            )
        if self.total_chunks < 1:
            raise ValueError(
                f"budget_bytes ({self.budget_bytes}) is smaller than one chunk ({self.chunk_bytes} bytes)"
            )

    @property
    def total_chunks(self) -> int:
        return self.budget_bytes // self.chunk_bytes

    @property
    def pool_bytes(self) -> int:
        """Bytes actually allocated: whole chunks only."""
        return self.total_chunks * self.chunk_bytes

    @property
    def unused_bytes(self) -> int:
        """Budget remainder smaller than a chunk; never allocated, reported for accounting."""
        return self.budget_bytes - self.pool_bytes

    @property
    def emb_slots_per_chunk(self) -> int:
        return self.chunk_bytes // self.emb_entry_bytes

    @property
    def kv_pages_per_chunk(self) -> int:
        return self.chunk_bytes // self.kv_page_bytes

    @property
    def emb_slot_count(self) -> int:
        """Rows of the allocation viewed as ``[n, emb_entry_bytes]`` (EMB capacity at alpha = 1)."""
        return self.total_chunks * self.emb_slots_per_chunk

    @property
    def kv_page_count(self) -> int:
        """Rows of the allocation viewed as ``[n, kv_page_bytes]`` (KV capacity at alpha = 0)."""
        return self.total_chunks * self.kv_pages_per_chunk

    def chunk_of_emb_slot(self, slot: int) -> int:
        if not 0 <= slot < self.emb_slot_count:
            raise ValueError(f"EMB slot {slot} outside [0, {self.emb_slot_count})")
        return slot // self.emb_slots_per_chunk

    def chunk_of_kv_page(self, page: int) -> int:
        if not 0 <= page < self.kv_page_count:
            raise ValueError(f"KV page {page} outside [0, {self.kv_page_count})")
        return page // self.kv_pages_per_chunk

    def emb_slots_of_chunk(self, chunk: int) -> range:
        self._check_chunk(chunk)
        n = self.emb_slots_per_chunk
        return range(chunk * n, (chunk + 1) * n)

    def kv_pages_of_chunk(self, chunk: int) -> range:
        self._check_chunk(chunk)
        n = self.kv_pages_per_chunk
        return range(chunk * n, (chunk + 1) * n)

    def _check_chunk(self, chunk: int) -> None:
        if not 0 <= chunk < self.total_chunks:
            raise ValueError(f"chunk {chunk} outside [0, {self.total_chunks})")
