"""The exact per-item EMB cache policy, as it was before vectorisation: the reference model for tests.

`services/worker/core/emb_cache.py` runs this policy batch by batch (see its docstring for the one
approximation); `test_emb_policy.py` replays traces through both and compares hit rates, and
`test_emb_vectorised.py` checks the two against each other operation by operation where the batch
semantics are exact. Test code only: per-item Python, an `OrderedDict` LRU, a bytearray count-min sketch
and a bucketed ghost list, moved here unchanged (names prefixed `Ref`), plus `RefBlockedSketch`: the
same per-item sketch with the production sketch's blocked hashing, so that a comparison can hold the
hash functions equal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.worker.core.chunk_allocator import ChunkAllocator
from services.worker.core.counters import PoolCounters
from services.worker.core.geometry import PoolGeometry
from services.worker.core.relocation import Relocation

__all__ = ["RefBlockedSketch", "RefEmbCache", "RefEmbLookup", "RefFrequencySketch", "RefGhostList"]

_DEPTH = 4
_MAX_COUNT = 15
_MIN_WIDTH = 64
_MASK64 = (1 << 64) - 1
# Python's hash(int) is the identity, so keys are first mixed (one multiply + xorshift), then each
# row takes the top bits of a multiply by its own fixed odd constant (multiply-shift hashing). Without
# the pre-mix, runs of sequential ids land on correlated lattices in all four rows and absent keys
# look present far more often than count-min's independent-rows bound.
_PREMIX = 0xFF51AFD7ED558CCD
_ROW_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_HALVE = bytes(b >> 1 for b in range(256))


class RefFrequencySketch:
    """Approximate recent access counts of non-negative int keys."""

    def __init__(self, capacity: int, *, sample_size: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if sample_size is None:
            sample_size = 10 * capacity
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        width = _MIN_WIDTH
        while width < capacity:
            width *= 2
        self._width = width
        self._shift = 64 - (width.bit_length() - 1)
        self._rows = [bytearray(width) for _ in range(_DEPTH)]
        self._sample_size = sample_size
        self._additions = 0
        self._generation = 0

    @property
    def width(self) -> int:
        return self._width

    @property
    def sample_size(self) -> int:
        return self._sample_size

    @property
    def generation(self) -> int:
        """How many times the counters were halved; lets callers invalidate cached estimates."""
        return self._generation

    @property
    def max_count(self) -> int:
        return _MAX_COUNT

    def increment(self, key: int) -> None:
        self.increment_and_estimate(key)

    def increment_and_estimate(self, key: int) -> int:
        """Count one access of ``key``; returns its estimate afterwards (one hash instead of two)."""
        key = (key * _PREMIX) & _MASK64
        key ^= key >> 29
        s = self._shift
        m0, m1, m2, m3 = _ROW_MULTIPLIERS
        r0, r1, r2, r3 = self._rows
        i0 = ((key * m0) & _MASK64) >> s
        i1 = ((key * m1) & _MASK64) >> s
        i2 = ((key * m2) & _MASK64) >> s
        i3 = ((key * m3) & _MASK64) >> s
        c0, c1, c2, c3 = r0[i0], r1[i1], r2[i2], r3[i3]
        if c0 < _MAX_COUNT:
            c0 += 1
            r0[i0] = c0
        if c1 < _MAX_COUNT:
            c1 += 1
            r1[i1] = c1
        if c2 < _MAX_COUNT:
            c2 += 1
            r2[i2] = c2
        if c3 < _MAX_COUNT:
            c3 += 1
            r3[i3] = c3
        self._additions += 1
        if self._additions >= self._sample_size:
            self._age()
            return self.estimate(key)
        return min(c0, c1, c2, c3)

    def estimate(self, key: int) -> int:
        key = (key * _PREMIX) & _MASK64
        key ^= key >> 29
        s = self._shift
        m0, m1, m2, m3 = _ROW_MULTIPLIERS
        r0, r1, r2, r3 = self._rows
        return min(
            r0[((key * m0) & _MASK64) >> s],
            r1[((key * m1) & _MASK64) >> s],
            r2[((key * m2) & _MASK64) >> s],
            r3[((key * m3) & _MASK64) >> s],
        )

    def _age(self) -> None:
        for row in self._rows:
            row[:] = row.translate(_HALVE)
        self._additions = 0
        self._generation += 1


class RefBlockedSketch(RefFrequencySketch):
    """`RefFrequencySketch` (one key at a time, aging in the middle of a batch) with the counter layout and
    hashing of `services.worker.core.sketch.FrequencySketch`: one 64-byte block per key, four 16-counter
    rows in it, the block from one multiply-shift of the pre-mixed key and the four positions from four
    nibbles of another."""

    _BLOCK_MULTIPLIER = 0x9E3779B97F4A7C15
    _ROW_MULTIPLIER = 0xC2B2AE3D27D4EB4F

    def __init__(self, capacity: int, *, sample_size: int | None = None) -> None:
        super().__init__(capacity, sample_size=sample_size)
        self._table = bytearray(_DEPTH * self._width)
        blocks = _DEPTH * self._width // 64
        self._block_shift = 64 - (blocks.bit_length() - 1) - 6

    def _counters(self, key: int) -> tuple[int, int, int, int]:
        key = (key * _PREMIX) & _MASK64
        key ^= key >> 29
        base = ((((key * self._BLOCK_MULTIPLIER) & _MASK64) >> self._block_shift) >> 6) << 6
        r = (key * self._ROW_MULTIPLIER) & _MASK64
        return (
            base + ((r >> 60) & 15),
            base + 16 + ((r >> 56) & 15),
            base + 32 + ((r >> 52) & 15),
            base + 48 + ((r >> 48) & 15),
        )

    def increment_and_estimate(self, key: int) -> int:
        table = self._table
        counters = self._counters(key)
        for i in counters:
            if table[i] < _MAX_COUNT:
                table[i] += 1
        self._additions += 1
        if self._additions >= self._sample_size:
            self._age()
        return min(table[i] for i in counters)

    def estimate(self, key: int) -> int:
        table = self._table
        return min(table[i] for i in self._counters(key))

    def _age(self) -> None:
        self._table[:] = self._table.translate(_HALVE)
        self._additions = 0
        self._generation += 1


class RefGhostList:
    def __init__(self, capacity: int, sketch: RefFrequencySketch) -> None:
        if capacity < 0:
            raise ValueError(f"ghost capacity must be >= 0, got {capacity}")
        self._capacity = capacity
        self._sketch = sketch
        self._recency: OrderedDict[int, int] = OrderedDict()  # item -> bucket, oldest first
        self._buckets: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(sketch.max_count + 1)]
        self._generation = sketch.generation

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._recency)

    def __contains__(self, item: int) -> bool:
        return item in self._recency

    def items(self) -> list[int]:
        """Oldest first."""
        return list(self._recency)

    def remember(self, item: int, estimate: int | None = None) -> None:
        """Record ``item`` as the most recent ghost, ranked by its current sketch ``estimate``
        (looked up when not given)."""
        if self._capacity == 0:
            return
        self._sync()
        bucket = self._sketch.estimate(item) if estimate is None else estimate
        old = self._recency.pop(item, None)
        if old is not None:
            del self._buckets[old][item]
        self._recency[item] = bucket
        self._buckets[bucket][item] = None
        if len(self._recency) > self._capacity:
            oldest, oldest_bucket = self._recency.popitem(last=False)
            del self._buckets[oldest_bucket][oldest]

    def discard(self, item: int) -> None:
        bucket = self._recency.pop(item, None)
        if bucket is not None:
            del self._buckets[bucket][item]

    def hottest(self, max_items: int) -> list[int]:
        """Up to ``max_items`` items, highest estimate first, ties most recent first."""
        if max_items <= 0:
            return []
        self._sync()
        out: list[int] = []
        for bucket in reversed(self._buckets):
            for item in reversed(bucket):
                out.append(item)
                if len(out) == max_items:
                    return out
        return out

    def check_invariants(self) -> None:
        if len(self._recency) > self._capacity:
            raise AssertionError(f"ghost list holds {len(self._recency)} > capacity {self._capacity}")
        if sum(len(b) for b in self._buckets) != len(self._recency):
            raise AssertionError("ghost buckets and recency list disagree in size")
        for item, bucket in self._recency.items():
            if item not in self._buckets[bucket]:
                raise AssertionError(f"ghost item {item} missing from bucket {bucket}")

    def _sync(self) -> None:
        """After sketch aging, re-bucket everything (once per aging period, so amortised O(1))."""
        generation = self._sketch.generation
        if generation == self._generation:
            return
        self._generation = generation
        for bucket in self._buckets:
            bucket.clear()
        estimate = self._sketch.estimate
        for item in list(self._recency):  # recency order, so every bucket stays recency-ordered
            b = estimate(item)
            self._recency[item] = b
            self._buckets[b][item] = None


@dataclass(frozen=True, slots=True)
class RefEmbLookup:
    """Result of one batch lookup; positions index the caller's input sequence."""

    hit_slots: list[tuple[int, int]]  # (position, slot)
    misses: list[tuple[int, int]]  # (position, item)


class RefEmbCache:
    def __init__(
        self,
        geometry: PoolGeometry,
        *,
        ghost_capacity: int,
        sketch: RefFrequencySketch | None = None,
        counters: PoolCounters | None = None,
    ) -> None:
        self._geometry = geometry
        self._slots_per_chunk = geometry.emb_slots_per_chunk
        self._alloc = ChunkAllocator(self._slots_per_chunk)
        self._resident: OrderedDict[int, int] = OrderedDict()  # item -> slot, LRU first
        self._item_at: dict[int, int] = {}  # slot -> item (reverse map)
        self._sketch = sketch if sketch is not None else RefFrequencySketch(geometry.emb_slot_count)
        self._ghost = RefGhostList(ghost_capacity, self._sketch)
        self._counters = counters if counters is not None else PoolCounters()
        self._touched: set[int] = set()  # items whose residency changed since the last drain

    # ----------------------------------------------------------------- read access
    @property
    def sketch(self) -> RefFrequencySketch:
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
    def lookup(self, items: Sequence[int]) -> RefEmbLookup:
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
        return RefEmbLookup(hit_slots=hits, misses=misses)

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
