"""Free-unit bookkeeping over the chunks one cache owns (units = EMB slots or KV pages).

Allocation takes the LOWEST owned chunk that has a free unit, so live data packs into few chunks
and the emptiest chunks (the cheapest to release) stay empty. Inside a chunk freed units are
reused LIFO. The lowest non-full chunk is found through a min-heap with lazy deletion, so
allocate/release are O(log chunks) and independent of capacity. The batched forms hand out or take
back many units per call (units in the order single calls would use), looping over chunks, not units.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

__all__ = ["ChunkAllocator"]


class ChunkAllocator:
    def __init__(self, units_per_chunk: int) -> None:
        if units_per_chunk < 1:
            raise ValueError(f"units_per_chunk must be >= 1, got {units_per_chunk}")
        self._n = units_per_chunk
        self._free: dict[int, list[int]] = {}  # owned chunk -> free units (pop() = next to hand out)
        self._heap: list[int] = []  # chunks that may have free units (stale entries skipped lazily)
        self._in_heap: set[int] = set()
        self._free_count = 0

    @property
    def units_per_chunk(self) -> int:
        return self._n

    @property
    def chunk_count(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return len(self._free) * self._n

    @property
    def free_count(self) -> int:
        return self._free_count

    def chunks(self) -> list[int]:
        return sorted(self._free)

    def owns(self, chunk: int) -> bool:
        return chunk in self._free

    def used_in(self, chunk: int) -> int:
        return self._n - len(self._free[chunk])

    def free_units(self, chunk: int) -> list[int]:
        """Copy of one chunk's free list (for invariant checks)."""
        return list(self._free[chunk])

    def add_chunk(self, chunk: int) -> None:
        if chunk in self._free:
            raise ValueError(f"chunk {chunk} is already owned")
        lo = chunk * self._n
        self._free[chunk] = list(range(lo + self._n - 1, lo - 1, -1))  # lowest unit handed out first
        self._free_count += self._n
        self._push(chunk)

    def detach_chunk(self, chunk: int) -> None:
        """Stop owning ``chunk``: its free units vanish; its live units are the caller's to move."""
        units = self._free.pop(chunk, None)
        if units is None:
            raise ValueError(f"chunk {chunk} is not owned")
        self._free_count -= len(units)

    def allocate(self) -> int | None:
        heap = self._heap
        while heap:
            units = self._free.get(heap[0])
            if units:
                self._free_count -= 1
                return units.pop()
            self._in_heap.discard(heapq.heappop(heap))
        return None

    def allocate_many(self, k: int) -> list[int]:
        """Up to ``k`` units, exactly those (and in the order) that ``k`` calls of :meth:`allocate` return."""
        out: list[int] = []
        heap = self._heap
        while len(out) < k and heap:
            units = self._free.get(heap[0])
            if units:
                take = min(k - len(out), len(units))
                out.extend(units[: -take - 1 : -1])  # the last `take`, in pop() order
                del units[-take:]
                self._free_count -= take
                continue
            self._in_heap.discard(heapq.heappop(heap))
        return out

    def release_many(self, units: Iterable[int]) -> None:
        """Release ``units`` in order (as many calls of :meth:`release`)."""
        self._release_run(units, skip_unowned=False)

    def release_owned(self, units: Iterable[int]) -> None:
        """Release, in order, those of ``units`` whose chunk is owned; skip the others."""
        self._release_run(units, skip_unowned=True)

    def release(self, unit: int) -> None:
        chunk = unit // self._n
        units = self._free.get(chunk)
        if units is None:
            raise ValueError(f"unit {unit} belongs to chunk {chunk}, which is not owned")
        units.append(unit)
        self._free_count += 1
        self._push(chunk)

    def _release_run(self, units: Iterable[int], *, skip_unowned: bool) -> None:
        """:meth:`release` of each unit in turn, looking its chunk up once per run of units in one chunk."""
        n = self._n
        chunk = -1
        free: list[int] | None = None
        for unit in units:
            c = unit // n
            if c != chunk:
                chunk = c
                free = self._free.get(c)
                if free is None and not skip_unowned:
                    raise ValueError(f"unit {unit} belongs to chunk {c}, which is not owned")
                if free is not None:
                    self._push(c)
            if free is not None:
                free.append(unit)
                self._free_count += 1

    def _push(self, chunk: int) -> None:
        if chunk not in self._in_heap:
            self._in_heap.add(chunk)
            heapq.heappush(self._heap, chunk)
