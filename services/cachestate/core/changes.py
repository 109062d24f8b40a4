"""View changes: the delta cachestate forwards to gateways, kept canonical while it accumulates.

Canonical means: at most one operation per (user, worker) KV key and per (worker, item) EMB key (the last
one wins), and a worker removal discards every earlier pending change of that worker. A receiver can
therefore apply a delta in a fixed order (workers_removed, workers, kv_removed, kv_upserts, emb_removed,
emb_added) and reach the same state as applying the individual changes in time order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from shared import schemas as s

__all__ = ["DEFAULT_PART_BYTES", "ViewChanges", "pack_updates"]

# A part's estimated size stays under this (NATS's default max payload is 1 MiB; estimates are upper
# bounds of the msgpack size: ids are 1-64 (worker) or 1-256 (user) characters, an item id <= 9 bytes).
DEFAULT_PART_BYTES = 256 * 1024
_WORKER_STATE_BYTES = 512  # generous: a WorkerState is ~300 bytes of msgpack plus its ids
_ITEM_BYTES = 9


def _str_bytes(text: str) -> int:
    return (len(text) if text.isascii() else len(text.encode())) + 5


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
        """The delta as ViewUpdate parts with consecutive seq starting at first_seq."""
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


def pack_updates(
    *,
    kind: Literal["delta", "snapshot"],
    source: str,
    first_seq: int,
    sent_at_ms: float,
    workers: list[s.WorkerState],
    workers_removed: list[str] | None = None,
    kv_removed: list[s.KvRemoval] | None = None,
    kv_upserts: list[s.KvPlacement] | None = None,
    emb_removed: dict[str, list[int]] | None = None,
    emb_added: dict[str, list[int]] | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> list[s.ViewUpdate]:
    """Cut a view message into parts whose estimated size stays under part_bytes. Worker records and
    removals all go in part 0 (so a receiver handles them before any residency of a later part)."""
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = 0

    def new_part() -> None:
        nonlocal current, size
        current = {"kv_removed": [], "kv_upserts": [], "emb_removed": [], "emb_added": []}
        parts.append(current)
        size = 0

    new_part()
    current["workers"] = list(workers)
    current["workers_removed"] = list(workers_removed or [])
    size = len(workers) * _WORKER_STATE_BYTES + sum(_str_bytes(w) for w in current["workers_removed"])

    for key, entries in (("kv_removed", kv_removed or []), ("kv_upserts", kv_upserts or [])):
        for entry in entries:
            cost = _str_bytes(entry.user_id) + _str_bytes(entry.worker_id) + 10
            if size + cost > part_bytes and size > 0:
                new_part()
            current[key].append(entry)
            size += cost

    for key, groups in (("emb_removed", emb_removed or {}), ("emb_added", emb_added or {})):
        for worker_id, items in groups.items():
            head = _str_bytes(worker_id) + 10
            start = 0
            while start < len(items):
                room = (part_bytes - size - head) // _ITEM_BYTES
                if room < 1:
                    new_part()
                    room = max(1, (part_bytes - head) // _ITEM_BYTES)
                chunk = items[start : start + room]
                current[key].append(s.EmbChange(worker_id, chunk))
                size += head + len(chunk) * _ITEM_BYTES
                start += len(chunk)

    return [
        s.ViewUpdate(
            source=source,
            seq=first_seq + i,
            kind=kind,
            part=i,
            parts=len(parts),
            sent_at_ms=sent_at_ms,
            **fields,
        )
        for i, fields in enumerate(parts)
    ]
