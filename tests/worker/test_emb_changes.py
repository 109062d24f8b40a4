"""The EMB cache's change log (what :meth:`EmbCache.drain_changes` reports without scanning the item map):
on random operation sequences it must give the answer of an outside record of every residency change, and
so must the scan it falls back to once the log overflows."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.worker.core import emb_cache
from services.worker.core.emb_cache import EmbCache
from services.worker.core.geometry import PoolGeometry
from services.worker.core.sketch import FrequencySketch

ENTRY = 4
CHUNKS = 6
SLOTS = 8
UNIVERSE = 400


def make_cache(sketch: FrequencySketch | None = None) -> EmbCache:
    geometry = PoolGeometry(
        budget_bytes=CHUNKS * SLOTS * ENTRY,
        chunk_bytes=SLOTS * ENTRY,
        emb_entry_bytes=ENTRY,
        kv_page_bytes=ENTRY,
        kv_page_tokens=1,
    )
    cache = EmbCache(geometry, ghost_capacity=20, sketch=sketch)
    for chunk in range(CHUNKS):
        cache.add_chunk(chunk)
    return cache


def drive(cache: EmbCache, rng: random.Random, steps: int) -> int:
    """Random lookups/admissions (hot and cold items), prefetches, chunk releases and re-adds, and drains;
    every drain is checked against the changes recorded from outside. Returns how many drains ran."""
    changed: set[int] = set()  # items placed or evicted since the last drain
    released: list[int] = []
    drains = 0
    for _ in range(steps):
        before = set(cache.items())
        op = rng.random()
        if op < 0.6:
            hot = rng.random() < 0.5
            pool = range(40) if hot else range(UNIVERSE)
            batch = sorted(rng.sample(pool, rng.randint(1, 12)))
            lookup = cache.lookup(batch)
            changed |= set(cache.admit(lookup.miss_items).items.tolist())
        elif op < 0.7:
            wanted = cache.prefetch_candidates(rng.randint(0, 6))
            changed |= set(cache.install_prefetched(wanted).items.tolist())
        elif op < 0.78 and len(cache.chunks()) > 1:
            chunk = cache.choose_chunk_to_release()
            cache.release_chunk(chunk)
            released.append(chunk)
        elif op < 0.86 and released:
            cache.add_chunk(released.pop())
        elif op < 0.93:
            now = set(cache.items())
            assert cache.drain_changes() == (sorted(changed & now), sorted(changed - now))
            assert cache.drain_changes() == ([], [])
            changed.clear()
            drains += 1
        changed |= before - set(cache.items())  # evicted (victims are never placed by the same call)
        cache.check_invariants()  # includes: the log holds exactly the marked items, once each
    now = set(cache.items())
    assert cache.drain_touched() == changed
    assert cache.drain_changes() == ([], [])
    return drains


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_drain_changes_equals_the_recorded_changes(seed: int) -> None:
    cache = make_cache()
    assert drive(cache, random.Random(seed), 1500) > 50
    assert cache._changes is not None  # never overflowed: every drain came from the log


@pytest.mark.parametrize(("min_changes", "per_id"), [(1, 10**9), (4, 64)])
def test_after_an_overflow_the_scan_gives_the_same_answer(
    monkeypatch: pytest.MonkeyPatch, min_changes: int, per_id: int
) -> None:
    """A log bounded to 1 entry (always overflows) or to a few (grows, overflows now and then)."""
    monkeypatch.setattr(emb_cache, "_MIN_CHANGES", min_changes)
    monkeypatch.setattr(emb_cache, "_CHANGES_PER_ITEM_ID", per_id)
    overflows = 0
    cache = make_cache()
    original = cache._scan_changes

    def counted() -> tuple[np.ndarray, np.ndarray]:
        nonlocal overflows
        overflows += 1
        return original()

    monkeypatch.setattr(cache, "_scan_changes", counted)
    drive(cache, random.Random(7), 1500)
    assert overflows > 10


def test_the_log_holds_each_changed_item_once() -> None:
    cache = make_cache(FrequencySketch(CHUNKS * SLOTS, sample_size=40))  # ages every round
    for _ in range(CHUNKS - 1):
        cache.release_chunk(cache.choose_chunk_to_release())
    for round_ in range(40):  # two groups of 8 items evict each other from the 8 slots left, over and over
        group = np.arange(8, dtype=np.int64) + 1000 + 8 * (round_ % 2)
        for _ in range(4):
            cache.lookup(group)
        cache.admit(cache.lookup(group).miss_items)
    assert cache.counters.emb_evictions > 200
    logged = cache._changes[: cache._n_changes].tolist()
    assert sorted(logged) == list(range(1000, 1016))
    cache.check_invariants()
    added, removed = cache.drain_changes()
    assert added == sorted(cache.items()) and len(removed) == 8
