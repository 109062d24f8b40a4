"""DigestTracker: sequence/incarnation rules, snapshots in parts, liveness, view changes."""

from __future__ import annotations

from typing import Any

from services.cachestate.core.changes import ViewChanges
from services.cachestate.core.residency import ResidencyIndex
from services.cachestate.core.tracker import DigestTracker
from shared import schemas as s


def digest(
    seq: int, kind: str = "delta", *, wid: str = "w0", inc: str = "i1", **fields: Any
) -> s.WorkerDigest:
    fields.setdefault("period_ms", 100.0)
    return s.WorkerDigest(worker_id=wid, incarnation=inc, seq=seq, kind=kind, sent_at_ms=0.0, **fields)  # type: ignore[arg-type]


def kv(*pairs: tuple[str, int]) -> list[s.KvEntry]:
    return [s.KvEntry(u, n) for u, n in pairs]


def synced(tracker: DigestTracker, **fields: Any) -> None:
    out = tracker.apply(digest(0, "snapshot", **fields), now=1.0)
    assert out.accepted and not out.need_snapshot


def test_join_snapshot_then_deltas() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    out = t.apply(digest(0, "snapshot", kv_upserts=kv(("a", 3)), emb_added=[1, 2]), now=1.0)
    assert (out.accepted, out.need_snapshot, out.reason) == (True, False, "new worker; snapshot applied")
    assert out.changes.kv == {("a", "w0"): 3}
    assert out.changes.emb == {"w0": {1: True, 2: True}}
    assert list(out.changes.workers) == ["w0"] and out.changes.removed == set()
    out = t.apply(
        digest(1, kv_upserts=kv(("a", 5), ("b", 2)), kv_removed=[], emb_added=[3], emb_removed=[1]), 1.1
    )
    assert (out.accepted, out.need_snapshot, out.reason) == (True, False, "delta applied")
    assert out.changes.kv == {("a", "w0"): 5, ("b", "w0"): 2}
    assert out.changes.emb == {"w0": {1: False, 3: True}}
    out = t.apply(digest(2, kv_removed=["b", "nobody"]), 1.2)
    assert out.changes.kv == {("b", "w0"): None}
    assert idx.kv_workers("a") == {"w0": 5} and idx.kv_workers("b") == {}
    assert idx.emb_masks([1, 2, 3]) == [0, 1, 1]
    assert t.counters.digests_applied == 3 and t.counters.snapshots_applied == 1


def test_first_delta_of_an_unknown_worker_is_dropped_and_needs_a_snapshot() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    out = t.apply(digest(7, kv_upserts=kv(("a", 3)), load=s.LoadInfo(in_flight=2)), now=1.0)
    assert (out.accepted, out.need_snapshot) == (False, True)
    assert out.reason == "new worker; delta residency dropped: out of sync; needs a snapshot"
    assert idx.kv_workers("a") == {}
    # Alive and routable by load meanwhile.
    assert out.changes.workers["w0"].load.in_flight == 2 and out.changes.kv == {}
    assert t.needs_snapshot("w0") and t.is_live("w0")
    out = t.apply(digest(8), now=1.1)
    assert out.need_snapshot  # level-triggered until a snapshot arrives
    out = t.apply(digest(9, "snapshot", kv_upserts=kv(("a", 4))), now=1.2)
    assert (out.accepted, out.need_snapshot, out.reason) == (True, False, "snapshot applied")
    assert idx.kv_workers("a") == {"w0": 4} and not t.needs_snapshot("w0")


def test_seq_gap_drops_residency_at_once_and_needs_a_snapshot() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3)), emb_added=[1])
    out = t.apply(digest(2, kv_upserts=kv(("b", 1))), now=1.1)  # seq 1 lost
    assert (out.accepted, out.need_snapshot) == (False, True)
    assert out.reason == "seq gap: expected 1, got 2; delta residency dropped: out of sync; needs a snapshot"
    assert t.counters.gaps == 1
    assert idx.kv_workers("a") == {} and idx.kv_workers("b") == {} and idx.emb_masks([1]) == [0]
    # Gateways drop the residency too, and keep the worker (routed by load).
    assert out.changes.removed == {"w0"} and list(out.changes.workers) == ["w0"] and out.changes.kv == {}
    out = t.apply(digest(3, "snapshot", kv_upserts=kv(("b", 1))), now=1.2)
    assert (out.accepted, out.need_snapshot) == (True, False)
    assert idx.kv_workers("b") == {"w0": 1}
    assert t.counters.repairs == 1


def test_old_seq_is_ignored() -> None:
    t = DigestTracker(ResidencyIndex())
    synced(t)
    t.apply(digest(1), now=1.1)
    out = t.apply(digest(1, kv_upserts=kv(("x", 1))), now=1.2)
    assert (out.accepted, out.need_snapshot, out.live) == (False, False, False)
    assert out.reason == "old seq 1 < 2" and out.changes.empty
    assert t.counters.digests_ignored == 1


def test_new_incarnation_resyncs_and_old_one_is_ignored_afterwards() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3)))
    out = t.apply(digest(0, inc="i2", kv_upserts=kv(("b", 1))), now=2.0)
    assert (out.accepted, out.need_snapshot) == (False, True)
    assert out.reason.startswith("new incarnation;")
    assert idx.kv_workers("a") == {} and out.changes.removed == {"w0"}
    assert out.changes.workers["w0"].incarnation == "i2"
    assert t.counters.new_incarnations == 1
    late = t.apply(digest(5, inc="i1", kv_upserts=kv(("z", 1))), now=2.1)  # from the dead process
    assert (late.accepted, late.need_snapshot, late.live) == (False, False, False)
    assert late.reason == "digest of a retired incarnation" and idx.kv_workers("z") == {}
    out = t.apply(digest(1, "snapshot", inc="i2", kv_upserts=kv(("b", 1))), now=2.2)
    assert out.accepted and idx.kv_workers("b") == {"w0": 1}


def test_new_incarnation_starting_with_a_snapshot_needs_nothing_more() -> None:
    t = DigestTracker(ResidencyIndex())
    synced(t)
    out = t.apply(digest(0, "snapshot", inc="i2"), now=2.0)
    assert (out.accepted, out.need_snapshot, out.reason) == (True, False, "new incarnation; snapshot applied")


def test_multi_part_snapshot_applies_when_complete() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    out = t.apply(digest(0, "snapshot", part=0, parts=3, kv_upserts=kv(("a", 1)), emb_added=[1]), now=1.0)
    assert (out.accepted, out.need_snapshot, out.reason) == (
        True,
        False,
        "new worker; snapshot part collected",
    )
    assert idx.kv_workers("a") == {}  # not before it is complete
    assert t.snapshot_parts_received("w0") == 1
    t.apply(digest(1, "snapshot", part=1, parts=3, kv_upserts=kv(("b", 2))), now=1.0)
    assert idx.kv_workers("b") == {}
    assert t.snapshot_parts_received("w0") == 2
    out = t.apply(digest(2, "snapshot", part=2, parts=3, emb_added=[5]), now=1.0)
    assert (out.accepted, out.need_snapshot, out.reason) == (True, False, "snapshot applied")
    assert t.snapshot_parts_received("w0") is None  # nothing being assembled any more
    assert t.snapshot_parts_received("nobody") is None
    assert idx.worker_kv("w0") == {"a": 1, "b": 2} and idx.worker_emb("w0") == [1, 5]
    assert out.changes.kv == {("a", "w0"): 1, ("b", "w0"): 2}
    assert out.changes.emb == {"w0": {1: True, 5: True}}


def test_a_missing_snapshot_part_needs_another_snapshot() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    t.apply(digest(0, "snapshot", part=0, parts=3, kv_upserts=kv(("a", 1))), now=1.0)
    out = t.apply(digest(2, "snapshot", part=2, parts=3), now=1.0)  # part 1 lost
    assert (out.accepted, out.need_snapshot) == (False, True)
    assert (
        out.reason == "seq gap: expected 1, got 2; snapshot residency dropped: out of sync; needs a snapshot"
    )
    assert idx.kv_workers("a") == {}
    # A snapshot of a synced worker replaces its residency; a lost part abandons it and desyncs.
    t2 = DigestTracker(ResidencyIndex())
    synced(t2, kv_upserts=kv(("a", 1)))
    t2.apply(digest(1, "snapshot", part=0, parts=2, kv_upserts=kv(("a", 1))), now=1.1)
    assert not t2.needs_snapshot("w0")  # still in sync while it is collected
    out = t2.apply(digest(2), now=1.2)  # a delta where part 1 should be
    assert out.need_snapshot and t2.counters.snapshots_abandoned == 1
    assert t2.index.kv_workers("a") == {}


def test_draining_flag_reaches_the_worker_record() -> None:
    t = DigestTracker(ResidencyIndex())
    synced(t)
    out = t.apply(digest(1, draining=True), now=1.1)
    assert out.changes.workers["w0"].draining is True
    assert [w.draining for w in t.live_workers()] == [True]


def test_expiry_fences_and_purges_silent_workers() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx, dead_after_periods=3.0)
    t.apply(
        digest(0, "snapshot", wid="w0", period_ms=125.0, kv_upserts=kv(("a", 1)), emb_added=[1]), now=10.0
    )
    t.apply(digest(0, "snapshot", wid="w1", period_ms=1000.0, emb_added=[1]), now=10.0)
    assert t.expire(10.375) == []  # exactly 3 periods: not yet
    assert t.expire(10.376) == ["w0"]
    assert not t.is_live("w0") and t.counters.workers_dead == 1
    assert idx.kv_workers("a") == {} and idx.emb_masks([1]) == [0b10] and idx.worker_bit("w0") is None
    assert [w.worker_id for w in t.live_workers()] == ["w1"]
    assert t.expire(12.0) == []
    assert t.expire(13.01) == ["w1"]
    assert idx.sizes() == (0, 0, 0, 0)
    # A fenced worker that speaks again is a new worker: it needs a snapshot.
    out = t.apply(digest(5, wid="w0"), now=14.0)
    assert out.need_snapshot and out.reason.startswith("new worker")


def test_live_worker_records() -> None:
    t = DigestTracker(ResidencyIndex())
    cost = s.CostCoefficients(ms_per_new_token=0.5, samples=3)
    window = s.WindowStats(requests=4)
    t.apply(digest(0, "snapshot", alpha=0.3, alpha_target=0.4, cost=cost, window=window), now=5.0)
    (w,) = t.live_workers()
    assert (w.worker_id, w.incarnation, w.in_sync, w.alpha, w.alpha_target) == ("w0", "i1", True, 0.3, 0.4)
    assert (w.cost, w.window, w.period_s, w.last_seen) == (cost, window, 0.1, 5.0)
    (state,) = t.worker_states()
    assert state.last_seen_ms == 5000.0 and state.cost == cost
    assert t.staleness(5.25) == {"w0": 0.25}


def test_cap_evictions_are_forwarded_as_removals() -> None:
    idx = ResidencyIndex(max_entries=2, track_evictions=True)
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 1), ("b", 1)))
    out = t.apply(digest(1, kv_upserts=kv(("c", 1))), now=1.1)
    assert out.changes.kv == {("c", "w0"): 1, ("a", "w0"): None}
    assert idx.kv_evictions == 1


def test_view_changes_stay_canonical() -> None:
    c = ViewChanges()
    c.kv_upsert("a", "w0", 1)
    c.kv_upsert("b", "w1", 1)
    c.emb_add("w0", [1, 2])
    later = ViewChanges()
    later.remove_worker("w0")
    later.kv_upsert("a", "w0", 7)
    later.emb_remove("w1", [3])
    c.merge(later)
    assert c.removed == {"w0"}
    assert c.kv == {("b", "w1"): 1, ("a", "w0"): 7}
    assert c.emb == {"w1": {3: False}}
