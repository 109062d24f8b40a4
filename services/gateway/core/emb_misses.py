"""EMB-miss counting: for one request, how many of the items each worker would look up its EMB lacks.

A worker with cached prefix ``c`` looks up the distinct items of ``history[c:]`` together with the distinct
candidates. All workers are counted from one pass:

1. each distinct item of history + candidates and its *last* position, without a sort: the positions are
   written into a scratch array indexed by item id and read back; an item's last occurrence is the one that
   reads back its own position (``np.maximum.at`` makes sure it won, should numpy have written repeated ids
   out of order). Those positions come out ascending. The scratch array is reused across calls without
   clearing (every id a call reads, it has written first): int32, sized to a power of two above the largest
   id seen (8 MiB for 1.6M items), ids below ``SCRATCH_MAX_ITEMS`` only. Other ids (negative or larger)
   take one sort instead (packed (item, position) pairs in one int64 when the ids leave room, a stable
   argsort otherwise);
2. one ``emb_masks`` call on the distinct items (``emb_masks_array`` while every bit index is below 64);
3. per bit, how many distinct items hold it: a 0/1 float32 bit matrix, items x worker bits (one table gather
   per mask byte), and one matrix-vector product; a worker's misses are the distinct items minus its bit's
   count;
4. a worker with a cached prefix ``c`` needs exactly the items whose last position is >= ``c``: it counts its
   own bit over that tail of the masks (one count per such worker; none when no worker has a prefix).

Scratch buffers grow as needed and are reused across calls: one ``EmbMissCounter`` per router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from services.gateway.core.routing_view import RoutingView
from services.gateway.core.table import WorkerTable

__all__ = ["EmbMissCounter"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
_Ints = Sequence[int] | npt.NDArray[np.integer[Any]]  # an int64 array is fastest

_MASK64: Final = (1 << 64) - 1
# the scratch array of last positions covers item ids below this (4 bytes per id: 64 MiB at most)
SCRATCH_MAX_ITEMS: Final = 1 << 24
_POS_MAX: Final = (1 << 31) - 1  # positions in the scratch array are int32


def _as_int64(x: _Ints) -> I64:
    out: I64 = np.asarray(x, dtype=np.int64)
    return out


# row v: the 8 bits of byte value v (little-endian bit order) as 0.0/1.0, the EMB bit matrix's building block
_BYTE_BITS: Final = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(
    np.float32
)


def _mask_words(masks: Sequence[int] | npt.NDArray[np.uint64], cols: int) -> npt.NDArray[np.uint64]:
    """The masks as (U, cols // 64) uint64 words (U, 1 while cols <= 64): word k = bits 64k..64k+63."""
    if cols <= 64:
        if isinstance(masks, np.ndarray) and masks.dtype != np.object_:
            m: npt.NDArray[np.uint64] = masks.astype(np.uint64, copy=False)
        else:
            try:
                m = np.array(masks, dtype=np.uint64)
            except OverflowError:  # bits >= 64 of workers that are not routable now
                m = np.array([int(x) & _MASK64 for x in masks], dtype=np.uint64)
        return m.reshape(-1, 1)
    words = cols // 64
    out: npt.NDArray[np.uint64] = np.array(
        [[(int(x) >> (64 * k)) & _MASK64 for k in range(words)] for x in masks], dtype=np.uint64
    ).reshape(len(masks), words)
    return out


class EmbMissCounter:
    """Counts EMB misses per worker (module docstring); keeps its scratch buffers between calls."""

    def __init__(self) -> None:
        self._arange32: npt.NDArray[np.int32] = np.arange(1024, dtype=np.int32)
        self._ones_buf: npt.NDArray[np.float32] = np.ones(1024, dtype=np.float32)
        # item id -> its last position in the latest call that held it (step 1 of the module docstring)
        self._last: npt.NDArray[np.int32] = np.empty(0, dtype=np.int32)

    def _positions32(self, n: int) -> npt.NDArray[np.int32]:
        if len(self._arange32) < n:
            self._arange32 = np.arange(max(n, 2 * len(self._arange32)), dtype=np.int32)
        return self._arange32[:n]

    def _ones(self, n: int) -> npt.NDArray[np.float32]:
        if len(self._ones_buf) < n:
            self._ones_buf = np.ones(max(n, 2 * len(self._ones_buf)), dtype=np.float32)
        return self._ones_buf[:n]

    def _last_positions(self, allv: I64) -> I64:
        """The last position of each distinct item of ``allv``, ascending (step 1 of the module docstring)."""
        nv = len(allv)
        ids = int(np.bitwise_or.reduce(allv))  # >= every id when none is negative, negative when one is
        if 0 <= ids < SCRATCH_MAX_ITEMS and nv <= _POS_MAX:
            last = self._last
            if ids >= len(last):  # a power of two above `ids` is above every id
                last = self._last = np.empty(max(1024, 1 << ids.bit_length()), dtype=np.int32)
            # every id of this call gets one of its positions (whatever earlier calls left there)...
            pos = self._positions32(nv)
            last[allv] = pos
            seen = last.take(allv)
            # ...the last one, unless numpy wrote repeated ids out of order (it does not promise the order)
            if (seen < pos).any():
                np.maximum.at(last, allv, pos)
                seen = last.take(allv)
            found: I64 = (seen == pos).nonzero()[0]
            return found
        # ids outside the scratch array: sort (item, position) pairs packed in one int64 (SIMD sort, ~4x a
        # stable argsort) when the ids leave room for the position bits; the last of each run of equal items
        # is its last position
        shift = nv.bit_length()
        is_last = np.empty(nv, dtype=np.bool_)
        is_last[-1] = True
        if 0 <= ids < 1 << (62 - shift):
            packed = allv << shift
            packed |= self._positions32(nv)
            packed.sort()
            vals = packed >> shift
            np.not_equal(vals[1:], vals[:-1], out=is_last[:-1])
            reps = packed[is_last]
            reps &= (1 << shift) - 1
        else:  # negative or huge ids: the general (slower) way
            order = np.argsort(allv, kind="stable")
            s = allv[order]
            np.not_equal(s[1:], s[:-1], out=is_last[:-1])
            reps = order[is_last]
        reps.sort()
        return reps

    def _bit_counts(self, words: npt.NDArray[np.uint64], cols: int) -> npt.NDArray[np.float32]:
        """Per bit column: how many rows of ``words`` hold it (exact in float32), step 3."""
        u = len(words)
        raw = words.astype("<u4") if cols == 32 else words.astype("<u8", copy=False)
        bits = _BYTE_BITS.take(raw.view(np.uint8).reshape(-1), axis=0).reshape(u, cols)
        hits: npt.NDArray[np.float32] = self._ones(u) @ bits
        return hits

    def count(
        self,
        view: RoutingView,
        t: WorkerTable,
        history: _Ints,
        candidates: _Ints,
        cached: Mapping[int, int],
    ) -> F64:
        """Per worker: distinct needed items (history[cached:] + candidates) whose mask lacks its bit.
        ``cached``: worker index -> cached prefix length (> 0). Shared when there is nothing to look up."""
        hist = _as_int64(history)
        cand = _as_int64(candidates)
        allv = np.concatenate((hist, cand)) if len(cand) else hist
        if len(allv) == 0:
            return t.zeros
        # Each distinct item, represented by its last position in history + candidates: a worker whose
        # cached prefix is c needs exactly the items whose last position is >= c (candidates: always).
        reps = self._last_positions(allv)
        items = allv.take(reps)
        u = len(items)
        cols = t.bit_cols
        fast = view.emb_masks_array(items) if cols <= 64 else None
        words = _mask_words(fast if fast is not None else view.emb_masks(items.tolist()), cols)
        hits = self._bit_counts(words, cols)  # per bit: how many distinct items hold it
        if t.bit_identity:
            misses: F64 = np.subtract(float(u), hits, dtype=np.float64)
        else:
            if t.any_without_bit:
                hits = np.append(hits, np.float32(0.0))
            misses = np.subtract(float(u), hits[t.bitidx], dtype=np.float64)
        bitlist = t.bitlist
        for i, c in cached.items():
            # the items a worker with prefix c needs: those whose last position is >= c
            f = int(reps.searchsorted(c))
            b = bitlist[i]
            held = int(np.count_nonzero(words[f:, b >> 6] & np.uint64(1 << (b & 63)))) if b < cols else 0
            misses[i] = (u - f) - held
        return misses
