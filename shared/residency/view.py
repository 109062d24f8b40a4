"""The routing view on the wire: one view message (a delta or a snapshot) cut into ``ViewUpdate`` parts.

cachestate publishes them (its ``ViewChanges`` deltas and its view snapshots); gateways apply them to their
replica (``services/gateway/core/view_replica.py``). Worker records and removals all go in part 0, so a
receiver handles them before any residency of a later part; the rest follows in the receiver's order of
application (KV removals, KV upserts, EMB removals, EMB additions), cut by ``shared.residency.parts``.
"""

from __future__ import annotations

from functools import partial
from typing import Final, Literal

from shared import schemas as s
from shared.residency.parts import DEFAULT_PART_BYTES, INT_BYTES, PartPacker, part_numbers, str_bytes

__all__ = ["VIEW_HEAD_BYTES", "WORKER_STATE_BYTES", "pack_updates"]

# A ViewUpdate's header (source, seq, kind, part numbers, time, field names): ~300 bytes of msgpack at most
# (cachestate's source is at most 137 characters); tests/shared/test_residency_parts.py checks the bound.
VIEW_HEAD_BYTES: Final = 512
WORKER_STATE_BYTES: Final = 512  # a WorkerState: ~510 bytes of msgpack at most, with a 64-character id
_FIELDS: Final = ("workers", "workers_removed", "kv_removed", "kv_upserts", "emb_removed", "emb_added")


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
    """One view message as ViewUpdate parts with consecutive seq from ``first_seq``, each estimated within
    ``part_bytes``. ``emb_*`` map worker ids to item ids (a worker with no items sends nothing)."""
    packer = PartPacker(_FIELDS, part_bytes=part_bytes, head_bytes=VIEW_HEAD_BYTES)
    packer.pin("workers", workers, len(workers) * WORKER_STATE_BYTES)
    removed = workers_removed or []
    packer.pin("workers_removed", removed, sum(str_bytes(w) for w in removed))
    for field, entries in (("kv_removed", kv_removed or []), ("kv_upserts", kv_upserts or [])):
        for entry in entries:
            # [user, worker] or [user, worker, length]: an array header and at most one int besides
            nbytes = 1 + str_bytes(entry.user_id) + str_bytes(entry.worker_id) + INT_BYTES
            packer.add(field, entry, nbytes)
    for field, groups in (("emb_removed", emb_removed or {}), ("emb_added", emb_added or {})):
        for worker_id, items in groups.items():
            # each run is an EmbChange [worker, [items]]: two array headers of up to 5 bytes and the id
            packer.add_items(
                field,
                items,
                run_bytes=str_bytes(worker_id) + 10,
                wrap=partial(s.EmbChange, worker_id),
            )
    parts = packer.parts()
    return [
        s.ViewUpdate(
            source=source,
            seq=number.seq,
            kind=kind,
            part=number.part,
            parts=number.parts,
            sent_at_ms=sent_at_ms,
            workers=fields["workers"],
            workers_removed=fields["workers_removed"],
            kv_removed=fields["kv_removed"],
            kv_upserts=fields["kv_upserts"],
            emb_removed=fields["emb_removed"],
            emb_added=fields["emb_added"],
        )
        for number, fields in zip(part_numbers(first_seq, len(parts)), parts, strict=True)
    ]
