"""Bounded memory of recently missed or evicted, non-resident EMB items: what to refill from.

Items are kept in recency order (to drop the oldest at capacity) and also in one bucket per sketch
estimate (0..15), each bucket in recency order. Ranking "hottest first, ties most recent first" is
then a walk from the top bucket down that stops after ``max_items``: O(max_items), not O(ghost).
An item's bucket is its estimate when it was last remembered; a ghost item is not resident, so every
lookup of it is a miss that re-buckets it. Only hash collisions can move an estimate unseen, and
sketch aging (which halves every counter) triggers one full re-bucketing per aging period.
"""

from __future__ import annotations

from collections import OrderedDict

from services.worker.core.sketch import FrequencySketch

__all__ = ["GhostList"]


class GhostList:
    def __init__(self, capacity: int, sketch: FrequencySketch) -> None:
        if capacity < 0:
            raise ValueError(f"ghost capacity must be >= 0, got {capacity}")
        self._capacity = capacity
        self._sketch = sketch
        self._recency: OrderedDict[int, int] = OrderedDict()  # item -> bucket, oldest first
        self._buckets: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(sketch.max_count + 1)]
        self._generation = sketch.generation

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._recency)

    def __contains__(self, item: int) -> bool:
        return item in self._recency

    def items(self) -> list[int]:
        """Oldest first."""
        return list(self._recency)

    def remember(self, item: int, estimate: int | None = None) -> None:
        """Record ``item`` as the most recent ghost, ranked by its current sketch ``estimate``
        (looked up when not given)."""
        if self._capacity == 0:
            return
        self._sync()
        bucket = self._sketch.estimate(item) if estimate is None else estimate
        old = self._recency.pop(item, None)
        if old is not None:
            del self._buckets[old][item]
        self._recency[item] = bucket
        self._buckets[bucket][item] = None
        if len(self._recency) > self._capacity:
            oldest, oldest_bucket = self._recency.popitem(last=False)
            del self._buckets[oldest_bucket][oldest]

    def discard(self, item: int) -> None:
        bucket = self._recency.pop(item, None)
        if bucket is not None:
            del self._buckets[bucket][item]

    def hottest(self, max_items: int) -> list[int]:
        """Up to ``max_items`` items, highest estimate first, ties most recent first."""
        if max_items <= 0:
            return []
        self._sync()
        out: list[int] = []
        for bucket in reversed(self._buckets):
            for item in reversed(bucket):
                out.append(item)
                if len(out) == max_items:
                    return out
        return out

    def check_invariants(self) -> None:
        if len(self._recency) > self._capacity:
            raise AssertionError(f"ghost list holds {len(self._recency)} > capacity {self._capacity}")
        if sum(len(b) for b in self._buckets) != len(self._recency):
            raise AssertionError("ghost buckets and recency list disagree in size")
        for item, bucket in self._recency.items():
            if item not in self._buckets[bucket]:
                raise AssertionError(f"ghost item {item} missing from bucket {bucket}")

    def _sync(self) -> None:
        """After sketch aging, re-bucket everything (once per aging period, so amortised O(1))."""
        generation = self._sketch.generation
        if generation == self._generation:
            return
        self._generation = generation
        for bucket in self._buckets:
            bucket.clear()
        estimate = self._sketch.estimate
        for item in list(self._recency):  # recency order, so every bucket stays recency-ordered
            b = estimate(item)
            self._recency[item] = b
            self._buckets[b][item] = None
