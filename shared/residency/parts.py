"""Messages sent in parts: the one splitter (``PartPacker``) and the one assembler (``SnapshotAssembler``).

Both residency streams, worker digests (``WorkerDigest``, ``shared.residency.digest``) and the routing view
(``ViewUpdate``, ``shared.residency.view``), send a message too large for one NATS payload as several parts.
The rules are the same for both and live here.

Numbering (``part_numbers``)
    Part ``i`` of ``n`` carries ``part = i``, ``parts = n`` and ``seq = first_seq + i``: parts take
    consecutive sequence numbers of their stream, so a lost part is a gap like any lost message.

Splitting (``PartPacker``)
    Entries go into parts in the order they are given. Each part's estimated msgpack size (``head_bytes``
    for the message around the entries, plus each entry's estimate) stays within ``part_bytes``: an entry
    that would push it over begins the next part. An entry larger than a whole part travels alone in a part
    of its own; no part is empty, except the only one of a message with nothing to send. A run of item ids
    (``add_items``) is cut across parts, filling each. ``pin`` puts entries in part 0 whatever their size
    (what a receiver must handle before any later part). Every entry lands in exactly one part.
    The estimates (``str_bytes``, ``INT_BYTES``) are upper bounds of what msgpack writes, so with the
    default ``DEFAULT_PART_BYTES`` (256 KiB) a part stays far below NATS's default 1 MiB payload limit.

Reassembly (``SnapshotAssembler``)
    A snapshot in parts is complete when parts ``0..n-1`` have arrived in that order with consecutive
    ``seq``; then the collected payloads come back in part order. Part 0 starts an assembly (an unfinished
    one is abandoned: superseded). Any other part is taken only if it is the next one of the assembly in
    progress: the same ``parts``, ``part`` one more than the last taken, ``seq = first_seq + part``.
    Anything else (a part after a missing one, a part out of order, a repeated part, a part with no part 0
    before it, a part claiming another ``parts``) is rejected and abandons the assembly: the receiver needs
    another snapshot. A message that is not a part of the snapshot, arriving while one is being assembled,
    means a part went missing: the receiver calls ``abandon()``. Duplicates by ``seq`` are the stream's
    business (``shared.sequence`` drops them before they get here); one that gets here is out of order.

Deltas in parts are not assembled: each part of a delta is a delta by itself, applied when it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Generic, TypeVar

__all__ = [
    "DEFAULT_PART_BYTES",
    "INT_BYTES",
    "Assembled",
    "PartNumber",
    "PartOutcome",
    "PartPacker",
    "PartVerdict",
    "SnapshotAssembler",
    "part_numbers",
    "str_bytes",
]

T = TypeVar("T")

# The estimated size each part stays within, for both streams (cachestate's view and the workers' digests).
DEFAULT_PART_BYTES: Final = 256 * 1024
INT_BYTES: Final = 9  # msgpack: any int up to 2**64 (one type byte and eight bytes), a float64 too


def str_bytes(text: str) -> int:
    """Upper bound of msgpack's size of a string (a header of at most 5 bytes, then the UTF-8 bytes)."""
    return (len(text) if text.isascii() else len(text.encode())) + 5


# ---- numbering ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PartNumber:
    seq: int
    part: int
    parts: int


def part_numbers(first_seq: int, parts: int) -> list[PartNumber]:
    """Where each of ``parts`` parts sits: part i has ``seq = first_seq + i``."""
    if parts < 1:
        raise ValueError(f"a message has at least one part, got {parts}")
    return [PartNumber(first_seq + i, i, parts) for i in range(parts)]


# ---- splitting ---------------------------------------------------------------------------------------------
class PartPacker:
    """Cuts lists of entries into parts whose estimated size stays within ``part_bytes`` (module docstring).

    ``fields`` names the lists every part has (each part gets all of them, empty where nothing went);
    ``head_bytes`` is the estimated size of everything else in one message (its header, scalars, keys).
    """

    __slots__ = ("_current", "_empty", "_fields", "_parts", "_size", "head_bytes", "part_bytes")

    def __init__(
        self, fields: Sequence[str], *, part_bytes: int = DEFAULT_PART_BYTES, head_bytes: int = 0
    ) -> None:
        if part_bytes < 1:
            raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
        if head_bytes < 0:
            raise ValueError(f"head_bytes must be >= 0, got {head_bytes}")
        self.part_bytes = part_bytes
        self.head_bytes = head_bytes
        self._fields = tuple(fields)
        self._parts: list[dict[str, list[Any]]] = []
        self._current: dict[str, list[Any]] = {}
        self._size = 0
        self._empty = True
        self._next_part()

    def _next_part(self) -> None:
        self._current = {name: [] for name in self._fields}
        self._parts.append(self._current)
        self._size = self.head_bytes
        self._empty = True

    def pin(self, field: str, entries: Iterable[Any], nbytes: int) -> None:
        """Put ``entries`` (estimated ``nbytes`` together) in part 0, whatever their size. Only before
        anything else went past part 0."""
        if len(self._parts) > 1:
            raise RuntimeError("pin() after part 0 was closed")
        before = len(self._current[field])
        self._current[field].extend(entries)
        self._size += nbytes
        self._empty = self._empty and len(self._current[field]) == before

    def add(self, field: str, entry: Any, nbytes: int) -> None:
        """Append one entry of estimated size ``nbytes``; it begins a new part if it does not fit."""
        if self._size + nbytes > self.part_bytes and not self._empty:
            self._next_part()
        self._current[field].append(entry)
        self._size += nbytes
        self._empty = False

    def add_items(
        self,
        field: str,
        items: Sequence[int],
        *,
        run_bytes: int = 0,
        wrap: Callable[[list[int]], Any] | None = None,
    ) -> None:
        """Append item ids (``INT_BYTES`` each), cut into runs that fill each part. Without ``wrap`` the
        ids are appended to the field's list; with it, each run is appended as ``wrap(run)``, estimated at
        ``run_bytes`` plus its ids."""
        start = 0
        while start < len(items):
            room = (self.part_bytes - self._size - run_bytes) // INT_BYTES
            if room < 1:
                if not self._empty:
                    self._next_part()
                room = max(1, (self.part_bytes - self._size - run_bytes) // INT_BYTES)
            run = list(items[start : start + room])
            if wrap is None:
                self._current[field].extend(run)
            else:
                self._current[field].append(wrap(run))
            self._size += run_bytes + len(run) * INT_BYTES
            self._empty = False
            start += len(run)

    def parts(self) -> list[dict[str, list[Any]]]:
        """The parts so far, in order (at least one)."""
        return self._parts


# ---- reassembly --------------------------------------------------------------------------------------------
class PartVerdict(StrEnum):
    COLLECTED = "collected"  # taken; more parts to come
    COMPLETE = "complete"  # taken, and it was the last: the outcome holds the whole snapshot
    REJECTED = "rejected"  # not the part expected: dropped, and the assembly with it


@dataclass(frozen=True, slots=True)
class Assembled(Generic[T]):
    """A complete snapshot: the payloads of its parts, in part order."""

    first_seq: int
    payloads: tuple[T, ...]

    @property
    def parts(self) -> int:
        return len(self.payloads)

    @property
    def next_seq(self) -> int:
        """The seq just after its last part."""
        return self.first_seq + len(self.payloads)


@dataclass(frozen=True, slots=True)
class PartOutcome(Generic[T]):
    verdict: PartVerdict
    abandoned: bool  # this part ended an unfinished assembly (superseded by a new part 0, or broken)
    snapshot: Assembled[T] | None = None  # with COMPLETE


class SnapshotAssembler(Generic[T]):
    """Collects the parts of one snapshot at a time (module docstring: the rules). ``T``: what the receiver
    keeps of each part (e.g. the message itself)."""

    __slots__ = ("_first_seq", "_parts", "_payloads")

    def __init__(self) -> None:
        self._first_seq = 0
        self._parts = 0  # 0: not collecting
        self._payloads: list[T] = []

    @property
    def collecting(self) -> bool:
        """A snapshot is being assembled (part 0 came, the last part not yet)."""
        return self._parts > 0

    @property
    def received(self) -> int | None:
        """How many parts of the snapshot being assembled have arrived (None: none is)."""
        return len(self._payloads) if self._parts else None

    def offer(self, seq: int, part: int, parts: int, payload: T) -> PartOutcome[T]:
        """One part arrived (its ``seq`` in the stream, ``part`` of ``parts``)."""
        was_collecting = self.collecting
        if parts >= 1 and part == 0:
            self._first_seq, self._parts, self._payloads = seq, parts, []
        elif not (
            was_collecting
            and parts == self._parts
            and part == len(self._payloads)
            and seq == self._first_seq + part
        ):
            self.abandon()
            return PartOutcome(PartVerdict.REJECTED, abandoned=was_collecting)
        self._payloads.append(payload)
        abandoned = was_collecting and part == 0
        if len(self._payloads) < self._parts:
            return PartOutcome(PartVerdict.COLLECTED, abandoned)
        done = Assembled(self._first_seq, tuple(self._payloads))
        self._reset()
        return PartOutcome(PartVerdict.COMPLETE, abandoned, done)

    def abandon(self) -> bool:
        """Drop the snapshot being assembled, if any; True if there was one."""
        was_collecting = self.collecting
        self._reset()
        return was_collecting

    def _reset(self) -> None:
        self._parts = 0
        self._payloads = []
