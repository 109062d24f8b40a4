"""A gateway's replica of cachestate's routing view, kept from the ViewUpdate stream.

Rules:
* Updates carry (source, seq): seq is consecutive per source, snapshot parts included, and is judged by
  ``shared.sequence``: a duplicate (just behind) is ignored; a gap or a restart of the numbering (a jump
  beyond the window either way) is a loss of sync.
* A new source (cachestate restarted), a seq gap or a seq restart puts the replica out of sync: deltas are
  ignored until a snapshot's parts have all arrived, which replaces everything (reassembly:
  ``shared.residency.parts``'s ``SnapshotAssembler``; a delta inside a snapshot's seq range means a part is
  missing). Until then the last good view stays in place (a brief stale view beats no view) and ``ready``
  is unchanged.
* A snapshot reaching a replica that is in sync (another gateway asked for it) only advances seq: its
  content equals what the replica already has.
* Delta order: workers_removed (record and all residency go), workers (records upserted), kv_removed,
  kv_upserts, emb_removed, emb_added. cachestate sends canonical deltas, so this order is exact.

``need_snapshot`` is level-triggered: True for every update after which the replica is out of sync and not
collecting a snapshot; the shell keeps one request in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared import schemas as s
from shared.residency import PartVerdict, ResidencyIndex, SnapshotAssembler
from shared.sequence import SeqOrder, classify, gap_start

__all__ = ["ReplicaOutcome", "ViewReplica"]


@dataclass(frozen=True, slots=True)
class ReplicaOutcome:
    need_snapshot: bool
    reason: str
    workers_changed: bool = False  # the worker records (or their EMB bits) changed: routers must rebuild


class ViewReplica:
    def __init__(self, index: ResidencyIndex) -> None:
        self.index = index
        self.workers: dict[str, s.WorkerState] = {}  # live workers (draining ones included)
        self.source: str | None = None
        self.seq = -1  # last seq applied or skipped in order
        self.snapshots_applied = 0
        self.deltas_applied = 0
        self.resyncs_needed = 0
        self._in_sync = False
        self._assembly: SnapshotAssembler[s.ViewUpdate] = SnapshotAssembler()
        self._gap_from: int | None = None  # where the last gap in the source's numbering began

    @property
    def in_sync(self) -> bool:
        return self._in_sync

    @property
    def ready(self) -> bool:
        """A complete view has been applied at least once and some worker takes new requests."""
        return self.snapshots_applied > 0 and any(not w.draining for w in self.workers.values())

    def apply(self, update: s.ViewUpdate) -> ReplicaOutcome:
        if update.source != self.source:
            reason = "new source"
            self._gap_from = None
        else:
            order = classify(update.seq, self.seq + 1, self._gap_from)
            if order is SeqOrder.DUPLICATE:
                return ReplicaOutcome(False, f"duplicate seq {update.seq} <= {self.seq}")
            self._gap_from = gap_start(order, self.seq + 1, self._gap_from)
            reason = (
                "" if order is SeqOrder.NEXT else f"seq {order}: expected {self.seq + 1}, got {update.seq}"
            )
        if reason:
            self._desync()
        if update.kind == "snapshot":
            return self._snapshot_part(update, reason)
        if self._assembly.collecting:  # a delta inside a snapshot's seq range: a part went missing
            self._desync()
            reason = "snapshot part missing"
        self._advance(update)
        if not self._in_sync:
            return self._need(reason or "out of sync: delta ignored")
        self._apply_delta(update)
        self.deltas_applied += 1
        return ReplicaOutcome(
            False, "delta applied", workers_changed=bool(update.workers or update.workers_removed)
        )

    # ---- internals ------------------------------------------------------------------------------------
    def _advance(self, update: s.ViewUpdate) -> None:
        self.source = update.source
        self.seq = update.seq

    def _desync(self) -> None:
        if self._in_sync:
            self.resyncs_needed += 1
        self._in_sync = False
        self._assembly.abandon()

    def _need(self, reason: str) -> ReplicaOutcome:
        return ReplicaOutcome(not self._assembly.collecting and not self._in_sync, reason)

    def _snapshot_part(self, u: s.ViewUpdate, reason: str) -> ReplicaOutcome:
        self._advance(u)
        if self._in_sync and not self._assembly.collecting:
            return ReplicaOutcome(False, "snapshot skipped: already in sync")
        out = self._assembly.offer(u.seq, u.part, u.parts, u)
        if out.verdict is PartVerdict.REJECTED:
            return self._need(reason or "snapshot part out of order")
        if out.snapshot is None:
            return ReplicaOutcome(False, reason or "snapshot part collected")
        self._replace(out.snapshot.payloads)
        return ReplicaOutcome(False, "snapshot applied", workers_changed=True)

    def _replace(self, parts: Sequence[s.ViewUpdate]) -> None:
        index = self.index
        index.clear()
        self.workers = {}
        for u in parts:
            for state in u.workers:
                self.workers[state.worker_id] = state
                index.add_worker(state.worker_id)
        for u in parts:
            for p in u.kv_upserts:
                index.upsert_kv(p.user_id, p.worker_id, p.length)
            for change in u.emb_added:
                index.add_emb(change.worker_id, change.items)
        self._in_sync = True
        self.snapshots_applied += 1

    def _apply_delta(self, u: s.ViewUpdate) -> None:
        index = self.index
        for wid in u.workers_removed:
            self.workers.pop(wid, None)
            index.drop_worker(wid)
        for state in u.workers:
            self.workers[state.worker_id] = state
            index.add_worker(state.worker_id)
        for r in u.kv_removed:
            index.remove_kv(r.user_id, r.worker_id)
        for p in u.kv_upserts:
            index.upsert_kv(p.user_id, p.worker_id, p.length)
        for change in u.emb_removed:
            index.remove_emb(change.worker_id, change.items)
        for change in u.emb_added:
            index.add_emb(change.worker_id, change.items)
