"""ResidencyIndex's dense uint64 array (``emb_masks_array``) always holds the low 64 bits of every mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.residency import DENSE_MAX_ITEMS, ResidencyIndex

MASK64 = (1 << 64) - 1
DENSE_CAP = 256  # small cap in the property tests: ids beyond it exercise the dict fallback
ITEM_MAX = 400
WORKERS = [f"w{i}" for i in range(6)]


def _model_masks(idx: ResidencyIndex) -> dict[int, int]:
    """item -> full mask, rebuilt from scratch from the per-worker sets and bits."""
    out: dict[int, int] = {}
    for w in idx.workers():
        bit = idx.worker_bit(w)
        assert bit is not None
        for item in idx.worker_emb(w):
            out[item] = out.get(item, 0) | (1 << bit)
    return out


def _check(idx: ResidencyIndex, probe: list[int]) -> None:
    model = _model_masks(idx)
    # the full masks (array + dict) agree with the model rebuilt from the workers' items
    assert idx.emb_masks(probe) == [model.get(i, 0) for i in probe]
    # the dense array equals the masks' low 64 bits at every index it covers
    dense = idx._dense
    assert len(dense) <= idx.dense_max_items
    expect = np.zeros(len(dense), dtype=np.uint64)
    for item, mask in model.items():
        if 0 <= item < len(dense):
            expect[item] = mask & MASK64
    np.testing.assert_array_equal(dense, expect)
    # every held item inside the cap is covered by the array
    assert not [i for i in model if len(dense) <= i < idx.dense_max_items]
    # the public answer: exact, for in-range, out-of-range and negative ids alike
    arr = np.array(probe, dtype=np.int64)
    got = idx.emb_masks_array(arr)
    assert got.dtype == np.uint64
    assert got.tolist() == [model.get(i, 0) & MASK64 for i in probe]
    # and the fast path (every id inside the array) agrees too
    inside = np.array([i for i in probe if 0 <= i < len(dense)], dtype=np.int64)
    assert idx.emb_masks_array(inside).tolist() == [model.get(i, 0) & MASK64 for i in inside.tolist()]


_items = st.lists(st.integers(min_value=-3, max_value=ITEM_MAX), max_size=30)
_worker = st.sampled_from(WORKERS)
_op = st.one_of(
    st.tuples(st.just("add"), _worker, _items),
    st.tuples(st.just("add"), _worker, _items),
    st.tuples(st.just("remove"), _worker, _items),
    st.tuples(st.just("kv"), _worker, st.integers(0, 20)),
    st.tuples(st.just("remove_kv"), _worker, st.integers(0, 20)),
    st.tuples(st.just("clear_worker"), _worker, st.just(0)),
    st.tuples(st.just("drop"), _worker, st.just(0)),
    st.tuples(st.just("replace"), _worker, _items),
    st.tuples(st.just("clear"), st.just(""), st.just(0)),
    st.tuples(st.just("fill_bits"), st.just(""), st.integers(0, 70)),
    st.tuples(st.just("drop_fillers"), st.just(""), st.integers(0, 70)),
)


def _apply(idx: ResidencyIndex, op: tuple[str, str, object]) -> None:
    name, w, arg = op
    if name == "add":
        assert isinstance(arg, list)
        idx.add_emb(w, arg)
    elif name == "remove":
        assert isinstance(arg, list)
        idx.remove_emb(w, arg)
    elif name == "kv":
        assert isinstance(arg, int)
        idx.upsert_kv(f"u{arg}", w, arg + 1)
    elif name == "remove_kv":
        assert isinstance(arg, int)
        idx.remove_kv(f"u{arg}", w)
    elif name == "clear_worker":
        idx.clear_worker(w)
    elif name == "drop":
        idx.drop_worker(w)
    elif name == "replace":
        assert isinstance(arg, list)
        idx.replace_worker(w, {"u0": 3}, arg)
    elif name == "clear":
        idx.clear()
    elif name == "fill_bits":  # register fillers so later workers get bits >= 64
        assert isinstance(arg, int)
        for k in range(arg):
            idx.add_worker(f"f{k}")
    elif name == "drop_fillers":  # free some low bits: the next workers reuse them
        assert isinstance(arg, int)
        for k in range(0, arg, 3):
            idx.drop_worker(f"f{k}")
    else:  # pragma: no cover
        raise AssertionError(name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(_op, max_size=40),
    max_entries=st.sampled_from([5, 25, 1000]),
    dense_cap=st.sampled_from([0, 1, DENSE_CAP, 4096]),
    track=st.booleans(),
)
def test_dense_masks_equal_dict_after_random_operations(
    ops: list[tuple[str, str, object]], max_entries: int, dense_cap: int, track: bool
) -> None:
    idx = ResidencyIndex(max_entries=max_entries, track_evictions=track, dense_max_items=dense_cap)
    probe = list(range(-4, ITEM_MAX + 8))
    for op in ops:
        _apply(idx, op)
        _check(idx, probe)


def test_bit_reuse_never_inherits_items() -> None:
    idx = ResidencyIndex()
    idx.add_emb("a", [1, 2, 3])
    idx.add_emb("b", [2, 3, 4])
    assert idx.emb_masks_array(np.arange(6, dtype=np.int64)).tolist() == [0, 1, 3, 3, 2, 0]
    assert idx.drop_worker("a")
    assert idx.emb_masks_array(np.arange(6, dtype=np.int64)).tolist() == [0, 0, 2, 2, 2, 0]
    assert idx.add_worker("c") == 0  # a's freed bit
    idx.add_emb("c", [5])
    assert idx.emb_masks_array(np.arange(6, dtype=np.int64)).tolist() == [0, 0, 2, 2, 2, 1]


def test_growth_by_doubling_and_cap() -> None:
    idx = ResidencyIndex(dense_max_items=5000)
    assert len(idx._dense) == 0
    idx.add_emb("a", [3])
    assert len(idx._dense) == 1024
    idx.add_emb("a", [1024])
    assert len(idx._dense) == 2048
    idx.add_emb("a", [4500])  # the next power of two would pass the cap: stop at it
    assert len(idx._dense) == 5000
    idx.add_emb("a", [10**12, 5000])  # beyond the cap: dict only, still answered exactly
    assert len(idx._dense) == 5000
    ids = np.array([3, 1024, 4500, 5000, 10**12, 7, -1], dtype=np.int64)
    assert idx.emb_masks_array(ids).tolist() == [1, 1, 1, 1, 1, 0, 0]
    idx.remove_emb("a", [10**12, 4500])
    assert idx.emb_masks_array(ids).tolist() == [1, 1, 0, 1, 0, 0, 0]
    idx.clear()  # frees the array
    assert len(idx._dense) == 0
    assert idx.emb_masks_array(ids).tolist() == [0] * 7
    assert idx.emb_masks_array(np.zeros(0, dtype=np.int64)).tolist() == []


def test_default_cap_and_validation() -> None:
    assert ResidencyIndex().dense_max_items == DENSE_MAX_ITEMS == 1 << 26
    with pytest.raises(ValueError):
        ResidencyIndex(dense_max_items=-1)


def test_bits_at_or_above_64_answer_the_low_64_bits() -> None:
    idx = ResidencyIndex()
    for k in range(70):
        assert idx.add_worker(f"f{k}") == k
    idx.add_emb("f0", [10])
    idx.add_emb("f63", [10, 11])
    idx.add_emb("f64", [10, 11, 12])  # bit 64: not in the array
    idx.add_emb("f69", [12])
    items = np.array([10, 11, 12, 13], dtype=np.int64)
    assert idx.emb_masks(items.tolist()) == [1 | 1 << 63 | 1 << 64, 1 << 63 | 1 << 64, 1 << 64 | 1 << 69, 0]
    assert idx.emb_masks_array(items).tolist() == [1 | 1 << 63, 1 << 63, 0, 0]
    idx.remove_emb("f64", [10, 11, 12])
    idx.drop_worker("f63")
    assert idx.emb_masks_array(items).tolist() == [1, 0, 0, 0]
    # a low bit freed and reused by a new worker starts empty
    assert idx.add_worker("new") == 63
    assert idx.emb_masks_array(items).tolist() == [1, 0, 0, 0]


def test_eviction_inside_add_keeps_the_array_exact() -> None:
    # the cap forces EMB evictions of the worker's own items while it adds more
    idx = ResidencyIndex(max_entries=3, track_evictions=True)
    idx.add_emb("a", [1, 2, 3, 4, 5, 6])
    idx.add_emb("b", [6, 7])
    ev = idx.take_evictions()
    assert sum(len(v) for v in ev.emb.values()) == idx.emb_evictions == 5
    probe = list(range(10))
    expect = [m & MASK64 for m in idx.emb_masks(probe)]
    assert idx.emb_masks_array(np.array(probe, dtype=np.int64)).tolist() == expect
    assert sum(bin(m).count("1") for m in expect) == 3


def test_removing_a_repeated_item_counts_it_once() -> None:
    index = ResidencyIndex(max_entries=10)
    index.add_emb("w0", [2, 3])
    assert index.remove_emb("w0", [2, 2]) == [2]
    assert index.emb_count("w0") == 1 and index.entries == 1
    assert index.emb_masks([2, 3]) == [0, 1 << index.worker_bit("w0")]  # type: ignore[operator]
