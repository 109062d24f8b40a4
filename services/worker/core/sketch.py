"""Count-min frequency sketch with aging: the TinyLFU admission filter of the EMB cache.

Depth 4, width a power of two, 4-bit-style saturating counters (max 15) stored one per byte in a
``bytearray`` so aging can halve a whole row with one C-level ``bytes.translate``. After
``sample_size`` increments every counter is halved, so old popularity decays and the estimate
tracks recent frequency (Einziger et al., TinyLFU).
"""

from __future__ import annotations

__all__ = ["FrequencySketch"]

_DEPTH = 4
_MAX_COUNT = 15
_MIN_WIDTH = 64
_MASK64 = (1 << 64) - 1
# Python's hash(int) is the identity, so keys are first mixed (one multiply + xorshift), then each
# row takes the top bits of a multiply by its own fixed odd constant (multiply-shift hashing). Without
# the pre-mix, runs of sequential ids land on correlated lattices in all four rows and absent keys
# look present far more often than count-min's independent-rows bound.
_PREMIX = 0xFF51AFD7ED558CCD
_ROW_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_HALVE = bytes(b >> 1 for b in range(256))


class FrequencySketch:
    """Approximate recent access counts of non-negative int keys."""

    def __init__(self, capacity: int, *, sample_size: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if sample_size is None:
            sample_size = 10 * capacity
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        width = _MIN_WIDTH
        while width < capacity:
            width *= 2
        self._width = width
        self._shift = 64 - (width.bit_length() - 1)
        self._rows = [bytearray(width) for _ in range(_DEPTH)]
        self._sample_size = sample_size
        self._additions = 0
        self._generation = 0

    @property
    def width(self) -> int:
        return self._width

    @property
    def sample_size(self) -> int:
        return self._sample_size

    @property
    def generation(self) -> int:
        """How many times the counters were halved; lets callers invalidate cached estimates."""
        return self._generation

    @property
    def max_count(self) -> int:
        return _MAX_COUNT

    def increment(self, key: int) -> None:
        self.increment_and_estimate(key)

    def increment_and_estimate(self, key: int) -> int:
        """Count one access of ``key``; returns its estimate afterwards (one hash instead of two)."""
        key = (key * _PREMIX) & _MASK64
        key ^= key >> 29
        s = self._shift
        m0, m1, m2, m3 = _ROW_MULTIPLIERS
        r0, r1, r2, r3 = self._rows
        i0 = ((key * m0) & _MASK64) >> s
        i1 = ((key * m1) & _MASK64) >> s
        i2 = ((key * m2) & _MASK64) >> s
        i3 = ((key * m3) & _MASK64) >> s
        c0, c1, c2, c3 = r0[i0], r1[i1], r2[i2], r3[i3]
        if c0 < _MAX_COUNT:
            c0 += 1
            r0[i0] = c0
        if c1 < _MAX_COUNT:
            c1 += 1
            r1[i1] = c1
        if c2 < _MAX_COUNT:
            c2 += 1
            r2[i2] = c2
        if c3 < _MAX_COUNT:
            c3 += 1
            r3[i3] = c3
        self._additions += 1
        if self._additions >= self._sample_size:
            self._age()
            return self.estimate(key)
        return min(c0, c1, c2, c3)

    def estimate(self, key: int) -> int:
        key = (key * _PREMIX) & _MASK64
        key ^= key >> 29
        s = self._shift
        m0, m1, m2, m3 = _ROW_MULTIPLIERS
        r0, r1, r2, r3 = self._rows
        return min(
            r0[((key * m0) & _MASK64) >> s],
            r1[((key * m1) & _MASK64) >> s],
            r2[((key * m2) & _MASK64) >> s],
            r3[((key * m3) & _MASK64) >> s],
        )

    def _age(self) -> None:
        for row in self._rows:
            row[:] = row.translate(_HALVE)
        self._additions = 0
        self._generation += 1
