"""EMB-miss counting: for one request, how many of the items each worker would look up its EMB lacks.

A worker with cached prefix ``c`` looks up the distinct items of ``history[c:]`` together with the distinct
candidates. All workers are counted from one pass:

1. one sort of history + candidates finds each distinct item and its *last* position (packed (item, position)
   pairs in one int64 when the ids leave room, a stable argsort otherwise);
2. one ``emb_masks`` call on the distinct items (``emb_masks_array`` while every bit index is below 64);
3. a 0/1 bit matrix, items x worker bits (one table gather per mask byte), and one matrix-vector product:
   per bit, how many distinct items hold it; a worker's misses are the distinct items minus its bit's count;
4. a worker with a cached prefix ``c`` needs exactly the items whose last position is >= ``c``: it counts its
   own bit over that tail (one count per such worker).

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


def _as_int64(x: _Ints) -> I64:
    out: I64 = np.asarray(x, dtype=np.int64)
    return out


# row v: the 8 bits of byte value v (little-endian bit order) as 0.0/1.0, the EMB bit matrix's building block
_BYTE_BITS: Final = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(
    np.float32
)


def _bit_matrix(masks: Sequence[int] | npt.NDArray[np.uint64], cols: int) -> npt.NDArray[np.float32]:
    """(U, cols) float32 0/1 matrix: column b = bit b of each item's mask (one table gather per byte)."""
    u = len(masks)
    if cols <= 64:
        if isinstance(masks, np.ndarray) and masks.dtype != np.object_:
            m = masks.astype(np.uint64, copy=False)
        else:
            try:
                m = np.array(masks, dtype=np.uint64)
            except OverflowError:  # bits >= 64 of workers that are not routable now
                m = np.array([int(x) & _MASK64 for x in masks], dtype=np.uint64)
        raw = m.astype("<u4") if cols == 32 else m.astype("<u8", copy=False)
    else:
        words = cols // 64
        raw = np.array(
            [[(int(x) >> (64 * k)) & _MASK64 for k in range(words)] for x in masks], dtype="<u8"
        ).reshape(u, words)
    out: npt.NDArray[np.float32] = _BYTE_BITS.take(raw.view(np.uint8).reshape(-1), axis=0).reshape(u, cols)
    return out


class EmbMissCounter:
    """Counts EMB misses per worker (module docstring); keeps its scratch buffers between calls."""

    def __init__(self) -> None:
        self._arange: I64 = np.arange(1024, dtype=np.int64)
        self._ones_buf: npt.NDArray[np.float32] = np.ones(1024, dtype=np.float32)

    def _positions(self, n: int) -> I64:
        if len(self._arange) < n:
            self._arange = np.arange(max(n, 2 * len(self._arange)), dtype=np.int64)
        return self._arange[:n]

    def _ones(self, n: int) -> npt.NDArray[np.float32]:
        if len(self._ones_buf) < n:
            self._ones_buf = np.ones(max(n, 2 * len(self._ones_buf)), dtype=np.float32)
        return self._ones_buf[:n]

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
        nv = len(allv)
        if nv == 0:
            return t.zeros
        # Each distinct item, represented by its last position in history + candidates: a worker whose
        # cached prefix is c needs exactly the items whose last position is >= c (candidates: always).
        # Sort (item, position) pairs packed in one int64 (SIMD sort, ~4x a stable argsort) when the ids
        # leave room for the position bits; the last of each run of equal items is its last position.
        shift = nv.bit_length()
        last = np.empty(nv, dtype=np.bool_)
        last[-1] = True
        if 0 <= int(np.bitwise_or.reduce(allv)) < 1 << (62 - shift):
            packed = allv << shift
            packed |= self._positions(nv)
            packed.sort()
            vals = packed >> shift
            np.not_equal(vals[1:], vals[:-1], out=last[:-1])
            reps = packed[last]
            reps &= (1 << shift) - 1
        else:  # negative or huge ids: the general (slower) way
            order = np.argsort(allv, kind="stable")
            s = allv[order]
            np.not_equal(s[1:], s[:-1], out=last[:-1])
            reps = order[last]
        reps.sort()  # the last positions of the distinct items, ascending
        items = allv[reps]
        u = len(items)
        cols = t.bit_cols
        fast = view.emb_masks_array(items) if cols <= 64 else None
        masks = fast if fast is not None else view.emb_masks(items.tolist())
        bits = _bit_matrix(masks, cols)
        hits = self._ones(u) @ bits  # per bit: how many distinct items hold it (exact in float32)
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
            misses[i] = (u - f) - (int(np.count_nonzero(bits[f:, b])) if b < cols else 0)
        return misses
