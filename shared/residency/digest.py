"""A worker's residency on the wire: the residency lists of ``WorkerDigest`` parts, both ways.

- ``digest_parts`` (the worker): a ``ResidencyDelta`` or ``ResidencySnapshot`` cut into the residency
  lists of one digest's parts (``shared.residency.parts``: one part when everything fits). Order: removals
  before upserts and additions; within a delta the lists name disjoint users and items, so each part is a
  delta by itself.
- ``snapshot_residency`` (cachestate): what the parts of a complete snapshot say together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, TypedDict

from shared import schemas as s
from shared.residency.delta import ResidencyDelta, ResidencySnapshot
from shared.residency.parts import DEFAULT_PART_BYTES, INT_BYTES, PartPacker, str_bytes

__all__ = ["DIGEST_HEAD_BYTES", "DigestResidency", "digest_parts", "snapshot_residency"]

# Everything in a digest but its residency lists: ids, load, alpha, cost, stats, window, field names.
# ~1.4 KB of msgpack at most (a 64-character worker id, a 128-character decision id, every number at its
# largest); tests/shared/test_residency_parts.py checks the bound.
DIGEST_HEAD_BYTES: Final = 2048
_FIELDS: Final = ("kv_removed", "kv_upserts", "emb_removed", "emb_added")


class DigestResidency(TypedDict):
    """The residency lists of one digest part (``WorkerDigest``'s fields of the same names)."""

    kv_upserts: list[s.KvEntry]
    kv_removed: list[str]
    emb_added: list[int]
    emb_removed: list[int]


def digest_parts(
    residency: ResidencyDelta | ResidencySnapshot, *, part_bytes: int = DEFAULT_PART_BYTES
) -> list[DigestResidency]:
    """The residency lists of each part of one digest (at least one part). KV entries are sorted by user."""
    if isinstance(residency, ResidencySnapshot):
        kv, kv_removed, emb_added, emb_removed = residency.kv, [], residency.emb, []
    else:
        kv, kv_removed = residency.kv_upserts, residency.kv_removed
        emb_added, emb_removed = residency.emb_added, residency.emb_removed
    packer = PartPacker(_FIELDS, part_bytes=part_bytes, head_bytes=DIGEST_HEAD_BYTES)
    for user in kv_removed:
        packer.add("kv_removed", user, str_bytes(user))
    for user, length in sorted(kv.items()):
        packer.add("kv_upserts", s.KvEntry(user, length), 1 + str_bytes(user) + INT_BYTES)  # [user, length]
    packer.add_items("emb_removed", emb_removed)
    packer.add_items("emb_added", emb_added)
    return [
        DigestResidency(
            kv_upserts=part["kv_upserts"],
            kv_removed=part["kv_removed"],
            emb_added=part["emb_added"],
            emb_removed=part["emb_removed"],
        )
        for part in packer.parts()
    ]


def snapshot_residency(parts: Iterable[s.WorkerDigest]) -> tuple[dict[str, int], set[int]]:
    """What the parts of one complete snapshot say together: user -> covered length (a later part wins for
    a user named twice), and the resident items."""
    kv: dict[str, int] = {}
    emb: set[int] = set()
    for digest in parts:
        kv.update((entry.user_id, entry.length) for entry in digest.kv_upserts)
        emb.update(digest.emb_added)
    return kv, emb
