"""Embedding hot cache: item id -> EMB slot, over the EMB chunks the pool hands it, a batch per call.

Map
---
* :class:`EmbCache` -- the cache. Serving path: :meth:`EmbCache.lookup` (a request's unique items),
  :meth:`EmbCache.admit` (its misses, once fetched), :meth:`EmbCache.install_prefetched` (background
  refill into free slots). Chunk ownership: :meth:`EmbCache.add_chunk`, :meth:`EmbCache.release_chunk`.
* :class:`EmbLookup` / :class:`EmbPlacement` -- results as int64 arrays: positions into the array the
  caller passed, items, slots.
* Collaborators: :class:`~services.worker.core.sketch.FrequencySketch` (TinyLFU counts),
  :class:`~services.worker.core.ghost_list.GhostList` (recent non-residents, what to refill from),
  :class:`~services.worker.core.chunk_allocator.ChunkAllocator` (free slots, lowest chunk first).

Policy
------
* Eviction order is LRU. Within one lookup, hits become most recent in input order; admitted items
  then become most recent in offer order.
* Admission is TinyLFU: every lookup increments a count-min sketch (depth 4, saturating at 15, halved
  after ``sample_size`` increments). A missed item offered to :meth:`EmbCache.admit` takes a free slot
  if there is one; otherwise it must have an estimate strictly greater than its victim's (ties keep the
  incumbent: one-hit wonders cannot flush the cache), and then the victim is evicted and its slot reused.
* Batch admission. Offered one at a time (the exact policy), the candidates that find no free slot
  meet the least recently used residents in order: candidate ``i`` faces victim ``j_i`` = the number of
  candidates admitted before it (a rejected candidate leaves its victim to the next one). A batch
  computes ``j`` vectorised, by fixed-point iteration (:meth:`EmbCache._duel`): everyone first faces the
  oldest victim; one round recomputes ``j`` as the prefix count of admissions and re-decides; a final
  round gives each still-admitted candidate its victim ``j_i`` (distinct: ``j`` counts admissions)
  and drops those that do not beat it. **This is the one approximation of the exact per-item policy**:
  it is exact when nobody beats the oldest victim, when every candidate beats its victim in order, and
  whenever the iteration has converged; otherwise a few decisions may differ from the sequential ones.
  ``tests/worker/test_emb_policy.py`` replays seeded Zipf and drifting-popularity traces through this
  cache and through the exact per-item model (``tests/worker/reference_emb.py``): hit rates agree
  within one percentage point. (The simpler "candidate ``i`` against the ``i``-th oldest" pairing
  misses that by up to 3 points on small caches.) The sketch ages at the end of a batch rather than
  in its middle (see its module), and the estimates a lookup records (ghost ranks, admission) are
  taken once the whole batch is counted.
* Victims are residents from before the call, never items this call places, so no slot is handed to
  two items in one call; a victim may be an item hit earlier in the same request, so the caller reads
  hit rows before writing admitted rows.
* A bounded ghost list remembers recently missed and evicted items that are not resident. When EMB
  grows, :meth:`EmbCache.prefetch_candidates` picks what to refill from it: hottest first by sketch
  estimate (as of the item's last miss/eviction, refreshed on every sketch aging), ties most recent
  first. Ghost items are never resident (admission removes them). Prefetched items enter at the cold
  (LRU) end: they are guesses.
* Releasing a chunk evicts the globally least recently used items until the survivors of the released
  chunk fit into free slots of the other EMB chunks, then relocates them there (keeping their recency).

Data structures
---------------
* ``map``: a dense int64 array indexed by item id, grown to the largest id seen plus an eighth (and at
  least doubled: amortised O(1) per id; ids must lie in ``[0, 2**31)``). A resident item's entry packs
  its slot (high 32 bits), a "residency changed since the last drain" bit (bit 31) and its recency
  stamp (low 31 bits); a non-resident item's entry is -1, or -2 if it was resident at some point since
  the last drain. One gather thus answers "resident? where? how recent?", and a touch rewrites the
  cache line it just read. With the ghost list's int32 position array, **12 bytes per item id** up to
  the largest id seen (12 MB for a million-item catalogue), whatever the cache size; plus 8 bytes per
  EMB slot (slot -> item) and the LRU log (9 bytes an entry, at most about 2.5 entries per resident
  item).
* Residency deltas: an item whose residency changes while unmarked (no touched bit, not -2) is
  appended to a change log, and then marked; so the log holds each changed item once, and
  :meth:`EmbCache.drain_changes` costs O(changes): it splits the log by current residency, sorts, and
  clears the marks. The log is bounded to one entry per 8 item ids; past that it is dropped, and the
  next drain finds the marks in one pass over the map instead (a few milliseconds per million ids,
  amortised over at least as many changes as an eighth of the ids).
* Exact LRU without per-item work: an append-only log of item ids with an alive flag per entry. A
  touch kills the item's previous entry (its log index is the stamp in the map value just gathered),
  appends a live one and stores its index as the new stamp. The live entries in log order are the LRU
  order; the k oldest residents are found by scanning the alive flags forward from the log head (a
  byte per entry, nothing looked up for dead ones), and the dead entries passed over are dropped (see
  ``_lru_oldest``). When the log runs out of room it is compacted (live entries copied, stamps
  renumbered), leaving a gap in front for cold-end inserts and at least as much room behind as there
  are live entries: touches cost amortised O(1) numpy work, and a lookup a fixed couple of dozen numpy
  calls whatever its size.
* Free slots come from the :class:`ChunkAllocator` (lowest chunk first), a loop over chunks per call.
* :meth:`EmbCache.admit` reuses the estimates of the last lookup when it is handed that lookup's very
  ``miss_items`` array and the sketch has not changed since (they would be recomputed identically); it
  still checks the array (unique, not resident) itself, so a caller that changed it in between can
  only skew admission decisions, never the cache's structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.worker.core.chunk_allocator import ChunkAllocator
from services.worker.core.counters import PoolCounters
from services.worker.core.geometry import PoolGeometry
from services.worker.core.ghost_list import GhostList
from services.worker.core.relocation import Relocation
from services.worker.core.sketch import FrequencySketch

__all__ = ["EmbCache", "EmbLookup", "EmbPlacement", "Items", "Relocation"]

IntArray = npt.NDArray[np.int64]
U8Array = npt.NDArray[np.uint8]
Items = IntArray | Sequence[int]

_MAX_ITEM = 2**31 - 1
_MIN_MAP = 1024
_MIN_LOG = 1024
# Packed map values (see the module docstring): resident = (slot << 32) | touched << 31 | stamp.
_STAMP_BITS = np.int64(0x7FFFFFFF)  # the item's log index
_TOUCHED = np.int64(1 << 31)  # residency changed since the last drain
_KEEP = np.int64(-(1 << 31))  # slot and touched bit
_LOW = np.int64(0xFFFFFFFF)  # touched bit and stamp
_CHANGED = np.int64(-(1 << 63) | (1 << 31))  # sign and touched bit: == _TOUCHED for changed residents
_ABSENT = -1  # not resident, unchanged since the last drain
_GONE = -2  # not resident, was resident at some point since the last drain
_STAMP_LIMIT = 0x7FFFFFFE  # the stamp bits of _ABSENT and _GONE: never a log index
_DUEL_ROUNDS = 1  # fixed-point rounds of batch admission (see EmbCache._duel)
_MIN_CHANGES = 1024  # initial length of the change log
_CHANGES_PER_ITEM_ID = 8  # the change log holds at most one entry per this many item ids, then overflows
_UNBEATABLE = np.uint8(16)  # above any sketch estimate


def _empty() -> IntArray:
    return np.zeros(0, dtype=np.int64)


def _iota(n: int) -> IntArray:
    out = np.arange(n, dtype=np.int64)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, slots=True, eq=False)
class EmbLookup:
    """Result of one batch lookup; positions index the caller's input array."""

    hit_positions: IntArray
    hit_slots: IntArray  # slot of each hit, same length
    miss_positions: IntArray
    miss_items: IntArray  # item at each miss position

    @property
    def hits(self) -> int:
        return len(self.hit_positions)

    @property
    def misses(self) -> int:
        return len(self.miss_positions)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: equal by value, unhashable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EmbLookup):
            return NotImplemented
        return (
            np.array_equal(self.hit_positions, other.hit_positions)
            and np.array_equal(self.hit_slots, other.hit_slots)
            and np.array_equal(self.miss_positions, other.miss_positions)
            and np.array_equal(self.miss_items, other.miss_items)
        )


@dataclass(frozen=True, slots=True, eq=False)
class EmbPlacement:
    """Items given slots by one call: write row ``fetched[positions[i]]`` into ``slots[i]``."""

    positions: IntArray  # indices into the array that was offered
    items: IntArray
    slots: IntArray

    @staticmethod
    def empty() -> EmbPlacement:
        return EmbPlacement(_empty(), _empty(), _empty())

    def __len__(self) -> int:
        return len(self.items)

    def pairs(self) -> list[tuple[int, int]]:
        """[(item, slot), ...] in placement order (for tests and logs)."""
        return list(zip(self.items.tolist(), self.slots.tolist(), strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: equal by value, unhashable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EmbPlacement):
            return NotImplemented
        return (
            np.array_equal(self.positions, other.positions)
            and np.array_equal(self.items, other.items)
            and np.array_equal(self.slots, other.slots)
        )


def _as_items(items: Items) -> IntArray:
    """The items as a 1-D int64 array (the caller's own array when it already is one)."""
    if isinstance(items, np.ndarray):
        if items.ndim != 1:
            raise ValueError(f"items must be 1-D, got shape {items.shape}")
        if items.dtype == np.int64:
            return items
        if items.dtype.kind not in "iu":
            raise TypeError(f"items must be integers, got {items.dtype}")
        return items.astype(np.int64)
    arr = np.asarray(items, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"items must be 1-D, got shape {arr.shape}")
    return arr


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
        self._item_at: IntArray = np.full(geometry.emb_slot_count, -1, dtype=np.int64)  # slot -> item
        # item -> (slot << 32) | touched << 31 | stamp, or _ABSENT / _GONE
        self._map: IntArray = np.full(0, -1, dtype=np.int64)
        self._size = 0
        # LRU log (see the module docstring): live entries lie in [head, tail).
        self._log: IntArray = np.zeros(0, dtype=np.int64)
        self._alive: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)  # the entry is its item's stamp
        self._log_iota = _iota(0)  # log index -> itself, as long as the log
        self._head = 0
        self._tail = 0
        # Items whose residency changed since the last drain, each once (see _record_changes); None
        # once it overflowed, until the next drain (which then scans the map).
        self._changes: IntArray | None = np.zeros(_MIN_CHANGES, dtype=np.int64)
        self._n_changes = 0
        self._sketch = sketch if sketch is not None else FrequencySketch(geometry.emb_slot_count)
        self._ghost = GhostList(ghost_capacity, self._sketch)
        self._counters = counters if counters is not None else PoolCounters()
        # (miss_items of the last lookup, their estimates, sketch version then): reused by admit
        self._pending: tuple[IntArray, U8Array, int] | None = None

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
        return self._size

    @property
    def free_slots(self) -> int:
        return self._alloc.free_count

    @property
    def ghost_capacity(self) -> int:
        return self._ghost.capacity

    def chunks(self) -> list[int]:
        return self._alloc.chunks()

    def slot_of(self, item: int) -> int | None:
        if not 0 <= item < len(self._map):
            return None
        packed = int(self._map[item])
        return None if packed < 0 else packed >> 32

    def items(self) -> list[int]:
        """Resident items, LRU first (a copy; O(log))."""
        h, t = self._head, self._tail
        items: list[int] = self._log[h:t][self._alive[h:t]].tolist()
        return items

    def ghost_items(self) -> list[int]:
        """Ghost list, oldest first."""
        return self._ghost.items()

    def resident_in_chunk(self, chunk: int) -> int:
        return self._alloc.used_in(chunk)

    # ----------------------------------------------------------------- serving path
    def lookup(self, items: Items) -> EmbLookup:
        """Resolve a batch of UNIQUE items: touch hits (LRU), count all in the sketch, ghost misses."""
        arr = _as_items(items)
        n = len(arr)
        self._pending = None
        if n == 0:
            return EmbLookup(_empty(), _empty(), _empty(), _empty())
        if not self._check_items(arr):
            raise ValueError("EmbCache.lookup: items must be unique")
        packed = self._map[arr]
        estimates = self._sketch.increment_many(arr)
        hit = packed >= 0
        n_hits = int(np.count_nonzero(hit))
        self._counters.emb_hits += n_hits
        self._counters.emb_misses += n - n_hits
        if n_hits == n:  # the common case of a warm cache: no compress at all
            slots = packed >> 32
            self._alive[packed & _STAMP_BITS] = False  # their old log entries
            packed &= _KEEP
            self._touch(arr, packed)
            return EmbLookup(np.arange(n, dtype=np.int64), slots, _empty(), _empty())
        if n_hits == 0:
            miss_positions = np.arange(n, dtype=np.int64)
            miss_items = arr.copy()
            miss_estimates = estimates
            hit_positions = hit_slots = _empty()
        else:
            hit_positions = hit.nonzero()[0]
            miss_positions = (~hit).nonzero()[0]
            hit_packed = packed[hit_positions]
            hit_slots = hit_packed >> 32
            self._alive[hit_packed & _STAMP_BITS] = False
            hit_packed &= _KEEP
            self._touch(arr[hit_positions], hit_packed)
            miss_items = arr[miss_positions]
            miss_estimates = estimates[miss_positions]
        self._ghost.remember(miss_items, miss_estimates)
        self._pending = (miss_items, miss_estimates, self._sketch.version)
        return EmbLookup(hit_positions, hit_slots, miss_positions, miss_items)

    def admit(self, items: Items) -> EmbPlacement:
        """Offer fetched items for residency; returns the placements to write.

        Items already resident (and repeats) are skipped. Free slots go to the first candidates; the
        rest duel with the least recently used residents (see the module docstring). A victim may be an
        item hit earlier in the same request, so the caller must read hit rows before writing admitted
        rows. Passing the lookup's own ``miss_items`` array saves estimating the candidates again.
        """
        arr = _as_items(items)
        pending, self._pending = self._pending, None
        estimates: U8Array | None = None
        if pending is not None and pending[0] is arr and pending[2] == self._sketch.version:
            estimates = pending[1]  # the misses of the lookup just made: their estimates, by position
        offered = self._offer(arr)  # positions of non-resident items, first occurrences, in order
        m = len(offered)
        if m == 0:
            return EmbPlacement.empty()
        n_free = min(self._alloc.free_count, m)
        paired = min(m - n_free, self._size)  # candidates that compete for a victim
        won = victim_of = _empty()
        if paired:
            victims, victim_packed, victim_pos = self._lru_oldest(paired)
            if estimates is not None:
                cand_est = estimates[offered[n_free : n_free + paired]]
            else:
                cand_est = self._sketch.estimate_many(arr[offered[n_free : n_free + paired]])
            victim_est = self._sketch.estimate_many(victims)
            won, victim_of = self._duel(cand_est, victim_est)
        n_won = len(won)
        self._counters.emb_rejects += m - n_free - n_won
        if n_free + n_won == 0:
            return EmbPlacement.empty()
        if n_won == paired:  # then victim_of is 0..paired-1
            positions = offered[: n_free + paired]
        else:
            positions = offered[n_free + won]
            if n_free:
                positions = np.concatenate([offered[:n_free], positions])
        placed = arr[positions]
        self._record_changes(placed, self._map[placed] == _ABSENT)
        if n_won:
            if n_won == paired:  # every victim goes, in order
                evicted, evicted_packed, evicted_est = victims, victim_packed, victim_est
                self._alive[victim_pos] = False
                self._head = int(victim_pos[-1]) + 1  # nothing before is alive
            else:
                evicted, evicted_packed, evicted_est = (
                    victims[victim_of],
                    victim_packed[victim_of],
                    victim_est[victim_of],
                )
                self._alive[victim_pos[victim_of]] = False
            self._record_changes(evicted, (evicted_packed & _TOUCHED) == 0)
            self._map[evicted] = _GONE
            slots = evicted_packed >> 32
            self._ghost.remember(evicted, evicted_est, new=True)
            self._counters.emb_evictions += n_won
            if n_free:
                slots = np.concatenate([self._allocate(n_free), slots])
        else:
            slots = self._allocate(n_free)
        self._size += n_free
        self._place(placed, slots)
        slot_bits = slots << 32
        slot_bits |= _TOUCHED
        self._touch(placed, slot_bits)
        self._counters.emb_admits += len(placed)
        return EmbPlacement(positions, placed, slots)

    @staticmethod
    def _duel(cand_est: U8Array, victim_est: U8Array) -> tuple[IntArray, IntArray]:
        """TinyLFU duels of a batch: (winning candidates, the victim each evicts), indices into the two
        estimate arrays (candidates in offer order, victims oldest first); the victims are distinct.

        Offered one at a time, candidate ``i`` faces victim ``j_i`` = the number of candidates admitted
        before it (a rejected candidate leaves its victim to the next one), and is admitted iff its
        estimate beats that victim's. That is a fixed point: A = (c > v[excl_prefix_count(A)]). We start
        from "everyone faces the oldest victim", apply the map ``_DUEL_ROUNDS`` times, and finally give
        each admitted candidate victim ``j_i`` (distinct: ``j`` counts admissions) and drop those that do
        not beat it. Once the iteration has converged (few or all admitted: the common cases) this is
        exactly the sequential outcome; otherwise it is close (see the module docstring).
        """
        admitted = cand_est > victim_est[0]
        n_admitted = int(np.count_nonzero(admitted))
        if n_admitted == 0:  # nobody beats the oldest victim: exact, nobody is admitted
            return _empty(), _empty()
        m = len(cand_est)
        k = len(victim_est)
        if k >= m and np.count_nonzero(cand_est > victim_est[:m]) == m:
            all_won = np.arange(m, dtype=np.int64)  # each beats the next victim in order: exact
            return all_won, all_won
        padded = np.empty(m + 1, dtype=np.uint8)  # past the victims: nothing to evict
        padded[k:] = _UNBEATABLE
        padded[:k] = victim_est
        faces = np.zeros(m, dtype=np.int64)
        for _ in range(_DUEL_ROUNDS):
            np.cumsum(admitted[:-1], out=faces[1:])
            admitted = cand_est > padded[faces]
        np.cumsum(admitted[:-1], out=faces[1:])
        admitted &= cand_est > padded[faces]
        won: IntArray = admitted.nonzero()[0]
        return won, faces[won]

    def install_prefetched(self, items: Items) -> EmbPlacement:
        """Place items into FREE slots only (never evicts); skips resident ones and repeats; stops when
        full.

        Prefetched items enter at the cold (LRU) end: they are guesses, and must be the first to go
        when the region shrinks, before items that requests really touched. Among them, the last one
        placed is the coldest (prefetch lists come hottest first).
        """
        arr = _as_items(items)
        self._pending = None
        offered = self._offer(arr)
        n = min(self._alloc.free_count, len(offered))
        if n == 0:
            return EmbPlacement.empty()
        positions = offered[:n]
        placed = arr[positions]
        self._record_changes(placed, self._map[placed] == _ABSENT)
        slots = self._allocate(n)
        self._size += n
        self._place(placed, slots)
        slot_bits = slots[::-1] << 32
        slot_bits |= _TOUCHED
        self._lru_prepend(placed[::-1], slot_bits)
        return EmbPlacement(positions, placed, slots)

    def prefetch_candidates(self, max_items: int) -> IntArray:
        """Up to ``max_items`` ghost items (never resident), hottest first, ties most recent first."""
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
        """Give ``chunk`` up; returns the copies (in order) that move its survivors elsewhere.

        Survivors need as many free slots elsewhere as there are of them; each eviction either frees a
        slot elsewhere or removes a survivor, so exactly ``live - free`` least recently used items go
        (the same ones, and the same copies, as evicting one at a time until the survivors fit).
        """
        if not self._alloc.owns(chunk):
            raise ValueError(f"chunk {chunk} is not owned by EMB")
        self._pending = None
        lo = chunk * self._slots_per_chunk
        hi = lo + self._slots_per_chunk
        live = (self._item_at[lo:hi] >= 0).nonzero()[0] + lo
        self._alloc.detach_chunk(chunk)
        deficit = len(live) - self._alloc.free_count
        if deficit > 0:
            evicted, evicted_packed, evicted_pos = self._lru_oldest(deficit)
            self._alive[evicted_pos] = False
            self._head = int(evicted_pos[-1]) + 1  # the oldest: nothing before is alive
            self._record_changes(evicted, (evicted_packed & _TOUCHED) == 0)
            self._map[evicted] = _GONE
            evicted_slots = evicted_packed >> 32
            self._item_at[evicted_slots] = -1
            self._size -= len(evicted)
            self._ghost.remember(evicted, self._sketch.estimate_many(evicted), new=True)
            self._counters.emb_evictions += len(evicted)
            elsewhere = evicted_slots[(evicted_slots < lo) | (evicted_slots >= hi)]
            self._alloc.release_many(elsewhere.tolist())
            live = live[self._item_at[live] >= 0]
        if len(live) == 0:
            return []
        dst = self._allocate(len(live))
        moved = self._item_at[live]
        self._item_at[dst] = moved
        self._item_at[live] = -1
        low = self._map[moved] & _LOW  # same log entry: the item keeps its LRU position
        self._map[moved] = (dst << 32) | low
        return [Relocation(src, dst) for src, dst in zip(live.tolist(), dst.tolist(), strict=True)]

    # ----------------------------------------------------------------- deltas / checks
    def drain_changes(self) -> tuple[list[int], list[int]]:
        """(added, removed): the items whose residency changed since the last drain that are resident now,
        and those that are not, both sorted; resets the record. O(changes) from the change log (one
        pass over the item map only after the log overflowed)."""
        added, removed = self._take_changes()
        return added.tolist(), removed.tolist()

    def drain_touched(self) -> set[int]:
        added, removed = self._take_changes()
        return set(added.tolist()) | set(removed.tolist())

    def check_invariants(self) -> None:
        """Raise AssertionError on any inconsistency (O(capacity + item ids); for tests and debugging)."""
        n = self._slots_per_chunk
        item_at = self._item_at
        if len(self._map) and int(self._map.min()) < _GONE:
            raise AssertionError("EMB item map holds an invalid value")
        resident = (self._map >= 0).nonzero()[0]
        used = (item_at >= 0).nonzero()[0]
        if len(resident) != self._size or len(used) != self._size:
            raise AssertionError(
                f"EMB size {self._size}, slot map holds {len(resident)}, reverse map holds {len(used)}"
            )
        slots = self._map[resident] >> 32
        if len(slots) and (slots.min() < 0 or slots.max() >= len(item_at)):
            raise AssertionError("EMB slot map points outside the slots")
        wrong = (item_at[slots] != resident).nonzero()[0]
        if len(wrong):
            item, slot = int(resident[wrong[0]]), int(slots[wrong[0]])
            raise AssertionError(f"EMB item {item} maps to slot {slot}, which holds {int(item_at[slot])}")
        used_per_chunk = np.bincount(slots // n, minlength=self._geometry.total_chunks)
        for chunk in used_per_chunk.nonzero()[0].tolist():
            if not self._alloc.owns(chunk):
                raise AssertionError(f"EMB items in chunk {chunk}, not owned by EMB")
        free_total = 0
        for chunk in self._alloc.chunks():
            free = self._alloc.free_units(chunk)
            if len(set(free)) != len(free):
                raise AssertionError(f"EMB chunk {chunk} free list has duplicates")
            if any(slot // n != chunk for slot in free):
                raise AssertionError(f"EMB free slot listed under chunk {chunk} lies elsewhere")
            if free and np.count_nonzero(item_at[np.array(free, dtype=np.int64)] >= 0):
                raise AssertionError(f"EMB chunk {chunk}: a slot is both free and used")
            if len(free) + int(used_per_chunk[chunk]) != n:
                raise AssertionError(f"EMB chunk {chunk}: free + used != {n}")
            free_total += len(free)
        if free_total != self._alloc.free_count:
            raise AssertionError("EMB free count out of sync")
        if self.size > self.capacity:
            raise AssertionError(f"EMB size {self.size} > capacity {self.capacity}")
        h, t = self._head, self._tail
        if np.count_nonzero(self._alive[:h]) or np.count_nonzero(self._alive[t:]):
            raise AssertionError("EMB LRU log entries alive outside [head, tail)")
        live = self._alive[h:t].nonzero()[0] + h
        if len(live) != self._size:
            raise AssertionError(f"EMB LRU log has {len(live)} live entries for {self._size} residents")
        # each live entry is the one its item's stamp names, so (count == size) a bijection
        if np.count_nonzero((self._map[self._log[live]] & _STAMP_BITS) != live):
            raise AssertionError("EMB LRU log entry alive but not its item's stamp")
        if self._changes is not None:
            marked = (((self._map & _CHANGED) == _TOUCHED) | (self._map == _GONE)).nonzero()[0]
            logged = np.sort(self._changes[: self._n_changes])
            if not np.array_equal(logged, marked):
                raise AssertionError("EMB change log disagrees with the changes marked in the item map")
        self._ghost.check_invariants()
        ghosts = np.array(self._ghost.items(), dtype=np.int64)
        if len(ghosts) and np.count_nonzero(self._map[ghosts] >= 0):
            raise AssertionError("EMB ghost item is resident")

    # ----------------------------------------------------------------- internals
    def _check_items(self, arr: IntArray) -> bool:
        """Range-check (growing the maps to the largest id); True iff the items are unique.

        Strictly increasing input (what the engine passes: ``np.unique`` output) is recognised with one
        comparison; anything else pays for a sort.
        """
        if len(arr) < 2 or not np.count_nonzero(arr[1:] <= arr[:-1]):
            lo, hi, unique = int(arr[0]), int(arr[-1]), True
        else:
            ordered = np.sort(arr)
            lo, hi = int(ordered[0]), int(ordered[-1])
            unique = not np.count_nonzero(ordered[1:] == ordered[:-1])
        if lo < 0 or hi > _MAX_ITEM:
            raise ValueError(f"EMB item ids must lie in [0, 2**31), got [{lo}, {hi}]")
        if hi >= len(self._map):
            self._grow_items(hi)
        return unique

    def _offer(self, arr: IntArray) -> IntArray:
        """Positions of the offered items that are not resident (first occurrences), in offer order."""
        if len(arr) == 0:
            return _empty()
        if self._check_items(arr):
            offered: IntArray = (self._map[arr] < 0).nonzero()[0]
            return offered
        _, first = np.unique(arr, return_index=True)
        first.sort()
        offered = first[self._map[arr[first]] < 0].astype(np.int64)
        return offered

    def _grow_items(self, hi: int) -> None:
        old = len(self._map)
        # An eighth beyond the largest id: a catalogue's first lookups already come near its end, and
        # doubling from there would allocate (and page in) twice the map it needs.
        size = min(max(hi + 1 + hi // 8, 2 * old, _MIN_MAP), _MAX_ITEM + 1)
        grown = np.full(size, -1, dtype=np.int64)
        grown[:old] = self._map
        self._map = grown
        self._ghost.reserve(size)

    def _allocate(self, n: int) -> IntArray:
        slots = np.array(self._alloc.allocate_many(n), dtype=np.int64)
        if len(slots) != n:  # pragma: no cover - callers ask for at most free_count
            raise AssertionError("EMB: fewer free slots than counted")
        return slots

    def _place(self, items: IntArray, slots: IntArray) -> None:
        """Give ``items`` (not resident) ``slots`` (free or just vacated); the caller then logs them."""
        self._item_at[slots] = items
        self._ghost.discard(items)

    def _record_changes(self, items: IntArray, fresh: npt.NDArray[np.bool_]) -> None:
        """Log the ``items`` flagged ``fresh`` (not yet marked as changed), just before their residency
        changes; the caller then marks them (touched bit or _GONE). Overflows past one entry per
        ``_CHANGES_PER_ITEM_ID`` item ids: the next drain then scans the map, which holds the marks."""
        log = self._changes
        if log is None:
            return
        k = int(np.count_nonzero(fresh))
        if k == 0:
            return
        n = self._n_changes
        end = n + k
        if end > len(log):
            limit = max(len(self._map) // _CHANGES_PER_ITEM_ID, _MIN_CHANGES)
            if end > limit:
                self._changes = None
                self._n_changes = 0
                return
            grown = np.zeros(min(2 * end, limit), dtype=np.int64)
            grown[:n] = log[:n]
            self._changes = log = grown
        log[n:end] = items if k == len(items) else items[fresh]
        self._n_changes = end

    def _take_changes(self) -> tuple[IntArray, IntArray]:
        """(added, removed), sorted, and clear their marks: from the change log, or after it overflowed
        from one pass over the map."""
        log = self._changes
        if log is None:
            self._changes = np.zeros(_MIN_CHANGES, dtype=np.int64)
            return self._scan_changes()
        n = self._n_changes
        if n == 0:
            return _empty(), _empty()
        self._n_changes = 0
        items = log[:n]
        packed = self._map[items]
        now = packed >= 0
        added = items[now]
        removed = items[~now]
        packed = packed[now]
        packed &= ~_TOUCHED
        self._map[added] = packed
        self._map[removed] = _ABSENT
        added.sort()
        removed.sort()
        return added, removed

    def _scan_changes(self) -> tuple[IntArray, IntArray]:
        """:meth:`_take_changes` by one pass over the whole map (what the change log stands in for)."""
        packed = self._map
        added: IntArray = ((packed & _CHANGED) == _TOUCHED).nonzero()[0]
        removed: IntArray = (packed == _GONE).nonzero()[0]
        packed[added] &= ~_TOUCHED
        packed[removed] = _ABSENT
        return added, removed

    # LRU log -----------------------------------------------------------
    def _touch(self, items: IntArray, slot_bits: IntArray) -> None:
        """Make ``items`` the most recent, in array order; ``slot_bits`` (their slot << 32 and touched
        bit) is consumed. Their previous log entries, if any, must already be dead."""
        n = len(items)
        if self._tail + n > len(self._log):
            self._compact_log(gap=0, room=n)
        t = self._tail
        e = t + n
        self._log[t:e] = items
        self._alive[t:e] = True
        slot_bits |= self._log_iota[t:e]
        self._map[items] = slot_bits
        self._tail = e

    def _lru_prepend(self, items: IntArray, slot_bits: IntArray) -> None:
        """Make ``items`` (not resident before) the least recent, ``items[0]`` first."""
        n = len(items)
        if self._head < n:
            self._compact_log(gap=n, room=0)
        h = self._head - n
        self._log[h : self._head] = items
        self._alive[h : self._head] = True
        slot_bits |= self._log_iota[h : self._head]
        self._map[items] = slot_bits
        self._head = h

    def _lru_oldest(self, k: int) -> tuple[IntArray, IntArray, IntArray]:
        """The ``k`` least recently used residents: (items, their map values, log positions), oldest
        first (k <= size). Kills nothing: the caller kills the entries of those it evicts.

        Scans the alive flags forward from the head in growing windows (a byte per entry, no lookups
        for dead ones), and moves the head past the dead prefix. When most of the range up to the k-th
        live entry is dead, those k entries are packed against its end (stamps renumbered, order
        kept) and the head moved there: each packing rewrites at most as many live entries as it drops
        dead ones, so it stays amortised O(1) per touch, and victims that admission keeps at the front
        do not make every later scan wade through the holes their evicted or re-touched neighbours left.
        """
        h, t = self._head, self._tail
        e = min(t, h + k + 16)
        while True:
            live = self._alive[h:e].nonzero()[0]
            if len(live) >= k or e == t:
                break
            e = min(t, h + 2 * (e - h))
        if len(live) == 0:
            self._head = t
            return _empty(), _empty(), _empty()
        live = live[:k]
        pos = live + h
        items = self._log[pos]
        packed = self._map[items]
        span = int(live[-1]) + 1  # entries from the head to the k-th live one
        if 2 * len(live) < span:  # mostly dead: pack
            end = h + span
            start = end - len(live)
            self._alive[h:start] = False
            self._alive[start:end] = True
            self._log[start:end] = items
            pos = self._log_iota[start:end]
            packed &= _KEEP
            packed |= pos
            self._map[items] = packed
            self._head = start
        else:
            self._head = int(pos[0])
        return items, packed, pos

    def _compact_log(self, *, gap: int, room: int) -> None:
        """Rewrite the live entries (in order) after ``gap`` free entries, with at least ``room`` free
        entries behind them; grow so that the log is at most half full. Stamps are renumbered."""
        h, t = self._head, self._tail
        items = self._log[h:t][self._alive[h:t]]
        n_live = len(items)
        gap += n_live // 8  # room for cold-end inserts without compacting each time
        need = gap + n_live + room
        if len(self._log) < 2 * need:
            size = max(2 * need, _MIN_LOG)
            if size >= _STAMP_LIMIT:  # pragma: no cover - 2**31 slots at most
                raise AssertionError("EMB LRU log would outgrow 31-bit stamps")
            self._log = np.zeros(size, dtype=np.int64)
            self._alive = np.zeros(size, dtype=np.bool_)
            self._log_iota = _iota(size)
        else:
            self._alive[h:t] = False
        end = gap + n_live
        self._log[gap:end] = items
        self._alive[gap:end] = True
        packed = self._map[items]
        packed &= _KEEP
        packed |= self._log_iota[gap:end]
        self._map[items] = packed
        self._head = gap
        self._tail = end
