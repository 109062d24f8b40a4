"""`python -m bench.emb_bookkeeping`: what the EMB hot cache's bookkeeping costs per item (no bytes move).

The pool: 64 MiB budget, 256 KiB chunks, 128-byte EMB rows, alpha 0.2 (104,448 EMB slots), filled with
items before anything is timed. Item ids are random over a catalogue of a million (as in
``bench.worker``), and every batch is sorted and unique, as the engine passes it (``np.unique`` output).
Figures, in microseconds per item, each the median over ``repeats`` batches of 512 items:

- emb_lookup_hit_us_per_item: ``Pool.emb_lookup`` of 512 distinct resident items (all hits).
- emb_lookup_hit_unsorted_us_per_item: the same in random order (the uniqueness check's slow path).
- emb_admit_us_per_item: ``emb_lookup`` + ``emb_admit`` of 512 never-seen items into the full cache; their
  estimates do not beat the LRU victims', so TinyLFU rejects them (the common case of one-hit wonders).
- emb_admit_evict_us_per_item: the same for 512 items looked up 14 times before (estimate 15, the most),
  hotter than the LRU victims: each is admitted and evicts one (the most work admission can do). The
  fraction admitted is reported as emb_admit_evict_admitted_fraction. An old resident whose estimate
  a count-min collision with earlier rounds' hot items pushed to 15 too cannot be beaten, and stops the
  rest of any batch it faces (the per-item policy does the same); between rounds, untimed, such residents
  at the LRU end are looked up once more so that later rounds measure evictions again.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from bench.report import machine_ref
from services.worker.core.geometry import PoolGeometry
from services.worker.core.pool import Pool

MIB = 1024 * 1024
BATCH = 512
CATALOGUE = 1_000_000
GEOMETRY = PoolGeometry(
    budget_bytes=64 * MIB,
    chunk_bytes=256 * 1024,
    emb_entry_bytes=128,
    kv_page_bytes=64 * 1024,
    kv_page_tokens=16,
)
ALPHA = 0.2
WARM_LOOKUPS = 14  # estimate 15 (the most) at admission: above (nearly) every resident

IntArray = npt.NDArray[np.int64]


def _per_item(fn: Callable[[IntArray], object], batch: IntArray) -> float:
    t0 = time.perf_counter_ns()
    fn(batch)
    return (time.perf_counter_ns() - t0) / 1e3 / BATCH


def _filled_pool(rng: np.random.Generator) -> tuple[Pool, IntArray]:
    """A pool whose EMB region is full, and the ids never used (shuffled)."""
    pool = Pool(GEOMETRY, alpha=ALPHA)
    ids = rng.permutation(CATALOGUE).astype(np.int64)
    used = 0
    while pool.emb.free_slots:
        batch = np.sort(ids[used : used + BATCH])
        used += BATCH
        lookup = pool.emb_lookup(batch)
        pool.emb_admit(lookup.miss_items)
    return pool, ids[used:]


def _unblock(pool: Pool) -> None:
    """Move unbeatable residents (estimate 15) off the LRU end (see the module docstring)."""
    oldest = np.array(pool.emb.items()[:BATCH], dtype=np.int64)
    stuck = oldest[pool.emb.sketch.estimate_many(oldest) >= pool.emb.sketch.max_count]
    if len(stuck):
        pool.emb_lookup(np.sort(stuck))


def measure(repeats: int = 100) -> dict[str, float]:
    """The figures of the module docstring (``repeats`` up to ~800: fresh ids run out beyond)."""
    rng = np.random.default_rng(0)
    pool, fresh = _filled_pool(rng)
    resident = np.array(pool.emb.items(), dtype=np.int64)
    hit: list[float] = []
    hit_unsorted: list[float] = []
    admit: list[float] = []
    evict: list[float] = []
    admitted = 0

    def lookup_and_admit(batch: IntArray) -> int:
        lookup = pool.emb_lookup(batch)
        return len(pool.emb_admit(lookup.miss_items))

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):  # hits do not change residency: `resident` stays valid
            batch = rng.choice(resident, BATCH, replace=False)
            hit_unsorted.append(_per_item(pool.emb_lookup, batch))
            batch = np.sort(batch)
            hit.append(_per_item(pool.emb_lookup, batch))
        for i in range(repeats):
            batch = np.sort(fresh[i * BATCH : (i + 1) * BATCH])
            admit.append(_per_item(lookup_and_admit, batch))
        offset = repeats * BATCH
        for i in range(repeats):
            batch = np.sort(fresh[offset + i * BATCH : offset + (i + 1) * BATCH])
            for _ in range(WARM_LOOKUPS):
                pool.emb_lookup(batch)
            t0 = time.perf_counter_ns()
            admitted += lookup_and_admit(batch)
            evict.append((time.perf_counter_ns() - t0) / 1e3 / BATCH)
            _unblock(pool)
    finally:
        if gc_was_enabled:
            gc.enable()
    pool.check_invariants()
    return {
        "emb_lookup_hit_us_per_item": statistics.median(hit),
        "emb_lookup_hit_unsorted_us_per_item": statistics.median(hit_unsorted),
        "emb_admit_us_per_item": statistics.median(admit),
        "emb_admit_evict_us_per_item": statistics.median(evict),
        "emb_admit_evict_admitted_fraction": admitted / (repeats * BATCH),
        "emb_slots": float(pool.emb.capacity),
    }


if __name__ == "__main__":
    print(json.dumps({**measure(), "machine_ref": machine_ref()}))
