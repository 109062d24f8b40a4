"""A gateway's replica of cachestate's routing view, kept from the ViewUpdate stream.

Rules:
* Updates carry (source, seq): seq is consecutive per source, snapshot parts included, and is judged by
  ``shared.sequence``: a duplicate (just behind) is ignored; a gap or a restart of the numbering (a jump
  beyond the window either way) is a loss of sync.
* A new source (cachestate restarted), a seq gap or a seq restart puts the replica out of sync: deltas are
  ignored until
  a snapshot's parts have all arrived (consecutive seq, parts 0..N-1), which replaces everything. Until
  then the last good view stays in place (a brief stale view beats no view) and ``ready`` is unchanged.
* A snapshot reaching a replica that is in sync (another gateway asked for it) only advances seq: its
  content equals what the replica already has.
* Delta order: workers_removed (record and all residency go), workers (records upserted), kv_removed,
  kv_upserts, emb_removed, emb_added. cachestate sends canonical deltas, so this order is exact.

``need_snapshot`` is level-triggered: True for every update after which the replica is out of sync and not
collecting a snapshot; the shell keeps one request in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared import schemas as s
from shared.residency import ResidencyIndex
from shared.sequence import SeqOrder, classify, gap_start

__all__ = ["ReplicaOutcome", "ViewReplica"]


@dataclass(frozen=True, slots=True)
class ReplicaOutcome:
    need_snapshot: bool
    reason: str
    workers_changed: bool = False  # the worker records (or their EMB bits) changed: routers must rebuild


@dataclass(slots=True)
class _Assembly:
    source: str
    first_seq: int
    parts: int
    next_part: int = 1
    updates: list[s.ViewUpdate] = field(default_factory=list)


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
        self._assembly: _Assembly | None = None
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
        if self._assembly is not None:  # a delta inside a snapshot's seq range: a part went missing
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
        self._assembly = None

    def _need(self, reason: str) -> ReplicaOutcome:
        return ReplicaOutcome(self._assembly is None and not self._in_sync, reason)

    def _snapshot_part(self, u: s.ViewUpdate, reason: str) -> ReplicaOutcome:
        self._advance(u)
        asm = self._assembly
        if self._in_sync and asm is None:
            return ReplicaOutcome(False, "snapshot skipped: already in sync")
        if u.part == 0:
            asm = self._assembly = _Assembly(source=u.source, first_seq=u.seq, parts=u.parts)
        elif asm is None or (u.parts, u.part, u.seq) != (asm.parts, asm.next_part, asm.first_seq + u.part):
            self._assembly = None
            return self._need(reason or "snapshot part out of order")
        else:
            asm.next_part += 1
        asm.updates.append(u)
        if u.part < u.parts - 1:
            return ReplicaOutcome(False, reason or "snapshot part collected")
        self._assembly = None
        self._replace(asm.updates)
        return ReplicaOutcome(False, "snapshot applied", workers_changed=True)

    def _replace(self, parts: list[s.ViewUpdate]) -> None:
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
