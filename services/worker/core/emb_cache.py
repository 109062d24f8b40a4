"""Embedding hot cache: item id -> EMB slot, over the EMB chunks the pool hands it.

Policy
------
* Eviction order is LRU (an ``OrderedDict`` item -> slot; head = least recently used).
* Admission is TinyLFU: every lookup increments a count-min :class:`FrequencySketch`. A missed
  item offered to :meth:`EmbCache.admit` takes a free slot if there is one; otherwise it is
  admitted only if ``estimate(candidate) > estimate(LRU victim)``, and then the victim is evicted
  and its slot reused. Ties keep the incumbent (one-hit wonders cannot flush the cache).
* A bounded "ghost" list (:class:`GhostList`) remembers recently missed and evicted items that are
  not resident. When EMB grows, :meth:`EmbCache.prefetch_candidates` picks what to refill from it:
  hottest first by sketch estimate (as of the item's last miss/eviction, refreshed on every sketch
  aging), ties most recent first. Ghost items are never resident (admission removes them).
* Releasing a chunk evicts globally coldest (LRU head) items until the survivors of the released
  chunk fit into free slots of the other EMB chunks, then relocates them there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.worker.core.chunk_allocator import ChunkAllocator
from services.worker.core.counters import PoolCounters
from services.worker.core.geometry import PoolGeometry
from services.worker.core.ghost_list import GhostList
from services.worker.core.relocation import Relocation
from services.worker.core.sketch import FrequencySketch

__all__ = ["EmbCache", "EmbLookup", "Relocation"]


@dataclass(frozen=True, slots=True)
class EmbLookup:
    """Result of one batch lookup; positions index the caller's input sequence."""

    hit_slots: list[tuple[int, int]]  # (position, slot)
    misses: list[tuple[int, int]]  # (position, item)


class EmbCache:
    def __init__(
        self,
        geometry: PoolGeometry,
        *,
        ghost_capacity: int,
        sketch: FrequencySketch | None = None,
        counters: PoolCounters | None = None,
    ) -> None:
        self._geometry = geometry
        self._slots_per_chunk = geometry.emb_slots_per_chunk
        self._alloc = ChunkAllocator(self._slots_per_chunk)
        self._resident: OrderedDict[int, int] = OrderedDict()  # item -> slot, LRU first
        self._item_at: dict[int, int] = {}  # slot -> item (reverse map)
        self._sketch = sketch if sketch is not None else FrequencySketch(geometry.emb_slot_count)
        self._ghost = GhostList(ghost_capacity, self._sketch)
        self._counters = counters if counters is not None else PoolCounters()
        self._touched: set[int] = set()  # items whose residency changed since the last drain

    # ----------------------------------------------------------------- read access
    @property
    def sketch(self) -> FrequencySketch:
        return self._sketch

    @property
    def counters(self) -> PoolCounters:
        return self._counters

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def size(self) -> int:
        return len(self._resident)

    @property
    def free_slots(self) -> int:
        return self._alloc.free_count

    @property
    def ghost_capacity(self) -> int:
        return self._ghost.capacity

    def chunks(self) -> list[int]:
        return self._alloc.chunks()

    def slot_of(self, item: int) -> int | None:
        return self._resident.get(item)

    def items(self) -> Iterable[int]:
        """Live view of resident items, LRU first; do not mutate the cache while iterating."""
        return self._resident.keys()

    def ghost_items(self) -> list[int]:
        """Ghost list, oldest first."""
        return self._ghost.items()

    def resident_in_chunk(self, chunk: int) -> int:
        return self._alloc.used_in(chunk)

    # ----------------------------------------------------------------- serving path
    def lookup(self, items: Sequence[int]) -> EmbLookup:
        """Resolve a batch of UNIQUE items: touch hits (LRU), count all in the sketch, ghost misses."""
        if len(set(items)) != len(items):
            raise ValueError("EmbCache.lookup: items must be unique")
        resident = self._resident
        increment = self._sketch.increment_and_estimate
        remember = self._ghost.remember
        hits: list[tuple[int, int]] = []
        misses: list[tuple[int, int]] = []
        for pos, item in enumerate(items):
            estimate = increment(item)
            slot = resident.get(item)
            if slot is None:
                misses.append((pos, item))
                remember(item, estimate)
            else:
                resident.move_to_end(item)
                hits.append((pos, slot))
        self._counters.emb_hits += len(hits)
        self._counters.emb_misses += len(misses)
        return EmbLookup(hit_slots=hits, misses=misses)

    def admit(self, items: Sequence[int]) -> list[tuple[int, int]]:
        """Offer fetched items for residency; returns accepted (item, slot) pairs to write.

        Items already resident are skipped. When no slot is free, each candidate must beat the
        LRU victim's sketch estimate. A victim may be an item hit earlier in the same batch, so the
        caller must read hit rows before writing admitted rows.
        """
        accepted: list[tuple[int, int]] = []
        placed: set[int] = set()
        resident = self._resident
        estimate = self._sketch.estimate
        rejects = 0
        for n, item in enumerate(items):
            if item in resident:
                continue
            slot = self._alloc.allocate()
            if slot is None:
                if not resident:  # no capacity at all
                    rejects += 1
                    continue
                victim = next(iter(resident))
                if victim in placed:
                    # Everything older is gone: the rest of the batch would only evict its own members
                    # (and hand one slot to two items in one write).
                    rejects += sum(1 for rest in items[n:] if rest not in resident)
                    break
                if estimate(item) <= estimate(victim):
                    rejects += 1
                    continue
                slot = self._evict(victim)
            self._place(item, slot)
            placed.add(item)
            accepted.append((item, slot))
        self._counters.emb_admits += len(accepted)
        self._counters.emb_rejects += rejects
        return accepted

    def install_prefetched(self, items: Sequence[int]) -> list[tuple[int, int]]:
        """Place items into FREE slots only (never evicts); skips resident ones; stops when full.

        Prefetched items enter at the cold (LRU) end: they are guesses, and must be the first to go
        when the region shrinks, before items that requests really touched.
        """
        installed: list[tuple[int, int]] = []
        for item in items:
            if item in self._resident:
                continue
            slot = self._alloc.allocate()
            if slot is None:
                break
            self._place(item, slot)
            self._resident.move_to_end(item, last=False)
            installed.append((item, slot))
        return installed

    def prefetch_candidates(self, max_items: int) -> list[int]:
        """Up to ``max_items`` ghost items (never resident), hottest first, ties most recent first.

        O(max_items): cheap enough to call every tick.
        """
        return self._ghost.hottest(max_items)

    # ----------------------------------------------------------------- chunk ownership
    def add_chunk(self, chunk: int) -> None:
        self._geometry.emb_slots_of_chunk(chunk)  # range check
        self._alloc.add_chunk(chunk)

    def choose_chunk_to_release(self) -> int:
        """The EMB chunk with the fewest resident items (fewest copies); ties: highest index."""
        chunks = self._alloc.chunks()
        if not chunks:
            raise ValueError("EmbCache owns no chunks")
        return min(chunks, key=lambda c: (self._alloc.used_in(c), -c))

    def release_chunk(self, chunk: int) -> list[Relocation]:
        """Give ``chunk`` up; returns the copies (in order) that move its survivors elsewhere."""
        if not self._alloc.owns(chunk):
            raise ValueError(f"chunk {chunk} is not owned by EMB")
        slots = self._geometry.emb_slots_of_chunk(chunk)
        item_at = self._item_at
        live = [slot for slot in slots if slot in item_at]
        self._alloc.detach_chunk(chunk)
        remaining = len(live)
        while self._alloc.free_count < remaining:
            slot = self._evict(next(iter(self._resident)))
            if slot in slots:
                remaining -= 1  # evicted from the leaving chunk itself: nothing to move
            else:
                self._alloc.release(slot)
        relocations: list[Relocation] = []
        for src in live:
            item = item_at.pop(src, None)
            if item is None:
                continue
            dst = self._alloc.allocate()
            if dst is None:  # pragma: no cover - guaranteed by the eviction loop above
                raise AssertionError("EMB release: no free slot for a survivor")
            item_at[dst] = item
            self._resident[item] = dst  # keeps the item's LRU position
            relocations.append(Relocation(src, dst))
        return relocations

    # ----------------------------------------------------------------- deltas / checks
    def drain_touched(self) -> set[int]:
        touched, self._touched = self._touched, set()
        return touched

    def check_invariants(self) -> None:
        """Raise AssertionError on any inconsistency (O(capacity); for tests and debugging)."""
        n = self._slots_per_chunk
        if len(self._item_at) != len(self._resident):
            raise AssertionError(
                f"EMB slot map ({len(self._resident)}) and reverse map ({len(self._item_at)}) differ in size"
            )
        used_per_chunk: dict[int, int] = {}
        for item, slot in self._resident.items():
            if self._item_at.get(slot) != item:
                holder = self._item_at.get(slot)
                raise AssertionError(f"EMB item {item} maps to slot {slot}, which holds {holder}")
            chunk = slot // n
            if not self._alloc.owns(chunk):
                raise AssertionError(f"EMB item {item} in slot {slot} of chunk {chunk}, not owned by EMB")
            used_per_chunk[chunk] = used_per_chunk.get(chunk, 0) + 1
        free_total = 0
        for chunk in self._alloc.chunks():
            free = self._alloc.free_units(chunk)
            free_set = set(free)
            if len(free_set) != len(free):
                raise AssertionError(f"EMB chunk {chunk} free list has duplicates")
            for slot in free_set:
                if slot // n != chunk:
                    raise AssertionError(f"EMB free slot {slot} listed under chunk {chunk}")
                if slot in self._item_at:
                    raise AssertionError(f"EMB slot {slot} is both free and used")
            if len(free) + used_per_chunk.get(chunk, 0) != n:
                raise AssertionError(f"EMB chunk {chunk}: free + used != {n}")
            free_total += len(free)
        if free_total != self._alloc.free_count:
            raise AssertionError("EMB free count out of sync")
        if self.size > self.capacity:
            raise AssertionError(f"EMB size {self.size} > capacity {self.capacity}")
        self._ghost.check_invariants()
        for item in self._ghost.items():
            if item in self._resident:
                raise AssertionError(f"EMB ghost item {item} is resident")

    # ----------------------------------------------------------------- internals
    def _place(self, item: int, slot: int) -> None:
        self._resident[item] = slot
        self._item_at[slot] = item
        self._ghost.discard(item)
        self._touched.add(item)

    def _evict(self, item: int) -> int:
        """Drop a resident item (to the ghost list); returns its slot, NOT yet released."""
        slot = self._resident.pop(item)
        del self._item_at[slot]
        self._ghost.remember(item)
        self._touched.add(item)
        self._counters.emb_evictions += 1
        return slot
