"""The exact residency index: who holds which user's KV (and how much of it), and which EMB items.

Used twice: by cachestate (the cluster's memory) and by every gateway (its replica of the routing view),
both with the one default cap ``DEFAULT_MAX_ENTRIES`` unless configured otherwise.

Structure
---------
* KV: ``user -> {worker_id: covered_length}``, plus ``worker -> users`` so a worker can be dropped in
  O(its entries), plus an LRU order over (user, worker) placements for eviction.
* EMB: for every item, the int bitmask of the workers holding it. Each worker owns one bit index while it
  is known; a freed bit is reused (lowest first), but only after every item mask has been cleared of it, so
  a reused bit never inherits another worker's items. Each bit of a mask is stored in exactly one place:
  - the dense ``uint64`` array (see "Dense EMB masks"): bits 0..63 of the items ``0 <= i < dense_max_items``
    (the usual case: every bit of every mask);
  - the dict ``item -> int`` of the other bits (bits >= 64; every bit of an item outside that range), with,
    per worker, the set of its items whose bit lives there.
  Per-worker counts are ints, so ``emb_count``, ``entries`` and the eviction rule need no scan;
  ``worker_emb`` and ``clear_worker`` make one numpy pass over the array.

Memory policy (one cap, ``max_entries``, over KV placements + EMB entries together)
------------------------------------------------------------------------------------
The default, ``DEFAULT_MAX_ENTRIES`` (2,000,000), is cachestate's ``MAX_ENTRIES`` setting's default and the
gateway's replica cap: one number for both, so a replica can hold everything cachestate sends it.
Before an insert that would exceed the cap, one entry is evicted:
1. the least-recently-updated KV placement, while any exists (an upsert or a snapshot refreshes it);
2. otherwise an EMB item of the worker that holds the most EMB entries (the earliest registered of those
   tied): its lowest item id, except that the worker an ``add_emb`` call is filling loses first the items
   it held before the call (lowest first), then the call's own earliest new items (those count as added
   and as evicted).
Eviction only ever loses information: the router sees a false negative (no affinity / no locality for
that entry), never a false positive. Evictions are counted (``kv_evictions``, ``emb_evictions``) and,
with ``track_evictions=True``, remembered until ``take_evictions()`` so they can be forwarded as removals.
Removing or dropping entries really frees them (no tombstones).

Bulk EMB updates
----------------
``add_emb`` / ``remove_emb`` take a batch (a list, any iterable of ints, or a 1-D integer numpy array) and
work on its distinct ids (a repeated id counts once; results keep first-occurrence order, except that ids
beyond int64, which only the dict can hold, come after the others). ``add_emb`` applies the rule above as
if its new items were inserted one by one, but in bulk (``_make_room_for``): it counts the inserts that
find the index full, takes that many KV placements from the LRU head, computes from the counts alone how
many EMB entries each worker loses (``_emb_victims``, no per-eviction loop), then clears each victim's
items and sets the new bits with one numpy operation each. Per-item Python remains only for the dict's
items.

Dense EMB masks (the router's fast path)
----------------------------------------
The dense array, indexed by item id, is where the low 64 bits of the masks of items ``0 <= i < len`` live,
so ``emb_masks_array`` answers a whole request with one numpy gather instead of one dict lookup per item.
Every path that changes a mask (add_emb, remove_emb, clear_worker, drop_worker, clear, replace_worker,
eviction) writes it there, so for every id ``0 <= i < len``: ``dense[i] == mask(i) & (2**64 - 1)``.

* Bits: the array holds bits 0..63 only. While every worker's bit is < 64 (at most 64 workers known at
  once: freed bits are reused lowest first) it is the whole mask; beyond that it is the mask's low 64 bits,
  which is what the router needs: it calls ``emb_masks_array`` only when every *routable* worker's bit is
  below 64, and reads no other column. ``emb_masks`` adds the dict's bits.
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
from operator import or_
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
BoolArray = npt.NDArray[np.bool_]

DEFAULT_MAX_ENTRIES: Final = 2_000_000  # KV placements + EMB entries (see "Memory policy")
DENSE_MAX_ITEMS: Final = 1 << 26  # default cap of the dense mask array: 2**26 items x 8 bytes = 512 MiB
_DENSE_MIN: Final = 1024  # first allocation (items)
_MASK64: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1


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
        self._emb_n: dict[str, int] = {}  # worker -> EMB entries it holds (in registration order)
        self._emb_extra: dict[str, set[int]] = {}  # worker -> its items whose bit lives in _item_masks
        self._emb_total = 0
        self._item_masks: dict[int, int] = {}  # item -> the bits of its mask not in _dense (never 0)
        self._bits: dict[str, int] = {}
        self._bit_owner: dict[int, str] = {}
        self._free_bits: list[int] = []  # heap
        self._next_bit = 0
        # bits 0..63 of the masks of ids 0 <= i < len(_dense) (see "Dense EMB masks" above)
        self.dense_max_items = dense_max_items
        self._dense: U64 = np.zeros(0, dtype=np.uint64)
        # some item outside [0, len(_dense)) was added since the last clear(): lookups outside the array
        # must consult the dict (sticky: cleared by clear() only)
        self._dense_outside = False

    # ---- queries (the router's hot path) ------------------------------------------------------------
    def emb_masks(self, items: Sequence[int]) -> list[int]:
        """For each item, the bitmask of workers holding it (0: nobody): a numpy gather from the dense
        array, OR-ed with the dict's bits (C-level loops) while the dict holds any."""
        try:
            ids = np.asarray(items, dtype=np.int64)
        except OverflowError:  # an id beyond int64: only the dict can hold it
            return [self._mask(i) for i in items]
        low: list[int] = self._gather(ids).tolist()
        rest = self._item_masks
        if not rest:
            return low
        keys = items if isinstance(items, list) else ids.tolist()
        return list(map(or_, low, map(rest.get, keys, repeat(0))))

    def emb_masks_array(self, items: I64) -> U64:
        """``emb_masks`` as a uint64 array, from the dense array: the low 64 bits of each item's mask
        (the whole mask while every worker bit is < 64; see the module docstring). Items outside the
        array (negative, or beyond ``dense_max_items``) are looked up in the dict; unknown items give 0."""
        out = self._gather(items)
        if self._dense_outside and len(items):
            size = len(self._dense)
            outside = np.flatnonzero((items < 0) | (items >= size))
            if len(outside):
                get = self._item_masks.get
                out[outside] = [get(i, 0) & _MASK64 for i in items[outside].tolist()]
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
        return self._emb_n.get(worker_id, 0)

    def has_emb(self, worker_id: str, item: int) -> bool:
        bit = self._bits.get(worker_id)
        if bit is None:
            return False
        if bit < 64 and 0 <= item < len(self._dense):
            return bool(int(self._dense[item]) >> bit & 1)
        return item in self._emb_extra[worker_id]

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
        """The worker's items, sorted (one pass over the dense array)."""
        if worker_id not in self._bits:
            return []
        held: list[int] = self._dense_items(worker_id).tolist()
        extra = self._emb_extra[worker_id]
        return sorted(held + list(extra)) if extra else held

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
        self._emb_n[worker_id] = 0
        self._emb_extra[worker_id] = set()
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
        bit = self._bits[worker_id]
        extra = self._emb_extra[worker_id]
        if self._emb_n[worker_id] > len(extra):  # it holds items in the array: clear its column there
            self._dense &= np.uint64(~(1 << bit) & _MASK64)
        self._dict_clear(extra, bit)
        self._emb_total -= self._emb_n[worker_id]
        self._emb_n[worker_id] = 0
        self._emb_extra[worker_id] = set()

    def drop_worker(self, worker_id: str) -> bool:
        """Forget a worker entirely (residency and bit, which becomes free for reuse)."""
        if worker_id not in self._bits:
            return False
        self.clear_worker(worker_id)
        bit = self._bits.pop(worker_id)
        del self._bit_owner[bit]
        del self._worker_users[worker_id]
        del self._emb_n[worker_id]
        del self._emb_extra[worker_id]
        heapq.heappush(self._free_bits, bit)
        if self._track:  # its pending evictions are moot: the whole worker goes
            self._evicted.kv = [e for e in self._evicted.kv if e[1] != worker_id]
            self._evicted.emb.pop(worker_id, None)
        return True

    def clear(self) -> None:
        """Forget everything (counters are kept)."""
        self._dense = np.zeros(0, dtype=np.uint64)  # every mask goes: free the array first (nothing to clear)
        for worker_id in list(self._bits):
            self.drop_worker(worker_id)
        self._free_bits = []
        self._next_bit = 0
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
    def add_emb(self, worker_id: str, items: Iterable[int] | I64) -> list[int]:
        """Mark items resident on a worker; returns those that were not already (each once, in
        first-occurrence order), including any this call evicts again (see "Memory policy")."""
        bit = self.add_worker(worker_id)
        ids, big = _distinct(items)
        return self._add(worker_id, bit, ids, big)

    def remove_emb(self, worker_id: str, items: Iterable[int] | I64) -> list[int]:
        """Mark items not resident on a worker; returns those that were (each once, in first-occurrence
        order)."""
        bit = self._bits.get(worker_id)
        if bit is None:
            return []
        ids, big = _distinct(items)
        side = self._dense_side(ids, bit)
        held = self._held(worker_id, bit, ids, side)
        gone = ids[held]
        extra = self._emb_extra[worker_id]
        gone_big = [i for i in big if i in extra]
        gone_side = side[held]
        self._unset(worker_id, bit, gone[gone_side], gone[~gone_side].tolist() + gone_big)
        out: list[int] = gone.tolist()
        return out + gone_big

    # ---- snapshots ------------------------------------------------------------------------------------
    def replace_worker(
        self, worker_id: str, kv: Mapping[str, int], emb: Iterable[int] | I64
    ) -> ResidencyDiff:
        """Make a worker's residency exactly (kv, emb); returns the effective changes. Every placement in
        ``kv`` counts as updated now (a snapshot confirms it)."""
        bit = self.add_worker(worker_id)
        diff = ResidencyDiff()
        for user in [u for u in self._worker_users[worker_id] if u not in kv]:
            self.remove_kv(user, worker_id)
            diff.kv_removed.append(user)
        for user, length in kv.items():
            if self.upsert_kv(user, worker_id, length):
                diff.kv_upserts[user] = length
        ids, big = _distinct(emb)
        held = self._dense_items(worker_id)
        gone = held[~np.isin(held, ids)]
        extra = self._emb_extra[worker_id]
        gone_extra: list[int] = []
        if extra:
            keep = set(ids.tolist()).union(big)
            gone_extra = sorted(i for i in extra if i not in keep)
        self._unset(worker_id, bit, gone, gone_extra)
        diff.emb_removed = gone.tolist() + gone_extra
        diff.emb_added = self._add(worker_id, bit, ids, big)
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
            self._evict_kv()
            return
        counts = self._emb_n
        self._evict_lowest(max(counts, key=counts.__getitem__), 1)  # max: the first of those tied

    def _make_room_for(self, worker_id: str, k: int) -> int:
        """Make room for ``k`` new EMB items of ``worker_id`` as ``k`` single inserts would (the rule of
        the module docstring, applied before each), in bulk. Returns how many of those ``k`` items the
        worker loses again (its own earlier items came first): the caller must not set them."""
        need = k - max(0, self.max_entries - self.entries)  # inserts that find the index full
        if need <= 0:
            return 0
        kv_n = min(need, len(self._lru))  # KV placements go first, while any is left
        for _ in range(kv_n):
            self._evict_kv()
        emb_n = need - kv_n
        if not emb_n:
            return 0
        before = self._emb_n[worker_id]
        # the EMB evictions are the last emb_n inserts: the k - emb_n before them have added their item
        drop = 0
        for victim, count in self._emb_victims(worker_id, before + k - emb_n, emb_n).items():
            if victim != worker_id:
                self._evict_lowest(victim, count)
                continue
            own = min(count, before)
            if own:
                self._evict_lowest(worker_id, own)
            drop = count - own
        self.emb_evictions += drop
        return drop

    def _emb_victims(self, worker_id: str, count: int, n: int) -> dict[str, int]:
        """How many entries each worker loses over ``n`` consecutive EMB evictions, each preceded by one
        insert of ``worker_id`` (which holds ``count`` entries before the first), each taking from the
        worker holding the most (the earliest registered of those tied), without replaying them.

        While ``worker_id`` is not the one, the evictions level the others down from the top (``_Leveling``)
        and it gains one entry per step; once it is the one, it stays so (it loses one and gains one per
        step, the others stand still). So: find the first step at which it is (a binary search: its count
        rises, the others' largest falls), give the others the steps before, and it the rest."""
        mine = 0
        others: list[tuple[int, str]] = []  # (registration position, worker)
        counts: list[int] = []
        for pos, (wid, held) in enumerate(self._emb_n.items()):
            if wid == worker_id:
                mine = pos
            elif held:
                others.append((pos, wid))
                counts.append(held)
        level = _Leveling(counts)
        lo, hi = 0, n  # the first step < n at which worker_id holds at least the others' largest, else n
        while lo < hi:
            mid = (lo + hi) // 2
            if count + mid >= level.top(mid):
                hi = mid
            else:
                lo = mid + 1
        step = lo
        if step < n and count + step == level.top(step) and others[level.next(step)][0] < mine:
            step += 1  # a tie with an earlier registered worker: that one goes first, then worker_id
        out = {wid: lost for (_, wid), lost in zip(others, level.lost(step), strict=True) if lost}
        if step < n:
            out[worker_id] = n - step
        return out

    def _evict_kv(self) -> None:
        user, worker = next(iter(self._lru))
        self.remove_kv(user, worker)
        self.kv_evictions += 1
        if self._track:
            self._evicted.kv.append((user, worker))

    def _evict_lowest(self, worker_id: str, n: int) -> None:
        """Evict the worker's ``n`` lowest item ids."""
        bit = self._bits[worker_id]
        extra = self._emb_extra[worker_id]
        in_dense = self._emb_n[worker_id] - len(extra)
        dense = self._dense_lowest(bit, min(n, in_dense)) if in_dense else _empty()
        others = heapq.nsmallest(n, extra) if extra else []
        if len(dense) and others:  # both hold some: the n lowest of the union
            lowest: list[int] = sorted(dense.tolist() + others)[:n]
            in_dict = set(others)
            others = [i for i in lowest if i in in_dict]
            dense = np.array([i for i in lowest if i not in in_dict], dtype=np.int64)
        else:
            lowest = dense.tolist() if len(dense) else others
        self._unset(worker_id, bit, dense, others)
        self.emb_evictions += n
        if self._track:
            self._evicted.emb.setdefault(worker_id, []).extend(lowest)

    # ---- EMB storage: the dense array and the dict --------------------------------------------------
    def _add(self, worker_id: str, bit: int, ids: I64, big: list[int]) -> list[int]:
        """add_emb on distinct ids (``big``: distinct ids beyond int64)."""
        side = self._dense_side(ids, bit)
        new_pos = ~self._held(worker_id, bit, ids, side)
        new = ids[new_pos]
        extra = self._emb_extra[worker_id]
        new_big = [i for i in big if i not in extra]
        k = len(new) + len(new_big)
        if not k:
            return []
        self._cover(new, new_big)
        new_side = side[new_pos]
        drop = self._make_room_for(worker_id, k)
        keep, keep_side, keep_big = new, new_side, new_big
        if drop:  # this call's earliest new items were evicted again: never set them
            gone: list[int] = new[:drop].tolist() + new_big[: max(0, drop - len(new))]
            keep, keep_side, keep_big = new[drop:], new_side[drop:], new_big[max(0, drop - len(new)) :]
            if self._track:
                self._evicted.emb.setdefault(worker_id, []).extend(gone)
        if bit < 64 and len(keep):
            self._dense[keep[keep_side]] |= np.uint64(1 << bit)
        to_dict = keep[~keep_side].tolist() + keep_big if not keep_side.all() or keep_big else []
        if to_dict:
            masks = self._item_masks
            flag = 1 << bit
            for item in to_dict:
                masks[item] = masks.get(item, 0) | flag
            extra.update(to_dict)
        n = len(keep) + len(keep_big)
        self._emb_n[worker_id] += n
        self._emb_total += n
        out: list[int] = new.tolist()
        return out + new_big

    def _dense_side(self, ids: I64, bit: int) -> BoolArray:
        """Which of the ids keep this bit in the dense array (the others: in the dict)."""
        cap = self.dense_max_items
        if bit >= 64 or not cap:
            return np.zeros(len(ids), dtype=np.bool_)
        if not len(ids) or int(ids.view(np.uint64).max()) < cap:  # read as uint64, a negative id is huge
            return np.ones(len(ids), dtype=np.bool_)
        side: BoolArray = (ids >= 0) & (ids < cap)
        return side

    def _held(self, worker_id: str, bit: int, ids: I64, side: BoolArray) -> BoolArray:
        """Which of the (distinct) ids the worker holds."""
        extra = self._emb_extra[worker_id]
        in_dense = self._emb_n[worker_id] - len(extra)
        dense = self._dense
        flag = np.uint64(1 << bit) if bit < 64 else np.uint64(0)
        if in_dense and len(ids) and int(ids.view(np.uint64).max()) < len(dense):  # all inside the array
            held: BoolArray = (dense[ids] & flag) != 0
        else:
            held = np.zeros(len(ids), dtype=np.bool_)
            if in_dense:  # ids beyond the array are held by nobody
                pos = np.flatnonzero(side & (ids < len(dense)))
                held[pos] = (dense[ids[pos]] & flag) != 0
        if extra:
            pos = np.flatnonzero(~side)
            if len(pos):
                held[pos] = [i in extra for i in ids[pos].tolist()]
        return held

    def _unset(self, worker_id: str, bit: int, dense: I64, others: list[int]) -> None:
        """Clear a worker's bit: of ``dense`` (held in the array), and of ``others`` (held in the dict)."""
        if len(dense):
            self._dense[dense] &= np.uint64(~(1 << bit) & _MASK64)
        if others:
            self._dict_clear(others, bit)
            self._emb_extra[worker_id].difference_update(others)
        n = len(dense) + len(others)
        self._emb_n[worker_id] -= n
        self._emb_total -= n

    def _dict_clear(self, items: Iterable[int], bit: int) -> None:
        masks = self._item_masks
        keep = ~(1 << bit)
        for item in items:
            mask = masks[item] & keep
            if mask:
                masks[item] = mask
            else:
                del masks[item]

    def _mask(self, item: int) -> int:
        dense = self._dense
        low = int(dense[item]) if 0 <= item < len(dense) else 0
        return low | self._item_masks.get(item, 0)

    def _gather(self, items: I64) -> U64:
        """The dense array at the items (0 outside it)."""
        dense = self._dense
        size = len(dense)
        if size and len(items) and int(items.view(np.uint64).max()) < size:  # one check for both bounds
            out: U64 = dense[items]
            return out
        out = np.zeros(len(items), dtype=np.uint64)
        if size:
            inside = (items >= 0) & (items < size)
            out[inside] = dense[items[inside]]
        return out

    def _dense_items(self, worker_id: str) -> I64:
        """The worker's items held in the dense array, ascending."""
        bit = self._bits[worker_id]
        if self._emb_n[worker_id] == len(self._emb_extra[worker_id]):
            return _empty()
        return np.flatnonzero(self._dense & np.uint64(1 << bit)).astype(np.int64, copy=False)

    def _dense_lowest(self, bit: int, n: int) -> I64:
        """The ``n`` lowest ids whose mask has ``bit`` in the dense array (fewer if it has fewer): a scan in
        doubling chunks from id 0, which stops as soon as it has them."""
        dense = self._dense
        flag = np.uint64(1 << bit)
        found: list[I64] = []
        got, start, step = 0, 0, 1 << 14
        while got < n and start < len(dense):
            hits = np.flatnonzero(dense[start : start + step] & flag)[: n - got]
            if len(hits):
                found.append(hits.astype(np.int64) + start)
                got += len(hits)
            start += step
            step *= 2
        return np.concatenate(found) if found else _empty()

    def _cover(self, new: I64, new_big: list[int]) -> None:
        """Before adding new items: grow the array toward the largest (see "Dense EMB masks"), and note
        whether any stays outside it."""
        lo = int(new.min()) if len(new) else None
        hi = int(new.max()) if len(new) else None
        if new_big:
            lo = min(new_big) if lo is None else min(lo, *new_big)
            hi = max(new_big) if hi is None else max(hi, *new_big)
        assert lo is not None and hi is not None
        if hi >= len(self._dense) and len(self._dense) < self.dense_max_items:
            self._dense_grow(hi)
        if lo < 0 or hi >= len(self._dense):
            self._dense_outside = True

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


class _Leveling:
    """Evictions from a list of counts, one at a time from the largest (the first listed of those tied),
    in closed form: after ``x`` of them, every count above some level L is cut to L, and the first
    ``x - (what the cuts took)`` of the counts at L (in list order) are one lower."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.desc = sorted(counts, reverse=True)

    def _level(self, x: int) -> tuple[int, int]:
        """(L, how many of those at L are one lower) after ``x`` evictions (at most the total)."""
        desc = self.desc
        total = 0
        for k, count in enumerate(desc, 1):
            total += count
            below = desc[k] if k < len(desc) else 0
            if total - k * below > x:  # cutting the k largest to the next count takes more than x
                level = -((x - total) // k)  # the lowest L with total - k * L <= x: ceil((total - x) / k)
                return level, x - (total - k * level)
        return 0, 0

    def top(self, x: int) -> int:
        """The largest count after ``x`` evictions (0: none left)."""
        return self._level(x)[0]

    def next(self, x: int) -> int:
        """The index of the count that eviction ``x + 1`` takes from."""
        level, done = self._level(x)
        return [i for i, count in enumerate(self.counts) if count >= level][done]

    def lost(self, x: int) -> list[int]:
        """What each count has lost after ``x`` evictions."""
        level, done = self._level(x)
        out: list[int] = []
        for count in self.counts:
            if count >= level:
                out.append(count - level + (1 if done > 0 else 0))
                done -= 1
            else:
                out.append(0)
        return out


def _empty() -> I64:
    return np.zeros(0, dtype=np.int64)


def _distinct(items: Iterable[int] | I64) -> tuple[I64, list[int]]:
    """A batch's distinct ids in first-occurrence order: those within int64 as an array, the others (only the
    dict can hold them) as a list."""
    if isinstance(items, np.ndarray):
        if items.dtype.kind == "i" or (items.dtype.kind == "u" and items.dtype.itemsize < 8):
            ids: I64 = items.astype(np.int64, copy=False).reshape(-1)
            return _dedup(ids), []
        items = items.tolist()  # uint64 (may pass int64) or anything else: as Python values
    seq = items if isinstance(items, list) else list(items)
    try:
        return _dedup(np.fromiter(seq, dtype=np.int64, count=len(seq))), []
    except OverflowError:
        ids = np.array([i for i in seq if _I64_MIN <= i <= _I64_MAX], dtype=np.int64)
        return _dedup(ids), list(dict.fromkeys(i for i in seq if not _I64_MIN <= i <= _I64_MAX))


def _dedup(ids: I64) -> I64:
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):  # strictly increasing (a sorted delta): distinct
        return ids
    _, first = np.unique(ids, return_index=True)  # index of each value's first occurrence
    if len(first) == len(ids):
        return ids
    out: I64 = ids[np.sort(first)]
    return out
