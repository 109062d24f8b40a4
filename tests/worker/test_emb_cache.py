from __future__ import annotations

import numpy as np
import pytest

from services.worker.core.emb_cache import EmbCache, Relocation
from services.worker.core.geometry import PoolGeometry
from services.worker.core.sketch import FrequencySketch

ENTRY = 4


def make_cache(
    chunks: int = 1, slots_per_chunk: int = 2, ghost: int = 8, owned: int | None = None
) -> EmbCache:
    geometry = PoolGeometry(
        budget_bytes=chunks * slots_per_chunk * ENTRY,
        chunk_bytes=slots_per_chunk * ENTRY,
        emb_entry_bytes=ENTRY,
        kv_page_bytes=ENTRY,
        kv_page_tokens=1,
    )
    cache = EmbCache(geometry, ghost_capacity=ghost)
    for chunk in range(chunks if owned is None else owned):
        cache.add_chunk(chunk)
    return cache


def touch(cache: EmbCache, item: int, times: int = 1) -> None:
    for _ in range(times):
        cache.lookup([item])


def fill(cache: EmbCache, items: list[int]) -> None:
    """Miss then admit each item in order (one sketch count each); they take the lowest free slots."""
    for item in items:
        touch(cache, item)
        assert cache.admit([item]).pairs() == [(item, cache.slot_of(item))]


# ---------------------------------------------------------------------------- sketch


def test_sketch_width_is_power_of_two_at_least_capacity() -> None:
    assert FrequencySketch(1000).width == 1024
    assert FrequencySketch(1024).width == 1024
    assert FrequencySketch(3).width == 64  # floor keeps tiny sketches from colliding constantly
    assert FrequencySketch(100).sample_size == 1000


def test_sketch_counts_saturate_at_15() -> None:
    sketch = FrequencySketch(64, sample_size=1000)
    for expected in range(1, 16):
        sketch.increment(7)
        assert sketch.estimate(7) == expected
    sketch.increment(7)
    assert sketch.estimate(7) == 15
    assert sketch.estimate(8) == 0


def test_sketch_never_underestimates_before_aging() -> None:
    sketch = FrequencySketch(256, sample_size=10_000)
    truth: dict[int, int] = {}
    for i in range(2000):
        key = (i * 7919) % 301
        sketch.increment(key)
        truth[key] = truth.get(key, 0) + 1
    for key, count in truth.items():
        assert sketch.estimate(key) >= min(count, 15)


def test_sketch_ages_by_halving_after_sample_size_increments() -> None:
    sketch = FrequencySketch(64, sample_size=10)
    for _ in range(9):
        sketch.increment(5)
    assert sketch.estimate(5) == 9
    sketch.increment(5)  # 10th increment: counters reach 10, then halve
    assert sketch.estimate(5) == 5
    sketch.increment(5)
    assert sketch.estimate(5) == 6


def test_sketch_rows_are_independent_enough_for_sequential_ids() -> None:
    # 1000 sequential ids in a 1024-wide sketch: each row is ~62% occupied, so an absent key looks
    # present with probability ~0.62^4 = 15% if rows are independent (correlated rows: far more).
    sketch = FrequencySketch(1000, sample_size=10**9)
    for key in range(1000):
        assert sketch.increment_and_estimate(key) >= 1
    false_positives = sum(sketch.estimate(key) > 0 for key in range(5000, 6000))
    assert false_positives < 250


def test_sketch_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        FrequencySketch(0)
    with pytest.raises(ValueError):
        FrequencySketch(8, sample_size=0)


# ---------------------------------------------------------------------------- lookup / admit


def test_admit_fills_free_slots_lowest_first() -> None:
    cache = make_cache(chunks=2)
    lookup = cache.lookup([10, 11, 12])
    assert (lookup.hits, lookup.misses) == (0, 3)
    assert lookup.miss_positions.tolist() == [0, 1, 2]
    assert lookup.miss_items.tolist() == [10, 11, 12]
    placed = cache.admit(lookup.miss_items)
    assert placed.pairs() == [(10, 0), (11, 1), (12, 2)]
    assert placed.positions.tolist() == [0, 1, 2]
    assert (cache.size, cache.capacity, cache.free_slots) == (3, 4, 1)
    assert cache.counters.emb_admits == 3
    assert cache.counters.emb_misses == 3
    cache.check_invariants()


def test_lookup_reports_input_positions() -> None:
    cache = make_cache(chunks=2)
    fill(cache, [10, 11])
    lookup = cache.lookup([11, 99, 10])
    assert lookup.hit_positions.tolist() == [0, 2]
    assert lookup.hit_slots.tolist() == [1, 0]
    assert lookup.miss_positions.tolist() == [1]
    assert lookup.miss_items.tolist() == [99]
    assert all(a.dtype == np.int64 for a in (lookup.hit_positions, lookup.hit_slots, lookup.miss_items))
    assert cache.counters.emb_hits == 2
    assert list(cache.items()) == [11, 10]  # hits moved to the MRU end in input order


def test_lookup_rejects_duplicates_without_side_effects() -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="unique"):
        cache.lookup([1, 2, 1])
    assert cache.counters.emb_misses == 0
    assert cache.sketch.estimate(1) == 0
    assert cache.ghost_items() == []


def test_admit_skips_resident_and_repeated_items() -> None:
    cache = make_cache(chunks=2)
    fill(cache, [1])
    placed = cache.admit([1, 2, 2])
    assert placed.pairs() == [(2, 1)]
    assert placed.positions.tolist() == [1]  # first occurrence
    assert cache.counters.emb_admits == 2


def test_full_cache_evicts_lru_victim_for_hotter_candidate() -> None:
    cache = make_cache()  # 2 slots
    fill(cache, [1, 2])
    touch(cache, 1)  # LRU order: 2, 1
    touch(cache, 3, times=3)  # est(3) = 3 > est(2) = 1
    assert cache.admit([3]).pairs() == [(3, 1)]  # reuses 2's slot
    assert cache.slot_of(2) is None
    assert list(cache.items()) == [1, 3]
    assert cache.counters.emb_evictions == 1
    assert cache.ghost_items() == [2]  # 3 left the ghost list when admitted
    cache.check_invariants()


def test_tinylfu_rejects_candidates_not_hotter_than_the_victim() -> None:
    cache = make_cache()
    fill(cache, [1, 2])
    touch(cache, 1, times=4)  # est(1) = 5
    touch(cache, 2, times=3)  # est(2) = 4
    touch(cache, 1)  # est(1) = 6; LRU order: 2, 1 -> victim is 2 (est 4)
    touch(cache, 3, times=2)
    assert len(cache.admit([3])) == 0  # 2 < 4
    touch(cache, 3, times=2)
    assert len(cache.admit([3])) == 0  # 4 == 4: ties keep the incumbent
    assert cache.counters.emb_rejects == 2
    touch(cache, 3)
    assert cache.admit([3]).pairs() == [(3, 1)]  # 5 > 4: evicts the LRU item 2, not a colder one
    assert cache.slot_of(2) is None
    assert cache.slot_of(1) == 0


def test_victim_is_lru_even_if_a_colder_item_exists() -> None:
    cache = make_cache()
    fill(cache, [1, 2])
    touch(cache, 1, times=3)  # est(1) = 4, est(2) = 1; LRU order: 2, 1
    touch(cache, 2)  # est(2) = 2; LRU order: 1, 2 -> victim is 1 (est 4)
    touch(cache, 3, times=3)
    assert len(cache.admit([3])) == 0  # 3 is hotter than 2 but not than the LRU victim 1
    touch(cache, 3, times=2)
    assert cache.admit([3]).pairs() == [(3, 0)]
    assert cache.slot_of(1) is None


def test_admit_without_capacity_rejects() -> None:
    cache = make_cache(owned=0)
    touch(cache, 1)
    assert len(cache.admit([1])) == 0
    assert cache.counters.emb_rejects == 1


# ---------------------------------------------------------------------------- ghost / prefetch


def test_ghost_is_bounded_and_ranks_hottest_then_most_recent() -> None:
    cache = make_cache(ghost=3)
    for item in (5, 6, 7, 8):
        touch(cache, item)
    assert cache.ghost_items() == [6, 7, 8]  # 5 fell off
    touch(cache, 6, times=2)  # 6 becomes hottest and most recent
    assert cache.ghost_items() == [7, 8, 6]
    assert cache.prefetch_candidates(10).tolist() == [6, 8, 7]
    assert cache.prefetch_candidates(2).tolist() == [6, 8]
    assert cache.prefetch_candidates(0).tolist() == []


def test_evicted_items_enter_ghost_and_admitted_items_leave_it() -> None:
    cache = make_cache()
    fill(cache, [1, 2])
    touch(cache, 3, times=3)
    assert cache.ghost_items() == [3]
    cache.admit([3])
    assert cache.ghost_items() == [1]
    assert cache.prefetch_candidates(5).tolist() == [1]


def test_ghost_ranking_is_refreshed_when_the_sketch_ages() -> None:
    geometry = PoolGeometry(
        budget_bytes=8, chunk_bytes=8, emb_entry_bytes=4, kv_page_bytes=4, kv_page_tokens=1
    )
    cache = EmbCache(geometry, ghost_capacity=4, sketch=FrequencySketch(1, sample_size=20))
    touch(cache, 1, times=3)
    touch(cache, 2, times=2)
    assert cache.prefetch_candidates(2).tolist() == [1, 2]
    for _ in range(15):  # 20th increment halves everything: est(1) = est(2) = 1
        cache.sketch.increment(99)
    assert cache.sketch.generation == 1
    assert cache.prefetch_candidates(2).tolist() == [2, 1]  # now a tie: most recent first
    cache.check_invariants()


def test_zero_ghost_capacity_remembers_nothing() -> None:
    cache = make_cache(ghost=0)
    touch(cache, 1)
    assert cache.ghost_items() == []
    assert cache.prefetch_candidates(3).tolist() == []


def test_install_prefetched_uses_only_free_slots() -> None:
    cache = make_cache()
    fill(cache, [1])
    touch(cache, 20, times=9)
    placed = cache.install_prefetched([1, 20, 21])
    assert placed.pairs() == [(20, 1)]
    assert placed.positions.tolist() == [1]
    assert cache.slot_of(21) is None
    assert cache.slot_of(1) == 0
    assert len(cache.install_prefetched([22])) == 0  # full: never evicts, however hot
    assert cache.counters.emb_evictions == 0
    assert cache.counters.emb_admits == 1
    cache.check_invariants()


# ---------------------------------------------------------------------------- chunk release


def test_release_chunk_relocates_survivors_and_evicts_coldest() -> None:
    cache = make_cache(chunks=3)  # slots: chunk0 = {0,1}, chunk1 = {2,3}, chunk2 = {4,5}
    fill(cache, [1, 2, 3, 4, 5])  # item i in slot i-1; LRU order 1..5; slot 5 free
    relocations = cache.release_chunk(1)
    # 2 survivors need 2 free slots elsewhere; only slot 5 is free -> evict LRU item 1 (slot 0)
    assert relocations == [Relocation(src_slot=2, dst_slot=0), Relocation(src_slot=3, dst_slot=5)]
    assert cache.slot_of(1) is None
    assert cache.ghost_items() == [1]
    assert {item: cache.slot_of(item) for item in (2, 3, 4, 5)} == {2: 1, 3: 0, 4: 5, 5: 4}
    assert list(cache.items()) == [2, 3, 4, 5]  # relocation keeps recency
    assert cache.chunks() == [0, 2]
    assert (cache.capacity, cache.free_slots) == (4, 0)
    cache.check_invariants()


def test_release_chunk_evicted_from_the_chunk_itself_needs_no_copy() -> None:
    cache = make_cache(chunks=2)
    fill(cache, [1, 2, 3, 4])  # chunk0 = {1, 2}, chunk1 = {3, 4}
    for item in (1, 4, 2):
        touch(cache, item)  # LRU order: 3, 1, 4, 2
    relocations = cache.release_chunk(1)
    # evict 3 (inside chunk 1: one survivor left), then 1 (frees slot 0); move 4 there
    assert relocations == [Relocation(src_slot=3, dst_slot=0)]
    assert sorted(cache.items()) == [2, 4]
    assert cache.slot_of(4) == 0
    assert cache.counters.emb_evictions == 2
    cache.check_invariants()


def test_release_empty_chunk_is_free() -> None:
    cache = make_cache(chunks=2)
    fill(cache, [1])
    assert cache.release_chunk(1) == []
    assert cache.capacity == 2
    assert cache.slot_of(1) == 0


def test_release_last_chunk_evicts_everything() -> None:
    cache = make_cache()
    fill(cache, [1, 2])
    assert cache.release_chunk(0) == []
    assert cache.size == 0
    assert cache.capacity == 0
    assert cache.ghost_items() == [1, 2]
    cache.check_invariants()


def test_choose_chunk_to_release_prefers_fewest_items_then_highest_index() -> None:
    cache = make_cache(chunks=3)
    assert cache.choose_chunk_to_release() == 2  # all empty: highest index
    fill(cache, [1, 2, 3])  # chunk0 full, chunk1 one item, chunk2 empty
    assert cache.choose_chunk_to_release() == 2
    fill(cache, [4, 5])  # chunk0 2, chunk1 2, chunk2 1
    assert cache.choose_chunk_to_release() == 2
    fill(cache, [6])
    assert cache.choose_chunk_to_release() == 2  # all full: highest index
    cache.release_chunk(2)
    assert cache.choose_chunk_to_release() == 1


def test_chunk_ownership_errors() -> None:
    cache = make_cache(chunks=2, owned=1)
    with pytest.raises(ValueError):
        cache.add_chunk(0)
    with pytest.raises(ValueError):
        cache.add_chunk(2)
    with pytest.raises(ValueError):
        cache.release_chunk(1)
    empty = make_cache(owned=0)
    with pytest.raises(ValueError):
        empty.choose_chunk_to_release()


def test_drain_touched_reports_residency_changes_once() -> None:
    cache = make_cache()
    fill(cache, [1, 2])
    touch(cache, 3, times=3)
    cache.admit([3])
    assert cache.drain_touched() == {1, 2, 3}
    assert cache.drain_touched() == set()


# ---------------------------------------------------------------------------- review fixes


def test_admit_never_gives_one_slot_to_two_items_of_a_batch() -> None:
    cache = make_cache(chunks=1, slots_per_chunk=2)
    fill(cache, [1, 2])
    batch = [10, 11, 12, 13]
    for item in batch:
        touch(cache, item, times=3)  # all hotter than the residents
    accepted = cache.admit(batch)
    slots = accepted.slots.tolist()
    assert len(slots) == len(set(slots))
    assert accepted.pairs() == [(10, 0), (11, 1)]  # the two residents made room; then the batch stops
    assert cache.counters.emb_rejects == 2 and cache.counters.emb_evictions == 2
    cache.check_invariants()


def test_prefetched_items_enter_at_the_cold_end() -> None:
    cache = make_cache(chunks=2, slots_per_chunk=2, owned=2)
    fill(cache, [1, 2])
    assert cache.install_prefetched([7]).pairs() == [(7, cache.slot_of(7))]
    assert next(iter(cache.items())) == 7  # first to be evicted
    touch(cache, 3)
    cache.admit([3])  # a free slot remains: no eviction yet
    touch(cache, 4, times=5)
    cache.admit([4])  # full now: the prefetched guess goes first, not a requested item
    assert cache.slot_of(7) is None and {1, 2, 3, 4} <= set(cache.items())
