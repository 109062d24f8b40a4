"""DigestTracker: sequence/incarnation rules, snapshots in parts, liveness, view changes."""

from __future__ import annotations

from typing import Any

import pytest

from services.cachestate.core.changes import ViewChanges
from services.cachestate.core.tracker import DigestTracker
from shared import schemas as s
from shared.residency import ResidencyIndex


def digest(
    seq: int, kind: str = "delta", *, wid: str = "w0", inc: str = "i1", **fields: Any
) -> s.WorkerDigest:
    fields.setdefault("period_ms", 100.0)
    return s.WorkerDigest(worker_id=wid, incarnation=inc, seq=seq, kind=kind, sent_at_ms=0.0, **fields)  # type: ignore[arg-type]


def kv(*pairs: tuple[str, int]) -> list[s.KvEntry]:
    return [s.KvEntry(u, n) for u, n in pairs]


UNVERIFIED = "unverified: needs a snapshot request answered"


def synced(tracker: DigestTracker, **fields: Any) -> None:
    """A worker joins with a snapshot (seq 0) and answers the snapshot request that verifies it."""
    out = tracker.apply(digest(0, "snapshot", **fields), now=1.0)
    assert out.accepted and out.need_snapshot and out.reason.endswith(UNVERIFIED)
    tracker.verify("w0", "i1", 0, now=1.0)
    assert tracker.is_verified("w0") and not tracker.needs_snapshot("w0")


def test_join_snapshot_then_deltas() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    out = t.apply(digest(0, "snapshot", kv_upserts=kv(("a", 3)), emb_added=[1, 2]), now=1.0)
    assert (out.accepted, out.need_snapshot) == (True, True)
    assert out.reason == f"new worker; snapshot kept until verified; {UNVERIFIED}"
    # A digest is a claim: nothing of it reaches the view or the index until the worker's subject answers.
    assert out.changes.empty and t.worker_states() == [] and idx.sizes() == (0, 0, 0, 0)
    assert not out.live and t.unverified() == ["w0"]
    changes = t.verify("w0", "i1", 0, now=1.0)
    assert list(changes.workers) == ["w0"] and [w.worker_id for w in t.worker_states()] == ["w0"]
    assert changes.kv == {("a", "w0"): 3} and changes.emb == {"w0": {1: True, 2: True}}  # the kept snapshot
    assert t.counters.verified == 1 and t.unverified() == [] and not t.needs_snapshot("w0")
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
    assert out.reason == f"new worker; delta residency dropped: out of sync; {UNVERIFIED}"
    assert idx.kv_workers("a") == {}
    assert t.needs_snapshot("w0") and t.is_live("w0")
    # Once verified, alive and routable by load while its residency is unknown.
    changes = t.verify("w0", "i1", 8, now=1.05)
    assert changes.workers["w0"].load.in_flight == 2 and changes.kv == {}
    out = t.apply(digest(8), now=1.1)
    assert out.need_snapshot and out.reason.endswith("; needs a snapshot")  # level-triggered
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
    assert out.reason.startswith("new incarnation claimed")
    # a claim: the verified i1 keeps its place and its residency until w0's own subject answers
    assert idx.kv_workers("a") == {"w0": 3} and out.changes.empty and t.unverified() == ["w0"]
    assert [w.incarnation for w in t.worker_states()] == ["i1"]
    changes = t.verify("w0", "i2", 1, now=2.0)  # i2 answers: the restart is real
    assert changes.removed == {"w0"} and changes.workers["w0"].incarnation == "i2"
    assert idx.kv_workers("a") == {} and t.counters.new_incarnations == 1
    late = t.apply(digest(5, inc="i1", kv_upserts=kv(("z", 1))), now=2.1)  # from the dead process
    assert (late.accepted, late.need_snapshot, late.live) == (False, False, False)
    assert late.reason == "digest of a retired incarnation" and idx.kv_workers("z") == {}
    out = t.apply(digest(1, "snapshot", inc="i2", kv_upserts=kv(("b", 1))), now=2.2)
    assert out.accepted and idx.kv_workers("b") == {"w0": 1}


def test_new_incarnation_starting_with_a_snapshot_needs_only_to_be_verified() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3)))
    out = t.apply(digest(0, "snapshot", inc="i2", kv_upserts=kv(("b", 1))), now=2.0)
    assert (out.accepted, out.need_snapshot) == (True, True)
    assert out.reason.startswith("new incarnation claimed (a candidate until its own subject answers); ")
    assert out.reason.endswith(f"; snapshot kept until verified; {UNVERIFIED}")
    changes = t.verify("w0", "i2", 0, now=2.0)
    assert not t.needs_snapshot("w0") and t.counters.verified == 2
    assert idx.worker_kv("w0") == {"b": 1}
    assert changes.removed == {"w0"} and changes.kv == {("b", "w0"): 1}  # i1's residency goes whole


def test_multi_part_snapshot_applies_when_complete() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    out = t.apply(digest(0, "snapshot", part=0, parts=3, kv_upserts=kv(("a", 1)), emb_added=[1]), now=1.0)
    assert (out.accepted, out.need_snapshot, out.reason) == (
        True,
        True,
        f"new worker; snapshot part collected; {UNVERIFIED}",
    )
    t.verify("w0", "i1", 0, now=1.0)
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
    assert out.reason == f"seq gap: expected 1, got 2; snapshot residency dropped: out of sync; {UNVERIFIED}"
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
    t.verify("w0", "i1", 0, now=10.0)
    t.verify("w1", "i1", 0, now=10.0)
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
    assert t.live_workers() == [] and t.worker_states() == []  # not before it is verified
    t.verify("w0", "i1", 0, now=5.0)
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


def test_a_forged_restart_costs_the_real_worker_nothing() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3)))
    # Someone claims a new incarnation of w0 ...
    out = t.apply(digest(0, "snapshot", inc="forged"), now=2.0)
    assert out.need_snapshot and out.changes.empty and t.needs_snapshot("w0")
    # ... while the real i1 goes on, in the view, its deltas applied
    out = t.apply(digest(1, kv_upserts=kv(("b", 1))), now=2.05)
    assert out.accepted and list(out.changes.workers) == ["w0"] and idx.kv_workers("b") == {"w0": 1}
    # w0's own subject answers: i1. The claim is retired; nothing of i1 was lost.
    changes = t.verify("w0", "i1", 2, now=2.1)
    assert t.counters.incarnations_rejected == 1 and changes.removed == set()
    assert idx.worker_kv("w0") == {"a": 3, "b": 1} and not t.needs_snapshot("w0")
    assert t.apply(digest(1, inc="forged"), now=2.3).reason == "digest of a retired incarnation"
    assert [w.incarnation for w in t.worker_states()] == ["i1"]


def test_an_ack_naming_an_unseen_incarnation_replaces_the_record() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3)))
    # w0 restarted as i3, whose digests have not arrived; its ack does, with its snapshot's first seq 4.
    changes = t.verify("w0", "i3", 4, now=2.1)
    assert t.counters.incarnations_corrected == 1 and changes.removed == {"w0"} and idx.kv_workers("a") == {}
    assert t.needs_snapshot("w0") and t.worker_states() == []  # listed again with its first digest
    out = t.apply(digest(4, "snapshot", inc="i3", kv_upserts=kv(("c", 2))), now=2.2)
    assert (out.accepted, out.need_snapshot) == (True, False) and idx.kv_workers("c") == {"w0": 2}
    assert [w.incarnation for w in t.worker_states()] == ["i3"]
    assert t.apply(digest(9, inc="i1"), now=2.3).reason == "digest of a retired incarnation"
    # an ack for a worker that has expired meanwhile changes nothing
    assert t.verify("gone", "x", 0, now=3.0).empty


def test_a_candidate_takes_the_place_of_a_dead_worker_still_unverified() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx, dead_after_periods=3.0)
    synced(t, kv_upserts=kv(("a", 3)))  # period 100 ms, heard at 1.0
    t.apply(digest(0, "snapshot", inc="i2", kv_upserts=kv(("b", 1))), now=1.25)  # a candidate i2
    assert t.expire(1.31) == ["w0"]  # i1 silent for 3 periods: fenced and purged
    assert idx.kv_workers("a") == {} and t.worker_states() == [] and t.unverified() == ["w0"]
    t.verify("w0", "i2", 0, now=1.4)  # i2 answers: its kept snapshot is installed
    assert idx.worker_kv("w0") == {"b": 1} and [w.incarnation for w in t.worker_states()] == ["i2"]
    # and a silent candidate beside a live worker simply goes
    t.apply(digest(1, "delta", inc="i2"), now=1.5)
    t.apply(digest(0, "snapshot", inc="i4"), now=1.5)
    t.apply(digest(2, "delta", inc="i2"), now=1.9)
    assert t.expire(1.95) == [] and t.unverified() == [] and not t.needs_snapshot("w0")


def test_a_seq_far_off_either_way_restarts_the_numbering() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3)))
    out = t.apply(digest(2**63 - 1), now=1.1)  # far ahead: a restart, not a gap
    assert out.need_snapshot and out.reason.startswith("seq restart: expected 1, got 9223372036854775807")
    assert (t.counters.seq_restarts, t.counters.gaps) == (1, 0) and idx.kv_workers("a") == {}
    # the genuine numbering resumes: far behind is a restart too, never "old, ignored"
    out = t.apply(digest(1, "snapshot", kv_upserts=kv(("a", 3))), now=1.2)
    assert (out.accepted, out.need_snapshot) == (True, False) and t.counters.seq_restarts == 2
    assert t.counters.digests_ignored == 0 and idx.kv_workers("a") == {"w0": 3}
    # just behind is a duplicate; a small jump ahead a gap
    assert t.apply(digest(1), now=1.3).reason == "old seq 1 < 2"
    assert t.apply(digest(5), now=1.4).reason.startswith("seq gap: expected 2, got 5")


def test_a_claimed_period_is_believed_only_within_bounds() -> None:
    t = DigestTracker(ResidencyIndex(), dead_after_periods=3.0, max_period_s=2.0)
    t.apply(digest(0, "snapshot", period_ms=1e9), now=10.0)  # "I speak every 11 days"
    t.verify("w0", "i1", 0, now=10.0)
    assert t.counters.periods_clamped == 1
    assert t.expire(16.0) == [] and t.expire(16.01) == ["w0"]  # 3 x 2 s, not 3 x 11 days
    t.apply(digest(0, "snapshot", wid="w1", period_ms=0.0), now=20.0)  # and 0 is the minimum, 10 ms
    assert t.counters.periods_clamped == 2 and t.expire(20.031) == ["w1"]


def test_refresh_forgives_the_observers_own_silence() -> None:
    t = DigestTracker(ResidencyIndex(), dead_after_periods=3.0)
    synced(t)  # period 100 ms, heard at t=1.0
    t.refresh(5.0)  # the observer was cut off until now (plus its grace)
    assert t.expire(5.3) == []
    assert t.staleness(5.3) == {"w0": pytest.approx(4.3)}  # when it was really heard from
    assert t.expire(5.31) == ["w0"]


def test_a_kept_snapshot_is_installed_only_if_nothing_came_after_it() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    t.apply(digest(0, "snapshot", kv_upserts=kv(("a", 4))), now=1.0)
    t.apply(digest(1, kv_upserts=kv(("b", 2))), now=1.05)  # dropped: the worker is not verified yet
    t.verify("w0", "i1", 0, now=1.1)
    # the kept snapshot lacks b: not installed; the worker stays out of sync and is asked again
    assert idx.kv_workers("a") == {} and t.needs_snapshot("w0") and t.is_verified("w0")
    out = t.apply(digest(2, "snapshot", kv_upserts=kv(("a", 4), ("b", 2))), now=1.2)
    assert (out.accepted, out.need_snapshot) == (True, False) and idx.worker_kv("w0") == {"a": 4, "b": 2}


def test_an_abandoned_snapshot_drops_the_kept_one_too() -> None:
    t = DigestTracker(ResidencyIndex())
    t.apply(digest(0, "snapshot", kv_upserts=kv(("a", 4))), now=1.0)  # kept
    t.apply(digest(1, "snapshot", part=0, parts=2), now=1.05)  # a newer one begins ...
    t.apply(digest(3, "snapshot", part=1, parts=2), now=1.1)  # ... and loses a part: out of sync
    t.verify("w0", "i1", 1, now=1.2)
    assert t.index.kv_workers("a") == {} and t.needs_snapshot("w0")


def test_a_forged_seq_just_ahead_does_not_silence_the_worker() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx, dead_after_periods=3.0)
    synced(t, kv_upserts=kv(("a", 3)))  # next seq 1
    out = t.apply(digest(13), now=1.05)  # forged: 12 ahead, within the gap window
    assert out.reason.startswith("seq gap") and t.counters.gaps == 1
    # the genuine numbering goes on at 1: inside the gap the forgery opened, so a restart, never "old"
    for i, seq in enumerate(range(1, 6)):
        out = t.apply(digest(seq), now=1.1 + 0.1 * i)
        assert out.live and out.reason != f"old seq {seq} < 14"
    assert t.counters.digests_ignored == 0 and t.counters.seq_restarts == 1
    assert t.expire(1.6) == []  # heard from all along: not fenced
    # a replay just behind the genuine numbering is still a duplicate
    assert t.apply(digest(4), now=1.7).reason == "old seq 4 < 6"


def test_cap_evictions_of_embeddings_are_forwarded_as_removals() -> None:
    idx = ResidencyIndex(max_entries=2, track_evictions=True)
    t = DigestTracker(idx)
    synced(t, emb_added=[1, 2])
    out = t.apply(digest(1, emb_added=[3]), now=1.1)
    # the gateways learn that item 1 left w0, not only that 3 arrived
    assert out.changes.emb == {"w0": {3: True, 1: False}}
    assert idx.emb_evictions == 1 and idx.worker_emb("w0") == [2, 3]


def test_a_later_snapshot_forwards_what_it_removed() -> None:
    idx = ResidencyIndex()
    t = DigestTracker(idx)
    synced(t, kv_upserts=kv(("a", 3), ("b", 2)), emb_added=[1, 2])
    out = t.apply(digest(1, "snapshot", kv_upserts=kv(("a", 4), ("c", 1)), emb_added=[2, 5]), now=1.1)
    assert (out.accepted, out.reason) == (True, "snapshot applied")
    # b and item 1 are gone from w0: the gateways must drop them too, or they keep routing to stale affinity
    assert out.changes.kv == {("b", "w0"): None, ("a", "w0"): 4, ("c", "w0"): 1}
    assert out.changes.emb == {"w0": {1: False, 5: True}}
    assert out.changes.removed == set()
    assert idx.worker_kv("w0") == {"a": 4, "c": 1} and idx.worker_emb("w0") == [2, 5]
