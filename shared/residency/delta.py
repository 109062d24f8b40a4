"""What a worker reports about its cache contents: a delta (net changes) or a snapshot (everything).

The worker's pool produces them (``Pool.drain_deltas()``, ``Pool.snapshot()``); on the wire they travel as
the residency lists of ``WorkerDigest`` parts (``shared.residency.digest``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ResidencyDelta", "ResidencySnapshot"]


@dataclass(frozen=True, slots=True)
class ResidencyDelta:
    """Net changes since the previous drain/snapshot, resolved against residency at drain time."""

    kv_upserts: dict[str, int] = field(default_factory=dict)  # user -> covered length (present now)
    kv_removed: list[str] = field(default_factory=list)  # touched users absent now, sorted
    emb_added: list[int] = field(default_factory=list)  # touched items resident now, sorted
    emb_removed: list[int] = field(default_factory=list)  # touched items not resident now, sorted

    @property
    def empty(self) -> bool:
        return not (self.kv_upserts or self.kv_removed or self.emb_added or self.emb_removed)


@dataclass(frozen=True, slots=True)
class ResidencySnapshot:
    kv: dict[str, int]  # user -> covered length, sorted by user
    emb: list[int]  # resident items, sorted
