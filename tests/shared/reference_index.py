"""The residency index's documented semantics, one item at a time: the reference model for tests.

``shared/residency/index.py`` applies its memory policy in bulk (one numpy operation per batch and per
victim); ``test_residency_bulk.py`` replays random operations through both and compares everything
observable. This model is the module docstring's rule taken literally, with plain sets and dicts: before
each single insert that finds the index full, evict the least-recently-updated KV placement while any
exists, else one EMB item of the worker holding the most (the earliest registered of those tied): its
lowest id, except that the worker an ``add_emb`` call is filling loses the items it held before the call
first (lowest first), then the call's own earliest new items. A batch is its distinct ids in
first-occurrence order, those beyond int64 last. Test code only.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

__all__ = ["RefIndex", "batch_order"]


def batch_order(items: Iterable[int]) -> list[int]:
    """The distinct ids in first-occurrence order, ids beyond int64 after the others."""
    ids = list(dict.fromkeys(items))
    return [i for i in ids if -(2**63) <= i < 2**63] + [i for i in ids if not -(2**63) <= i < 2**63]


class RefIndex:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.kv: dict[tuple[str, str], int] = {}  # (user, worker) -> length; order = LRU (head: oldest)
        self.emb: dict[str, set[int]] = {}  # registration order
        self.bits: dict[str, int] = {}
        self.free: list[int] = []
        self.next_bit = 0
        self.kv_evictions = 0
        self.emb_evictions = 0
        self.evicted_kv: list[tuple[str, str]] = []
        self.evicted_emb: dict[str, list[int]] = {}

    # ---- queries --------------------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        return len(self.kv) + sum(map(len, self.emb.values()))

    def mask(self, item: int) -> int:
        return sum(1 << self.bits[w] for w, held in self.emb.items() if item in held)

    def worker_kv(self, worker: str) -> dict[str, int]:
        return {u: n for (u, w), n in self.kv.items() if w == worker}

    # ---- workers --------------------------------------------------------------------------------------
    def add_worker(self, worker: str) -> int:
        if worker not in self.bits:
            if self.free:
                self.bits[worker] = heapq.heappop(self.free)
            else:
                self.bits[worker] = self.next_bit
                self.next_bit += 1
            self.emb[worker] = set()
        return self.bits[worker]

    def clear_worker(self, worker: str) -> None:
        if worker in self.bits:
            self.kv = {k: n for k, n in self.kv.items() if k[1] != worker}
            self.emb[worker] = set()

    def drop_worker(self, worker: str) -> None:
        if worker in self.bits:
            self.clear_worker(worker)
            del self.emb[worker]
            heapq.heappush(self.free, self.bits.pop(worker))
            self.evicted_kv = [e for e in self.evicted_kv if e[1] != worker]
            self.evicted_emb.pop(worker, None)

    def clear(self) -> None:
        for worker in list(self.bits):
            self.drop_worker(worker)
        self.free = []
        self.next_bit = 0

    # ---- the rule -------------------------------------------------------------------------------------
    def _make_room(
        self, adding: str | None = None, before: set[int] | None = None, batch: Iterable[int] = ()
    ) -> None:
        if self.entries < self.max_entries:
            return
        if self.kv:
            key = next(iter(self.kv))
            del self.kv[key]
            self.kv_evictions += 1
            self.evicted_kv.append(key)
            return
        victim = max(self.emb, key=lambda w: len(self.emb[w]))
        held = self.emb[victim]
        if victim == adding:
            assert before is not None
            old = held & before
            item = min(old) if old else next(i for i in batch if i in held)
        else:
            item = min(held)
        held.remove(item)
        self.emb_evictions += 1
        self.evicted_emb.setdefault(victim, []).append(item)

    # ---- updates --------------------------------------------------------------------------------------
    def upsert_kv(self, user: str, worker: str, length: int) -> bool:
        key = (user, worker)
        if key in self.kv:
            old = self.kv.pop(key)
            self.kv[key] = length
            return old != length
        self.add_worker(worker)
        self._make_room()
        self.kv[key] = length
        return True

    def remove_kv(self, user: str, worker: str) -> bool:
        return self.kv.pop((user, worker), None) is not None

    def add_emb(self, worker: str, items: Iterable[int]) -> list[int]:
        self.add_worker(worker)
        held = self.emb[worker]
        before = set(held)
        batch = [i for i in batch_order(items) if i not in held]
        for item in batch:
            self._make_room(worker, before, batch)
            held.add(item)
        return batch

    def remove_emb(self, worker: str, items: Iterable[int]) -> list[int]:
        held = self.emb.get(worker)
        if held is None:
            return []
        gone = [i for i in batch_order(items) if i in held]
        held.difference_update(gone)
        return gone

    def replace_worker(
        self, worker: str, kv: Mapping[str, int], emb: Iterable[int]
    ) -> tuple[list[str], dict[str, int], list[int], list[int]]:
        """(kv_removed, kv_upserts, emb_removed sorted, emb_added)"""
        self.add_worker(worker)
        kv_removed = [u for u in self.worker_kv(worker) if u not in kv]
        for user in kv_removed:
            self.remove_kv(user, worker)
        kv_upserts = {u: n for u, n in kv.items() if self.upsert_kv(u, worker, n)}
        new = batch_order(emb)
        keep = set(new)
        emb_removed = sorted(self.remove_emb(worker, [i for i in self.emb[worker] if i not in keep]))
        return kv_removed, kv_upserts, emb_removed, self.add_emb(worker, new)
