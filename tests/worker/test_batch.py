"""The round helpers of :mod:`services.worker.core.batch`: their shortcuts against the general forms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.core.batch import (
    PrefixHasher,
    RoundCaches,
    RoundRequest,
    _unique_inverse,
    per_request_emb,
)
from services.worker.core.geometry import PoolGeometry
from services.worker.core.pool import Pool

GEOMETRY = PoolGeometry(
    budget_bytes=64 * 64 * 4, chunk_bytes=64 * 4, emb_entry_bytes=4, kv_page_bytes=64, kv_page_tokens=4
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=40), st.sampled_from([np.int64, np.int32]))
def test_unique_inverse_is_numpys(values: list[int], dtype: type) -> None:
    items = np.array(values, dtype=dtype)
    unique, inverse = _unique_inverse(items)
    want_unique, want_inverse = np.unique(items, return_inverse=True)
    assert unique.dtype == want_unique.dtype and inverse.dtype == np.int64
    assert np.array_equal(unique, want_unique) and np.array_equal(inverse, want_inverse)


def request(rng: np.random.Generator, user: str) -> RoundRequest:
    history = rng.integers(0, 300, int(rng.integers(0, 30)))
    candidates = rng.integers(0, 300, int(rng.integers(0, 10)))
    return RoundRequest(user, history, candidates, PrefixHasher(history, np.zeros_like(history)))


@pytest.mark.parametrize("size", [1, 2, 5])
def test_per_request_emb_of_a_round_agrees_with_the_general_count(size: int) -> None:
    rng = np.random.default_rng(size)
    pool = Pool(GEOMETRY, alpha=0.5)
    for _ in range(60):
        reqs = [request(rng, f"u{i}") for i in range(size)]
        caches = RoundCaches.lookup(pool, reqs)
        hits, misses = caches.per_request_emb()
        want = per_request_emb(caches.unique.shape[0], caches.inverse, caches.counts, caches.missed())
        assert np.array_equal(hits, want[0]) and np.array_equal(misses, want[1])
        assert hits.dtype == misses.dtype == np.int64
        caches.admit(pool)
        for r in reqs:
            if len(r.history):
                RoundCaches.commit(pool, r)
        pool.check_invariants()


def test_a_batch_takes_distinct_users_and_leaves_repeats_queued() -> None:
    from services.worker.core.batch import SCAN_FACTOR, BatchFormer

    former = BatchFormer("a", max_batch=3)
    assert [former.offer(u) for u in ["a", "b", "b", "c"]] == [False, True, False, True]
    assert former.size == 3 and former.done
    with pytest.raises(ValueError, match="max_batch"):
        BatchFormer("a", max_batch=0)
    lonely = BatchFormer("a", max_batch=8)
    looked = 1
    while not lonely.done:
        assert not lonely.offer("a")
        looked += 1
    assert looked == SCAN_FACTOR * 8 and lonely.size == 1  # it stops looking after SCAN_FACTOR batches' worth
