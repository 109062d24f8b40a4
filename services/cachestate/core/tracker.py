"""Digest tracking: per-worker sequence, incarnation, snapshot assembly and liveness over a ResidencyIndex.

Rules (per worker):
* A digest of an unknown worker or of a new incarnation registers the worker with no residency; the old
  incarnation's residency is dropped. If the digest starts a snapshot (part 0) its collection begins; a
  delta's residency cannot be applied to an unknown base: it is dropped and the outcome says
  ``need_snapshot``.
* Verification: a digest is only a claim (anyone on the bus can publish one). A record is *unverified*,
  out of the routing view (``worker_states``) and out of the index (a complete snapshot it sends is kept
  aside as ``pending``; deltas are dropped), until ``verify`` is called with the ack of a snapshot request
  sent to the worker's own subject, naming the incarnation of the process that answered. Then its pending
  snapshot is installed. A worker id nobody answers for never becomes routable, and never touches the index.
* A new incarnation claimed for a verified worker is a *candidate* beside it: the verified record keeps
  serving the view (and its digests keep applying) until the ack decides. An ack naming the candidate
  promotes it (the old incarnation is retired, its residency dropped); one naming the verified record
  retires the candidate (a forged restart costs the real worker nothing); one naming a third incarnation
  replaces both (a restart whose digests have not arrived yet: its snapshot follows the ack).
* Within an incarnation ``seq`` follows ``shared.sequence``: a duplicate is ignored; a gap (lost digest)
  or a restart of the numbering (a jump beyond the window either way) drops the worker's residency at once
  (stale affinity is worse than none: the router falls back to load for that worker), continues from that
  seq, and sets ``need_snapshot`` until a snapshot completes.
* ``period_ms`` is believed only within ``[MIN_PERIOD_S, max_period_s]``: a digest cannot buy itself a
  longer life than the configured bound.
* A snapshot of N parts replaces the worker's residency when complete; the reassembly rules (a missing or
  out-of-order part abandons it, and another snapshot is needed) are ``shared.residency.parts``'s
  ``SnapshotAssembler``; a delta inside a snapshot's seq range means a part is missing.
* Deltas apply while the worker is in sync; while it is not, their residency is dropped (the snapshot to
  come supersedes them) but their load/alpha/cost/window still count.
* ``expire(now)``: a worker silent for more than ``dead_after_periods`` of its own digest period is dead:
  removed from the view and purged from the index (a silent candidate just goes). ``refresh(until)``: no
  silence before `until` counts; the shell calls it when its own bus connection comes back (with a grace),
  so that the silence its disconnection caused is not taken for deaths.

``need_snapshot`` is level-triggered: it is True for every digest after which the worker is unverified,
or out of sync with no snapshot being collected. The shell keeps at most one snapshot request in flight
per worker and asks ``needs_snapshot(worker_id)`` whether it is still needed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from services.cachestate.core.changes import ViewChanges
from shared import schemas as s
from shared.residency import Assembled, PartVerdict, ResidencyIndex, SnapshotAssembler, snapshot_residency
from shared.sequence import SeqOrder, classify, gap_start

__all__ = ["DigestOutcome", "DigestTracker", "LiveWorker", "TrackerCounters"]

MIN_PERIOD_S = 0.01  # a digest period of 0 (misconfigured worker) is judged as 10 ms
DEFAULT_MAX_PERIOD_S = 5.0  # the longest digest period believed (CACHESTATE_MAX_PERIOD_MS's default)
DEFAULT_DEAD_AFTER_PERIODS = 3.0  # silent this many periods: dead (CACHESTATE_DEAD_AFTER_PERIODS's default)
RETIRED_INCARNATIONS = 4  # per worker, remembered so a late digest of a dead process cannot reset it


@dataclass(slots=True)
class DigestOutcome:
    accepted: bool  # its residency was applied (or collected into a snapshot)
    need_snapshot: bool  # ask this worker for a snapshot (unless a request is already in flight)
    reason: str
    changes: ViewChanges  # the delta to forward to gateways
    live: bool = True  # it counted for liveness/load/window (False: duplicate or from a retired process)


@dataclass(frozen=True, slots=True)
class LiveWorker:
    worker_id: str
    incarnation: str
    draining: bool
    in_sync: bool  # residency is known (a snapshot completed and no gap since)
    load: s.LoadInfo
    alpha: float
    alpha_target: float
    cost: s.CostCoefficients
    stats: s.PoolStats
    window: s.WindowStats  # of its last digest
    period_s: float
    last_seen: float  # `now` of its last digest
    applied_decision_id: str | None


@dataclass
class TrackerCounters:
    digests_applied: int = 0  # residency applied or collected
    digests_ignored: int = 0  # duplicates/old seq or retired incarnations
    digests_dropped: int = 0  # live, but residency dropped (out of sync)
    gaps: int = 0
    seq_restarts: int = 0  # a seq beyond the window either way: numbering restarted (or forged)
    periods_clamped: int = 0  # digests whose period_ms was outside the believed range
    verified: int = 0  # workers (incarnations) confirmed by a snapshot ack from their own subject
    incarnations_rejected: int = 0  # a claimed new incarnation that the worker's own subject denied
    incarnations_corrected: int = 0  # an ack named an incarnation no digest had claimed (it replaces both)
    new_workers: int = 0
    new_incarnations: int = 0
    snapshots_applied: int = 0
    snapshots_abandoned: int = 0  # a part went missing
    repairs: int = 0  # an out-of-sync worker back in sync through a snapshot
    workers_dead: int = 0


@dataclass(slots=True)
class _Worker:
    worker_id: str
    incarnation: str
    next_seq: int
    last_seen: float
    period_s: float
    in_sync: bool = False
    ever_synced: bool = False
    verified: bool = False
    assembly: SnapshotAssembler[s.WorkerDigest] = field(default_factory=SnapshotAssembler)
    pending: Assembled[s.WorkerDigest] | None = None  # an unverified record's complete snapshot, kept aside
    gap_from: int | None = None  # where the last seq gap began (shared.sequence)
    retired: deque[str] = field(default_factory=lambda: deque(maxlen=RETIRED_INCARNATIONS))
    last: s.WorkerDigest | None = None


class DigestTracker:
    def __init__(
        self,
        index: ResidencyIndex,
        *,
        dead_after_periods: float = DEFAULT_DEAD_AFTER_PERIODS,
        max_period_s: float = DEFAULT_MAX_PERIOD_S,
    ) -> None:
        if dead_after_periods <= 0:
            raise ValueError(f"dead_after_periods must be > 0, got {dead_after_periods}")
        if max_period_s < MIN_PERIOD_S:
            raise ValueError(f"max_period_s must be >= {MIN_PERIOD_S}, got {max_period_s}")
        self.index = index
        self.dead_after_periods = dead_after_periods
        self.max_period_s = max_period_s
        self.counters = TrackerCounters()
        self._workers: dict[str, _Worker] = {}
        self._candidates: dict[str, _Worker] = {}  # an unverified new incarnation beside a verified worker
        self._judge_from = -math.inf  # silence before this moment does not count (refresh)

    # ---- queries --------------------------------------------------------------------------------------
    def needs_snapshot(self, worker_id: str) -> bool:
        """Ask the worker for a snapshot: to learn its residency, or to verify that it answers at all (or
        which of two incarnations does)."""
        rec = self._workers.get(worker_id)
        return rec is not None and (not (rec.in_sync and rec.verified) or worker_id in self._candidates)

    def is_verified(self, worker_id: str) -> bool:
        rec = self._workers.get(worker_id)
        return rec is not None and rec.verified

    def snapshot_parts_received(self, worker_id: str) -> int | None:
        """How many parts of the worker's snapshot now being assembled have arrived (None: no assembly)."""
        rec = self._workers.get(worker_id)
        return None if rec is None else rec.assembly.received

    def is_live(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def live_workers(self) -> list[LiveWorker]:
        """Verified workers heard from (those in the routing view)."""
        return [self._live(rec) for rec in self._workers.values() if rec.last is not None and rec.verified]

    def worker_states(self) -> list[s.WorkerState]:
        """The routing view's worker records: verified workers heard from."""
        return [self._state(rec) for rec in self._workers.values() if rec.last is not None and rec.verified]

    def unverified(self) -> list[str]:
        """Worker ids with a record or a candidate not (yet) confirmed by their own subject."""
        return sorted({w for w, rec in self._workers.items() if not rec.verified} | set(self._candidates))

    def staleness(self, now: float) -> dict[str, float]:
        """Seconds since each live worker's last digest."""
        return {w: max(0.0, now - rec.last_seen) for w, rec in self._workers.items()}

    # ---- digests --------------------------------------------------------------------------------------
    def apply(self, digest: s.WorkerDigest, now: float) -> DigestOutcome:
        changes = ViewChanges()
        wid = digest.worker_id
        rec = self._workers.get(wid)
        if rec is not None and digest.incarnation != rec.incarnation and digest.incarnation in rec.retired:
            self.counters.digests_ignored += 1
            return DigestOutcome(False, False, "digest of a retired incarnation", changes, live=False)
        notes: list[str] = []
        fresh = True  # a record made for this digest: its seq starts the numbering
        if rec is not None and rec.verified and digest.incarnation != rec.incarnation:
            cand = self._candidates.get(wid)
            if cand is None or cand.incarnation != digest.incarnation:
                notes.append("new incarnation claimed (a candidate until its own subject answers)")
                cand = self._candidates[wid] = self._new_record(digest, now)
            else:
                fresh = False
            rec = cand
        elif rec is None or digest.incarnation != rec.incarnation:
            notes.append("new worker" if rec is None else "new incarnation")
            rec = self._register(digest, rec, now, changes)
        else:
            fresh = False
        if not fresh:
            order = classify(digest.seq, rec.next_seq, rec.gap_from)
            rec.gap_from = gap_start(order, rec.next_seq, rec.gap_from)
            if order is SeqOrder.DUPLICATE:
                self.counters.digests_ignored += 1
                reason = f"old seq {digest.seq} < {rec.next_seq}"
                return DigestOutcome(False, False, reason, changes, live=False)
            if order is SeqOrder.GAP:
                self.counters.gaps += 1
                notes.append(f"seq gap: expected {rec.next_seq}, got {digest.seq}")
                self._desync(rec, changes)
            elif order is SeqOrder.RESTART:
                self.counters.seq_restarts += 1
                notes.append(f"seq restart: expected {rec.next_seq}, got {digest.seq}")
                self._desync(rec, changes)
        rec.next_seq = digest.seq + 1
        rec.last_seen = now
        rec.period_s = self._period(digest.period_ms)
        rec.last = digest

        snapshots_before = self.counters.snapshots_applied
        accepted = self._residency(rec, digest, changes)
        if accepted:
            self.counters.digests_applied += 1
            if self.counters.snapshots_applied > snapshots_before:
                notes.append("snapshot applied")
            elif digest.kind == "snapshot":
                complete = digest.part == digest.parts - 1
                notes.append("snapshot kept until verified" if complete else "snapshot part collected")
            else:
                notes.append("delta applied")
        else:
            self.counters.digests_dropped += 1
            notes.append(f"{digest.kind} residency dropped: out of sync")
        if rec.verified:
            changes.upsert_worker(self._state(rec))
        self._forward_evictions(changes)
        need = not rec.verified or (not rec.in_sync and not rec.assembly.collecting)
        if need:
            notes.append(
                "needs a snapshot" if rec.verified else "unverified: needs a snapshot request answered"
            )
        return DigestOutcome(accepted, need, "; ".join(notes), changes, live=rec.verified)

    def verify(self, worker_id: str, incarnation: str, seq: int, now: float) -> ViewChanges:
        """The worker answered a snapshot request on its own subject: the process behind `incarnation` is
        real. Its snapshot (first seq `seq`) is on its way, or has arrived. Returns the view changes."""
        changes = ViewChanges()
        rec = self._workers.get(worker_id)
        if rec is None:
            return changes  # expired meanwhile: its next digest registers it again
        cand = self._candidates.pop(worker_id, None)
        if cand is not None and cand.incarnation == incarnation:
            # The claimed restart is real: the old process is gone.
            self.counters.new_incarnations += 1
            cand.retired.extend(rec.retired)
            cand.retired.append(rec.incarnation)
            self.index.clear_worker(worker_id)
            changes.remove_worker(worker_id)
            self._workers[worker_id] = rec = cand
        elif incarnation == rec.incarnation:
            if cand is not None:  # the claimed restart was not the worker's
                self.counters.incarnations_rejected += 1
                rec.retired.append(cand.incarnation)
        else:
            # An incarnation no digest has named yet (a restart whose digests are still on their way): it is
            # the worker now, and its residency comes with the snapshot that follows this ack.
            self.counters.incarnations_corrected += 1
            new = _Worker(worker_id, incarnation, next_seq=seq, last_seen=now, period_s=rec.period_s)
            new.retired.extend(i for i in rec.retired if i != incarnation)
            new.retired.append(rec.incarnation)
            if cand is not None:
                new.retired.append(cand.incarnation)
            self.index.clear_worker(worker_id)
            changes.remove_worker(worker_id)
            self._workers[worker_id] = rec = new
        if not rec.verified:
            rec.verified = True
            self.counters.verified += 1
            self.index.add_worker(worker_id)
        if rec.pending is not None:
            pending, rec.pending = rec.pending, None
            # Only if nothing came after it: deltas that arrived meanwhile were dropped (unverified), and
            # the snapshot without them would be stale. Then the worker stays out of sync: asked again.
            if rec.next_seq == pending.next_seq:
                self._install(rec, pending, changes)
        if rec.last is not None:
            changes.upsert_worker(self._state(rec))
        self._forward_evictions(changes)
        return changes

    def _period(self, period_ms: float) -> float:
        period_s = period_ms / 1e3
        if not MIN_PERIOD_S <= period_s <= self.max_period_s:
            self.counters.periods_clamped += 1
        return min(max(period_s, MIN_PERIOD_S), self.max_period_s)

    @staticmethod
    def _new_record(digest: s.WorkerDigest, now: float) -> _Worker:
        return _Worker(
            worker_id=digest.worker_id,
            incarnation=digest.incarnation,
            next_seq=digest.seq,
            last_seen=now,
            period_s=MIN_PERIOD_S,  # set (and counted if clamped) by apply(), like every digest's
        )

    def _register(
        self, digest: s.WorkerDigest, old: _Worker | None, now: float, changes: ViewChanges
    ) -> _Worker:
        """A record for a new worker id, or in place of an unverified one (which holds nothing)."""
        rec = self._new_record(digest, now)
        if old is None:
            self.counters.new_workers += 1
        else:
            rec.retired.extend(old.retired)
            rec.retired.append(old.incarnation)
        self._workers[digest.worker_id] = rec
        return rec

    def _desync(self, rec: _Worker, changes: ViewChanges) -> None:
        """Residency unknown from now on: drop it here and at the gateways (and any snapshot kept aside)."""
        rec.assembly.abandon()
        rec.pending = None
        if rec.in_sync:  # otherwise it holds nothing already
            self.index.clear_worker(rec.worker_id)
            changes.remove_worker(rec.worker_id)
        rec.in_sync = False

    def _residency(self, rec: _Worker, d: s.WorkerDigest, changes: ViewChanges) -> bool:
        if d.kind == "snapshot":
            return self._snapshot_part(rec, d, changes)
        if rec.assembly.collecting:  # a delta inside a snapshot's seq range: a part is missing
            self.counters.snapshots_abandoned += 1
            self._desync(rec, changes)
            return False
        if not rec.in_sync or not rec.verified:
            return False
        wid = rec.worker_id
        index = self.index
        for user in d.kv_removed:
            if index.remove_kv(user, wid):
                changes.kv_remove(user, wid)
        for entry in d.kv_upserts:
            if index.upsert_kv(entry.user_id, wid, entry.length):
                changes.kv_upsert(entry.user_id, wid, entry.length)
        if d.emb_removed:
            changes.emb_remove(wid, index.remove_emb(wid, d.emb_removed))
        if d.emb_added:
            changes.emb_add(wid, index.add_emb(wid, d.emb_added))
        return True

    def _snapshot_part(self, rec: _Worker, d: s.WorkerDigest, changes: ViewChanges) -> bool:
        out = rec.assembly.offer(d.seq, d.part, d.parts, d)
        if out.abandoned:  # superseded by a new part 0, or broken by this part
            self.counters.snapshots_abandoned += 1
        if out.verdict is PartVerdict.REJECTED:
            self._desync(rec, changes)
            return False
        if out.snapshot is not None:
            if rec.verified:
                self._install(rec, out.snapshot, changes)
            else:
                rec.pending = out.snapshot  # kept aside: nothing of an unverified record reaches the index
        return True

    def _install(self, rec: _Worker, snapshot: Assembled[s.WorkerDigest], changes: ViewChanges) -> None:
        """A complete snapshot becomes the worker's residency, here and (as changes) at the gateways."""
        kv, emb = snapshot_residency(snapshot.payloads)
        diff = self.index.replace_worker(rec.worker_id, kv, emb)
        wid = rec.worker_id
        for user in diff.kv_removed:
            changes.kv_remove(user, wid)
        for user, length in diff.kv_upserts.items():
            changes.kv_upsert(user, wid, length)
        changes.emb_remove(wid, diff.emb_removed)
        changes.emb_add(wid, diff.emb_added)
        self.counters.snapshots_applied += 1
        if rec.ever_synced and not rec.in_sync:
            self.counters.repairs += 1
        rec.in_sync = rec.ever_synced = True

    # ---- liveness -------------------------------------------------------------------------------------
    def _silent(self, rec: _Worker, now: float) -> bool:
        return now - max(rec.last_seen, self._judge_from) > self.dead_after_periods * rec.period_s

    def expire(self, now: float) -> list[str]:
        """Fence and purge every worker silent for more than dead_after_periods of its period; returns their
        ids. A silent candidate just goes; a candidate whose verified worker died takes its place (still to
        be verified: the restart it claimed may be real)."""
        for wid in [w for w, cand in self._candidates.items() if self._silent(cand, now)]:
            del self._candidates[wid]
        dead = [wid for wid, rec in self._workers.items() if self._silent(rec, now)]
        for wid in dead:
            cand = self._candidates.pop(wid, None)
            self.remove(wid)
            self.counters.workers_dead += 1
            if cand is not None:
                self._workers[wid] = cand
        return dead

    def refresh(self, until: float) -> None:
        """No silence before `until` counts (the observer was cut off: it heard nothing, which says nothing
        about the workers). `last_seen` stays what it was: when each was really heard from."""
        self._judge_from = max(self._judge_from, until)

    def remove(self, worker_id: str) -> bool:
        """Forget a worker (and any candidate incarnation of it) and purge its residency."""
        self._candidates.pop(worker_id, None)
        if self._workers.pop(worker_id, None) is None:
            return False
        self.index.drop_worker(worker_id)
        return True

    # ---- helpers --------------------------------------------------------------------------------------
    def _forward_evictions(self, changes: ViewChanges) -> None:
        ev = self.index.take_evictions()
        for user, wid in ev.kv:
            changes.kv_remove(user, wid)
        for wid, items in ev.emb.items():
            changes.emb_remove(wid, items)

    @staticmethod
    def _state(rec: _Worker) -> s.WorkerState:
        d = rec.last
        assert d is not None
        return s.WorkerState(
            worker_id=rec.worker_id,
            incarnation=rec.incarnation,
            draining=d.draining,
            load=d.load,
            alpha=d.alpha,
            alpha_target=d.alpha_target,
            cost=d.cost,
            last_seen_ms=max(0.0, rec.last_seen * 1e3),
        )

    @staticmethod
    def _live(rec: _Worker) -> LiveWorker:
        d = rec.last
        assert d is not None
        return LiveWorker(
            worker_id=rec.worker_id,
            incarnation=rec.incarnation,
            draining=d.draining,
            in_sync=rec.in_sync,
            load=d.load,
            alpha=d.alpha,
            alpha_target=d.alpha_target,
            cost=d.cost,
            stats=d.stats,
            window=d.window,
            period_s=rec.period_s,
            last_seen=rec.last_seen,
            applied_decision_id=d.applied_decision_id,
        )
