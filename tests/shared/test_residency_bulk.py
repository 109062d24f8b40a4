"""ResidencyIndex's bulk EMB updates: exactly the documented one-insert-at-a-time rule (``reference_index``),
for every input form (lists, iterables, numpy arrays, repeated ids), inside and outside the dense array,
with bits beyond 64, and with the memory cap reached in the middle of a batch."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.residency import DENSE_MAX_ITEMS, Evictions, IndexSizes, ResidencyIndex
from tests.shared.reference_index import RefIndex
from tests.shared.test_residency_masks import _check

MASK64 = (1 << 64) - 1
WORKERS = [f"w{i}" for i in range(5)]
HUGE = [2**63, 2**64 + 7, -(2**63) - 1]  # beyond int64: only the dict can hold them
PROBE = [-4, -3, -1, 0, 1, 2, 5, 63, 64, 100, 255, 256, 300, 399, 400, 10**12, *HUGE]


def _form(items: list[int], form: str) -> Iterable[int] | np.ndarray:
    """The same batch as a list, a generator, an int64 / int32 / uint64 array."""
    fits = all(-(2**31) <= i < 2**31 for i in items)
    if form == "gen":
        return iter(items)
    if form == "i64" and all(-(2**63) <= i < 2**63 for i in items):
        return np.array(items, dtype=np.int64)
    if form == "i32" and fits:
        return np.array(items, dtype=np.int32)
    if form == "u64" and all(0 <= i < 2**64 for i in items):
        return np.array(items, dtype=np.uint64)
    return items


# ids mostly small (inside a dense array of 256 or 4096), some negative, beyond the array, or beyond int64
_id = st.one_of(
    st.integers(min_value=-3, max_value=400),
    st.integers(min_value=-3, max_value=400),
    st.integers(min_value=-3, max_value=400),
    st.sampled_from([10**12, 4095, 4096, *HUGE]),
)
_items = st.lists(_id, max_size=25)
_form_st = st.sampled_from(["list", "gen", "i64", "i32", "u64"])
_worker = st.sampled_from(WORKERS)
_op = st.one_of(
    st.tuples(st.just("add"), _worker, _items, _form_st),
    st.tuples(st.just("add"), _worker, _items, _form_st),
    st.tuples(st.just("add"), _worker, _items, _form_st),
    st.tuples(st.just("remove"), _worker, _items, _form_st),
    st.tuples(st.just("kv"), _worker, st.integers(0, 12), st.just("")),
    st.tuples(st.just("remove_kv"), _worker, st.integers(0, 12), st.just("")),
    st.tuples(st.just("clear_worker"), _worker, st.just(0), st.just("")),
    st.tuples(st.just("drop"), _worker, st.just(0), st.just("")),
    st.tuples(st.just("replace"), _worker, _items, _form_st),
    st.tuples(st.just("clear"), st.just(""), st.just(0), st.just("")),
    st.tuples(st.just("fill_bits"), st.just(""), st.integers(0, 70), st.just("")),
    st.tuples(st.just("drop_fillers"), st.just(""), st.integers(0, 70), st.just("")),
    st.tuples(st.just("take"), st.just(""), st.just(0), st.just("")),
)


def _same(idx: ResidencyIndex, ref: RefIndex) -> None:
    assert {w: idx.worker_bit(w) for w in idx.workers()} == ref.bits
    for w in ref.bits:
        assert idx.worker_emb(w) == sorted(ref.emb[w])
        assert idx.emb_count(w) == len(ref.emb[w])
        assert idx.worker_kv(w) == ref.worker_kv(w)
        for item in PROBE:
            assert idx.has_emb(w, item) == (item in ref.emb[w])
    assert idx.emb_masks(PROBE) == [ref.mask(i) for i in PROBE]
    assert idx.entries == ref.entries
    assert idx.sizes() == IndexSizes(
        len(ref.kv), sum(map(len, ref.emb.values())), len({u for u, _ in ref.kv}), len(ref.bits)
    )
    assert (idx.kv_evictions, idx.emb_evictions) == (ref.kv_evictions, ref.emb_evictions)
    assert list(idx._lru) == list(ref.kv)  # the same LRU order


def _apply(idx: ResidencyIndex, ref: RefIndex, op: tuple[str, str, object, str]) -> None:
    name, w, arg, form = op
    if name == "add":
        assert isinstance(arg, list)
        assert idx.add_emb(w, _form(arg, form)) == ref.add_emb(w, arg)
    elif name == "remove":
        assert isinstance(arg, list)
        assert idx.remove_emb(w, _form(arg, form)) == ref.remove_emb(w, arg)
    elif name == "kv":
        assert isinstance(arg, int)
        assert idx.upsert_kv(f"u{arg}", w, arg % 3 + 1) == ref.upsert_kv(f"u{arg}", w, arg % 3 + 1)
    elif name == "remove_kv":
        assert isinstance(arg, int)
        assert idx.remove_kv(f"u{arg}", w) == ref.remove_kv(f"u{arg}", w)
    elif name == "clear_worker":
        idx.clear_worker(w)
        ref.clear_worker(w)
    elif name == "drop":
        idx.drop_worker(w)
        ref.drop_worker(w)
    elif name == "replace":
        assert isinstance(arg, list)
        kv = {"u0": 2, "u1": len(arg) % 3 + 1}
        diff = idx.replace_worker(w, kv, _form(arg, form))
        kv_removed, kv_upserts, emb_removed, emb_added = ref.replace_worker(w, kv, arg)
        assert sorted(diff.kv_removed) == sorted(kv_removed) and diff.kv_upserts == kv_upserts
        assert sorted(diff.emb_removed) == emb_removed and diff.emb_added == emb_added
    elif name == "clear":
        idx.clear()
        ref.clear()
    elif name == "fill_bits":  # register fillers so later workers get bits >= 64
        assert isinstance(arg, int)
        for k in range(arg):
            assert idx.add_worker(f"f{k}") == ref.add_worker(f"f{k}")
    elif name == "drop_fillers":  # free some low bits: the next workers reuse them
        assert isinstance(arg, int)
        for k in range(0, arg, 3):
            idx.drop_worker(f"f{k}")
            ref.drop_worker(f"f{k}")
    elif name == "take":
        got = idx.take_evictions()
        assert got == Evictions(kv=ref.evicted_kv, emb=ref.evicted_emb)
        ref.evicted_kv, ref.evicted_emb = [], {}
    else:  # pragma: no cover
        raise AssertionError(name)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, max_size=40),
    max_entries=st.sampled_from([1, 4, 12, 30, 1000]),
    dense_cap=st.sampled_from([0, 1, 256, 4096]),
)
def test_bulk_updates_equal_the_one_insert_at_a_time_rule(
    ops: list[tuple[str, str, object, str]], max_entries: int, dense_cap: int
) -> None:
    idx = ResidencyIndex(max_entries=max_entries, track_evictions=True, dense_max_items=dense_cap)
    ref = RefIndex(max_entries)
    for op in ops:
        _apply(idx, ref, op)
        _same(idx, ref)
        _check(idx, PROBE[:-3])  # the dense array equals the masks' low 64 bits
    assert idx.take_evictions() == Evictions(kv=ref.evicted_kv, emb=ref.evicted_emb)


def test_array_input_and_repeated_ids() -> None:
    idx = ResidencyIndex()
    assert idx.add_emb("w0", np.array([5, 3, 5, 9, 3], dtype=np.int64)) == [5, 3, 9]
    assert idx.add_emb("w0", np.array([9, 1, 1], dtype=np.int32)) == [1]
    assert idx.add_emb("w1", (i for i in [3, 3, 4])) == [3, 4]
    assert idx.add_emb("w1", np.zeros(0, dtype=np.int64)) == []
    assert idx.entries == 6 and idx.emb_count("w0") == 4 and idx.emb_count("w1") == 2
    assert idx.emb_masks([1, 3, 4, 5, 9, 7]) == [0b01, 0b11, 0b10, 0b01, 0b01, 0]
    assert idx.emb_masks_array(np.array([1, 3, 4, 5, 9, 7])).tolist() == [1, 3, 2, 1, 1, 0]
    assert idx.remove_emb("w0", np.array([9, 9, 7, 3], dtype=np.int64)) == [9, 3]
    assert idx.remove_emb("w0", np.array([9, 3], dtype=np.uint64)) == []
    assert idx.worker_emb("w0") == [1, 5] and idx.entries == 4
    assert idx.remove_emb("nobody", np.array([1])) == []


def test_sorted_and_unsorted_batches_give_the_same_index() -> None:
    rng = np.random.default_rng(3)
    items = rng.choice(100_000, 5_000, replace=False)
    a, b = ResidencyIndex(), ResidencyIndex()
    assert a.add_emb("w", np.sort(items)) == sorted(items.tolist())
    assert b.add_emb("w", items.tolist()) == items.tolist()  # first-occurrence order
    assert np.array_equal(a._dense, b._dense) and a.worker_emb("w") == b.worker_emb("w")
    assert a.remove_emb("w", items[::-1]) == items[::-1].tolist()
    assert a.entries == 0 and not a._dense.any()


def test_cap_reached_mid_batch_evicts_kv_then_the_filling_workers_own_items() -> None:
    idx = ResidencyIndex(max_entries=10, track_evictions=True)
    idx.upsert_kv("u1", "w0", 1)  # registers w0 first: it wins ties
    idx.add_emb("w0", [1, 2, 3])
    idx.add_emb("w1", [20, 21, 22, 23, 24])
    assert idx.entries == 9
    # 6 inserts: 1 free, then the KV placement, then 4 EMB evictions; w0 ties w1 at 5 and is the earlier
    # registered: it loses its 3 earlier items, lowest first, then this call's earliest item
    assert idx.add_emb("w0", [5, 6, 7, 8, 9, 10]) == [5, 6, 7, 8, 9, 10]
    assert idx.worker_emb("w0") == [6, 7, 8, 9, 10] and idx.worker_emb("w1") == [20, 21, 22, 23, 24]
    assert (idx.entries, idx.kv_evictions, idx.emb_evictions) == (10, 1, 4)
    assert idx.take_evictions() == Evictions(kv=[("u1", "w0")], emb={"w0": [1, 2, 3, 5]})
    assert idx.emb_masks_array(np.arange(12)).tolist() == [0] * 6 + [1] * 5 + [0]


def test_cap_reached_mid_batch_levels_the_largest_worker_first() -> None:
    idx = ResidencyIndex(max_entries=8, track_evictions=True)
    idx.add_emb("w1", [20, 21, 22, 23, 24, 25])
    idx.add_emb("w0", [1])
    # 4 inserts, 3 evictions: w1 (6, then 5) is larger than w0 (2, then 3); at 4-4 w1 registered earlier
    assert idx.add_emb("w0", [2, 3, 4, 5]) == [2, 3, 4, 5]
    assert idx.worker_emb("w0") == [1, 2, 3, 4, 5] and idx.worker_emb("w1") == [23, 24, 25]
    assert idx.take_evictions() == Evictions(emb={"w1": [20, 21, 22]})
    assert (idx.entries, idx.emb_evictions) == (8, 3)


def test_a_batch_larger_than_the_cap_keeps_its_last_items() -> None:
    idx = ResidencyIndex(max_entries=3, track_evictions=True)
    assert idx.add_emb("a", np.arange(1, 7)) == [1, 2, 3, 4, 5, 6]  # 1, 2, 3 added, then evicted again
    assert idx.worker_emb("a") == [4, 5, 6] and idx.emb_evictions == 3
    assert idx.take_evictions() == Evictions(emb={"a": [1, 2, 3]})
    assert idx.emb_masks_array(np.arange(8)).tolist() == [0, 0, 0, 0, 1, 1, 1, 0]


def test_items_outside_the_dense_array_live_in_the_dict() -> None:
    idx = ResidencyIndex(dense_max_items=100)
    items = [-5, 50, 150, 10**12, 2**64, 99, 2**64]
    assert idx.add_emb("w0", items) == [-5, 50, 150, 10**12, 99, 2**64]  # ids beyond int64 come last
    assert idx.add_emb("w1", np.array([150, 50, -5])) == [150, 50, -5]
    assert len(idx._dense) == 100
    assert idx._item_masks == {-5: 0b11, 150: 0b11, 10**12: 0b01, 2**64: 0b01}
    assert np.flatnonzero(idx._dense).tolist() == [50, 99]
    assert idx.worker_emb("w0") == [-5, 50, 99, 150, 10**12, 2**64]
    assert idx.emb_masks([-5, 50, 150, 10**12, 2**64, 7]) == [3, 3, 3, 1, 1, 0]
    assert idx.emb_masks_array(np.array([-5, 50, 150, 10**12, 7])).tolist() == [3, 3, 3, 1, 0]
    assert idx.has_emb("w0", 2**64) and idx.has_emb("w1", -5) and not idx.has_emb("w1", 99)
    assert idx.remove_emb("w0", [2**64, 150, 50, 3]) == [150, 50, 2**64]
    assert idx._item_masks == {-5: 0b11, 150: 0b10, 10**12: 0b01}
    idx.drop_worker("w1")
    assert idx._item_masks == {-5: 0b01, 10**12: 0b01}
    assert np.flatnonzero(idx._dense).tolist() == [99]
    assert idx.sizes() == IndexSizes(0, 3, 0, 1)


def test_bits_at_or_above_64_live_in_the_dict() -> None:
    idx = ResidencyIndex()
    for k in range(64):
        idx.add_worker(f"f{k}")
    assert idx.add_emb("hi", np.array([7, 8, 7])) == [7, 8]  # bit 64
    assert idx.add_emb("f1", np.array([8, 9])) == [8, 9]
    assert idx._item_masks == {7: 1 << 64, 8: 1 << 64}
    assert idx.emb_masks([7, 8, 9]) == [1 << 64, 1 << 64 | 0b10, 0b10]
    assert idx.emb_masks_array(np.array([7, 8, 9])).tolist() == [0, 0b10, 0b10]
    assert idx.has_emb("hi", 8) and not idx.has_emb("hi", 9) and idx.emb_count("hi") == 2
    assert idx.remove_emb("hi", [8, 9]) == [8]
    assert idx.worker_emb("hi") == [7] and idx._item_masks == {7: 1 << 64}
    idx.clear_worker("hi")
    assert idx._item_masks == {} and idx.emb_masks([7, 8]) == [0, 0b10]


def test_largest_worker_by_count_without_a_scan() -> None:
    # a KV insert at the cap with no KV left: one EMB item, the lowest id of the largest worker
    idx = ResidencyIndex(max_entries=6, track_evictions=True)
    idx.add_emb("a", [5, 1, 3])
    idx.add_emb("b", [9, 8, 2])
    assert idx.upsert_kv("u", "c", 1)
    assert idx.take_evictions() == Evictions(emb={"a": [1]})  # a and b tie: a is the earlier registered
    assert idx.upsert_kv("v", "c", 1)
    assert idx.take_evictions() == Evictions(kv=[("u", "c")])


@pytest.mark.parametrize("dense_max_items", [DENSE_MAX_ITEMS, 0])
def test_a_large_bulk_update_against_the_reference(dense_max_items: int) -> None:
    # many workers, batches of thousands, a cap reached again and again
    rng = np.random.default_rng(7)
    idx = ResidencyIndex(max_entries=20_000, track_evictions=True, dense_max_items=dense_max_items)
    ref = RefIndex(20_000)
    for step in range(40):
        w = f"w{rng.integers(6)}"
        items = rng.integers(0, 30_000, int(rng.integers(1, 4_000))).tolist()
        if step % 4 == 3:
            assert idx.remove_emb(w, np.array(items)) == ref.remove_emb(w, items)
        else:
            assert idx.add_emb(w, items) == ref.add_emb(w, items)
    assert idx.emb_evictions == ref.emb_evictions > 0
    for w in ref.emb:
        assert idx.worker_emb(w) == sorted(ref.emb[w])
    assert idx.take_evictions() == Evictions(kv=ref.evicted_kv, emb=ref.evicted_emb)


@settings(max_examples=500, deadline=None)
@given(
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=7),
    mine=st.integers(0, 6),
    n=st.integers(1, 40),
)
def test_victim_counts_equal_a_replay_one_eviction_at_a_time(counts: list[int], mine: int, n: int) -> None:
    mine %= len(counts)
    if not any(counts):
        counts[mine] = 1  # the index is full: somebody holds an entry
    idx = ResidencyIndex()
    names = [f"w{i}" for i in range(len(counts))]
    for name, count in zip(names, counts, strict=True):
        idx.add_worker(name)
        idx._emb_n[name] = count
    # the replay: evict from the largest (the earliest registered of those tied), then insert one
    held = dict(zip(names, counts, strict=True))
    want: dict[str, int] = {}
    for _ in range(n):
        victim = max(held, key=held.__getitem__)
        held[victim] -= 1
        want[victim] = want.get(victim, 0) + 1
        held[names[mine]] += 1
    assert idx._emb_victims(names[mine], counts[mine], n) == want
