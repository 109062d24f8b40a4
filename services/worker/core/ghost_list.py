"""Bounded memory of recently missed or evicted, non-resident EMB items: what to refill from.

Layout (all numpy, every operation a fixed number of numpy calls per batch):

* an append-only log of entries ``(item, estimate, alive)``, oldest first, live between ``head`` and
  ``tail``; remembering an item appends a fresh entry and kills its previous one, so the log order of
  live entries is the recency order;
* ``pos[item]``: the log index of the item's live entry, or -1 (a dense int32 array over item ids, grown
  by :meth:`GhostList.reserve`: 4 bytes per item id).

Dropping the oldest at capacity scans forward from ``head`` in windows over the alive flags; when the
log runs out of room it is compacted (live entries copied to the front), at most once per as many
appends as there are live entries, so appends cost amortised O(1).

An entry's estimate is the sketch estimate when it was remembered; a ghost item is not resident, so
every lookup of it is a miss that re-remembers it. Only hash collisions can move an estimate unseen, and
sketch aging (which halves every counter) triggers one vectorised re-estimation of every live entry per
aging period. :meth:`GhostList.hottest` ranks "highest estimate first, ties most recent first" with a
16-bucket histogram of the live estimates (find the lowest bucket needed) and a sort of the few entries
above it: O(ghost) in cheap uint8 passes, no sort of the whole list.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.worker.core.sketch import FrequencySketch

__all__ = ["GhostList"]

IntArray = npt.NDArray[np.int64]
_MIN_LOG = 1024


def _iota(n: int) -> IntArray:
    out = np.arange(n, dtype=np.int64)
    out.flags.writeable = False
    return out


class GhostList:
    def __init__(self, capacity: int, sketch: FrequencySketch) -> None:
        if capacity < 0:
            raise ValueError(f"ghost capacity must be >= 0, got {capacity}")
        self._capacity = capacity
        self._sketch = sketch
        self._pos: npt.NDArray[np.int32] = np.full(0, -1, dtype=np.int32)
        self._log_items: IntArray = np.zeros(0, dtype=np.int64)
        self._log_est: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
        self._alive: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self._iota = _iota(0)
        self._head = 0
        self._tail = 0
        self._count = 0
        self._generation = sketch.generation

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._count

    def __contains__(self, item: int) -> bool:
        return 0 <= item < len(self._pos) and bool(self._pos[item] >= 0)

    def reserve(self, n_items: int) -> None:
        """Make item ids ``0 .. n_items - 1`` addressable (the caller grows this with its own slot map)."""
        old = len(self._pos)
        if n_items > old:
            grown = np.full(n_items, -1, dtype=np.int32)
            grown[:old] = self._pos
            self._pos = grown

    def items(self) -> list[int]:
        """Oldest first."""
        h, t = self._head, self._tail
        items: list[int] = self._log_items[h:t][self._alive[h:t]].tolist()
        return items

    def remember(self, items: IntArray, estimates: npt.NDArray[np.uint8], *, new: bool = False) -> None:
        """Record ``items`` (unique, reserved, not resident) as the most recent ghosts, in array order,
        ranked by ``estimates`` (their current sketch estimates); then drop the oldest beyond capacity.

        ``new=True`` promises that none of them is a ghost yet (items just evicted: residents never
        are), which saves looking their old entries up.
        """
        n = len(items)
        if n == 0 or self._capacity == 0:
            return
        self._sync()
        pos = self._pos
        if not new:
            old = pos[items]
            seen = old >= 0
            again = int(np.count_nonzero(seen))
            if again:
                self._alive[old if again == n else old[seen]] = False
                self._count -= again
        if self._tail + n > len(self._log_items):
            self._make_room(n)
        t = self._tail
        e = t + n
        self._log_items[t:e] = items
        self._log_est[t:e] = estimates
        self._alive[t:e] = True
        pos[items] = self._iota[t:e]
        self._tail = e
        self._count += n
        if self._count > self._capacity:
            self._drop_oldest(self._count - self._capacity)

    def discard(self, items: IntArray) -> None:
        """Forget ``items`` (unique, reserved) where they are ghosts."""
        if self._count == 0 or len(items) == 0:
            return
        old = self._pos[items]
        seen = old >= 0
        gone = int(np.count_nonzero(seen))
        if gone == len(items):
            self._alive[old] = False
            self._pos[items] = -1
        elif gone:
            self._alive[old[seen]] = False
            self._pos[items[seen]] = -1
        self._count -= gone

    def hottest(self, max_items: int) -> IntArray:
        """Up to ``max_items`` items, highest estimate first, ties most recent first."""
        want = min(max_items, self._count)
        if want <= 0:
            return np.zeros(0, dtype=np.int64)
        self._sync()
        h, t = self._head, self._tail
        key = self._log_est[h:t] + np.uint8(1)  # 1..16 for live entries
        key *= self._alive[h:t]  # 0 for dead ones
        counts = np.bincount(key, minlength=17).tolist()
        # The lowest bucket b still needed: everything above b is taken, then the most recent of b.
        b = 16
        above = 0
        while above + counts[b] < want:
            above += counts[b]
            b -= 1
        upper = np.flatnonzero(key > b)[::-1]  # most recent first
        if len(upper) > 1:
            upper = upper[np.argsort(np.uint8(16) - key[upper], kind="stable")]  # estimate desc, stable
        ties = np.flatnonzero(key == b)[::-1][: want - above]
        picked = np.concatenate([upper, ties])
        picked += h
        out: IntArray = self._log_items[picked]
        return out

    def check_invariants(self) -> None:
        h, t = self._head, self._tail
        if self._count > self._capacity:
            raise AssertionError(f"ghost list holds {self._count} > capacity {self._capacity}")
        if np.count_nonzero(self._alive[:h]) or np.count_nonzero(self._alive[t:]):
            raise AssertionError("ghost entries alive outside [head, tail)")
        live = np.flatnonzero(self._alive[h:t]) + h
        if len(live) != self._count:
            raise AssertionError(f"ghost count {self._count} but {len(live)} live log entries")
        items = self._log_items[live]
        if np.count_nonzero(self._pos[items] != live):
            raise AssertionError("ghost position map disagrees with the log")
        if np.count_nonzero(self._pos >= 0) != self._count:
            raise AssertionError("ghost position map holds stale items")

    # ----------------------------------------------------------------- internals
    def _sync(self) -> None:
        """After sketch aging, re-estimate every live entry (once per aging period, so amortised O(1))."""
        generation = self._sketch.generation
        if generation == self._generation:
            return
        self._generation = generation
        h, t = self._head, self._tail
        live = np.flatnonzero(self._alive[h:t]) + h
        if len(live):
            self._log_est[live] = self._sketch.estimate_many(self._log_items[live])

    def _drop_oldest(self, k: int) -> None:
        """Forget the ``k`` oldest live entries: scan forward from head in growing windows."""
        h, t = self._head, self._tail
        window = 2 * k + 64
        while True:
            e = min(t, h + window)
            live = self._alive[h:e].nonzero()[0]
            if len(live) >= k or e == t:
                break
            window *= 4
        drop = live[:k] + h
        end = int(drop[-1]) + 1
        self._alive[h:end] = False  # the dropped ones and dead ones between them
        self._pos[self._log_items[drop]] = -1
        self._count -= len(drop)
        self._head = end

    def _make_room(self, n: int) -> None:
        """Compact the live entries to the front of the log, growing it so that it is at most half full
        after the coming ``n`` appends (hence the amortised O(1))."""
        h, t = self._head, self._tail
        live = np.flatnonzero(self._alive[h:t]) + h
        items = self._log_items[live]
        est = self._log_est[live]
        n_live = len(live)
        need = n_live + n
        if len(self._log_items) < 2 * need:
            size = max(2 * need, _MIN_LOG)
            self._log_items = np.zeros(size, dtype=np.int64)
            self._log_est = np.zeros(size, dtype=np.uint8)
            self._alive = np.zeros(size, dtype=np.bool_)
            self._iota = _iota(size)
        else:
            self._alive[:t] = False
        self._log_items[:n_live] = items
        self._log_est[:n_live] = est
        self._alive[:n_live] = True
        self._pos[items] = self._iota[:n_live]
        self._head = 0
        self._tail = n_live
