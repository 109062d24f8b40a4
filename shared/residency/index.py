"""The exact residency index: who holds which user's KV (and how much of it), and which EMB items.

Used twice: by cachestate (the cluster's memory) and by every gateway (its replica of the routing view),
both with the one default cap ``DEFAULT_MAX_ENTRIES`` unless configured otherwise.

Structure
---------
* KV: ``user -> {worker_id: covered_length}``, plus ``worker -> users`` so a worker can be dropped in
  O(its entries), plus an LRU order over (user, worker) placements for eviction.
* EMB: ``worker -> set of items`` and the inverted ``item -> int bitmask`` of the workers holding it.
  Each worker owns one bit index while it is known; a freed bit is reused (lowest first), but only after
  every item mask has been cleared of it, so a reused bit never inherits another worker's items.

Memory policy (one cap, ``max_entries``, over KV placements + EMB entries together)
------------------------------------------------------------------------------------
The default, ``DEFAULT_MAX_ENTRIES`` (2,000,000), is cachestate's ``MAX_ENTRIES`` setting's default and the
gateway's replica cap: one number for both, so a replica can hold everything cachestate sends it.
Before an insert that would exceed the cap, one entry is evicted:
1. the least-recently-updated KV placement, while any exists (an upsert or a snapshot refreshes it);
2. otherwise an arbitrary EMB item of the worker that holds the most EMB entries.
Eviction only ever loses information: the router sees a false negative (no affinity / no locality for
that entry), never a false positive. Evictions are counted (``kv_evictions``, ``emb_evictions``) and,
with ``track_evictions=True``, remembered until ``take_evictions()`` so they can be forwarded as removals.
Removing or dropping entries really frees them (no tombstones).

Dense EMB masks (the router's fast path)
----------------------------------------
Beside the dict ``item -> mask``, the low 64 bits of every mask are mirrored in a dense numpy ``uint64``
array indexed by item id, so ``emb_masks_array`` answers a whole request with one numpy gather instead of
one dict lookup per item. The mirror is kept exactly in sync on every path that changes a mask (add_emb,
remove_emb, clear_worker, drop_worker, clear, replace_worker, eviction): for every id ``0 <= i < len``,
``dense[i] == masks.get(i, 0) & (2**64 - 1)``.

* Bits: the array holds bits 0..63 only. While every worker's bit is < 64 (at most 64 workers known at
  once: freed bits are reused lowest first) it is the whole mask; beyond that it is the mask's low 64 bits,
  which is what the router needs: it calls ``emb_masks_array`` only when every *routable* worker's bit is
  below 64, and reads no other column.
* Memory: 8 bytes x (the largest item id seen + 1, rounded up to a power of two, at least 1024), whatever
  ``max_entries`` says: it grows by doubling as larger ids arrive and never beyond ``dense_max_items``
  (default 2**26 items = 512 MiB worst case; a 1M-item catalogue costs 8 MiB). It is freed by ``clear()``.
  Items at or beyond the cap (or negative) live only in the dict; ``emb_masks_array`` looks those up there,
  so the answer is exact either way, just slower for them. ``dense_max_items=0`` disables the array.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DENSE_MAX_ITEMS",
    "Evictions",
    "IndexSizes",
    "ResidencyDiff",
    "ResidencyIndex",
]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

DEFAULT_MAX_ENTRIES: Final = 2_000_000  # KV placements + EMB entries (see "Memory policy")
DENSE_MAX_ITEMS: Final = 1 << 26  # default cap of the dense mask array: 2**26 items x 8 bytes = 512 MiB
_DENSE_MIN: Final = 1024  # first allocation (items)
_MASK64: Final = (1 << 64) - 1


class IndexSizes(NamedTuple):
    kv_placements: int
    emb_entries: int
    users: int
    workers: int


@dataclass(slots=True)
class ResidencyDiff:
    """What a replace_worker() really changed (effective changes only)."""

    kv_upserts: dict[str, int] = field(default_factory=dict)  # new or changed length
    kv_removed: list[str] = field(default_factory=list)
    emb_added: list[int] = field(default_factory=list)
    emb_removed: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Evictions:
    kv: list[tuple[str, str]] = field(default_factory=list)  # (user_id, worker_id)
    emb: dict[str, list[int]] = field(default_factory=dict)  # worker_id -> items

    @property
    def empty(self) -> bool:
        return not (self.kv or self.emb)


class ResidencyIndex:
    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        track_evictions: bool = False,
        dense_max_items: int = DENSE_MAX_ITEMS,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if dense_max_items < 0:
            raise ValueError(f"dense_max_items must be >= 0, got {dense_max_items}")
        self.max_entries = max_entries
        self.kv_evictions = 0
        self.emb_evictions = 0
        self._track = track_evictions
        self._evicted = Evictions()
        self._kv: dict[str, dict[str, int]] = {}
        self._worker_users: dict[str, set[str]] = {}
        self._lru: OrderedDict[tuple[str, str], None] = OrderedDict()  # head = least recently updated
        self._emb: dict[str, set[int]] = {}
        self._emb_total = 0
        self._item_masks: dict[int, int] = {}
        self._bits: dict[str, int] = {}
        self._bit_owner: dict[int, str] = {}
        self._free_bits: list[int] = []  # heap
        self._next_bit = 0
        # low 64 bits of _item_masks for ids 0 <= i < len(_dense) (see "Dense EMB masks" above)
        self.dense_max_items = dense_max_items
        self._dense: U64 = np.zeros(0, dtype=np.uint64)
        # some item outside [0, len(_dense)) was added since the last clear(): lookups outside the array
        # must consult the dict (sticky: cleared by clear() only)
        self._dense_outside = False

    # ---- queries (the router's hot path) ------------------------------------------------------------
    def emb_masks(self, items: Sequence[int]) -> list[int]:
        """For each item, the bitmask of workers holding it (0: nobody). One C-level loop."""
        return list(map(self._item_masks.get, items, repeat(0)))

    def emb_masks_array(self, items: I64) -> U64:
        """``emb_masks`` as a uint64 array, from the dense mirror: the low 64 bits of each item's mask
        (the whole mask while every worker bit is < 64; see the module docstring). Items outside the
        array (negative, or beyond ``dense_max_items``) are looked up in the dict; unknown items give 0."""
        dense = self._dense
        n = len(items)
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        size = len(dense)
        # one reduction checks both bounds: read as uint64, a negative id is huge
        if size and int(items.view(np.uint64).max()) < size:
            out: U64 = dense[items]
            return out
        out = np.zeros(n, dtype=np.uint64)
        inside = (items >= 0) & (items < size)
        out[inside] = dense[items[inside]]
        if self._dense_outside:
            get = self._item_masks.get
            where = np.flatnonzero(~inside)
            out[where] = [get(i, 0) & _MASK64 for i in items[where].tolist()]
        return out

    def worker_bit(self, worker_id: str) -> int | None:
        return self._bits.get(worker_id)

    def bit_owner(self, bit: int) -> str | None:
        return self._bit_owner.get(bit)

    def kv_workers(self, user_id: str) -> dict[str, int]:
        """worker_id -> covered length for every worker holding this user's KV (a copy)."""
        held = self._kv.get(user_id)
        return dict(held) if held else {}

    def kv_length(self, user_id: str, worker_id: str) -> int:
        held = self._kv.get(user_id)
        return held.get(worker_id, 0) if held else 0

    def emb_count(self, worker_id: str) -> int:
        items = self._emb.get(worker_id)
        return len(items) if items else 0

    def has_emb(self, worker_id: str, item: int) -> bool:
        items = self._emb.get(worker_id)
        return items is not None and item in items

    def workers(self) -> list[str]:
        """Every worker the index knows (has a bit), in bit order."""
        return [self._bit_owner[b] for b in sorted(self._bit_owner)]

    def sizes(self) -> IndexSizes:
        return IndexSizes(len(self._lru), self._emb_total, len(self._kv), len(self._bits))

    @property
    def entries(self) -> int:
        """What counts against max_entries: KV placements + EMB entries."""
        return len(self._lru) + self._emb_total

    def kv_placements(self) -> Iterator[tuple[str, str, int]]:
        """(user_id, worker_id, length) for every placement (for snapshots)."""
        for user, held in self._kv.items():
            for worker, length in held.items():
                yield user, worker, length

    def worker_kv(self, worker_id: str) -> dict[str, int]:
        return {u: self._kv[u][worker_id] for u in self._worker_users.get(worker_id, ())}

    def worker_emb(self, worker_id: str) -> list[int]:
        return sorted(self._emb.get(worker_id, ()))

    # ---- workers --------------------------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> int:
        """Register a worker (idempotent); returns its bit index."""
        bit = self._bits.get(worker_id)
        if bit is not None:
            return bit
        if self._free_bits:
            bit = heapq.heappop(self._free_bits)
        else:
            bit = self._next_bit
            self._next_bit += 1
        self._bits[worker_id] = bit
        self._bit_owner[bit] = worker_id
        self._worker_users[worker_id] = set()
        self._emb[worker_id] = set()
        return bit

    def clear_worker(self, worker_id: str) -> None:
        """Forget all of a worker's residency, keeping it registered (and its bit)."""
        if worker_id not in self._bits:
            return
        kv = self._kv
        lru = self._lru
        for user in self._worker_users[worker_id]:
            held = kv[user]
            del held[worker_id]
            if not held:
                del kv[user]
            del lru[(user, worker_id)]
        self._worker_users[worker_id] = set()
        items = self._emb[worker_id]
        self._clear_bit(items, 1 << self._bits[worker_id])
        self._emb_total -= len(items)
        self._emb[worker_id] = set()

    def drop_worker(self, worker_id: str) -> bool:
        """Forget a worker entirely (residency and bit, which becomes free for reuse)."""
        if worker_id not in self._bits:
            return False
        self.clear_worker(worker_id)
        bit = self._bits.pop(worker_id)
        del self._bit_owner[bit]
        del self._worker_users[worker_id]
        del self._emb[worker_id]
        heapq.heappush(self._free_bits, bit)
        if self._track:  # its pending evictions are moot: the whole worker goes
            self._evicted.kv = [e for e in self._evicted.kv if e[1] != worker_id]
            self._evicted.emb.pop(worker_id, None)
        return True

    def clear(self) -> None:
        """Forget everything (counters are kept)."""
        for worker_id in list(self._bits):
            self.drop_worker(worker_id)
        self._free_bits = []
        self._next_bit = 0
        self._dense = np.zeros(0, dtype=np.uint64)  # every mask is gone: free the mirror too
        self._dense_outside = False

    # ---- KV -------------------------------------------------------------------------------------------
    def upsert_kv(self, user_id: str, worker_id: str, length: int) -> bool:
        """Create or refresh a placement; True if it is new or its length changed."""
        key = (user_id, worker_id)
        held = self._kv.get(user_id)
        if held is not None and worker_id in held:
            self._lru.move_to_end(key)
            if held[worker_id] == length:
                return False
            held[worker_id] = length
            return True
        self.add_worker(worker_id)
        self._make_room()
        held = self._kv.get(user_id)  # _make_room may have evicted this user's last placement
        if held is None:
            held = self._kv[user_id] = {}
        held[worker_id] = length
        self._worker_users[worker_id].add(user_id)
        self._lru[key] = None
        return True

    def remove_kv(self, user_id: str, worker_id: str) -> bool:
        held = self._kv.get(user_id)
        if held is None or worker_id not in held:
            return False
        del held[worker_id]
        if not held:
            del self._kv[user_id]
        del self._lru[(user_id, worker_id)]
        self._worker_users[worker_id].discard(user_id)
        return True

    # ---- EMB ------------------------------------------------------------------------------------------
    def add_emb(self, worker_id: str, items: Iterable[int]) -> list[int]:
        """Mark items resident on a worker; returns those that were not already."""
        self.add_worker(worker_id)
        held = self._emb[worker_id]
        bit = 1 << self._bits[worker_id]
        masks = self._item_masks
        added: list[int] = []
        evictions = self.emb_evictions
        for item in items:
            if item in held:
                continue
            self._make_room()
            held.add(item)
            self._emb_total += 1
            masks[item] = masks.get(item, 0) | bit
            added.append(item)
        if added:
            # An EMB eviction inside the loop may have cleared an item added above: then copy the dict's
            # final masks, else OR the bit in (the same, faster).
            self._dense_set(added, bit if self.emb_evictions == evictions else None)
        return added

    def remove_emb(self, worker_id: str, items: Iterable[int]) -> list[int]:
        """Mark items not resident on a worker; returns those that were."""
        held = self._emb.get(worker_id)
        if held is None:
            return []
        removed = [item for item in dict.fromkeys(items) if item in held]  # a repeated id counts once
        held.difference_update(removed)
        self._emb_total -= len(removed)
        self._clear_bit(removed, 1 << self._bits[worker_id])
        return removed

    # ---- snapshots ------------------------------------------------------------------------------------
    def replace_worker(self, worker_id: str, kv: Mapping[str, int], emb: Iterable[int]) -> ResidencyDiff:
        """Make a worker's residency exactly (kv, emb); returns the effective changes. Every placement in
        ``kv`` counts as updated now (a snapshot confirms it)."""
        self.add_worker(worker_id)
        diff = ResidencyDiff()
        for user in [u for u in self._worker_users[worker_id] if u not in kv]:
            self.remove_kv(user, worker_id)
            diff.kv_removed.append(user)
        for user, length in kv.items():
            if self.upsert_kv(user, worker_id, length):
                diff.kv_upserts[user] = length
        new = emb if isinstance(emb, set | frozenset) else set(emb)
        diff.emb_removed = self.remove_emb(worker_id, [i for i in self._emb[worker_id] if i not in new])
        diff.emb_added = self.add_emb(worker_id, new)
        return diff

    # ---- evictions ------------------------------------------------------------------------------------
    def take_evictions(self) -> Evictions:
        """Evictions since the last call (only recorded with track_evictions=True)."""
        out, self._evicted = self._evicted, Evictions()
        return out

    def _make_room(self) -> None:
        """Evict one entry if one more would exceed the cap (see the module docstring)."""
        if len(self._lru) + self._emb_total < self.max_entries:
            return
        if self._lru:
            user, worker = next(iter(self._lru))
            self.remove_kv(user, worker)
            self.kv_evictions += 1
            if self._track:
                self._evicted.kv.append((user, worker))
            return
        victim = max(self._emb, key=lambda w: len(self._emb[w]))
        held = self._emb[victim]
        item = held.pop()
        self._emb_total -= 1
        self._clear_bit((item,), 1 << self._bits[victim])
        self.emb_evictions += 1
        if self._track:
            self._evicted.emb.setdefault(victim, []).append(item)

    def _clear_bit(self, items: Iterable[int], bit: int) -> None:
        masks = self._item_masks
        keep = ~bit
        seen: list[int] = []
        for item in items:
            mask = masks[item] & keep
            if mask:
                masks[item] = mask
            else:
                del masks[item]
            seen.append(item)
        dense = self._dense
        if bit > _MASK64 or not seen or not len(dense):
            return
        if len(seen) == 1:  # an eviction: a scalar write beats building an index array
            item = seen[0]
            if 0 <= item < len(dense):
                dense[item] = masks.get(item, 0) & _MASK64
            return
        idx = self._dense_index(seen)
        if len(idx):
            dense[idx] &= np.uint64(keep & _MASK64)

    # ---- dense mirror of the masks --------------------------------------------------------------------
    def _dense_index(self, items: list[int]) -> I64:
        """The items that fall inside the dense array, as an index array."""
        size = len(self._dense)
        if not items or not size:
            return np.zeros(0, dtype=np.int64)
        lo, hi = min(items), max(items)
        if lo >= 0 and hi < size:
            return np.array(items, dtype=np.int64)
        return np.array([i for i in items if 0 <= i < size], dtype=np.int64)

    def _dense_set(self, items: list[int], bit: int | None) -> None:
        """Mirror newly added items: OR ``bit`` in, or (``bit=None``) copy their masks from the dict."""
        hi = max(items)
        if hi >= len(self._dense) and len(self._dense) < self.dense_max_items:
            self._dense_grow(hi)
        size = len(self._dense)
        if min(items) < 0 or hi >= size:
            self._dense_outside = True
        idx = self._dense_index(items)
        if not len(idx):
            return
        if bit is None:
            get = self._item_masks.get
            self._dense[idx] = np.array([get(i, 0) & _MASK64 for i in idx.tolist()], dtype=np.uint64)
        elif bit <= _MASK64:
            self._dense[idx] |= np.uint64(bit)

    def _dense_grow(self, item: int) -> None:
        """Grow the array (doubling, capped at dense_max_items) to cover ``item`` if the cap allows."""
        size = max(len(self._dense), _DENSE_MIN)
        while size <= item:
            size *= 2
        size = min(size, self.dense_max_items)
        if size <= len(self._dense):
            return
        grown: U64 = np.zeros(size, dtype=np.uint64)
        grown[: len(self._dense)] = self._dense
        self._dense = grown
