"""The one instruction a chunk release hands to the storage layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Relocation"]


@dataclass(frozen=True, slots=True)
class Relocation:
    """Copy the unit at ``src_slot`` to ``dst_slot`` (EMB slot ids or KV page ids, global).

    Lists of relocations must be applied in order: a later relocation may read a unit that an
    earlier one (from an earlier chunk move in the same tick) wrote.
    """

    src_slot: int
    dst_slot: int

    # Unit-neutral aliases (KV relocations move pages, not slots); the engine reads these.
    @property
    def src(self) -> int:
        return self.src_slot

    @property
    def dst(self) -> int:
        return self.dst_slot
