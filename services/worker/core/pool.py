"""The pool facade the engine drives: one byte budget, chunks split between EMB and KV.

Everything here is synchronous bookkeeping. The engine performs the byte copies it is told to:
after :meth:`Pool.tick` it applies ``emb_relocations`` then ``kv_relocations`` (each in list
order), then writes ``refill`` rows, all before serving the next request.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.worker.core.counters import PoolCounters
from services.worker.core.emb_cache import EmbCache, EmbLookup, EmbPlacement, Items
from services.worker.core.geometry import Owner, PoolGeometry
from services.worker.core.kv_cache import KvCache, KvCommit, KvLookup
from services.worker.core.relocation import Relocation
from services.worker.core.sketch import FrequencySketch
from shared.residency import ResidencyDelta, ResidencySnapshot

__all__ = [
    "EmbLookup",
    "EmbPlacement",
    "Pool",
    "RefillMode",
    "Relocation",
    "ResidencyDelta",
    "ResidencySnapshot",
    "TickPlan",
]


# The ghost list (what prefetch and the naive refill draw from) is re-ranked in one pass whenever the
# sketch ages; bounding it keeps that pass to a few milliseconds whatever the pool size.
DEFAULT_GHOST_CAPACITY = 65_536


class RefillMode(enum.StrEnum):
    """How EMB capacity gained by reallocation is refilled.

    INCREMENTAL: through ordinary misses plus optional asynchronous prefetch (HELM's mode).
    NAIVE: synchronously, the hottest ghost items at once, before serving resumes (the baseline).
    """

    INCREMENTAL = "incremental"
    NAIVE = "naive"


@dataclass(frozen=True, slots=True)
class TickPlan:
    chunks_moved: int
    emb_relocations: list[Relocation] = field(default_factory=list)
    kv_relocations: list[Relocation] = field(default_factory=list)
    refill: EmbPlacement = field(default_factory=EmbPlacement.empty)  # NAIVE mode only


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


class Pool:
    def __init__(
        self,
        geometry: PoolGeometry,
        *,
        alpha: float,
        max_chunks_per_tick: int = 1,
        refill_mode: RefillMode = RefillMode.INCREMENTAL,
        ghost_capacity: int | None = None,
        sketch_sample_factor: int = 10,
    ) -> None:
        _check_alpha(alpha)
        if max_chunks_per_tick < 1:
            raise ValueError(f"max_chunks_per_tick must be >= 1, got {max_chunks_per_tick}")
        if sketch_sample_factor < 1:
            raise ValueError(f"sketch_sample_factor must be >= 1, got {sketch_sample_factor}")
        self.geometry = geometry
        self.counters = PoolCounters()
        self.max_chunks_per_tick = max_chunks_per_tick
        self.refill_mode = RefillMode(refill_mode)
        max_slots = geometry.emb_slot_count  # EMB capacity if alpha were 1
        sketch = FrequencySketch(max_slots, sample_size=sketch_sample_factor * max_slots)
        self.emb = EmbCache(
            geometry,
            ghost_capacity=min(max_slots, DEFAULT_GHOST_CAPACITY)
            if ghost_capacity is None
            else ghost_capacity,
            sketch=sketch,
            counters=self.counters,
        )
        self.kv = KvCache(geometry, counters=self.counters)
        total = geometry.total_chunks
        emb_chunks = round(alpha * total)
        self._owner = [Owner.EMB if c < emb_chunks else Owner.KV for c in range(total)]
        self._counts = {Owner.FREE: 0, Owner.EMB: emb_chunks, Owner.KV: total - emb_chunks}
        for chunk in range(total):
            if chunk < emb_chunks:
                self.emb.add_chunk(chunk)
            else:
                self.kv.add_chunk(chunk)
        self._target_alpha = alpha
        self._target_emb_chunks = emb_chunks

    # ----------------------------------------------------------------- split
    def owner(self, chunk: int) -> Owner:
        if not 0 <= chunk < len(self._owner):
            raise ValueError(f"chunk {chunk} outside [0, {len(self._owner)})")
        return self._owner[chunk]

    @property
    def emb_chunks(self) -> int:
        return self._counts[Owner.EMB]

    @property
    def kv_chunks(self) -> int:
        return self._counts[Owner.KV]

    @property
    def free_chunks(self) -> int:
        return self._counts[Owner.FREE]

    @property
    def alpha(self) -> float:
        return self.emb_chunks / self.geometry.total_chunks

    @property
    def target_alpha(self) -> float:
        return self._target_alpha

    @property
    def target_emb_chunks(self) -> int:
        return self._target_emb_chunks

    def set_target(self, alpha: float) -> None:
        """Aim the split at ``alpha``; :meth:`tick` then moves toward it a bounded step at a time."""
        _check_alpha(alpha)
        self._target_alpha = alpha
        self._target_emb_chunks = round(alpha * self.geometry.total_chunks)

    def tick(self) -> TickPlan:
        """Move at most ``max_chunks_per_tick`` chunks toward the target; call between batches."""
        emb_relocations: list[Relocation] = []
        kv_relocations: list[Relocation] = []
        moved = 0
        emb_grew = False
        while moved < self.max_chunks_per_tick and self.emb_chunks != self._target_emb_chunks:
            if self.emb_chunks < self._target_emb_chunks:
                chunk = self._a_free_chunk()
                if chunk is None:
                    chunk = self.kv.choose_chunk_to_release()
                    kv_relocations.extend(self.kv.release_chunk(chunk))
                self.emb.add_chunk(chunk)
                self._set_owner(chunk, Owner.EMB)
                emb_grew = True
            else:
                chunk = self.emb.choose_chunk_to_release()
                emb_relocations.extend(self.emb.release_chunk(chunk))
                self.kv.add_chunk(chunk)
                self._set_owner(chunk, Owner.KV)
            moved += 1
        refill = EmbPlacement.empty()
        if emb_grew and self.refill_mode is RefillMode.NAIVE:
            candidates = self.emb.prefetch_candidates(self.emb.free_slots)
            refill = self.emb.install_prefetched(candidates)
            self.counters.critical_refill_bytes += len(refill) * self.geometry.emb_entry_bytes
        self.counters.chunks_moved += moved
        self.counters.relocations += len(emb_relocations) + len(kv_relocations)
        return TickPlan(
            chunks_moved=moved, emb_relocations=emb_relocations, kv_relocations=kv_relocations, refill=refill
        )

    # ----------------------------------------------------------------- EMB
    def emb_lookup(self, items: Items) -> EmbLookup:
        """Items must be unique (``np.unique`` output is the cheapest to check)."""
        result = self.emb.lookup(items)
        self.counters.emb_miss_bytes += result.misses * self.geometry.emb_entry_bytes
        return result

    def emb_admit(self, items: Items) -> EmbPlacement:
        """Offer fetched misses; pass the lookup's own ``miss_items`` array to reuse its estimates."""
        return self.emb.admit(items)

    def prefetch_plan(self, max_bytes: int) -> npt.NDArray[np.int64]:
        """Items worth fetching in the background into free EMB slots (INCREMENTAL mode only)."""
        if self.refill_mode is not RefillMode.INCREMENTAL or self.target_emb_chunks < self.emb_chunks:
            return np.zeros(0, dtype=np.int64)  # never refill a region that is being given away
        limit = min(self.emb.free_slots, max_bytes // self.geometry.emb_entry_bytes)
        return self.emb.prefetch_candidates(limit)

    def install_prefetched(self, items: Items) -> EmbPlacement:
        installed = self.emb.install_prefetched(items)
        self.counters.prefetch_bytes += len(installed) * self.geometry.emb_entry_bytes
        return installed

    # ----------------------------------------------------------------- KV
    def kv_lookup(self, user: str, history_len: int, prefix_hash: Callable[[int], bytes]) -> KvLookup:
        return self.kv.lookup(user, history_len, prefix_hash)

    def kv_commit(self, user: str, length: int, prefix_hash: bytes) -> KvCommit | None:
        return self.kv.commit(user, length, prefix_hash)

    def kv_discard(self, user: str) -> None:
        self.kv.discard(user)

    # ----------------------------------------------------------------- residency reporting
    def drain_deltas(self) -> ResidencyDelta:
        emb_added, emb_removed = self.emb.drain_changes()
        kv_touched = self.kv.drain_touched()
        kv_upserts: dict[str, int] = {}
        kv_removed: list[str] = []
        for user in sorted(kv_touched):
            entry = self.kv.get(user)
            if entry is None:
                kv_removed.append(user)
            else:
                kv_upserts[user] = entry.length
        return ResidencyDelta(
            kv_upserts=kv_upserts, kv_removed=kv_removed, emb_added=emb_added, emb_removed=emb_removed
        )

    def snapshot(self) -> ResidencySnapshot:
        """Full residency; resets the delta baseline to it."""
        self.emb.drain_touched()
        self.kv.drain_touched()
        kv = self.kv.entries_snapshot()
        return ResidencySnapshot(kv={user: kv[user] for user in sorted(kv)}, emb=sorted(self.emb.items()))

    # ----------------------------------------------------------------- checks
    def check_invariants(self) -> None:
        """Raise AssertionError describing the first broken invariant (O(capacity))."""
        total = self.geometry.total_chunks
        if len(self._owner) != total:
            raise AssertionError(f"ownership array has {len(self._owner)} chunks, geometry says {total}")
        counted = {owner: self._owner.count(owner) for owner in Owner}
        if counted != self._counts:
            raise AssertionError(f"chunk counts {self._counts} disagree with ownership array {counted}")
        if sum(counted.values()) != total:
            raise AssertionError(f"EMB+KV+FREE chunks {sum(counted.values())} != total_chunks {total}")
        emb_owned = [c for c in range(total) if self._owner[c] is Owner.EMB]
        kv_owned = [c for c in range(total) if self._owner[c] is Owner.KV]
        if self.emb.chunks() != emb_owned:
            raise AssertionError(f"EMB cache holds chunks {self.emb.chunks()}, pool assigns {emb_owned}")
        if self.kv.chunks() != kv_owned:
            raise AssertionError(f"KV cache holds chunks {self.kv.chunks()}, pool assigns {kv_owned}")
        owned_bytes = (len(emb_owned) + len(kv_owned)) * self.geometry.chunk_bytes
        if owned_bytes > self.geometry.budget_bytes:
            raise AssertionError(f"owned bytes {owned_bytes} exceed budget {self.geometry.budget_bytes}")
        self.emb.check_invariants()
        self.kv.check_invariants()

    # ----------------------------------------------------------------- internals
    def _a_free_chunk(self) -> int | None:
        if self._counts[Owner.FREE] == 0:
            return None
        return self._owner.index(Owner.FREE)

    def _set_owner(self, chunk: int, owner: Owner) -> None:
        self._counts[self._owner[chunk]] -= 1
        self._owner[chunk] = owner
        self._counts[owner] += 1
