from __future__ import annotations

import math

import numpy as np
import pytest

from services.worker.core.counters import PoolCounters
from services.worker.core.geometry import Owner, PoolGeometry
from services.worker.core.pool import Pool, RefillMode, Relocation, ResidencyDelta, TickPlan

# 8 chunks of 16 bytes (+5 unused): 4 EMB slots or 2 KV pages (of 2 tokens) per chunk
GEOMETRY = PoolGeometry(
    budget_bytes=8 * 16 + 5, chunk_bytes=16, emb_entry_bytes=4, kv_page_bytes=8, kv_page_tokens=2
)


def request(pool: Pool, items: list[int]) -> None:
    """What the engine does per batch: look up, then offer the misses for admission."""
    lookup = pool.emb_lookup(items)
    pool.emb_admit(lookup.miss_items)


def commit(pool: Pool, user: str, length: int) -> list[int]:
    result = pool.kv_commit(user, length, f"{user}:{length}".encode())
    assert result is not None
    return result.pages


class Storage:
    """Shadow of device memory: what each EMB slot / KV page holds."""

    def __init__(self) -> None:
        self.emb: dict[int, int] = {}
        self.kv: dict[int, tuple[str, int]] = {}

    def apply(self, plan: TickPlan) -> None:
        for r in plan.emb_relocations:
            self.emb[r.dst_slot] = self.emb[r.src_slot]
        for r in plan.kv_relocations:
            self.kv[r.dst] = self.kv[r.src]  # aliases of dst_slot / src_slot
        for item, slot in plan.refill.pairs():
            self.emb[slot] = item

    def check(self, pool: Pool) -> None:
        for item in pool.emb.items():
            slot = pool.emb.slot_of(item)
            assert slot is not None
            assert self.emb[slot] == item
        for user in pool.kv.entries_snapshot():
            entry = pool.kv.get(user)
            assert entry is not None
            assert [self.kv[page] for page in entry.pages] == [(user, i) for i in range(len(entry.pages))]


def test_initial_split() -> None:
    pool = Pool(GEOMETRY, alpha=0.25)
    assert (pool.emb_chunks, pool.kv_chunks, pool.free_chunks) == (2, 6, 0)
    assert pool.alpha == 0.25
    assert (pool.target_alpha, pool.target_emb_chunks) == (0.25, 2)
    assert [pool.owner(c) for c in range(8)] == [Owner.EMB] * 2 + [Owner.KV] * 6
    assert (pool.emb.capacity, pool.kv.capacity_pages) == (8, 12)
    assert pool.emb.ghost_capacity == 32  # EMB slots if alpha were 1
    assert GEOMETRY.unused_bytes == 5
    pool.check_invariants()


@pytest.mark.parametrize(("alpha", "emb_chunks"), [(0.0, 0), (0.3, 2), (0.5, 4), (0.99, 8), (1.0, 8)])
def test_initial_split_rounds(alpha: float, emb_chunks: int) -> None:
    pool = Pool(GEOMETRY, alpha=alpha)
    assert pool.emb_chunks == emb_chunks
    assert pool.kv_chunks == 8 - emb_chunks
    pool.check_invariants()


def test_edges_of_the_split() -> None:
    all_emb = Pool(GEOMETRY, alpha=1.0)
    assert all_emb.kv_commit("u", 1, b"h") is None
    assert all_emb.counters.kv_rejects == 1
    all_kv = Pool(GEOMETRY, alpha=0.0)
    request(all_kv, [1, 2])
    assert all_kv.emb.size == 0
    assert all_kv.counters.emb_rejects == 2


@pytest.mark.parametrize("alpha", [-0.1, 1.01, math.nan])
def test_invalid_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        Pool(GEOMETRY, alpha=alpha)
    pool = Pool(GEOMETRY, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        pool.set_target(alpha)
    assert pool.target_alpha == 0.5


def test_invalid_tick_budget() -> None:
    with pytest.raises(ValueError, match="max_chunks_per_tick"):
        Pool(GEOMETRY, alpha=0.5, max_chunks_per_tick=0)


@pytest.mark.parametrize(
    ("alpha", "target", "max_per_tick"),
    [(0.25, 1.0, 1), (0.25, 1.0, 4), (1.0, 0.0, 3), (0.5, 0.125, 2), (0.5, 0.5, 2), (0.0, 0.3, 5)],
)
def test_tick_moves_at_most_budget_and_reaches_target(alpha: float, target: float, max_per_tick: int) -> None:
    pool = Pool(GEOMETRY, alpha=alpha, max_chunks_per_tick=max_per_tick)
    pool.set_target(target)
    diff = abs(pool.target_emb_chunks - pool.emb_chunks)
    ticks = 0
    while pool.emb_chunks != pool.target_emb_chunks:
        before = pool.emb_chunks
        plan = pool.tick()
        assert 1 <= plan.chunks_moved <= max_per_tick
        assert abs(pool.emb_chunks - before) == plan.chunks_moved
        ticks += 1
        pool.check_invariants()
    assert ticks == math.ceil(diff / max_per_tick)
    assert pool.tick() == TickPlan(chunks_moved=0)
    assert pool.counters.chunks_moved == diff
    assert pool.alpha == pool.target_emb_chunks / 8


def test_emb_shrink_relocates_survivors_and_evicts_coldest() -> None:
    pool = Pool(GEOMETRY, alpha=0.5)  # EMB chunks 0-3 = slots 0-15
    storage = Storage()
    for item in range(100, 110):
        request(pool, [item])
    for item, slot in ((item, pool.emb.slot_of(item)) for item in range(100, 110)):
        assert slot == item - 100
        storage.emb[slot] = item
    pool.set_target(0.25)
    first = pool.tick()  # chunk 3 is empty: free to release
    assert first == TickPlan(chunks_moved=1)
    assert pool.owner(3) is Owner.KV
    second = pool.tick()  # chunk 2 holds 108, 109; chunks 0-1 are full -> evict LRU 100, 101
    assert second.emb_relocations == [Relocation(src_slot=8, dst_slot=1), Relocation(src_slot=9, dst_slot=0)]
    assert second.kv_relocations == []
    storage.apply(second)
    storage.check(pool)
    assert sorted(pool.emb.items()) == list(range(102, 110))
    assert pool.emb.ghost_items() == [100, 101]
    assert (pool.counters.emb_evictions, pool.counters.relocations, pool.counters.chunks_moved) == (2, 2, 2)
    assert (pool.emb.capacity, pool.kv.capacity_pages) == (8, 12)
    pool.check_invariants()


def test_kv_shrink_relocates_pages_and_evicts_coldest_users() -> None:
    pool = Pool(GEOMETRY, alpha=0.25, max_chunks_per_tick=2)  # KV chunks 2-7 = pages 4-15
    storage = Storage()
    for u in range(6):
        pages = commit(pool, f"u{u}", 4)
        assert pages == [4 + 2 * u, 5 + 2 * u]
        storage.kv.update({page: (f"u{u}", i) for i, page in enumerate(pages)})
    pool.set_target(0.5)
    plan = pool.tick()
    assert plan.chunks_moved == 2
    # all KV chunks are full: release 7 (evict u0, move u5 into its pages), then 6 (evict u1, move u4)
    assert plan.kv_relocations == [
        Relocation(src_slot=14, dst_slot=4),
        Relocation(src_slot=15, dst_slot=5),
        Relocation(src_slot=12, dst_slot=6),
        Relocation(src_slot=13, dst_slot=7),
    ]
    assert plan.emb_relocations == []
    assert len(plan.refill) == 0
    storage.apply(plan)
    storage.check(pool)
    assert pool.kv.entries_snapshot() == {"u2": 4, "u3": 4, "u4": 4, "u5": 4}
    assert (pool.owner(6), pool.owner(7)) == (Owner.EMB, Owner.EMB)
    assert pool.counters.kv_evictions == 2
    pool.check_invariants()


def test_relocations_of_several_moves_in_one_tick_chain_in_order() -> None:
    pool = Pool(GEOMETRY, alpha=0.0, max_chunks_per_tick=8)  # KV chunk c = pages {2c, 2c+1}
    storage = Storage()
    for user, length in (("c", 4), ("b", 2), ("filler", 2), ("a", 2)):
        for i, page in enumerate(commit(pool, user, length)):
            storage.kv[page] = (user, i)
    # c = [0, 1], b = [2], filler = [3], a = [4]; drop filler so chunk 1 has one free page
    pool.kv_lookup("filler", 2, lambda n: b"changed")
    pool.set_target(0.875)  # KV keeps a single chunk
    plan = pool.tick()
    assert plan.chunks_moved == 7
    # chunks 7..3 are empty; chunk 2 moves a's page into chunk 1 (4 -> 3); chunk 1 is then released
    # too, evicting LRU user c and moving b and a (again: 3 -> 1) into chunk 0.
    assert plan.kv_relocations == [
        Relocation(src_slot=4, dst_slot=3),
        Relocation(src_slot=2, dst_slot=0),
        Relocation(src_slot=3, dst_slot=1),
    ]
    storage.apply(plan)
    storage.check(pool)
    assert pool.kv.entries_snapshot() == {"b": 2, "a": 2}
    pool.check_invariants()


def test_emb_relocations_of_several_moves_in_one_tick_chain_in_order() -> None:
    pool = Pool(GEOMETRY, alpha=0.5, max_chunks_per_tick=3)  # EMB chunk c = slots 4c..4c+3
    storage = Storage()
    for item in range(9):  # item i in slot i
        request(pool, [item])
        storage.emb[item] = item
    for item in (0, 1, 2, 3, 5, 6, 7, 8):
        pool.emb_lookup([item])  # LRU order: 4, 0, 1, 2, 3, 5, 6, 7, 8
    pool.set_target(0.125)
    plan = pool.tick()
    assert plan.chunks_moved == 3
    # chunk 3 is empty; chunk 2 evicts 4 and moves 8 into its slot; chunks 0 and 1 then tie and
    # chunk 1 goes, evicting 0-3 and moving 8 a second time (4 -> 3).
    assert plan.emb_relocations == [
        Relocation(src_slot=8, dst_slot=4),
        Relocation(src_slot=4, dst_slot=3),
        Relocation(src_slot=5, dst_slot=2),
        Relocation(src_slot=6, dst_slot=1),
        Relocation(src_slot=7, dst_slot=0),
    ]
    storage.apply(plan)
    storage.check(pool)
    assert {item: pool.emb.slot_of(item) for item in pool.emb.items()} == {5: 2, 6: 1, 7: 0, 8: 3}
    pool.check_invariants()


def _ghost_scenario(mode: RefillMode) -> Pool:
    """EMB full with 0-7, ghost holds 102-109 once each, 101 twice, 100 three times."""
    pool = Pool(GEOMETRY, alpha=0.25, refill_mode=mode)
    for item in range(8):
        request(pool, [item])
    for item in range(102, 110):
        pool.emb_lookup([item])
    for _ in range(2):
        pool.emb_lookup([101])
    for _ in range(3):
        pool.emb_lookup([100])
    assert pool.emb.free_slots == 0
    pool.set_target(0.5)
    return pool


def test_naive_mode_refills_synchronously_and_counts_critical_bytes() -> None:
    pool = _ghost_scenario(RefillMode.NAIVE)
    plan = pool.tick()
    assert plan.chunks_moved == 1
    assert pool.owner(7) is Owner.EMB  # all KV chunks empty: highest index moves
    # hottest first, ties most recent first, into the 4 new slots of chunk 7
    assert plan.refill.pairs() == [(100, 28), (101, 29), (109, 30), (108, 31)]
    assert plan.refill.positions.tolist() == [0, 1, 2, 3]  # into the candidate list it drew
    assert pool.counters.critical_refill_bytes == 4 * GEOMETRY.emb_entry_bytes
    assert pool.counters.prefetch_bytes == 0
    assert pool.emb.free_slots == 0
    assert pool.prefetch_plan(1000).tolist() == []
    pool.check_invariants()


def test_incremental_mode_never_refills_synchronously() -> None:
    pool = _ghost_scenario(RefillMode.INCREMENTAL)
    plan = pool.tick()
    assert plan == TickPlan(chunks_moved=1)
    assert pool.counters.critical_refill_bytes == 0
    assert pool.emb.free_slots == 4
    assert pool.prefetch_plan(12).tolist() == [100, 101, 109]  # bounded by bytes
    assert pool.prefetch_plan(0).tolist() == []
    wanted = pool.prefetch_plan(10_000)  # bounded by free slots
    assert wanted.dtype == np.int64
    assert wanted.tolist() == [100, 101, 109, 108]
    assert pool.install_prefetched(wanted).pairs() == [(100, 28), (101, 29), (109, 30), (108, 31)]
    assert pool.counters.prefetch_bytes == 16
    assert pool.prefetch_plan(10_000).tolist() == []  # no free slots left
    assert pool.counters.critical_refill_bytes == 0
    pool.check_invariants()


def test_prefetch_never_evicts() -> None:
    pool = _ghost_scenario(RefillMode.INCREMENTAL)
    resident = sorted(pool.emb.items())
    assert pool.prefetch_plan(1000).tolist() == []  # no free slot yet
    assert len(pool.install_prefetched([100, 101])) == 0
    assert sorted(pool.emb.items()) == resident
    assert pool.counters.emb_evictions == 0
    assert pool.counters.prefetch_bytes == 0


def test_free_chunks_are_given_to_emb_first() -> None:
    pool = Pool(GEOMETRY, alpha=0.25)
    commit(pool, "u", 4)  # pages 4, 5 in chunk 2
    # Park chunk 3 as FREE (the public API never does this; a future shrink-the-budget path would).
    assert pool.kv.release_chunk(3) == []
    pool._set_owner(3, Owner.FREE)
    assert (pool.emb_chunks, pool.kv_chunks, pool.free_chunks) == (2, 5, 1)
    pool.check_invariants()
    pool.set_target(0.375)
    plan = pool.tick()
    assert plan == TickPlan(chunks_moved=1)
    assert pool.owner(3) is Owner.EMB
    assert pool.free_chunks == 0
    assert pool.kv.entries_snapshot() == {"u": 4}
    pool.check_invariants()


def test_lookup_counters_and_miss_bytes() -> None:
    pool = Pool(GEOMETRY, alpha=0.25)
    request(pool, [1, 2, 3])
    pool.emb_lookup([1, 2, 4])
    c = pool.counters
    assert (c.emb_hits, c.emb_misses, c.emb_admits, c.emb_miss_bytes) == (2, 4, 3, 16)
    history = [5, 6, 7]
    assert pool.kv_lookup("u", 3, lambda n: bytes(history[:n])).cached_len == 0
    pool.kv_commit("u", 3, bytes(history))
    assert pool.kv_lookup("u", 3, lambda n: bytes(history[:n])).cached_len == 3
    assert (c.kv_hits, c.kv_misses) == (1, 1)
    assert set(c.as_dict()) == {
        "emb_hits", "emb_misses", "emb_admits", "emb_rejects", "emb_evictions", "kv_hits", "kv_misses",
        "kv_evictions", "kv_rejects", "chunks_moved", "relocations", "emb_miss_bytes", "prefetch_bytes",
        "critical_refill_bytes",
    }  # fmt: skip
    assert PoolCounters().as_dict() == dict.fromkeys(c.as_dict(), 0)


def test_deltas_are_net_per_period() -> None:
    pool = Pool(GEOMETRY, alpha=0.125)  # 1 EMB chunk = 4 slots
    commit(pool, "old", 2)
    assert pool.snapshot().kv == {"old": 2}
    assert pool.drain_deltas() == ResidencyDelta()  # snapshot reset the baseline
    request(pool, [1, 2, 3, 4])
    for _ in range(3):
        pool.emb_lookup([5])
    pool.emb_admit([5])  # evicts LRU item 1, admitted in this same period
    commit(pool, "a", 2)
    commit(pool, "a", 5)
    commit(pool, "b", 2)
    pool.kv_lookup("b", 1, lambda n: b"other")  # invalidates b, created in this same period
    pool.kv_lookup("old", 1, lambda n: b"other")  # invalidates old
    delta = pool.drain_deltas()
    assert delta == ResidencyDelta(
        kv_upserts={"a": 5}, kv_removed=["b", "old"], emb_added=[2, 3, 4, 5], emb_removed=[1]
    )
    assert pool.drain_deltas().empty


def test_snapshot_lists_everything_sorted_and_clears_deltas() -> None:
    pool = Pool(GEOMETRY, alpha=0.25)
    request(pool, [9, 3, 7])
    commit(pool, "z", 3)
    commit(pool, "a", 1)
    snap = pool.snapshot()
    assert snap.emb == [3, 7, 9]
    assert list(snap.kv.items()) == [("a", 1), ("z", 3)]
    assert pool.drain_deltas().empty


def test_check_invariants_detects_corruption() -> None:
    pool = Pool(GEOMETRY, alpha=0.25)
    request(pool, [1])
    pool.check_invariants()
    pool._owner[1] = Owner.KV
    with pytest.raises(AssertionError, match="chunk counts"):
        pool.check_invariants()
    pool._owner[1] = Owner.EMB
    pool.emb._map[2] = 0  # item 2 claims slot 0 (item 1's)
    with pytest.raises(AssertionError, match="EMB"):
        pool.check_invariants()


def test_no_prefetch_while_the_emb_region_shrinks() -> None:
    pool = Pool(GEOMETRY, alpha=0.5, max_chunks_per_tick=1)
    request(pool, [1, 2, 3])
    pool.set_target(0.0)  # shrink to nothing: the three items go to the ghost list
    while pool.emb_chunks:
        pool.tick()
    pool.set_target(0.25)
    pool.tick()  # growing again: one chunk with 4 free slots, and ghosts to prefetch
    assert sorted(pool.prefetch_plan(1024).tolist()) == [1, 2, 3]
    pool.set_target(0.0)  # shrinking: nothing may be prefetched into a region being given away
    assert pool.prefetch_plan(1024).tolist() == []
