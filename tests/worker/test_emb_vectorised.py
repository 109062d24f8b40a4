"""The vectorised EMB cache's machinery: operation by operation against the per-item reference model where
the batch semantics are exact, and its parts (sketch batches, duels, ghost ranking, allocator batches,
input checks) on their own."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.emb_bookkeeping import measure
from services.worker.core.chunk_allocator import ChunkAllocator
from services.worker.core.emb_cache import _DUEL_ROUNDS, EmbCache, EmbLookup, EmbPlacement
from services.worker.core.geometry import PoolGeometry
from services.worker.core.ghost_list import GhostList
from services.worker.core.pool import TickPlan
from services.worker.core.sketch import FrequencySketch
from tests.worker.reference_emb import RefBlockedSketch, RefEmbCache

ENTRY = 4


def geometry(chunks: int, slots_per_chunk: int) -> PoolGeometry:
    return PoolGeometry(
        budget_bytes=chunks * slots_per_chunk * ENTRY,
        chunk_bytes=slots_per_chunk * ENTRY,
        emb_entry_bytes=ENTRY,
        kv_page_bytes=ENTRY,
        kv_page_tokens=1,
    )


# ---------------------------------------------------------------------------- against the reference


class Twins:
    """The vectorised cache and the per-item reference (same sketch hashing), driven alike."""

    def __init__(
        self, chunks: int, slots_per_chunk: int, ghost: int, sample_size: int, width: int = 0
    ) -> None:
        g = geometry(chunks, slots_per_chunk)
        capacity = max(width, chunks * slots_per_chunk)
        sketch = FrequencySketch(capacity, sample_size=sample_size)
        self.new = EmbCache(g, ghost_capacity=ghost, sketch=sketch)
        self.ref = RefEmbCache(
            g, ghost_capacity=ghost, sketch=RefBlockedSketch(capacity, sample_size=sample_size)
        )
        for chunk in range(chunks):
            self.new.add_chunk(chunk)
            self.ref.add_chunk(chunk)
        self.released: list[int] = []

    def request(self, items: list[int], batch_admit: bool) -> None:
        lookup = self.new.lookup(items)
        expected = self.ref.lookup(items)
        assert list(zip(lookup.hit_positions.tolist(), lookup.hit_slots.tolist(), strict=True)) == (
            expected.hit_slots
        )
        assert list(zip(lookup.miss_positions.tolist(), lookup.miss_items.tolist(), strict=True)) == (
            expected.misses
        )
        misses = lookup.miss_items.tolist()
        if batch_admit and len(misses) <= self.new.free_slots:  # free slots only: exact in a batch
            placed = self.new.admit(lookup.miss_items)
            assert placed.pairs() == self.ref.admit(misses)
            assert placed.positions.tolist() == list(range(len(misses)))
        else:  # one candidate per call: the duel is exact
            for item in misses:
                assert self.new.admit([item]).pairs() == self.ref.admit([item])

    def install(self, items: list[int]) -> None:
        assert self.new.install_prefetched(items).pairs() == self.ref.install_prefetched(items)

    def prefetch(self, k: int) -> None:
        wanted = self.new.prefetch_candidates(k).tolist()
        assert wanted == self.ref.prefetch_candidates(k)
        self.install(wanted)

    def release(self) -> None:
        if not self.new.chunks():
            return
        chunk = self.new.choose_chunk_to_release()
        assert chunk == self.ref.choose_chunk_to_release()
        assert self.new.release_chunk(chunk) == self.ref.release_chunk(chunk)
        self.released.append(chunk)

    def add(self) -> None:
        if self.released:
            chunk = self.released.pop()
            self.new.add_chunk(chunk)
            self.ref.add_chunk(chunk)

    def check(self, universe: int) -> None:
        new, ref = self.new, self.ref
        assert new.items() == list(ref.items())  # the exact LRU order
        assert new.ghost_items() == ref.ghost_items()
        assert [new.slot_of(i) for i in range(universe)] == [ref.slot_of(i) for i in range(universe)]
        assert (new.size, new.capacity, new.free_slots) == (ref.size, ref.capacity, ref.free_slots)
        assert new.counters == ref.counters
        assert new.drain_touched() == ref.drain_touched()
        new.check_invariants()


# (chunks, slots per chunk, item ids, ghost capacity, largest batch)
SHAPES = {"small": (4, 4, 48, 10, 6), "large": (8, 8, 300, 40, 20)}


@pytest.mark.parametrize(
    ("seed", "aging", "shape"),
    [(1, False, "small"), (2, False, "small"), (3, True, "small"), (4, True, "small")]
    + [(5, False, "large"), (6, True, "large")],
)
def test_operation_by_operation_equal_to_the_reference(seed: int, aging: bool, shape: str) -> None:
    """Thousands of random operations (enough to compact the LRU log and the ghost log many times over),
    restricted to where batches are exact: single-candidate admissions or free slots only, and, while the
    sketch ages, single-item lookups (a batch ages at its end, the reference in its middle). The sketch
    is wide: the estimates a batch records (ghost ranks) are taken once the whole batch is counted, the
    reference's as each item is, which differs only where keys of one batch share a counter."""
    chunks, slots_per_chunk, universe, ghost, max_batch = SHAPES[shape]
    rng = random.Random(seed)
    sample_size = universe if aging else 10**9
    twins = Twins(chunks, slots_per_chunk, ghost, sample_size=sample_size, width=1 << 20)
    for _ in range(3000):
        op = rng.random()
        if op < 0.6:
            size = 1 if aging else rng.randint(1, max_batch)
            twins.request(rng.sample(range(universe), size), batch_admit=rng.random() < 0.5)
        elif op < 0.7:
            twins.install([rng.randrange(universe) for _ in range(rng.randint(0, max_batch))])
        elif op < 0.8:
            twins.prefetch(rng.randint(0, max_batch))
        elif op < 0.9:
            twins.release()
        else:
            twins.add()
        twins.check(universe)


def test_hot_front_with_holes_is_packed_and_order_kept() -> None:
    """Candidates that keep losing to the same old hot residents, while others behind them are evicted:
    the scan's packing of a mostly dead front must keep the LRU order exact."""
    twins = Twins(chunks=2, slots_per_chunk=32, ghost=16, sample_size=10**9)
    for item in range(64):
        twins.request([item], batch_admit=False)
    for _ in range(6):
        twins.request(list(range(8)), batch_admit=False)  # 0-7 hot, touched: now the newest
    for item in range(8):
        twins.request([item + 64], batch_admit=False)
    for round_ in range(40):
        for item in range(100 + 8 * round_, 108 + 8 * round_):
            twins.request([item], batch_admit=False)
            twins.request([item], batch_admit=False)
            twins.request([item], batch_admit=False)
        twins.check(500)


def test_victims_behind_a_dead_front_are_found() -> None:
    """The oldest residents were hit (their log entries died): the victim scan must look past them."""
    twins = Twins(chunks=2, slots_per_chunk=32, ghost=16, sample_size=10**9, width=4096)
    for item in range(64):
        twins.request([item], batch_admit=False)
    for item in range(41):
        twins.request([item], batch_admit=False)  # the 41 oldest become the newest
    batch = list(range(100, 130))
    for _ in range(3):
        twins.new.lookup(batch)
        twins.ref.lookup(batch)
    lookup = twins.new.lookup(batch)  # estimate 4 against 1-2: all win, in order (exact)
    twins.ref.lookup(batch)
    placed = twins.new.admit(lookup.miss_items)
    assert placed.pairs() == twins.ref.admit(batch)
    assert placed.items.tolist() == batch
    twins.check(200)


def test_a_batch_mixing_free_slots_winners_and_losers() -> None:
    cache = EmbCache(geometry(2, 4), ghost_capacity=16, sketch=FrequencySketch(64, sample_size=10**9))
    cache.add_chunk(0)
    for item in range(4):
        cache.admit(cache.lookup([item]).miss_items)  # chunk 0 full, estimates 1
    cache.add_chunk(1)
    for _ in range(3):
        cache.lookup([20, 22])  # hot; 21, 23, 24 stay cold
    lookup = cache.lookup([10, 11, 20, 21, 22, 23, 24])
    cache.lookup([30])  # another lookup in between: admit re-estimates instead of reusing
    placed = cache.admit(lookup.miss_items)
    # free slots 4..7 go to the first four candidates (10, 11, 20, 21); then 22 (estimate 4) beats the
    # oldest resident 0, 23 and 24 (estimate 1) tie with the next one and stay out
    assert placed.items.tolist() == [10, 11, 20, 21, 22]
    assert placed.positions.tolist() == [0, 1, 2, 3, 4]
    assert placed.slots.tolist() == [4, 5, 6, 7, 0]
    assert cache.slot_of(0) is None and cache.ghost_items()[-1] == 0
    assert (cache.counters.emb_admits, cache.counters.emb_rejects) == (4 + 5, 2)
    cache.check_invariants()


def test_losers_between_winners_keep_their_victims() -> None:
    cache = EmbCache(geometry(1, 4), ghost_capacity=16, sketch=FrequencySketch(64, sample_size=10**9))
    cache.add_chunk(0)
    for item in range(4):
        cache.admit(cache.lookup([item]).miss_items)
    for _ in range(2):
        cache.lookup([0])  # victim 0 is hot: estimate 3
    cache.lookup([1, 2, 3])  # LRU order 0, 1, 2, 3; estimates 3, 2, 2, 2
    for _ in range(4):
        cache.lookup([50, 52])
    lookup = cache.lookup([50, 51, 52])
    placed = cache.admit(lookup.miss_items)
    # victims oldest first: 0 (estimate 3), 1 (2), 2 (2). 50 (5) beats 0; 51 (1) loses to 1;
    # 52 (5) then faces 1 as well (a loser leaves its victim to the next) and beats it
    assert placed.pairs() == [(50, 0), (52, 1)]
    assert placed.positions.tolist() == [0, 2]
    assert sorted(cache.items()) == [2, 3, 50, 52]
    cache.check_invariants()


def test_residency_changes_are_recorded_in_the_map_and_drained_once() -> None:
    cache = EmbCache(geometry(1, 4), ghost_capacity=4)
    cache.add_chunk(0)
    history: set[int] = set()
    for item in range(40):
        for _ in range(item % 3):
            cache.lookup([item % 9])
        placed = cache.admit(cache.lookup([item % 9]).miss_items)
        history |= set(placed.items.tolist())
    cache.release_chunk(0)  # everything goes
    cache.add_chunk(0)
    cache.admit(cache.lookup([3]).miss_items)
    added, removed = cache.drain_changes()
    assert added == [3] == cache.items()
    assert removed == sorted(history - {3})
    assert cache.drain_changes() == ([], [])
    assert cache.drain_touched() == set()
    cache.check_invariants()


# ---------------------------------------------------------------------------- sketch batches


def test_batch_increments_count_every_key_like_single_increments() -> None:
    rng = np.random.default_rng(0)
    batched = FrequencySketch(64, sample_size=10**9)  # tiny: many keys of a batch share counters
    single = FrequencySketch(64, sample_size=10**9)
    for _ in range(20):
        keys = rng.choice(1000, 40, replace=False).astype(np.int64)
        estimates = batched.increment_many(keys)
        for key in keys.tolist():
            single.increment(key)
        assert estimates.tolist() == single.estimate_many(keys).tolist()
    probe = np.arange(1000, dtype=np.int64)
    assert batched.estimate_many(probe).tolist() == single.estimate_many(probe).tolist()


def test_a_batch_ages_at_its_end() -> None:
    sketch = FrequencySketch(64, sample_size=10)
    keys = np.arange(6, dtype=np.int64)
    for _ in range(2):
        sketch.increment_many(keys[:4])  # 8 additions, counts 2
    estimates = sketch.increment_many(keys)  # 14 additions: one halving, after the batch's counts
    assert sketch.generation == 1
    assert estimates.tolist() == [1] * 4 + [0] * 2  # (2 + 1) // 2 and 1 // 2
    assert sketch.estimate_many(keys).tolist() == estimates.tolist()
    sketch.increment_many(np.arange(100, 126, dtype=np.int64))  # 4 left over + 26: three more periods
    assert sketch.generation == 4


def test_a_batch_wider_than_the_sketch_saturates_instead_of_wrapping() -> None:
    sketch = FrequencySketch(64, sample_size=10**9)
    keys = np.arange(5000, dtype=np.int64)  # ~80 keys per counter
    estimates = sketch.increment_many(keys)
    assert int(estimates.min()) >= 1 and int(estimates.max()) <= 15
    assert int(sketch._table.max()) == 15


def test_estimates_do_not_count() -> None:
    sketch = FrequencySketch(64)
    version = sketch.version
    sketch.estimate_many(np.arange(10, dtype=np.int64))
    assert sketch.version == version
    sketch.increment(3)
    assert sketch.version > version


def test_reference_blocked_sketch_hashes_like_the_production_one() -> None:
    rng = np.random.default_rng(1)
    ref = RefBlockedSketch(300, sample_size=500)
    new = FrequencySketch(300, sample_size=500)
    for key in rng.integers(0, 2000, 3000).tolist():
        assert ref.increment_and_estimate(key) == new.increment_and_estimate(key)
    assert ref.generation == new.generation > 0
    assert all(ref.estimate(k) == new.estimate(k) for k in range(2000))


# ---------------------------------------------------------------------------- duels


def sequential_duels(cand: list[int], victims: list[int]) -> tuple[list[int], list[int]]:
    """Offered one at a time: a rejected candidate leaves its victim to the next one."""
    won: list[int] = []
    j = 0
    for i, c in enumerate(cand):
        if j < len(victims) and c > victims[j]:
            won.append(i)
            j += 1
    return won, list(range(len(won)))


ESTIMATES = st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=40)


@settings(max_examples=2000, deadline=None, database=None)
@given(cand=ESTIMATES, victims=ESTIMATES)
def test_duels_are_valid_and_exact_where_documented(cand: list[int], victims: list[int]) -> None:
    victims = victims[: len(cand)]  # the cache asks for at most one victim per candidate
    c = np.array(cand, dtype=np.uint8)
    v = np.array(victims, dtype=np.uint8)
    won, victim_of = EmbCache._duel(c, v)
    won_l, victim_l = won.tolist(), victim_of.tolist()
    assert won_l == sorted(set(won_l))
    assert victim_l == sorted(set(victim_l))  # distinct victims, oldest to the first winner
    assert all(0 <= j < len(victims) for j in victim_l)
    assert all(cand[i] > victims[j] for i, j in zip(won_l, victim_l, strict=True))  # TinyLFU holds
    expected = sequential_duels(cand, victims)
    if not any(x > victims[0] for x in cand):
        assert (won_l, victim_l) == expected == ([], [])
    if len(cand) == len(victims) and all(x > y for x, y in zip(cand, victims, strict=True)):
        assert (won_l, victim_l) == expected
    # once the fixed-point rounds have converged, the outcome is the sequential one
    padded = np.append(v, [16] * len(cand))

    def step(admitted: np.ndarray) -> np.ndarray:
        faces = np.concatenate([[0], np.cumsum(admitted)[:-1]])
        return c > padded[faces]

    admitted = c > v[0]
    for _ in range(_DUEL_ROUNDS):
        admitted = step(admitted)
    if np.array_equal(step(admitted), admitted):
        assert (won_l, victim_l) == expected


# ---------------------------------------------------------------------------- ghost list


@settings(max_examples=200, deadline=None, database=None)
@given(
    ops=st.lists(st.tuples(st.lists(st.integers(0, 30), max_size=6, unique=True), st.integers(0, 15))),
    capacity=st.integers(0, 12),
    k=st.integers(0, 20),
)
def test_ghost_ranking_and_bound(ops: list[tuple[list[int], int]], capacity: int, k: int) -> None:
    sketch = FrequencySketch(64, sample_size=10**9)
    ghost = GhostList(capacity, sketch)
    ghost.reserve(31)
    model: dict[int, tuple[int, int]] = {}  # item -> (estimate, recency)
    clock = 0
    for items, estimate in ops:
        arr = np.array(items, dtype=np.int64)
        ghost.remember(arr, np.full(len(items), estimate, dtype=np.uint8))
        if capacity:
            for item in items:
                clock += 1
                model[item] = (estimate, clock)
            while len(model) > capacity:
                del model[min(model, key=lambda i: model[i][1])]
        ghost.check_invariants()
    assert ghost.items() == sorted(model, key=lambda i: model[i][1])
    expected = sorted(model, key=lambda i: (-model[i][0], -model[i][1]))[:k]
    assert ghost.hottest(k).tolist() == expected
    ghost.discard(np.array(expected[:2], dtype=np.int64))
    assert len(ghost) == len(model) - len(expected[:2])
    ghost.check_invariants()


def test_ghost_drops_the_oldest_behind_a_dead_front() -> None:
    ghost = GhostList(200, FrequencySketch(64, sample_size=10**9))
    ghost.reserve(300)
    ones = np.ones(300, dtype=np.uint8)
    ghost.remember(np.arange(200, dtype=np.int64), ones[:200])
    ghost.remember(np.arange(151, dtype=np.int64), ones[:151])  # the front is dead now
    ghost.remember(np.arange(200, 261, dtype=np.int64), ones[:61])  # drops 151-199 and 0-11
    assert ghost.items() == list(range(12, 151)) + list(range(200, 261))
    ghost.check_invariants()


# ---------------------------------------------------------------------------- allocator batches


@settings(max_examples=200, deadline=None, database=None)
@given(
    chunks=st.lists(st.integers(0, 7), min_size=1, max_size=5, unique=True),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 9))),
)
def test_allocate_many_hands_out_what_single_allocations_would(
    chunks: list[int], steps: list[tuple[bool, int]]
) -> None:
    batched, single = ChunkAllocator(3), ChunkAllocator(3)
    for chunk in chunks:
        batched.add_chunk(chunk)
        single.add_chunk(chunk)
    held: list[int] = []
    for allocate, n in steps:
        if allocate:
            got = batched.allocate_many(n)
            expected = [u for u in (single.allocate() for _ in range(n)) if u is not None]
            assert got == expected
            held += got
        elif held:
            back, held = held[:n], held[n:]
            batched.release_many(back)
            for unit in back:
                single.release(unit)
        assert batched.free_count == single.free_count
        assert all(batched.free_units(c) == single.free_units(c) for c in chunks)


@settings(max_examples=200, deadline=None, database=None)
@given(
    taken=st.integers(0, 24),
    detached=st.sets(st.integers(0, 7), max_size=3),
    order=st.randoms(use_true_random=False),
)
def test_release_owned_releases_what_single_releases_would_skipping_detached_chunks(
    taken: int, detached: set[int], order: random.Random
) -> None:
    batched, single = ChunkAllocator(3), ChunkAllocator(3)
    for alloc in (batched, single):
        for chunk in range(8):
            alloc.add_chunk(chunk)
    held = batched.allocate_many(taken)
    assert single.allocate_many(taken) == held
    for chunk in detached:
        batched.detach_chunk(chunk)
        single.detach_chunk(chunk)
    order.shuffle(held)
    batched.release_owned(held)
    for unit in held:
        if single.owns(unit // 3):
            single.release(unit)
    assert batched.free_count == single.free_count
    assert batched.chunks() == single.chunks()
    assert all(batched.free_units(c) == single.free_units(c) for c in single.chunks())
    assert batched.allocate_many(30) == single.allocate_many(30)
    if held and any(unit // 3 in detached for unit in held):
        with pytest.raises(ValueError, match="not owned"):
            batched.release_many(held)


# ---------------------------------------------------------------------------- inputs and results


def small_cache() -> EmbCache:
    cache = EmbCache(geometry(2, 4), ghost_capacity=8)
    for chunk in range(2):
        cache.add_chunk(chunk)
    return cache


def test_item_arrays_of_any_integer_type_and_order_are_accepted() -> None:
    cache = small_cache()
    cache.admit(cache.lookup(np.array([5, 3], dtype=np.int32)).miss_items)
    lookup = cache.lookup(np.array([9, 3, 5], dtype=np.uint16))
    assert lookup.hit_positions.tolist() == [1, 2]
    assert lookup.miss_items.tolist() == [9]
    assert lookup.miss_items.dtype == np.int64


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([1, -2], ValueError),
        ([2**31], ValueError),
        (np.array([[1, 2]]), ValueError),
        (np.array([1.0, 2.0]), TypeError),
        ([4, 1, 4], ValueError),
    ],
)
def test_bad_items_are_refused_without_side_effects(items: object, error: type[Exception]) -> None:
    cache = small_cache()
    with pytest.raises(error):
        cache.lookup(items)  # type: ignore[arg-type]
    assert cache.counters.emb_misses == 0
    assert cache.ghost_items() == []


def test_admit_reuses_the_lookups_estimates_only_for_its_own_array() -> None:
    """Handing back the lookup's array skips re-estimating; an equal copy gives the same outcome."""
    results = []
    for same in (True, False):
        cache = EmbCache(geometry(1, 4), ghost_capacity=8)
        cache.add_chunk(0)
        for item in range(4):
            cache.admit(cache.lookup([item]).miss_items)
        for _ in range(3):
            cache.lookup([7, 8, 9])
        lookup = cache.lookup([7, 8, 9])
        placed = cache.admit(lookup.miss_items if same else lookup.miss_items.copy())
        results.append((placed.pairs(), cache.items(), cache.counters.emb_evictions))
        cache.check_invariants()
    assert results[0] == results[1] == ([(7, 0), (8, 1), (9, 2)], [3, 7, 8, 9], 3)


def test_results_compare_by_value() -> None:
    a = EmbPlacement(np.array([0]), np.array([5]), np.array([2]))
    assert a == EmbPlacement(np.array([0]), np.array([5]), np.array([2]))
    assert a != EmbPlacement.empty()
    assert (len(a), a.pairs()) == (1, [(5, 2)])
    assert TickPlan(chunks_moved=0) == TickPlan(chunks_moved=0, refill=EmbPlacement.empty())
    empty = np.zeros(0, dtype=np.int64)
    lookup = EmbLookup(np.array([1]), np.array([3]), empty, empty)
    assert (lookup.hits, lookup.misses) == (1, 0)
    assert lookup == EmbLookup(np.array([1]), np.array([3]), empty, empty)
    assert lookup != EmbLookup(empty, empty, np.array([1]), np.array([3]))


def test_bookkeeping_benchmark_runs() -> None:
    figures = measure(repeats=3)
    for key in ("emb_lookup_hit_us_per_item", "emb_admit_us_per_item", "emb_admit_evict_us_per_item"):
        assert figures[key] > 0
    assert figures["emb_admit_evict_admitted_fraction"] > 0.5
