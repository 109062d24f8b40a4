"""ResidencyIndex: exact KV/EMB residency, bitmasks, the shared memory cap."""

from __future__ import annotations

import numpy as np
import pytest

from services.cachestate.settings import CacheStateSettings
from shared.residency import DEFAULT_MAX_ENTRIES, DENSE_MAX_ITEMS, Evictions, IndexSizes, ResidencyIndex


def test_kv_placements_and_lengths() -> None:
    idx = ResidencyIndex()
    assert idx.upsert_kv("alice", "w0", 10) is True
    assert idx.upsert_kv("alice", "w1", 4) is True
    assert idx.upsert_kv("alice", "w0", 10) is False  # unchanged
    assert idx.upsert_kv("alice", "w0", 12) is True
    assert idx.kv_workers("alice") == {"w0": 12, "w1": 4}
    assert idx.kv_length("alice", "w0") == 12
    assert idx.kv_length("alice", "w9") == 0
    assert idx.kv_length("bob", "w0") == 0
    assert idx.kv_workers("bob") == {}
    assert idx.remove_kv("alice", "w1") is True
    assert idx.remove_kv("alice", "w1") is False
    assert idx.kv_workers("alice") == {"w0": 12}
    idx.kv_workers("alice")["w0"] = 99  # a copy: the index is not changed through it
    assert idx.kv_length("alice", "w0") == 12
    assert idx.sizes() == IndexSizes(kv_placements=1, emb_entries=0, users=1, workers=2)


def test_emb_masks_follow_bits() -> None:
    idx = ResidencyIndex()
    assert idx.add_emb("w0", [1, 2, 3]) == [1, 2, 3]
    assert idx.add_emb("w1", [2, 3, 4, 2]) == [2, 3, 4]
    assert idx.add_emb("w0", [1]) == []
    b0, b1 = idx.worker_bit("w0"), idx.worker_bit("w1")
    assert (b0, b1) == (0, 1)
    assert idx.emb_masks([1, 2, 3, 4, 5]) == [0b01, 0b11, 0b11, 0b10, 0]
    assert idx.remove_emb("w1", [3, 99]) == [3]
    assert idx.emb_masks([3, 4]) == [0b01, 0b10]
    assert idx.emb_count("w0") == 3 and idx.emb_count("w1") == 2 and idx.emb_count("nobody") == 0
    assert idx.worker_bit("nobody") is None
    assert idx.bit_owner(1) == "w1"


@pytest.mark.parametrize("dense_max_items", [DENSE_MAX_ITEMS, 0])  # masks in the array / in the dict
def test_drop_worker_frees_everything_and_its_bit_is_reused_clean(dense_max_items: int) -> None:
    idx = ResidencyIndex(dense_max_items=dense_max_items)
    idx.add_emb("w0", [1, 2])
    idx.add_emb("w1", [2, 3])
    idx.add_emb("w2", [3])
    idx.upsert_kv("alice", "w1", 5)
    idx.upsert_kv("bob", "w1", 6)
    idx.upsert_kv("bob", "w2", 7)
    assert idx.drop_worker("w1") is True
    assert idx.drop_worker("w1") is False
    assert idx.worker_bit("w1") is None
    assert idx.emb_masks([1, 2, 3]) == [0b001, 0b001, 0b100]
    assert idx.kv_workers("alice") == {} and idx.kv_workers("bob") == {"w2": 7}
    assert idx.sizes() == IndexSizes(kv_placements=1, emb_entries=3, users=1, workers=2)
    # really freed, no zero masks left: every mask bit is stored once, in the array or in the dict
    if dense_max_items:
        assert idx._item_masks == {}
        assert np.flatnonzero(idx._dense).tolist() == [1, 2, 3]
        assert idx._dense[[1, 2, 3]].tolist() == [0b001, 0b001, 0b100]
    else:
        assert len(idx._dense) == 0
        assert idx._item_masks == {1: 0b001, 2: 0b001, 3: 0b100}
    # The freed bit 1 goes to the next worker, which inherits none of w1's items.
    assert idx.add_worker("w3") == 1
    assert idx.emb_masks([2, 3]) == [0b001, 0b100]
    idx.add_emb("w3", [3])
    assert idx.emb_masks([3]) == [0b110]
    assert idx.add_worker("w4") == 3  # no free bit left: a new one
    assert idx.workers() == ["w0", "w3", "w2", "w4"]


def test_clear_worker_keeps_its_bit() -> None:
    idx = ResidencyIndex()
    idx.add_emb("w0", [1])
    idx.add_emb("w1", [1, 2])
    idx.upsert_kv("u", "w1", 3)
    idx.clear_worker("w1")
    assert idx.worker_bit("w1") == 1
    assert idx.emb_masks([1, 2]) == [0b01, 0]
    assert idx.kv_workers("u") == {}
    assert idx.sizes() == IndexSizes(0, 1, 0, 2)


def test_replace_worker_returns_the_effective_diff() -> None:
    idx = ResidencyIndex()
    idx.upsert_kv("a", "w0", 1)
    idx.upsert_kv("b", "w0", 2)
    idx.add_emb("w0", [1, 2, 3])
    diff = idx.replace_worker("w0", {"b": 2, "c": 3, "a": 5}, [2, 3, 4])
    assert diff.kv_upserts == {"c": 3, "a": 5}
    assert diff.kv_removed == []
    assert diff.emb_removed == [1] and diff.emb_added == [4]
    diff = idx.replace_worker("w0", {"c": 3}, [])
    assert sorted(diff.kv_removed) == ["a", "b"] and diff.kv_upserts == {}
    assert sorted(diff.emb_removed) == [2, 3, 4] and diff.emb_added == []
    assert idx.worker_kv("w0") == {"c": 3} and idx.worker_emb("w0") == []


def test_memory_cap_evicts_the_least_recently_updated_kv_first_and_counts() -> None:
    idx = ResidencyIndex(max_entries=4, track_evictions=True)
    idx.add_emb("w0", [1])
    idx.upsert_kv("u1", "w0", 1)
    idx.upsert_kv("u2", "w0", 1)
    idx.upsert_kv("u3", "w1", 1)
    idx.upsert_kv("u1", "w0", 2)  # refreshed: u2 is now the oldest
    assert idx.entries == 4
    idx.upsert_kv("u4", "w1", 1)
    assert idx.kv_workers("u2") == {}
    idx.add_emb("w1", [7])  # an EMB insert also evicts the oldest KV placement (u3)
    assert idx.kv_workers("u3") == {}
    assert idx.entries == 4
    assert (idx.kv_evictions, idx.emb_evictions) == (2, 0)
    assert idx.take_evictions() == Evictions(kv=[("u2", "w0"), ("u3", "w1")], emb={})
    assert idx.take_evictions() == Evictions()
    assert idx.sizes() == IndexSizes(kv_placements=2, emb_entries=2, users=2, workers=2)


def test_memory_cap_evicts_emb_of_the_largest_worker_when_no_kv_is_left() -> None:
    idx = ResidencyIndex(max_entries=5, track_evictions=True)
    idx.add_emb("w0", [1, 2, 3])
    idx.add_emb("w1", [10, 11])
    idx.add_emb("w1", [12])
    assert idx.emb_count("w0") == 2 and idx.emb_count("w1") == 3
    assert idx.emb_evictions == 1
    ev = idx.take_evictions()
    assert list(ev.emb) == ["w0"] and len(ev.emb["w0"]) == 1 and ev.emb["w0"][0] in {1, 2, 3}
    (gone,) = ev.emb["w0"]
    assert idx.emb_masks([gone]) == [0]
    assert idx.entries == 5


def test_evictions_are_not_kept_without_tracking() -> None:
    idx = ResidencyIndex(max_entries=1)
    idx.upsert_kv("a", "w", 1)
    idx.upsert_kv("b", "w", 1)
    assert idx.kv_evictions == 1 and idx.take_evictions().empty


def test_clear_forgets_everything() -> None:
    idx = ResidencyIndex()
    idx.add_emb("w0", [1])
    idx.upsert_kv("a", "w1", 1)
    idx.clear()
    assert idx.sizes() == IndexSizes(0, 0, 0, 0)
    assert idx._item_masks == {} and idx.add_worker("x") == 0


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ResidencyIndex(max_entries=0)


def test_one_default_cap_for_cachestate_and_every_gateway() -> None:
    # the gateway's replica uses it too (tests/gateway/test_gateway_service.py)
    assert ResidencyIndex().max_entries == CacheStateSettings().max_entries == DEFAULT_MAX_ENTRIES
