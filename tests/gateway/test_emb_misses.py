"""EMB-miss counting (``emb_misses.py``) against a naive count, over a ResidencyIndex-backed view: every path
of finding the distinct items (the scratch array, its growth and reuse, the sorts for ids outside it), the
dense and dict mask lookups, bits beyond 64, cached prefixes and degenerate requests."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from services.gateway.core.emb_misses import SCRATCH_MAX_ITEMS, EmbMissCounter
from services.gateway.core.router import Policy, Router, RouteRequest
from services.gateway.core.routing_view import IndexView
from shared.residency import ResidencyIndex
from shared.schemas import CostCoefficients, LoadInfo, WorkerState

I64 = npt.NDArray[np.int64]


def ws(wid: str) -> WorkerState:
    return WorkerState(
        worker_id=wid,
        incarnation="i1",
        load=LoadInfo(in_flight=0, queue_depth=0, ewma_service_ms=1.0),
        cost=CostCoefficients(
            fixed_ms=1.0,
            ms_per_new_token=0.1,
            ms_per_cached_token=0.01,
            ms_per_candidate=0.02,
            ms_per_emb_miss=0.5,
        ),
    )


class FixedView(IndexView):
    """The simulator's and the gateway's kind of view (residency in a ResidencyIndex, masks from its dense
    array while every routable bit is below 64), with a fixed set of routable workers."""

    version = 1

    def __init__(self, index: ResidencyIndex, routable: Sequence[str]) -> None:
        super().__init__(index)
        self.workers = [ws(w) for w in routable]

    def routable_workers(self) -> Sequence[WorkerState]:
        return self.workers


def naive(index: ResidencyIndex, history: Sequence[int], cands: Sequence[int], cached: int, wid: str) -> int:
    needed = set(list(history)[cached:]) | set(cands)
    bit = index.worker_bit(wid)
    masks = index.emb_masks(sorted(needed))
    return sum(1 for m in masks if bit is None or not m >> bit & 1)


def check(router: Router, view: IndexView, req: RouteRequest, now: float) -> None:
    history, cands = req.history, req.candidates
    d = router.route(view, req, now)
    for sb in d.ranked:
        assert sb.emb_misses == naive(view.index, history, cands, sb.cached_tokens, sb.worker_id), sb


# item id pools: small (the scratch array and the dense masks), beyond the dense array (dict lookups), beyond
# the scratch array (a packed sort), negative and huge (a stable argsort)
SMALL = range(0, 3000)
BEYOND_DENSE = range(5000, 6000)
BEYOND_SCRATCH = range(SCRATCH_MAX_ITEMS, SCRATCH_MAX_ITEMS + 500)
NEGATIVE = range(-300, 0)
HUGE = range(1 << 61, (1 << 61) + 300)


@pytest.mark.parametrize(
    ("pools", "n_workers", "routable_bits"),
    [
        ((SMALL,), 32, range(32)),
        ((SMALL, BEYOND_DENSE), 32, range(32)),
        ((SMALL, BEYOND_SCRATCH), 40, range(40)),
        ((SMALL, NEGATIVE), 20, range(20)),
        ((SMALL, HUGE, NEGATIVE), 20, range(20)),
        ((SMALL, BEYOND_DENSE), 70, [0, 3, 31, 63, 64, 65, 69]),  # bits beyond 64: the multi-word masks
        ((SMALL,), 70, [1, 2, 40]),  # holes in the bits: the misses read through the worker's own bit
        ((SMALL, BEYOND_DENSE), 8, [0, 1, 2, -1]),  # -1: a routable worker the index does not know (no bit)
    ],
)
def test_index_backed_counts_match_a_naive_count(
    pools: tuple[range, ...], n_workers: int, routable_bits: Sequence[int]
) -> None:
    rng = random.Random(n_workers * 7 + len(pools))
    index = ResidencyIndex(dense_max_items=4096)
    names = [f"w{i}" for i in range(n_workers)]
    for wid in names:
        index.add_worker(wid)  # bits in order: w{i} holds bit i
    universe = [i for pool in pools for i in pool]
    for wid in names:
        index.add_emb(wid, rng.sample(universe, len(universe) // 3))
    routable = [names[b] if b >= 0 else "ghost" for b in routable_bits]
    view = FixedView(index, routable)
    router = Router(Policy.JOINT, rng_seed=1)
    for trial in range(60):  # one router, many calls: the scratch array is reused (and grown) across them
        length = rng.choice([0, 1, 50, 400, 900])
        hot = rng.sample(universe, 200)  # repeated items, within history, candidates and across both
        history = [rng.choice(hot) if rng.random() < 0.5 else rng.choice(universe) for _ in range(length)]
        cands = [rng.choice(hot) for _ in range(rng.choice([0, 1, 64, 300]))]
        user = f"u{trial % 7}"
        for wid in rng.sample(routable, min(3, len(routable))):
            index.upsert_kv(user, wid, rng.randrange(1, length + 2))  # some prefixes longer than history
        as_array = trial % 2 == 0
        h: Any = np.array(history, dtype=np.int64) if as_array else history
        c: Any = np.array(cands, dtype=np.int64) if as_array else cands
        check(router, view, RouteRequest(user, h, c), float(trial))
        if trial % 5 == 0:  # predict-on-route: a prefix the view does not (yet) know
            router.on_dispatch(routable[trial % len(routable)], RouteRequest(user, h, c), float(trial))


def test_degenerate_requests() -> None:
    index = ResidencyIndex()
    for wid in ("a", "b", "c"):
        index.add_worker(wid)
    index.add_emb("a", [1, 2, 3])
    index.add_emb("b", [3, 4])
    index.upsert_kv("u", "b", 4)
    index.upsert_kv("u", "c", 2)
    view = FixedView(index, ["a", "b", "c"])
    router = Router(Policy.JOINT, rng_seed=0)

    def misses(history: list[int], cands: list[int]) -> dict[str, int]:
        d = router.route(view, RouteRequest("u", history, cands), now=0.0)
        return {sb.worker_id: sb.emb_misses for sb in d.ranked}

    assert misses([], []) == {"a": 0, "b": 0, "c": 0}
    assert misses([], [3, 3, 5]) == {"a": 1, "b": 1, "c": 2}  # empty history: distinct candidates only
    assert misses([1, 2], []) == {"a": 0, "b": 2, "c": 0}  # c's KV covers the whole history: no look-ups
    assert misses([7] * 50, [7]) == {"a": 1, "b": 1, "c": 1}  # one item, however often
    # b's KV covers [1, 1, 1, 4]: it needs 4 (from the candidates) only; c's covers [1, 1]: it needs 1, 4
    assert misses([1, 1, 1, 4], [4]) == {"a": 1, "b": 0, "c": 2}
    # items repeated on both sides of c's prefix are needed (their last positions are past it)
    assert misses([1, 9, 1, 9], []) == {"a": 1, "b": 0, "c": 2}


def test_distinct_items_every_path() -> None:
    """The last positions of the distinct items, ascending, whichever way they are found."""
    rng = np.random.default_rng(3)
    counter = EmbMissCounter()

    def expect(allv: I64) -> list[int]:
        last = {int(v): i for i, v in enumerate(allv.tolist())}
        return sorted(last.values())

    def check_once(allv: I64) -> None:
        assert counter._last_positions(allv).tolist() == expect(allv)

    for top in (10, 2000, 100_000, 3_000_000):  # the scratch array grows with the largest id
        for n in (1, 2, 30, 1500):
            check_once(rng.integers(0, top, n))
    assert len(counter._last) == 1 << 22
    # what earlier calls left in the scratch array never counts: the same ids again, in other orders
    allv = rng.integers(0, 50, 400)
    for _ in range(5):
        check_once(rng.permutation(allv))
    # ids the scratch array does not cover: the sorts
    check_once(rng.integers(SCRATCH_MAX_ITEMS, SCRATCH_MAX_ITEMS + 100, 500))
    check_once(rng.integers(-50, 50, 500))
    check_once(rng.integers(1 << 62, (1 << 62) + 40, 300))
    check_once(np.array([-(1 << 63), (1 << 63) - 1, -(1 << 63), 0, 0], dtype=np.int64))


class _FirstWriteWins(np.ndarray):
    """A scratch array whose repeated writes keep the *first* value: numpy does not promise the order of
    repeated writes, so the counter must not depend on it."""

    def __setitem__(self, key: Any, value: Any) -> None:
        key = np.asarray(key)
        value = np.broadcast_to(value, key.shape)
        np.ndarray.__setitem__(self, key[::-1], value[::-1])


def test_distinct_items_whatever_the_order_of_repeated_writes() -> None:
    counter = EmbMissCounter()
    counter._last = np.zeros(1 << 12, dtype=np.int32).view(_FirstWriteWins)
    rng = np.random.default_rng(5)
    for _ in range(10):
        allv = rng.integers(0, 100, 700)
        last = {int(v): i for i, v in enumerate(allv.tolist())}
        assert counter._last_positions(allv).tolist() == sorted(last.values())
