"""The gateway's routing core: cost arithmetic, policies, anti-herding, predict-on-route, tie-breaks."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
import numpy.typing as npt
import pytest

from services.gateway.core.router import (
    DEMOTE_BASE_S,
    DEMOTE_MAX_S,
    NoWorkers,
    Policy,
    RankedScores,
    RouteDecision,
    Router,
    RouteReason,
    RouteRequest,
    RoutingView,
    Saturated,
    ScoreBreakdown,
    route_reason,
)
from shared.errors import ErrorKind
from shared.schemas import CostCoefficients, LoadInfo, WorkerState


def ws(
    wid: str,
    *,
    in_flight: int = 0,
    queue_depth: int = 0,
    ewma: float = 0.0,
    fixed: float = 1.0,
    new: float = 0.1,
    cached: float = 0.01,
    cand: float = 0.02,
    miss: float = 0.5,
    draining: bool = False,
    max_queue: int = 0,
    ewma_service: float = 0.0,
) -> WorkerState:
    return WorkerState(
        worker_id=wid,
        incarnation="i1",
        draining=draining,
        load=LoadInfo(
            in_flight=in_flight,
            queue_depth=queue_depth,
            ewma_latency_ms=ewma,
            max_queue=max_queue,
            ewma_service_ms=ewma_service,
        ),
        cost=CostCoefficients(
            fixed_ms=fixed,
            ms_per_new_token=new,
            ms_per_cached_token=cached,
            ms_per_candidate=cand,
            ms_per_emb_miss=miss,
        ),
    )


class DictView(RoutingView):
    """Test double of the gateway's replica: plain dicts, no version (the router rebuilds every call)."""

    def __init__(
        self,
        workers: list[WorkerState],
        *,
        kv: Mapping[str, Mapping[str, int]] | None = None,
        emb: Mapping[int, set[str]] | None = None,
        bits: Mapping[str, int | None] | None = None,
    ) -> None:
        self.workers = workers
        self.kv = dict(kv or {})
        self.emb = dict(emb or {})
        self.bits = dict(bits) if bits is not None else {w.worker_id: b for b, w in enumerate(workers)}
        self.mask_calls = 0

    def routable_workers(self) -> Sequence[WorkerState]:
        return [w for w in self.workers if not w.draining]

    def kv_workers(self, user_id: str) -> Mapping[str, int]:
        return self.kv.get(user_id, {})

    def worker_bit(self, worker_id: str) -> int | None:
        return self.bits.get(worker_id)

    def emb_masks(self, items: Sequence[int]) -> list[int]:
        self.mask_calls += 1
        out = []
        for item in items:
            mask = 0
            for wid in self.emb.get(item, ()):
                b = self.bits.get(wid)
                if b is not None:
                    mask |= 1 << b
            out.append(mask)
        return out


class ArrayView(DictView):
    """The same view with the optional numpy fast path and a version."""

    version = 1

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        return np.array(self.emb_masks(items.tolist()), dtype=np.uint64)


def req(user: str, history: Sequence[int], candidates: Sequence[int] = (100, 101)) -> RouteRequest:
    return RouteRequest(user_id=user, history=list(history), candidates=list(candidates))


def by_id(decision: RouteDecision) -> dict[str, ScoreBreakdown]:
    return {sb.worker_id: sb for sb in decision.ranked}


# ---------------------------------------------------------------------------------------------------------
def test_cost_arithmetic_hand_built_view() -> None:
    history = [1, 2, 3, 1, 4, 5, 6, 7]  # item 1 twice: still needed by a worker that cached 2 tokens
    candidates = [10, 11, 10]  # K = 3 scored, 2 distinct lookups
    view = DictView(
        [
            ws(
                "A",
                in_flight=2,
                queue_depth=1,
                ewma=12.0,
                fixed=1.0,
                new=0.5,
                cached=0.05,
                cand=0.25,
                miss=2.0,
            ),
            ws("B", fixed=2.0, new=0.25, cached=0.0, cand=0.5, miss=1.0),
            ws("C", in_flight=1, queue_depth=1, fixed=1.0, new=1.0, cached=0.5, cand=0.0, miss=0.5),
        ],
        kv={"u": {"A": 6, "C": 2, "B": 9}},  # B's 9 > len(history): not this history, counts as 0
        emb={1: {"A", "B", "C"}, 2: {"A"}, 6: {"A"}, 7: {"B"}, 10: {"B"}, 11: {"C"}},
    )
    d = Router(Policy.JOINT, rng_seed=0).route(view, RouteRequest("u", history, candidates), now=0.0)
    s = by_id(d)
    # A: cached 6, needs {6, 7, 10, 11}, holds 6; queue = 1 waiting x (ewma 12 / (1 + queue_depth 1))
    assert asdict(s["A"]) == {
        "worker_id": "A",
        "total_ms": pytest.approx(6.0 + 3.05 + 6.0, abs=1e-9),
        "queue_ms": pytest.approx(6.0, abs=1e-9),
        "compute_ms": pytest.approx(1.0 + 0.5 * 2 + 0.05 * 6 + 0.25 * 3, abs=1e-9),
        "emb_ms": pytest.approx(2.0 * 3, abs=1e-9),
        "cached_tokens": 6,
        "new_tokens": 2,
        "emb_misses": 3,
        "in_flight": 1,
        "predicted": False,
    }
    # B: nothing cached, needs all 9 distinct items, holds 1, 7, 10; idle
    assert s["B"].cached_tokens == 0 and s["B"].new_tokens == 8
    assert s["B"].emb_misses == 6
    assert s["B"].queue_ms == 0.0
    assert s["B"].compute_ms == pytest.approx(2.0 + 0.25 * 8 + 0.5 * 3, abs=1e-9)
    assert s["B"].total_ms == pytest.approx(5.5 + 6.0, abs=1e-9)
    # C: cached 2, needs {3, 1, 4, 5, 6, 7, 10, 11}, holds 1 and 11; no latency reported yet, so the
    # service time is its no-cache compute: 1 + 1.0 * 8 + 0 * 3 = 9
    assert s["C"].cached_tokens == 2 and s["C"].emb_misses == 6
    assert s["C"].compute_ms == pytest.approx(1.0 + 1.0 * 6 + 0.5 * 2, abs=1e-9)
    assert s["C"].queue_ms == pytest.approx(9.0, abs=1e-9)
    assert s["C"].emb_ms == pytest.approx(3.0, abs=1e-9)
    assert s["C"].total_ms == pytest.approx(20.0, abs=1e-9)
    assert d.worker_ids == ["B", "A", "C"]  # B 11.5, A 15.05, C 20
    assert d.best.worker_id == "B" and d.runner_up is not None and d.runner_up.worker_id == "A"
    assert d.policy is Policy.JOINT


def test_kv_affinity_wins_when_loads_are_equal() -> None:
    view = DictView([ws("A"), ws("B"), ws("C")], kv={"u": {"B": 60}})
    for seed in range(20):
        d = Router(Policy.JOINT, rng_seed=seed).route(view, req("u", range(64)), now=0.0)
        assert d.best.worker_id == "B"
        assert d.best.cached_tokens == 60 and d.best.new_tokens == 4


def test_overloaded_cache_rich_worker_loses() -> None:
    # A holds the user's whole history; 20 requests are ahead of us there (19 waiting, one running)
    view = DictView([ws("A", in_flight=20, queue_depth=19, ewma=40.0), ws("B")], kv={"u": {"A": 64}})
    d = Router(Policy.JOINT, rng_seed=0).route(view, req("u", range(64)), now=0.0)
    assert d.worker_ids == ["B", "A"]
    a = by_id(d)["A"]
    assert a.in_flight == 19 and a.queue_ms == pytest.approx(19 * 40.0 / 20, abs=1e-9)  # the waiting ones
    assert a.compute_ms < by_id(d)["B"].compute_ms  # cheapest on cache, still loses


def test_own_in_flight_counts_before_any_digest() -> None:
    view = DictView([ws("A"), ws("B")], kv={"u": {"A": 64}})
    router = Router(Policy.JOINT, rng_seed=0)
    r = req("u", range(64))
    assert router.route(view, r, now=0.0).best.worker_id == "A"
    for _ in range(20):
        router.on_dispatch("A", req("other", range(8)), now=0.0)
    d = router.route(view, r, now=0.0)
    assert d.best.worker_id == "B"
    assert by_id(d)["A"].in_flight == 20
    for _ in range(20):
        router.on_done("A")
    assert router.in_flight("A") == 0
    router.on_done("A")  # one too many: stays at 0
    assert router.in_flight("A") == 0
    assert router.route(view, r, now=0.0).best.worker_id == "A"


def test_overload_guard_ranks_last_whatever_the_cost() -> None:
    def view(limit_a: int) -> DictView:
        return DictView(
            [
                ws("A", in_flight=5, queue_depth=5, ewma=0.001, max_queue=limit_a),
                ws("B", in_flight=1, queue_depth=1, ewma=50.0, max_queue=5),
                ws("C", in_flight=2, queue_depth=2, ewma=50.0),  # reports no limit: never full
            ],
            kv={"u": {"A": 64}},
        )

    for policy in Policy:
        d = Router(policy, rng_seed=0).route(view(5), req("u", range(64)), now=0.0)
        assert d.worker_ids[-1] == "A", policy  # at the limit it reports itself
    assert Router(Policy.JOINT, rng_seed=0).route(view(6), req("u", range(64)), now=0.0).best.worker_id == "A"


def test_own_in_flight_fills_a_worker_and_every_full_worker_is_saturation() -> None:
    view = ArrayView([ws("A", max_queue=2), ws("B", max_queue=1)])
    router = Router(Policy.LEAST_LOADED, rng_seed=0)
    r = req("u", range(4))
    router.on_dispatch("B", r, now=0.0)  # B is at its limit of 1: ranked last
    assert router.route(view, r, now=0.0).worker_ids == ["A", "B"]
    router.on_dispatch("A", r, now=0.0)
    router.on_dispatch("A", r, now=0.0)
    with pytest.raises(Saturated) as info:
        router.route(view, r, now=0.0)
    assert info.value.code == "overloaded" and isinstance(info.value, NoWorkers)
    router.on_done("A")
    assert router.route(view, r, now=0.0).worker_ids == ["A", "B"]


def test_a_failed_worker_is_demoted_with_a_growing_back_off() -> None:
    view = ArrayView([ws("A"), ws("B", queue_depth=2, ewma=9.0), ws("C", max_queue=1)])
    router = Router(Policy.LEAST_LOADED, rng_seed=0)
    r = req("u", range(4))
    router.on_dispatch("C", r, now=0.0)  # C is full
    assert router.route(view, r, now=0.0).worker_ids == ["A", "B", "C"]
    assert router.on_failure("A", now=10.0) == DEMOTE_BASE_S
    # demoted: after the healthy and after the full worker
    assert router.route(view, r, now=10.0).worker_ids == ["B", "C", "A"]
    assert router.demoted_until("A") == 10.0 + DEMOTE_BASE_S
    # the back-off over, A is tried first again; failing again doubles it, up to DEMOTE_MAX_S
    t = 10.0 + DEMOTE_BASE_S
    assert router.route(view, r, now=t).worker_ids[0] == "A"
    backoffs = [router.on_failure("A", now=t) for _ in range(8)]
    assert backoffs == [min(DEMOTE_BASE_S * 2**k, DEMOTE_MAX_S) for k in range(1, 9)]
    assert backoffs[-1] == DEMOTE_MAX_S
    assert router.route(view, r, now=t + DEMOTE_MAX_S - 0.01).worker_ids[-1] == "A"
    # an answer ends the demotion at once, and the next failure starts from the base again
    router.on_success("A")
    assert router.demoted_until("A") is None
    assert router.route(view, r, now=t).worker_ids[0] == "A"
    assert router.on_failure("A", now=t) == DEMOTE_BASE_S
    # every worker demoted: all still ranked (the least bad first), never an empty decision
    router.on_failure("B", now=t)
    router.on_done("C")
    router.on_failure("C", now=t)
    assert sorted(router.route(view, r, now=t).worker_ids) == ["A", "B", "C"]
    # a worker that leaves the view is forgotten, demotion included
    router.forget_worker("A")
    assert router.demoted_until("A") is None


def test_emb_locality_wins_under_emb_policy() -> None:
    history = list(range(32))
    cands = [100, 101]
    emb = {i: {"A"} for i in [*history, *cands]}
    view = DictView([ws("A"), ws("B")], kv={"u": {"B": 32}}, emb=emb)
    d = Router(Policy.EMB, rng_seed=0).route(view, req("u", history, cands), now=0.0)
    assert d.worker_ids == ["A", "B"]
    s = by_id(d)
    assert s["A"].emb_misses == 0 and s["B"].emb_misses == 34
    assert s["B"].cached_tokens == 0 and s["B"].new_tokens == 32  # EMB ignores KV residency
    assert s["A"].compute_ms == s["B"].compute_ms == pytest.approx(1.0 + 0.1 * 32 + 0.02 * 2, abs=1e-9)
    assert s["B"].emb_ms == pytest.approx(0.5 * 34, abs=1e-9)


def test_kv_policy_ignores_emb() -> None:
    history = list(range(32))
    emb = {i: {"A"} for i in [*history, 100, 101]}
    view = DictView([ws("A", miss=100.0), ws("B", miss=100.0)], kv={"u": {"B": 32}}, emb=emb)
    d = Router(Policy.KV, rng_seed=0).route(view, req("u", history), now=0.0)
    assert d.worker_ids == ["B", "A"]
    for sb in d.ranked:
        assert sb.emb_ms == 0.0 and sb.emb_misses == 0
    assert view.mask_calls == 0
    # the joint policy weighs both: 34 misses at 100 ms each outweigh 32 tokens of KV
    assert Router(Policy.JOINT, rng_seed=0).route(view, req("u", history), now=0.0).best.worker_id == "A"


def test_least_loaded() -> None:
    view = DictView(
        [
            ws("A", in_flight=3, queue_depth=3, ewma=10.0),
            ws("B", in_flight=1, queue_depth=1, ewma=10.0),
            ws("C", in_flight=2, queue_depth=2, ewma=10.0),
        ],
        kv={"u": {"A": 64}},
        emb={i: {"A"} for i in range(64)},
    )
    d = Router(Policy.LEAST_LOADED, rng_seed=0).route(view, req("u", range(64)), now=0.0)
    assert d.worker_ids == ["B", "C", "A"]
    b = d.best
    assert b.total_ms == b.queue_ms == pytest.approx(1 * 10.0 / 2, abs=1e-9)  # 1 waiting x ewma/(1+1)
    assert b.compute_ms == 0.0 and b.emb_ms == 0.0 and b.cached_tokens == 0


def test_round_robin_rotates_and_spreads() -> None:
    view = DictView([ws("w2"), ws("w0"), ws("w1")], kv={"u": {"w2": 64}})
    router = Router(Policy.ROUND_ROBIN, rng_seed=0)
    firsts = []
    for _ in range(9):
        d = router.route(view, req("u", range(64)), now=0.0)
        assert sorted(d.worker_ids) == ["w0", "w1", "w2"]
        firsts.append(d.best.worker_id)
    assert firsts == ["w0", "w1", "w2"] * 3
    # the rest of the ranked list is least-loaded
    view = DictView([ws("w0"), ws("w1", in_flight=4, ewma=5.0), ws("w2", in_flight=1, ewma=5.0)])
    d = Router(Policy.ROUND_ROBIN, rng_seed=0).route(view, req("u", range(8)), now=0.0)
    assert d.worker_ids == ["w0", "w2", "w1"]


def test_predict_on_route_sticks_then_expires() -> None:
    view = DictView([ws(f"w{i}") for i in range(4)])
    for seed in range(10):
        router = Router(Policy.JOINT, rng_seed=seed, predict_ttl_s=5.0)
        first = router.route(view, req("u", range(40)), now=100.0)
        chosen = first.best.worker_id
        assert not first.best.predicted and first.best.cached_tokens == 0
        router.on_dispatch(chosen, req("u", range(40)), now=100.0)
        router.on_done(chosen)  # loads equal again: only the prediction tells the workers apart
        second = router.route(view, req("u", range(48)), now=104.0)
        assert second.best.worker_id == chosen
        assert second.best.predicted and second.best.cached_tokens == 40 and second.best.new_tokens == 8
        # a shorter history than the one sent is a different history: no prediction
        shorter = router.route(view, req("u", range(30)), now=104.0)
        assert all(not sb.predicted and sb.cached_tokens == 0 for sb in shorter.ranked)
        # past the TTL the prediction is gone
        later = router.route(view, req("u", range(48)), now=105.5)
        assert all(not sb.predicted and sb.cached_tokens == 0 for sb in later.ranked)
        assert router.predictions == 0


def test_prediction_does_not_override_a_longer_digest_prefix() -> None:
    view = DictView([ws("A"), ws("B")], kv={"u": {"B": 50}})
    router = Router(Policy.JOINT, rng_seed=0)
    router.on_dispatch("B", req("u", range(40)), now=0.0)
    router.on_done("B")
    b = by_id(router.route(view, req("u", range(60)), now=1.0))["B"]
    assert b.cached_tokens == 50 and not b.predicted


def test_predictions_are_bounded_lru() -> None:
    router = Router(Policy.JOINT, rng_seed=0, max_predictions=2)
    view = DictView([ws("A"), ws("B")])
    for user in ("u1", "u2", "u3"):
        router.on_dispatch("A", req(user, range(10)), now=0.0)
    assert router.predictions == 2
    s1 = by_id(router.route(view, req("u1", range(10)), now=0.0))
    s3 = by_id(router.route(view, req("u3", range(10)), now=0.0))
    assert s1["A"].cached_tokens == 0  # evicted
    assert s3["A"].cached_tokens == 10 and s3["A"].predicted
    # dispatches also sweep expired entries
    router.on_dispatch("B", req("u4", range(10)), now=100.0)
    assert router.predictions == 1


def test_ties_are_random_but_reproducible() -> None:
    view = DictView([ws("A"), ws("B")])

    def picks(seed: int) -> list[str]:
        router = Router(Policy.JOINT, rng_seed=seed)
        return [router.route(view, req(f"u{i}", range(16)), now=0.0).best.worker_id for i in range(400)]

    first = picks(7)
    counts = Counter(first)
    assert set(counts) == {"A", "B"}
    assert 120 < counts["A"] < 280
    assert picks(7) == first
    assert picks(8) != first


def test_costs_more_than_one_percent_apart_never_swap() -> None:
    # totals 11.0 and 11.22 (2% apart)
    view = DictView([ws("A", fixed=1.0, miss=0.0), ws("B", fixed=1.0 + 0.02 * 11.0, miss=0.0)])
    router = Router(Policy.JOINT, rng_seed=3)
    r = RouteRequest("u", list(range(100)), [])
    for _ in range(300):
        assert router.route(view, r, now=0.0).worker_ids == ["A", "B"]
    # within 1%: a near tie, both orders happen
    view = DictView([ws("A", fixed=1.0, miss=0.0), ws("B", fixed=1.0 + 0.005 * 11.0, miss=0.0)])
    seen = {router.route(view, r, now=0.0).best.worker_id for _ in range(300)}
    assert seen == {"A", "B"}


def test_no_workers() -> None:
    with pytest.raises(NoWorkers) as err:
        Router(Policy.JOINT).route(DictView([]), req("u", range(4)), now=0.0)
    assert err.value.kind is ErrorKind.RETRY and err.value.code == "no_workers"
    draining = DictView([ws("A", draining=True), ws("B", draining=True)])
    for policy in Policy:
        with pytest.raises(NoWorkers):
            Router(policy).route(draining, req("u", range(4)), now=0.0)


def test_draining_workers_never_chosen() -> None:
    view = DictView([ws("A", draining=True), ws("B", in_flight=30, ewma=100.0)], kv={"u": {"A": 64}})
    for policy in Policy:
        router = Router(policy, rng_seed=0)
        for _ in range(5):
            assert router.route(view, req("u", range(64)), now=0.0).worker_ids == ["B"]


def test_forget_worker() -> None:
    view = DictView([ws("A"), ws("B")])
    router = Router(Policy.JOINT, rng_seed=0)
    router.route(view, req("u", range(10)), now=0.0)
    router.on_dispatch("A", req("u", range(10)), now=0.0)
    router.on_dispatch("A", req("v", range(10)), now=0.0)
    router.on_dispatch("B", req("w", range(10)), now=0.0)
    router.forget_worker("A")
    assert router.in_flight("A") == 0 and router.in_flight("B") == 1
    assert router.predictions == 1
    # A comes back (a new incarnation): no stale prediction or load sticks to it
    s = by_id(router.route(view, req("u", range(12)), now=1.0))
    assert s["A"].cached_tokens == 0 and not s["A"].predicted and s["A"].in_flight == 0
    assert s["B"].in_flight == 1


@pytest.mark.parametrize("policy", list(Policy))
def test_ranked_contains_every_routable_worker_once(policy: Policy) -> None:
    rng = random.Random(5)
    workers = [
        ws(f"w{i}", in_flight=rng.randrange(6), ewma=rng.uniform(0, 20), draining=i % 7 == 3)
        for i in range(20)
    ]
    emb = {item: {f"w{i}" for i in range(20) if rng.random() < 0.3} for item in range(200)}
    view = DictView(workers, kv={"u": {"w1": 30, "w2": 10}}, emb=emb)
    router = Router(policy, rng_seed=1)
    routable = sorted(w.worker_id for w in workers if not w.draining)
    for i in range(20):
        d = router.route(view, req("u", [rng.randrange(200) for _ in range(40)], [i, i + 1]), now=0.0)
        assert sorted(d.worker_ids) == routable
        assert [sb.worker_id for sb in d.ranked] == d.worker_ids
        totals = [sb.total_ms for sb in d.ranked]
        if policy is not Policy.ROUND_ROBIN:
            assert all(b >= a / 1.01 - 1e-9 for a, b in itertools.pairwise(totals))


def _naive_misses(view: DictView, history: list[int], cands: list[int], cached: int, wid: str) -> int:
    needed = set(history[cached:]) | set(cands)
    bit = view.bits.get(wid)
    return sum(1 for item in needed if bit is None or wid not in view.emb.get(item, set()))


@pytest.mark.parametrize("fast", [False, True])
def test_vectorised_misses_match_a_naive_count(fast: bool) -> None:
    rng = random.Random(11)
    for trial in range(40):
        n = rng.choice([1, 3, 31, 33, 70])
        workers = [ws(f"w{i}") for i in range(n)]
        bits: dict[str, int | None] = {f"w{i}": i for i in range(n)}
        if trial % 3 == 0:
            bits[f"w{n - 1}"] = None  # a worker without a bit yet: every item misses
        if trial % 5 == 0:
            bits["w0"] = 200  # a sparse high bit: multi-word masks
        items = [rng.randrange(-5 if trial % 4 == 0 else 0, 60) for _ in range(600)]
        emb = {item: {f"w{i}" for i in range(n) if rng.random() < 0.4} for item in set(items)}
        kv = {"u": {f"w{i}": rng.randrange(0, 700) for i in rng.sample(range(n), min(n, 3))}}
        cls = ArrayView if fast and trial % 5 != 0 and n <= 64 else DictView
        view = cls(workers, kv=kv, emb=emb, bits=bits)
        length = rng.choice([0, 1, 17, 300, 520])
        history = items[:length]
        cands = items[length : length + rng.choice([0, 1, 64])]
        d = Router(Policy.JOINT, rng_seed=trial).route(view, RouteRequest("u", history, cands), now=0.0)
        for sb in d.ranked:
            c = kv["u"].get(sb.worker_id, 0)
            c = c if c <= len(history) else 0
            assert sb.cached_tokens == c
            assert sb.emb_misses == _naive_misses(view, history, cands, c, sb.worker_id), (trial, sb)


def test_misses_with_shared_prefix_lengths_reused_view_and_arrays() -> None:
    """One versioned view routed many times (arrays reused, requests of varying sizes as int64 arrays):
    several workers sharing a cached length, predictions, 32 and 64 bit columns, a worker without a bit."""
    rng = random.Random(5)
    for n in (32, 40):
        workers = [ws(f"w{i}") for i in range(n)]
        bits: dict[str, int | None] = {f"w{i}": i for i in range(n)}
        bits[f"w{n - 2}"] = None
        items = list(range(90))
        emb = {item: {f"w{i}" for i in range(n) if rng.random() < 0.5} for item in items}
        view = ArrayView(workers, emb=emb, bits=bits)
        router = Router(Policy.JOINT, rng_seed=n)
        for trial in range(30):
            length = rng.choice([0, 5, 40, 200, 300])
            history = [rng.choice(items) for _ in range(length)]
            cands = [rng.choice(items) for _ in range(rng.choice([0, 3, 50]))]
            shared = rng.randrange(0, length + 1)
            holders = rng.sample(range(n), 4)
            view.kv = {"u": {f"w{i}": shared for i in holders[:3]} | {f"w{holders[3]}": length // 2}}
            r = RouteRequest("u", np.array(history, dtype=np.int64), np.array(cands, dtype=np.int64))
            d = router.route(view, r, now=float(trial))
            fresh = by_id(Router(Policy.JOINT, rng_seed=0).route(view, r, now=float(trial)))
            for sb in d.ranked:
                c = sb.cached_tokens
                if not sb.predicted:
                    kv_len = view.kv["u"].get(sb.worker_id, 0)
                    assert c == (kv_len if kv_len <= length else 0)
                assert sb.emb_misses == _naive_misses(view, history, cands, c, sb.worker_id), (n, trial)
                if not sb.predicted and not fresh[sb.worker_id].predicted:
                    other = fresh[sb.worker_id]
                    assert sb.compute_ms == other.compute_ms and sb.emb_ms == other.emb_ms
            router.on_dispatch(d.best.worker_id, r, now=float(trial))
            router.on_done(d.best.worker_id)


def test_breakdowns_are_plain_score_breakdowns() -> None:
    view = DictView([ws("A"), ws("B", in_flight=2, queue_depth=1)], kv={"u": {"B": 2}}, emb={1: {"A"}})
    d = Router(Policy.JOINT, rng_seed=0).route(view, req("u", [1, 2, 3]), now=0.0)
    for sb in d.ranked:
        twin = ScoreBreakdown(**asdict(sb))
        assert sb == twin and hash(sb) == hash(twin) and repr(sb) == repr(twin)
        assert type(sb) is ScoreBreakdown
        with pytest.raises(AttributeError):
            sb.total_ms = 0.0  # type: ignore[misc]


def test_history_as_numpy_array() -> None:
    view = DictView([ws("A"), ws("B")], kv={"u": {"B": 3}}, emb={5: {"A"}})
    r = RouteRequest("u", np.array([5, 6, 7, 8], dtype=np.int32), np.array([5], dtype=np.int64))
    s = by_id(Router(Policy.JOINT, rng_seed=0).route(view, r, now=0.0))
    assert s["A"].emb_misses == 3 and s["B"].emb_misses == 2 and s["B"].cached_tokens == 3


def test_versioned_view_reuses_arrays_until_the_version_changes() -> None:
    view = ArrayView([ws("A", in_flight=9, queue_depth=9, ewma=10.0), ws("B")])
    router = Router(Policy.LEAST_LOADED, rng_seed=0)
    assert router.route(view, req("u", range(4)), now=0.0).best.worker_id == "B"
    view.workers = [ws("A", ewma=10.0), ws("B", in_flight=9, queue_depth=9, ewma=10.0)]
    assert router.route(view, req("u", range(4)), now=0.0).best.worker_id == "B"  # same version: cached
    view.version = 2
    assert router.route(view, req("u", range(4)), now=0.0).best.worker_id == "A"
    # own in-flight counts stay current across cached calls
    for _ in range(20):
        router.on_dispatch("A", req("x", range(4)), now=0.0)
    d = router.route(view, req("u", range(4)), now=0.0)
    assert d.best.worker_id == "B" and by_id(d)["A"].in_flight == 20


def test_ranked_scores_read_like_a_list() -> None:
    view = DictView(
        [
            ws("A"),
            ws("B", in_flight=1, queue_depth=1, ewma=1.0),
            ws("C", in_flight=2, queue_depth=2, ewma=1.0),
        ]
    )
    d = Router(Policy.LEAST_LOADED, rng_seed=0).route(view, req("u", range(4)), now=0.0)
    assert isinstance(d.ranked, RankedScores)
    assert len(d.ranked) == 3
    assert [sb.worker_id for sb in d.ranked[1:]] == ["B", "C"]
    assert d.ranked[-1].worker_id == "C"
    assert d.ranked == list(d.ranked)
    assert RouteDecision(ranked=list(d.ranked), policy=Policy.LEAST_LOADED).worker_ids == ["A", "B", "C"]


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        Router(Policy.JOINT, max_predictions=-1)
    with pytest.raises(ValueError):
        Router(Policy.JOINT, predict_ttl_s=-1.0)
    assert Router("round-robin").policy is Policy.ROUND_ROBIN  # type: ignore[arg-type]


def test_a_request_over_the_budget_is_refused_at_once() -> None:
    # A: 10 waiting x 5 ms each = 50 ms queued; B: 4 x 5 ms = 20 ms; compute of this request: 1 + 0.1*4 ms.
    view = ArrayView([ws("A", queue_depth=10, ewma_service=5.0), ws("B", queue_depth=4, ewma_service=5.0)])
    router = Router(Policy.JOINT, rng_seed=0)
    r = req("u", range(4))
    d = router.route(view, r, now=0.0, budget_ms=25.0)
    assert d.best.worker_id == "B" and d.best.queue_ms == pytest.approx(20.0)
    assert d.best.total_ms > 20.0
    with pytest.raises(Saturated) as over:  # the queue alone is over: refused before the EMB term
        router.route(view, r, now=0.0, budget_ms=19.0)
    assert "queued" in over.value.message
    with pytest.raises(Saturated):  # queue within, queue + compute over
        router.route(view, r, now=0.0, budget_ms=20.5)
    assert router.route(view, r, now=0.0).best.worker_id == "B"  # no budget: never refused


def test_the_reported_service_time_beats_the_latency_quotient() -> None:
    # 300 ms of latency remembered from a queue that has drained (depth 1 now): the quotient would say 150 ms
    # a request; the worker's own service time says 4.
    view = ArrayView(
        [ws("A", queue_depth=1, ewma=300.0, ewma_service=4.0), ws("B", queue_depth=1, ewma=300.0)]
    )
    scores = by_id(Router(Policy.LEAST_LOADED, rng_seed=0).route(view, req("u", range(4)), now=0.0))
    assert scores["A"].queue_ms == pytest.approx(4.0)
    assert scores["B"].queue_ms == pytest.approx(150.0)


def test_answers_age_the_reported_queue_until_the_next_view() -> None:
    view = ArrayView([ws("A", queue_depth=5, ewma_service=2.0), ws("B", queue_depth=0, ewma_service=30.0)])
    router = Router(Policy.LEAST_LOADED, rng_seed=0)
    r = req("u", range(4))
    assert by_id(router.route(view, r, now=0.0))["A"].queue_ms == pytest.approx(10.0)
    router.on_dispatch("A", r, now=0.0)
    router.on_done("A", answered=False)  # a timeout says nothing about A's queue
    assert by_id(router.route(view, r, now=0.0))["A"].queue_ms == pytest.approx(10.0)
    for _ in range(3):  # three of ours answered by A: its queue has moved on by at least three
        router.on_dispatch("A", r, now=0.0)
        router.on_done("A")
    assert by_id(router.route(view, r, now=0.0))["A"].queue_ms == pytest.approx(4.0)
    for _ in range(5):
        router.on_dispatch("A", r, now=0.0)
        router.on_done("A")
    assert by_id(router.route(view, r, now=0.0))["A"].queue_ms == 0.0  # never below empty
    view.version += 1  # a new view: its own depth counts again
    assert by_id(router.route(view, r, now=0.0))["A"].queue_ms == pytest.approx(10.0)


def test_a_worker_full_by_the_view_alone_is_full() -> None:
    # Another gateway filled w1: the view says 4 in flight (3 waiting + 1 running) of its limit of 4.
    view = ArrayView([ws("w1", in_flight=4, queue_depth=3, max_queue=4), ws("w2", queue_depth=9, ewma=90.0)])
    router = Router(Policy.JOINT, rng_seed=0)
    assert router.route(view, req("u", range(4)), now=0.0).worker_ids == ["w2", "w1"]
    view.workers = [ws("w1", in_flight=4, queue_depth=3, max_queue=4)]
    view.version += 1
    with pytest.raises(Saturated):
        router.route(view, req("u", range(4)), now=0.0)
    r = req("u", range(4))
    router.on_dispatch("w1", r, now=0.0)
    router.on_done("w1")  # one answered: the worker has room again until the next view says otherwise
    assert router.route(view, r, now=0.0).worker_ids == ["w1"]


def test_round_robin_does_not_give_its_turn_to_a_worker_over_the_budget() -> None:
    view = ArrayView([ws("w1", queue_depth=100, ewma_service=5.0), ws("w2")])  # w1: 500 ms queued
    router = Router(Policy.ROUND_ROBIN, rng_seed=0)
    for _ in range(4):  # every turn: w2 serves; never shed while w2 is within the budget
        assert router.route(view, req("u", range(4)), now=0.0, budget_ms=300.0).best.worker_id == "w2"
    # the cheapest eligible worker decides the budget, not the first-ranked (a demoted one is not eligible)
    router.on_failure("w2", now=0.0)
    with pytest.raises(Saturated):
        router.route(view, req("u", range(4)), now=0.0, budget_ms=300.0)


def test_emb_policy_total_is_queue_plus_compute_plus_emb() -> None:
    # A holds every item but has a queue; B holds none and is idle. EMB policy: the total is the sum of all
    # three terms, so a long enough queue outweighs A's locality.
    history = list(range(8))
    emb = {i: {"A"} for i in [*history, 100, 101]}
    view = DictView([ws("A", queue_depth=2, ewma_service=5.0), ws("B")], emb=emb)
    d = Router(Policy.EMB, rng_seed=0).route(view, req("u", history), now=0.0)
    s = by_id(d)
    for sb in d.ranked:
        assert sb.total_ms == pytest.approx(sb.queue_ms + sb.compute_ms + sb.emb_ms, abs=1e-9)
    assert s["A"].queue_ms == pytest.approx(10.0) and s["A"].emb_ms == 0.0
    assert s["B"].queue_ms == 0.0 and s["B"].emb_ms == pytest.approx(0.5 * 10, abs=1e-9)
    compute = 1.0 + 0.1 * 8 + 0.02 * 2
    assert s["A"].compute_ms == s["B"].compute_ms == pytest.approx(compute, abs=1e-9)
    assert d.worker_ids == ["B", "A"]  # B: 1.84 + 5 ms; A: 10 + 1.84 ms


def test_each_answer_frees_exactly_one_slot_and_a_refilled_worker_saturates_again() -> None:
    view = ArrayView([ws("A", max_queue=3, queue_depth=2, ewma_service=5.0)])
    router = Router(Policy.LEAST_LOADED, rng_seed=0)
    r = req("u", range(4))
    assert router.route(view, r, now=0.0).best.queue_ms == pytest.approx(10.0)
    router.on_done("A")  # nothing of ours in flight: a stray answer neither frees a slot nor ages the queue
    assert router.in_flight("A") == 0
    assert router.route(view, r, now=0.0).best.queue_ms == pytest.approx(10.0)
    for _ in range(3):
        router.on_dispatch("A", r, now=0.0)
    with pytest.raises(Saturated):  # 3 of ours ahead: at its limit
        router.route(view, r, now=0.0)
    router.on_done("A")
    assert router.in_flight("A") == 2  # one answer frees one slot, not two
    assert router.route(view, r, now=0.0).worker_ids == ["A"]  # below the limit again: routable
    router.on_dispatch("A", r, now=0.0)  # full again: the only worker is full, so saturation
    with pytest.raises(Saturated):
        router.route(view, r, now=0.0)


# ---------------------------------------------------------------------------------------------------------
# why the first-ranked worker came first


def sb(
    wid: str,
    *,
    queue: float = 0.0,
    compute: float = 0.0,
    emb: float = 0.0,
    cached: int = 0,
    misses: int = 0,
) -> ScoreBreakdown:
    """A breakdown whose total is the sum of its terms, as the router makes them."""
    return ScoreBreakdown(
        worker_id=wid,
        total_ms=queue + compute + emb,
        queue_ms=queue,
        compute_ms=compute,
        emb_ms=emb,
        cached_tokens=cached,
        new_tokens=64 - cached,
        emb_misses=misses,
        in_flight=0,
        predicted=False,
    )


def test_the_route_reasons_are_a_handful_of_fixed_labels() -> None:
    assert [str(r) for r in RouteReason] == ["single", "tie", "kv", "compute", "emb", "load", "override"]


def test_one_worker_is_a_single_choice() -> None:
    assert route_reason(sb("A", queue=5.0), None) is RouteReason.SINGLE


@pytest.mark.parametrize(
    ("chosen", "runner_up"),
    [
        (sb("A"), sb("B")),  # both 0 ms
        (sb("A", queue=10.0), sb("B", compute=10.0)),  # equal totals, different terms
        (sb("A", queue=100.0), sb("B", queue=101.0)),  # 101 < 1.01 * 100 + 1e-9: within the band
        (sb("A", queue=101.0), sb("B", queue=100.0)),  # the costlier first, within the band: a tie too
        (sb("A"), sb("B", queue=0.5e-9)),  # below the absolute part of the band
    ],
    ids=["zero", "equal-totals", "within-1pct", "within-1pct-reversed", "within-1e-9-ms"],
)
def test_totals_within_the_tie_band_are_a_tie(chosen: ScoreBreakdown, runner_up: ScoreBreakdown) -> None:
    assert route_reason(chosen, runner_up) is RouteReason.TIE


def test_a_lead_just_past_the_tie_band_is_no_tie() -> None:
    assert route_reason(sb("A"), sb("B", queue=1e-9)) is RouteReason.LOAD  # 1e-9 is not < 0 + 1e-9
    assert route_reason(sb("A", queue=100.0), sb("B", queue=101.5)) is RouteReason.LOAD


def test_a_chosen_worker_costlier_than_the_runner_up_was_an_override() -> None:
    # round-robin's turn, or a cheaper runner-up that is full or demoted
    assert route_reason(sb("A", queue=20.0), sb("B", queue=10.0)) is RouteReason.OVERRIDE
    assert route_reason(sb("A", compute=20.0, cached=64), sb("B", compute=2.0)) is RouteReason.OVERRIDE


def test_the_largest_term_of_the_lead_names_the_reason() -> None:
    # A: 1 ms queued but 60 tokens cached (2 ms compute); B: idle, 8 ms compute: a 5 ms lead, +6 from compute
    assert route_reason(sb("A", queue=1.0, compute=2.0, cached=60), sb("B", compute=8.0)) is RouteReason.KV
    # the same lead with no more cached tokens on A: its cost model is just faster
    assert route_reason(sb("A", queue=1.0, compute=2.0), sb("B", compute=8.0)) is RouteReason.COMPUTE
    assert (
        route_reason(sb("A", queue=1.0, compute=2.0, cached=10), sb("B", compute=8.0, cached=20))
        is RouteReason.COMPUTE
    )
    # EMB: 4 ms of misses fewer, 1 ms more compute
    assert route_reason(sb("A", compute=3.0, emb=1.0), sb("B", compute=2.0, emb=5.0)) is RouteReason.EMB
    # load: 9 ms less queued, despite B's KV (3 ms less compute) and fewer misses (1 ms less)
    assert (
        route_reason(
            sb("A", queue=1.0, compute=5.0, emb=2.0), sb("B", queue=10.0, compute=2.0, emb=1.0, cached=50)
        )
        is RouteReason.LOAD
    )


def test_the_emb_lookups_a_longer_cached_prefix_spares_count_for_kv() -> None:
    # B holds 60 of the user's 64 tokens: 5.4 ms less compute, and 60 fewer of A's 66 misses (0.5 ms each)
    a = sb("A", compute=7.4, emb=33.0, misses=66)
    b = sb("B", compute=2.0, emb=3.0, cached=60, misses=6)
    assert route_reason(b, a) is RouteReason.KV  # 5.4 + 30 spared by the prefix, 0 ms of EMB left
    # one cached token more spares at most one of A's misses (0.5 ms): a warmer EMB is the rest
    c = sb("C", compute=7.3, emb=3.0, cached=1, misses=6)
    assert route_reason(c, a) is RouteReason.EMB  # compute 0.1 + 0.5 against EMB 30 - 0.5
    # a runner-up without misses has none to spare: the compute advantage alone
    assert route_reason(sb("D", compute=1.0, cached=8), sb("E", compute=2.0)) is RouteReason.KV


def test_equal_advantages_go_to_compute_then_emb_then_load() -> None:
    even = sb("B", queue=2.0, compute=2.0, emb=2.0)
    assert route_reason(sb("A", cached=1), even) is RouteReason.KV
    assert route_reason(sb("A"), even) is RouteReason.COMPUTE
    assert route_reason(sb("A", compute=2.0), even) is RouteReason.EMB
    assert route_reason(sb("A", compute=2.0, emb=2.0), even) is RouteReason.LOAD


def test_the_decision_says_why_its_best_worker_came_first() -> None:
    history = range(64)
    router = Router(Policy.JOINT, rng_seed=0)
    single = DictView([ws("A")])
    assert router.route(single, req("u", history), now=0.0).reason is RouteReason.SINGLE
    same = DictView([ws("A"), ws("B")])  # identical idle workers, nothing cached: the same cost
    assert router.route(same, req("u", history), now=0.0).reason is RouteReason.TIE
    kv = DictView([ws("A"), ws("B")], kv={"u": {"B": 60}})
    d = router.route(kv, req("u", history), now=0.0)
    assert (d.best.worker_id, d.reason) == ("B", RouteReason.KV)
    faster = DictView([ws("A", new=0.2), ws("B")])  # B computes a new token in 0.1 ms, A in 0.2
    d = router.route(faster, req("u", history), now=0.0)
    assert (d.best.worker_id, d.reason) == ("B", RouteReason.COMPUTE)
    emb = DictView([ws("A"), ws("B")], emb={i: {"A"} for i in range(64)})  # A holds every history item
    d = router.route(emb, req("u", history), now=0.0)
    assert (d.best.worker_id, d.reason) == ("A", RouteReason.EMB)
    # A holds the whole history (38 ms less to compute and look up) but has 76 ms queued
    busy = DictView([ws("A", in_flight=20, queue_depth=19, ewma=80.0), ws("B")], kv={"u": {"A": 64}})
    d = router.route(busy, req("u", history), now=0.0)
    assert (d.best.worker_id, d.reason) == ("B", RouteReason.LOAD)
    router.on_failure("B", now=0.0)  # the cheaper B demoted: A comes first at a higher cost
    d = router.route(busy, req("u", history), now=0.0)
    assert (d.best.worker_id, d.reason) == ("A", RouteReason.OVERRIDE)


def test_round_robins_turn_for_a_costlier_worker_is_an_override() -> None:
    view = DictView([ws("A", queue_depth=2, ewma_service=5.0), ws("B")])
    router = Router(Policy.ROUND_ROBIN, rng_seed=0)
    turns = [router.route(view, req("u", range(4)), now=0.0) for _ in range(2)]
    assert [(d.best.worker_id, d.reason) for d in turns] == [
        ("A", RouteReason.OVERRIDE),
        ("B", RouteReason.LOAD),
    ]
