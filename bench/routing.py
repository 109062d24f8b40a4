"""Routing decision latency: how long the gateway's router takes to pick a worker, on this machine.

Setup (synthetic, sized like a production gateway's view; every report carries it under ``route_setup``):
32 workers; a catalogue of 1M items with Zipf(1.0) popularity; each worker's EMB holds ~50k items: a Zipf
head replicated on most workers (each of the 20k most popular items on a worker with probability 0.75) plus
its own popularity-weighted tail; 2000 users, 60% with KV on one worker and 15% on two (covering 256-512
tokens), the rest on none; loads 0-8 in flight with digest latencies of 5-30 ms. Requests: a 512-item
history (Zipf, repeats included) and 128 candidates, users drawn at random.

The headline figures go through the gateway's REAL view: the same cluster is turned into the snapshot
``ViewUpdate`` messages cachestate would publish (``pack_updates``, default part size), each encoded and
decoded with the wire codec and applied to a ``ViewReplica`` over a ``ResidencyIndex`` (the gateway's
cap, ``shared.residency.DEFAULT_MAX_ENTRIES``), read through ``ReplicaView`` with its ``version`` bumped per
applied update, exactly as ``Gateway._on_view`` does. The build checks that the replica's masks and KV equal
the synthetic cluster's (``route_setup.real_view``).

Figures (each the median over ``repeats`` runs of ``calls`` timed calls after a warm-up):
- route_p50_us / route_p99_us: JOINT policy through the real view, ``route()`` plus reading the best and
  runner-up breakdowns (what the gateway puts on the routing span), history and candidates as int64
  arrays (EMB masks from ``ResidencyIndex.emb_masks_array``, its dense numpy mirror). Each decision is then
  dispatched and completed (untimed), 1 ms of simulated time apart, so the router's own in-flight counts
  and predictions evolve as in service.
- route_only_p50_us / route_only_p99_us: ``route()`` alone, real view.
- route_real_dict_path_*: the real view with ``emb_masks_array`` hidden, so the router asks
  ``emb_masks`` (one dict lookup per unique item): the gateway before the dense mirror.
- policies: p50/p99 of every policy through the real view (route() plus best and runner-up).
Secondary, over the bench-only ``SyntheticView`` (EMB masks in a numpy array over the catalogue):
- route_synthetic_p50_us / route_synthetic_p99_us: JOINT, as route_p50/p99_us.
- route_list_input_*: the same with history and candidates as Python lists (JSON as parsed).
- route_list_view_*: the same view without the optional ``emb_masks_array`` (the router hands
  ``emb_masks`` a list of ints; the view converts it back to an array).
- route_unversioned_view_*: the same view without ``version`` (per-worker arrays rebuilt every call).
- route_dict_view_*: a view that keeps EMB residency in a dict item -> mask and answers a list (one dict
  lookup per unique item: what a naive replica costs).
- policies_synthetic: p50/p99 of every policy over the synthetic view.
Timed with perf_counter_ns; the garbage collector stays on (as in the gateway). The machine is shared and
noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from services.gateway.core.router import Policy, Router, RouteRequest, RoutingView
from services.gateway.core.view_replica import ViewReplica
from services.gateway.service import ReplicaView
from shared import schemas as s
from shared.residency import DEFAULT_MAX_ENTRIES, ResidencyIndex, pack_updates
from shared.schemas import CostCoefficients, LoadInfo, WorkerState

WORKERS = 32
CATALOGUE = 1_000_000
EMB_PER_WORKER = 50_000
HEAD = 20_000
HEAD_REPLICATION = 0.75
USERS = 2_000
HISTORY = 512
CANDIDATES = 128
ITEM_ZIPF = 1.0
KV_ONE, KV_TWO = 0.60, 0.15
REQUESTS = 4096


class SyntheticView(RoutingView):
    """A routing view held in numpy: EMB masks indexed by item id (uint64, bit b = worker b)."""

    version: int | None = 1  # never bumped: the cluster is fixed

    def __init__(
        self,
        workers: list[WorkerState],
        masks: npt.NDArray[np.uint64],
        kv: dict[str, dict[str, int]],
    ) -> None:
        self._workers = workers
        self._bits = {w.worker_id: b for b, w in enumerate(workers)}
        self._masks = masks
        self._kv = kv

    def routable_workers(self) -> Sequence[WorkerState]:
        return self._workers

    def kv_workers(self, user_id: str) -> Mapping[str, int]:
        return self._kv.get(user_id, {})

    def worker_bit(self, worker_id: str) -> int | None:
        return self._bits.get(worker_id)

    def emb_masks(self, items: Sequence[int]) -> npt.NDArray[np.uint64]:
        return self._masks[np.asarray(items, dtype=np.int64)]

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        return self._masks[items]


class ListView(SyntheticView):
    """The same view without the optional ``emb_masks_array``: the router passes a list of ints."""

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        return None


class UnversionedView(SyntheticView):
    """The same view without a ``version``: the router rebuilds its per-worker arrays on every call."""

    version = None


class DictView(ListView):
    """The same view with EMB residency in a dict item -> mask (answers a list of Python ints)."""

    def __init__(
        self,
        workers: list[WorkerState],
        masks: npt.NDArray[np.uint64],
        kv: dict[str, dict[str, int]],
    ) -> None:
        super().__init__(workers, masks, kv)
        held = np.flatnonzero(masks)
        self._dict: dict[int, int] = dict(zip(held.tolist(), masks[held].tolist(), strict=True))

    def emb_masks(self, items: Sequence[int]) -> list[int]:  # type: ignore[override]
        get = self._dict.get
        return [get(i, 0) for i in items]


class DictPathReplicaView(ReplicaView):
    """The real view with ``emb_masks_array`` hidden: the router falls back to ``emb_masks`` (a list
    answered one dict lookup per item), as the gateway did before the dense mirror."""

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        return None


def build_real_view(
    workers: list[WorkerState],
    masks: npt.NDArray[np.uint64],
    kv: dict[str, dict[str, int]],
    view_cls: type[ReplicaView] = ReplicaView,
) -> tuple[ReplicaView, dict[str, Any]]:
    """The gateway's view of this cluster, built the way a gateway builds it: snapshot ViewUpdates
    (packed like cachestate's, through the wire codec) applied to a ViewReplica over a ResidencyIndex."""
    t0 = time.perf_counter()
    emb_added: dict[str, list[int]] = {}
    for b, w in enumerate(workers):
        emb_added[w.worker_id] = np.flatnonzero(masks & np.uint64(1 << b)).tolist()
    updates = pack_updates(
        kind="snapshot",
        source="bench-cachestate",
        first_seq=0,
        sent_at_ms=0.0,
        workers=workers,
        kv_upserts=[s.KvPlacement(u, w, n) for u, held in kv.items() for w, n in held.items()],
        emb_added=emb_added,
    )
    index = ResidencyIndex(max_entries=DEFAULT_MAX_ENTRIES)
    replica = ViewReplica(index)
    view = view_cls(replica, index)
    dec = s.decoder(s.ViewUpdate)
    wire_bytes = 0
    for update in updates:
        data = s.encode(update)
        wire_bytes += len(data)
        outcome = replica.apply(s.decode(dec, data))
        view.version += 1  # as Gateway._on_view: every update that changes worker records
        if outcome.need_snapshot:
            raise RuntimeError(f"bench view snapshot not applied: {outcome.reason}")
    build_s = time.perf_counter() - t0
    # the replica must hold exactly the synthetic cluster
    routable = [w.worker_id for w in view.routable_workers()]
    if not replica.in_sync or routable != [w.worker_id for w in workers]:
        raise RuntimeError("bench view: replica out of sync or workers differ")
    if [index.worker_bit(w.worker_id) for w in workers] != list(range(len(workers))):
        raise RuntimeError("bench view: worker bits differ from the synthetic view")
    all_items = np.arange(len(masks), dtype=np.int64)
    if not np.array_equal(index.emb_masks_array(all_items), masks):
        raise RuntimeError("bench view: EMB masks differ from the synthetic view")
    if any(dict(view.kv_workers(u)) != held for u, held in kv.items()):
        raise RuntimeError("bench view: KV placements differ from the synthetic view")
    if index.kv_evictions or index.emb_evictions:
        raise RuntimeError("bench view: the replica's cap evicted entries")
    info: dict[str, Any] = {
        "snapshot_parts": len(updates),
        "snapshot_wire_bytes": wire_bytes,
        "replica_entries": index.entries,
        "replica_max_entries": DEFAULT_MAX_ENTRIES,
        "dense_mask_items": len(index._dense),
        "build_s": round(build_s, 3),
        "verified_equal_to_synthetic": True,
    }
    return view, info


def _zipf_sampler(rng: np.random.Generator, n: int, a: float) -> npt.NDArray[np.float64]:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


def build_setup(
    seed: int = 7,
) -> tuple[
    list[WorkerState], npt.NDArray[np.uint64], dict[str, dict[str, int]], list[RouteRequest], dict[str, Any]
]:
    """Workers, EMB masks by item, KV residency by user, requests, and the setup's description."""
    rng = np.random.default_rng(seed)
    cdf = _zipf_sampler(rng, CATALOGUE, ITEM_ZIPF)
    # popularity rank -> item id (a fixed random permutation: popular items are not the small ids)
    perm = rng.permutation(CATALOGUE).astype(np.int64)
    masks = np.zeros(CATALOGUE, dtype=np.uint64)
    for b in range(WORKERS):
        head = np.flatnonzero(rng.random(HEAD) < HEAD_REPLICATION)
        tail_ranks = np.searchsorted(cdf, rng.random(8 * (EMB_PER_WORKER - len(head))))
        tail = np.unique(tail_ranks[tail_ranks >= HEAD])[: EMB_PER_WORKER - len(head)]
        held = perm[np.concatenate((head, tail))]
        masks[held] |= np.uint64(1 << b)
    workers = [
        WorkerState(
            worker_id=f"w{b:02d}",
            incarnation="i0",
            load=LoadInfo(
                in_flight=(inf := int(rng.integers(0, 9))),
                queue_depth=max(0, inf - 1),
                ewma_latency_ms=float(rng.uniform(5.0, 30.0)),
            ),
            alpha=0.5,
            cost=CostCoefficients(
                fixed_ms=1.0,
                ms_per_new_token=0.02,
                ms_per_cached_token=0.002,
                ms_per_candidate=0.01,
                ms_per_emb_miss=0.005,
                samples=1000,
            ),
        )
        for b in range(WORKERS)
    ]
    kv: dict[str, dict[str, int]] = {}
    for u in range(USERS):
        r = rng.random()
        k = 1 if r < KV_ONE else 2 if r < KV_ONE + KV_TWO else 0
        if k:
            ws = rng.choice(WORKERS, size=k, replace=False)
            kv[f"u{u}"] = {f"w{int(w):02d}": int(rng.integers(256, HISTORY + 1)) for w in ws}
    requests = [
        RouteRequest(
            user_id=f"u{int(rng.integers(0, USERS))}",
            history=perm[np.searchsorted(cdf, rng.random(HISTORY))],
            candidates=perm[np.searchsorted(cdf, rng.random(CANDIDATES))],
        )
        for _ in range(REQUESTS)
    ]
    held_per_worker = [int(np.count_nonzero(masks & np.uint64(1 << b))) for b in range(WORKERS)]
    setup: dict[str, Any] = {
        "workers": WORKERS,
        "catalogue_items": CATALOGUE,
        "emb_items_per_worker_mean": float(np.mean(held_per_worker)),
        "head_items": HEAD,
        "head_replication": HEAD_REPLICATION,
        "item_zipf": ITEM_ZIPF,
        "users": USERS,
        "users_kv_on_one_worker": KV_ONE,
        "users_kv_on_two_workers": KV_TWO,
        "history_len": HISTORY,
        "candidates": CANDIDATES,
        "unique_items_per_request_mean": float(
            np.mean([len(set(r.history) | set(r.candidates)) for r in requests[:256]])
        ),
        "synthetic": True,
    }
    return workers, masks, kv, requests, setup


def _time_calls(
    router: Router,
    view: RoutingView,
    requests: Sequence[RouteRequest],
    calls: int,
    *,
    read_top2: bool,
) -> tuple[float, float]:
    """Times route() as the gateway drives it: each decision is dispatched and completed (untimed), one
    millisecond of simulated time apart, so own in-flight counts and predictions evolve as in service."""
    n = len(requests)
    warm = min(2000, calls)
    samples = np.empty(calls, dtype=np.int64)
    clock = time.perf_counter_ns
    route = router.route
    for i in range(warm + calls):
        req = requests[i % n]
        now = i * 1e-3
        t0 = clock()
        d = route(view, req, now)
        if read_top2:
            d.best  # noqa: B018
            d.runner_up  # noqa: B018
        t1 = clock()
        if i >= warm:
            samples[i - warm] = t1 - t0
        wid = d.worker_ids[0]
        router.on_dispatch(wid, req, now)
        router.on_done(wid)
    p50, p99 = np.percentile(samples, [50, 99]) / 1e3
    return float(p50), float(p99)


def _median_runs(
    policy: Policy,
    view: RoutingView,
    requests: Sequence[RouteRequest],
    calls: int,
    repeats: int,
    *,
    read_top2: bool = True,
) -> tuple[float, float]:
    runs = [
        _time_calls(Router(policy, rng_seed=r), view, requests, calls, read_top2=read_top2)
        for r in range(repeats)
    ]
    return statistics.median(p[0] for p in runs), statistics.median(p[1] for p in runs)


def measure_route_latency(repeats: int, quick: bool) -> dict[str, Any]:
    """Routing decision latency figures (microseconds); see the module docstring."""
    repeats = max(1, repeats)
    calls = 3_000 if quick else 20_000
    workers, masks, kv, requests, setup = build_setup()
    real, real_info = build_real_view(workers, masks, kv)
    real_dict, _ = build_real_view(workers, masks, kv, DictPathReplicaView)
    view = SyntheticView(workers, masks, kv)
    gc.collect()
    out: dict[str, Any] = {}
    # headline: the gateway's real view
    p50, p99 = _median_runs(Policy.JOINT, real, requests, calls, repeats)
    out["route_p50_us"], out["route_p99_us"] = p50, p99
    p50, p99 = _median_runs(Policy.JOINT, real, requests, calls, repeats, read_top2=False)
    out["route_only_p50_us"], out["route_only_p99_us"] = p50, p99
    p50, p99 = _median_runs(Policy.JOINT, real_dict, requests, calls, repeats)
    out["route_real_dict_path_p50_us"], out["route_real_dict_path_p99_us"] = p50, p99
    policies: dict[str, dict[str, float]] = {}
    for policy in Policy:
        p50, p99 = _median_runs(policy, real, requests, calls, repeats)
        policies[policy.value] = {"p50_us": p50, "p99_us": p99}
    out["policies"] = policies
    del real_dict
    # secondary: the bench-only synthetic view
    p50, p99 = _median_runs(Policy.JOINT, view, requests, calls, repeats)
    out["route_synthetic_p50_us"], out["route_synthetic_p99_us"] = p50, p99
    as_lists = [
        RouteRequest(r.user_id, np.asarray(r.history).tolist(), np.asarray(r.candidates).tolist())
        for r in requests
    ]
    p50, p99 = _median_runs(Policy.JOINT, view, as_lists, calls, repeats)
    out["route_list_input_p50_us"], out["route_list_input_p99_us"] = p50, p99
    lview = ListView(workers, masks, kv)
    p50, p99 = _median_runs(Policy.JOINT, lview, requests, calls, repeats)
    out["route_list_view_p50_us"], out["route_list_view_p99_us"] = p50, p99
    uview = UnversionedView(workers, masks, kv)
    p50, p99 = _median_runs(Policy.JOINT, uview, requests, calls, repeats)
    out["route_unversioned_view_p50_us"], out["route_unversioned_view_p99_us"] = p50, p99
    dview = DictView(workers, masks, kv)
    p50, p99 = _median_runs(Policy.JOINT, dview, requests, calls, repeats)
    out["route_dict_view_p50_us"], out["route_dict_view_p99_us"] = p50, p99
    synthetic: dict[str, dict[str, float]] = {}
    for policy in Policy:
        p50, p99 = _median_runs(policy, view, requests, calls, repeats)
        synthetic[policy.value] = {"p50_us": p50, "p99_us": p99}
    out["policies_synthetic"] = synthetic
    out["route_setup"] = {
        **setup,
        "view": "real: ResidencyIndex + ViewReplica + ReplicaView from snapshot ViewUpdates",
        "real_view": real_info,
        "timed_calls": calls,
        "repeats": repeats,
        "quick": quick,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    return out


def _summary(r: Mapping[str, Any]) -> str:
    lines = [
        f"route through the real gateway view (joint, 32 workers, {HISTORY}-item history, {CANDIDATES} "
        f"candidates): p50 {r['route_p50_us']:.1f} us, p99 {r['route_p99_us']:.1f} us "
        f"(route() alone: p50 {r['route_only_p50_us']:.1f}, p99 {r['route_only_p99_us']:.1f}; "
        f"dict path, emb_masks_array hidden: p50 {r['route_real_dict_path_p50_us']:.1f}, "
        f"p99 {r['route_real_dict_path_p99_us']:.1f})",
    ]
    for name, f in r["policies"].items():
        lines.append(f"  {name:>13}: p50 {f['p50_us']:.1f} us, p99 {f['p99_us']:.1f} us")
    lines += [
        f"synthetic view (joint): p50 {r['route_synthetic_p50_us']:.1f} us, "
        f"p99 {r['route_synthetic_p99_us']:.1f} us",
        f"  list input: p50 {r['route_list_input_p50_us']:.1f}, p99 {r['route_list_input_p99_us']:.1f}; "
        f"view without emb_masks_array: p50 {r['route_list_view_p50_us']:.1f}, "
        f"p99 {r['route_list_view_p99_us']:.1f}; "
        f"dict-backed view: p50 {r['route_dict_view_p50_us']:.1f}, p99 {r['route_dict_view_p99_us']:.1f}; "
        f"view without version: p50 {r['route_unversioned_view_p50_us']:.1f}, "
        f"p99 {r['route_unversioned_view_p99_us']:.1f}",
    ]
    for name, f in r["policies_synthetic"].items():
        lines.append(f"  {name:>13}: p50 {f['p50_us']:.1f} us, p99 {f['p99_us']:.1f} us")
    return "\n".join(lines)


def main_quick() -> None:
    """Print the figures of a quick run (manual use: ``python -m bench.routing``)."""
    r = measure_route_latency(repeats=1, quick=True)
    print(_summary(r))
    print(json.dumps(r["route_setup"], indent=None))


if __name__ == "__main__":
    main_quick()
