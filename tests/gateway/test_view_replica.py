"""ViewReplica (the gateway's copy of the view) against the updates cachestate's core produces, and the
ReplicaView the router reads over it."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from services.cachestate.core.changes import ViewChanges
from services.gateway.core.view_replica import ViewReplica
from services.gateway.service import ReplicaView
from shared import schemas as s
from shared.residency import ResidencyIndex, pack_updates


def ws(wid: str, **fields: Any) -> s.WorkerState:
    return s.WorkerState(worker_id=wid, incarnation="i", **fields)


def snapshot(
    seq: int, *, source: str = "cs1", part_bytes: int = 256 * 1024, **fields: Any
) -> list[s.ViewUpdate]:
    fields.setdefault("workers", [ws("w0"), ws("w1")])
    return pack_updates(
        kind="snapshot", source=source, first_seq=seq, sent_at_ms=0.0, part_bytes=part_bytes, **fields
    )


def delta(seq: int, changes: ViewChanges, source: str = "cs1") -> s.ViewUpdate:
    (update,) = changes.to_updates(source=source, first_seq=seq, sent_at_ms=0.0)
    return update


def fresh_synced() -> ViewReplica:
    r = ViewReplica(ResidencyIndex())
    (u,) = snapshot(0, kv_upserts=[s.KvPlacement("a", "w0", 3)], emb_added={"w0": [1, 2], "w1": [2]})
    out = r.apply(u)
    assert (out.need_snapshot, out.reason) == (False, "snapshot applied")
    return r


def test_snapshot_then_deltas() -> None:
    r = fresh_synced()
    assert r.ready and r.in_sync and (r.source, r.seq) == ("cs1", 0)
    assert r.index.kv_workers("a") == {"w0": 3}
    b0, b1 = r.index.worker_bit("w0"), r.index.worker_bit("w1")
    assert b0 is not None and b1 is not None
    assert r.index.emb_masks([1, 2, 3]) == [1 << b0, (1 << b0) | (1 << b1), 0]
    c = ViewChanges()
    c.kv_upsert("b", "w1", 4)
    c.kv_remove("a", "w0")
    c.emb_add("w1", [3])
    c.emb_remove("w0", [1])
    c.upsert_worker(ws("w1", draining=True))
    out = r.apply(delta(1, c))
    assert (out.need_snapshot, out.reason) == (False, "delta applied")
    assert r.index.kv_workers("a") == {} and r.index.kv_workers("b") == {"w1": 4}
    assert r.index.emb_masks([1, 3]) == [0, 1 << b1]
    assert r.workers["w1"].draining and r.ready  # w0 still takes requests


def test_worker_removal_drops_its_residency_and_a_readd_comes_after() -> None:
    r = fresh_synced()
    c = ViewChanges()
    c.remove_worker("w0")
    c.upsert_worker(ws("w0"))
    c.kv_upsert("z", "w0", 1)
    r.apply(delta(1, c))
    assert set(r.workers) == {"w0", "w1"}
    assert r.index.kv_workers("a") == {} and r.index.kv_workers("z") == {"w0": 1}
    assert r.index.emb_count("w0") == 0
    c = ViewChanges()
    c.remove_worker("w1")
    r.apply(delta(2, c))
    assert set(r.workers) == {"w0"} and r.index.worker_bit("w1") is None


def test_a_fresh_replica_needs_a_snapshot_and_ignores_deltas() -> None:
    r = ViewReplica(ResidencyIndex())
    assert (r.ready, r.in_sync) == (False, False)
    c = ViewChanges()
    c.upsert_worker(ws("w0"))
    out = r.apply(delta(5, c))
    assert (out.need_snapshot, out.reason) == (True, "new source")
    assert (r.workers, r.ready) == ({}, False)
    out = r.apply(delta(6, c))
    assert (out.need_snapshot, out.reason) == (True, "out of sync: delta ignored")
    parts = snapshot(7, workers=[ws("w0")])
    assert r.apply(parts[0]).reason == "snapshot applied"
    assert r.ready and set(r.workers) == {"w0"}


def test_seq_gap_needs_a_snapshot_and_keeps_the_last_view_meanwhile() -> None:
    r = fresh_synced()
    c = ViewChanges()
    c.kv_upsert("b", "w0", 1)
    out = r.apply(delta(2, c))  # seq 1 lost
    assert (out.need_snapshot, out.reason) == (True, "seq gap: expected 1, got 2")
    assert not r.in_sync and r.ready
    assert r.index.kv_workers("b") == {} and r.index.kv_workers("a") == {"w0": 3}
    (u,) = snapshot(3, kv_upserts=[s.KvPlacement("b", "w0", 1)])
    assert r.apply(u).reason == "snapshot applied"
    assert r.index.kv_workers("a") == {} and r.index.kv_workers("b") == {"w0": 1}
    assert r.resyncs_needed == 1


def test_duplicates_are_ignored() -> None:
    r = fresh_synced()
    (u,) = snapshot(0)
    out = r.apply(u)
    assert (out.need_snapshot, out.reason) == (False, "duplicate seq 0 <= 0")


def test_new_source_resyncs_from_its_snapshot() -> None:
    r = fresh_synced()
    c = ViewChanges()
    c.upsert_worker(ws("w9"))
    out = r.apply(delta(0, c, source="cs2"))
    assert (out.need_snapshot, out.reason) == (True, "new source")
    assert "w9" not in r.workers
    (u,) = snapshot(1, source="cs2", workers=[ws("w9")])
    assert r.apply(u).reason == "snapshot applied"
    assert set(r.workers) == {"w9"} and r.index.kv_workers("a") == {} and r.source == "cs2"


def test_multi_part_snapshot_and_a_missing_part() -> None:
    kv = [s.KvPlacement(f"user-{i}", "w0", i) for i in range(50)]
    parts = snapshot(10, source="cs2", part_bytes=1400, kv_upserts=kv, emb_added={"w1": list(range(100))})
    assert len(parts) > 3 and [p.seq for p in parts] == list(range(10, 10 + len(parts)))
    r = ViewReplica(ResidencyIndex())
    for p in parts[:-1]:
        out = r.apply(p)
        assert not out.need_snapshot and not r.in_sync
    assert r.apply(parts[-1]).reason == "snapshot applied"
    assert r.index.sizes() == (50, 100, 50, 2)
    assert r.index.kv_workers("user-7") == {"w0": 7}
    # Lose a middle part: the replica asks again and ignores the rest.
    r2 = ViewReplica(ResidencyIndex())
    r2.apply(parts[0])
    out = r2.apply(parts[2])
    assert (out.need_snapshot, out.reason) == (True, "seq gap: expected 11, got 12")
    for p in parts[3:]:
        r2.apply(p)
    assert not r2.in_sync and r2.workers == {}


def test_a_snapshot_for_another_gateway_is_skipped_when_in_sync() -> None:
    r = fresh_synced()
    (u,) = snapshot(1, workers=[ws("w7")])
    out = r.apply(u)
    assert (out.need_snapshot, out.reason) == (False, "snapshot skipped: already in sync")
    assert set(r.workers) == {"w0", "w1"} and r.seq == 1


def test_large_deltas_split_into_parts_under_the_budget() -> None:
    c = ViewChanges()
    c.upsert_worker(ws("w0"))
    c.emb_add("w0", range(1000))
    for i in range(30):
        c.kv_upsert(f"u{i}", "w0", i)
    updates = c.to_updates(source="cs1", first_seq=4, sent_at_ms=0.0, part_bytes=1024)
    assert [u.seq for u in updates] == list(range(4, 4 + len(updates)))
    assert all(u.parts == len(updates) and u.kind == "delta" for u in updates)
    assert all(len(s.encode(u)) <= 1024 + 600 for u in updates)  # budget + one WorkerState's slack
    assert [w.worker_id for w in updates[0].workers] == ["w0"]
    assert sorted(i for u in updates for e in u.emb_added for i in e.items) == list(range(1000))
    r = fresh_synced()
    r.seq = 3
    for u in updates:
        assert not r.apply(u).need_snapshot
    assert r.index.emb_count("w0") == 1000  # 1 and 2 were there already
    assert r.index.kv_workers("u29") == {"w0": 29}


def test_replica_view_forwards_emb_masks_array() -> None:
    idx = ResidencyIndex()
    view = ReplicaView(ViewReplica(idx), idx)
    idx.add_emb("a", [1, 2])
    idx.add_emb("b", [2])
    items: npt.NDArray[np.int64] = np.array([0, 1, 2], dtype=np.int64)
    assert view.emb_masks_array(items).tolist() == [0, 1, 3] == list(view.emb_masks(items.tolist()))
