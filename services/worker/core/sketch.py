"""Count-min frequency sketch with aging: the TinyLFU admission filter of the EMB cache.

Depth 4, saturating counters (max 15) stored one per byte in one ``uint8`` array of ``4 * width``
counters, ``width`` a power of two. After ``sample_size`` increments every counter is halved, so old
popularity decays and the estimate tracks recent frequency (Einziger et al., TinyLFU).

Layout: blocked count-min (as in Caffeine). The table is cut into 64-byte blocks (one cache line) of
four 16-counter rows; a key hashes to one block and to one counter in each of its four rows. A batch
then touches one cache line per key instead of four, which is most of the cost of counting a batch
whose keys are spread over a table of megabytes. Keys are first mixed (one multiply + xorshift); the
block is the top bits of one multiply-shift of the mixed key, and the four in-row positions are four
nibbles of the top bits of a second one (multiply-shift hashing with fixed odd constants). Without the
pre-mix, runs of sequential ids land on correlated lattices and absent keys look present far more often
than count-min's bound. All arithmetic is uint64, wrapping modulo 2**64.

Batches
-------
:meth:`FrequencySketch.increment_many` and :meth:`FrequencySketch.estimate_many` take an int64 array
of keys and cost a fixed dozen numpy calls, whatever the batch size: the ``4 x n`` counter indices
are computed by broadcasting, bumped with ``np.add.at`` (so keys of one batch that share a counter each
count, as they would one at a time; with a uint8 scalar it is a fast path), then saturated and read.
Two differences from counting the keys one at a time, documented policy: the estimates returned are
those after the whole batch was counted (one at a time, a key's estimate would miss the bumps of later
keys of the batch sharing its counters), and aging is applied at the end of the batch (as many halvings
as ``sample_size`` periods the batch completed), not in its middle.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["FrequencySketch"]

_DEPTH = 4
_MAX_COUNT = 15
_MIN_WIDTH = 64
_BLOCK = 64  # bytes = counters per block: _DEPTH rows of 16
_PREMIX = np.uint64(0xFF51AFD7ED558CCD)
_XORSHIFT = np.uint64(29)
_BLOCK_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_ROW_MULTIPLIER = np.uint64(0xC2B2AE3D27D4EB4F)
_NIBBLE_SHIFTS = np.array([60, 56, 52, 48], dtype=np.uint64)[:, None]  # row r: bits 63-4r .. 60-4r
_ROW_OFFSETS = (np.arange(_DEPTH, dtype=np.uint64) * np.uint64(_BLOCK // _DEPTH))[:, None]
_NIBBLE = np.uint64(15)
_BLOCK_MASK = np.uint64(2**64 - _BLOCK)
_ONE = np.uint8(1)
_MAX = np.uint8(_MAX_COUNT)


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
        blocks = _DEPTH * width // _BLOCK  # a power of two
        # top log2(blocks) bits of the product, already multiplied by the block size
        self._block_shift = np.uint64(64 - (blocks.bit_length() - 1) - (_BLOCK.bit_length() - 1))
        self._table: npt.NDArray[np.uint8] = np.zeros(_DEPTH * width, dtype=np.uint8)
        self._sample_size = sample_size
        self._additions = 0
        self._generation = 0
        self._version = 0

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
    def version(self) -> int:
        """Bumped by every change to the counters: estimates taken at one version hold until it moves."""
        return self._version

    @property
    def max_count(self) -> int:
        return _MAX_COUNT

    # ----------------------------------------------------------------- batches
    def increment_many(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        """Count one access of each key (int64, >= 0); returns their estimates afterwards (after any aging
        the batch triggered)."""
        n = len(keys)
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        if n <= self._width:
            estimates = self._bump(keys)
        else:  # a batch wider than a row: in row-wide parts (see _bump)
            w = self._width
            estimates = np.concatenate([self._bump(keys[i : i + w]) for i in range(0, n, w)])
        self._version += 1
        self._additions += n
        if self._additions >= self._sample_size:
            periods, self._additions = divmod(self._additions, self._sample_size)
            self._age(periods)
            estimates >>= np.uint8(min(periods, 8))
        return estimates

    def estimate_many(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        """Estimates of the keys (int64, >= 0), without counting them."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.uint8)
        estimates: npt.NDArray[np.uint8] = self._table[self._index(keys)].min(axis=0)
        return estimates

    # ----------------------------------------------------------------- single keys (tests, tools)
    def increment(self, key: int) -> None:
        self.increment_many(np.array([key], dtype=np.int64))

    def increment_and_estimate(self, key: int) -> int:
        """Count one access of ``key``; returns its estimate afterwards."""
        return int(self.increment_many(np.array([key], dtype=np.int64))[0])

    def estimate(self, key: int) -> int:
        return int(self.estimate_many(np.array([key], dtype=np.int64))[0])

    # ----------------------------------------------------------------- internals
    def _bump(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        """Increment (saturating) and estimate ``keys``, no more of them than a row is wide.

        ``np.add.at`` bumps a counter once per key of the batch that maps to it, in uint8, and only then
        is the result saturated; a counter reached by more than 240 keys of one batch would wrap instead.
        With at most ``width`` keys per call a counter expects about one of them, so that takes an
        adversarial choice of ids, and even then it only lowers an estimate (still within 0..15).
        """
        idx = self._index(keys)
        table = self._table
        np.add.at(table, idx.reshape(-1), _ONE)
        counts = table[idx]  # (4, n)
        np.minimum(counts, _MAX, out=counts)
        table[idx] = counts
        estimates: npt.NDArray[np.uint8] = counts.min(axis=0)
        return estimates

    def _index(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Flat counter indices, shape (4, n): key k's counter in row r of its block."""
        h = keys.view(np.uint64) * _PREMIX  # ids are >= 0: the same numbers
        h ^= h >> _XORSHIFT
        block = h * _BLOCK_MULTIPLIER
        block >>= self._block_shift
        block &= _BLOCK_MASK  # byte offset of the block
        idx = (h * _ROW_MULTIPLIER) >> _NIBBLE_SHIFTS  # (4, n), wraps modulo 2**64
        idx &= _NIBBLE
        idx += _ROW_OFFSETS
        idx += block
        # < 4 * width, so the int64 view is the same numbers; numpy gathers twice as fast with it
        return idx.view(np.int64)

    def _age(self, periods: int) -> None:
        self._table >>= np.uint8(min(periods, 8))
        self._generation += periods
        self._version += 1
