"""View changes: the delta cachestate forwards to gateways, kept canonical while it accumulates.

It goes out as ``ViewUpdate`` parts cut by the view protocol's packer (``shared.residency.view``).

Canonical means: at most one operation per (user, worker) KV key and per (worker, item) EMB key (the last
one wins), and a worker removal discards every earlier pending change of that worker. A receiver can
therefore apply a delta in a fixed order (workers_removed, workers, kv_removed, kv_upserts, emb_removed,
emb_added) and reach the same state as applying the individual changes in time order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared import schemas as s
from shared.residency import DEFAULT_PART_BYTES, pack_updates

__all__ = ["ViewChanges"]


@dataclass(slots=True)
class ViewChanges:
    workers: dict[str, s.WorkerState] = field(default_factory=dict)  # upserted records
    removed: set[str] = field(default_factory=set)  # workers fenced/gone/reset: drop their residency
    kv: dict[tuple[str, str], int | None] = field(default_factory=dict)  # (user, worker) -> len | None
    emb: dict[str, dict[int, bool]] = field(default_factory=dict)  # worker -> item -> resident?

    @property
    def empty(self) -> bool:
        return not (self.workers or self.removed or self.kv or self.emb)

    def upsert_worker(self, state: s.WorkerState) -> None:
        self.workers[state.worker_id] = state

    def remove_worker(self, worker_id: str) -> None:
        """The worker's record and all its residency go (a later upsert in this batch re-adds it)."""
        self.removed.add(worker_id)
        self.workers.pop(worker_id, None)
        self.emb.pop(worker_id, None)
        for key in [k for k in self.kv if k[1] == worker_id]:
            del self.kv[key]

    def kv_upsert(self, user_id: str, worker_id: str, length: int) -> None:
        self.kv[(user_id, worker_id)] = length

    def kv_remove(self, user_id: str, worker_id: str) -> None:
        self.kv[(user_id, worker_id)] = None

    def emb_add(self, worker_id: str, items: Iterable[int]) -> None:
        self.emb.setdefault(worker_id, {}).update(dict.fromkeys(items, True))

    def emb_remove(self, worker_id: str, items: Iterable[int]) -> None:
        self.emb.setdefault(worker_id, {}).update(dict.fromkeys(items, False))

    def merge(self, later: ViewChanges) -> None:
        """Fold in changes that happened after these."""
        for worker_id in later.removed:
            self.remove_worker(worker_id)
        self.workers.update(later.workers)
        self.kv.update(later.kv)
        for worker_id, items in later.emb.items():
            self.emb.setdefault(worker_id, {}).update(items)

    def to_updates(
        self, *, source: str, first_seq: int, sent_at_ms: float, part_bytes: int = DEFAULT_PART_BYTES
    ) -> list[s.ViewUpdate]:
        """The delta as ViewUpdate parts with consecutive seq starting at first_seq (``pack_updates``)."""
        kv_removed = [s.KvRemoval(u, w) for (u, w), n in self.kv.items() if n is None]
        kv_upserts = [s.KvPlacement(u, w, n) for (u, w), n in self.kv.items() if n is not None]
        emb_removed = {w: [i for i, on in items.items() if not on] for w, items in self.emb.items()}
        emb_added = {w: [i for i, on in items.items() if on] for w, items in self.emb.items()}
        return pack_updates(
            kind="delta",
            source=source,
            first_seq=first_seq,
            sent_at_ms=sent_at_ms,
            workers=list(self.workers.values()),
            workers_removed=sorted(self.removed),
            kv_removed=kv_removed,
            kv_upserts=kv_upserts,
            emb_removed=emb_removed,
            emb_added=emb_added,
            part_bytes=part_bytes,
        )
