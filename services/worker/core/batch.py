"""The cache side of serving a batch: the order of pool calls, written once for the engine and the simulator.

A batch is served in rounds (:func:`rounds`): a user's k-th request of the batch goes in the k-th round,
after the earlier one is committed. Within a round, for every request:

1. ``kv_lookup(user, len(history), prefix hash)`` -> ``cached`` (the engine reads those pages right away);
2. one ``emb_lookup`` of the union of every request's new history items ``history[cached:]`` and
   candidates, unique; then ``emb_admit`` of the misses (the engine reads the hit rows before admitting:
   a victim may be one of this round's hits);
3. the model runs; then ``kv_commit(user, len(history), prefix hash)`` for every request with new tokens,
   in batch order (a later commit may evict an earlier one of the same round).

:class:`RoundCaches` runs steps 1-2 (:meth:`RoundCaches.lookup`) and 3 (:meth:`commit`) so that both
callers make the same calls in the same order; :func:`per_request_emb` attributes the round's EMB hits and
misses to requests (each request counts the distinct items it needed). :class:`PrefixHasher` is the hash a
KV entry's prefix is checked by. Pure: numpy and hashlib only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.worker.core.emb_cache import EmbLookup, EmbPlacement
from services.worker.core.kv_cache import KvCommit, KvLookup
from services.worker.core.pool import Pool

__all__ = ["SCAN_FACTOR", "BatchFormer", "PrefixHasher", "RoundCaches", "per_request_emb", "rounds"]

# A batch looks at most at this many times `max_batch` queued requests for distinct users.
SCAN_FACTOR = 4

I64 = npt.NDArray[np.int64]


class PrefixHasher:
    """Hash of the first n history tokens (items and timestamps): what a KV entry's prefix is checked by."""

    __slots__ = ("_history", "_timestamps")

    def __init__(self, history: I64, timestamps: I64) -> None:
        self._history = history
        self._timestamps = timestamps

    def __call__(self, n: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(self._history[:n].tobytes())
        h.update(self._timestamps[:n].tobytes())
        return h.digest()


class BatchFormer:
    """Which queued requests join the batch being formed: distinct users only, up to ``max_batch``.

    Offer the queued requests in queue order after the batch's first; ``offer`` says whether one joins.
    A request whose user already has one in the batch stays queued, in its place: it leads the next batch,
    after this one has committed its user's KV (taken into this batch, it would need a second pass of its
    own, paying a whole pass's fixed cost for one or two requests). At most ``SCAN_FACTOR * max_batch``
    requests are looked at; ``done`` says when to stop offering.
    """

    __slots__ = ("_limit", "_looked", "_max", "_users", "size")

    def __init__(self, first_user: str, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._users = {first_user}
        self._max = max_batch
        self._looked = 1
        self._limit = SCAN_FACTOR * max_batch
        self.size = 1

    @property
    def done(self) -> bool:
        return self.size >= self._max or self._looked >= self._limit

    def offer(self, user_id: str) -> bool:
        self._looked += 1
        if user_id in self._users:
            return False
        self._users.add(user_id)
        self.size += 1
        return True


def rounds(user_ids: Sequence[str]) -> list[list[int]]:
    """Positions of the batch per round: a user's k-th request goes in round k."""
    seen: dict[str, int] = {}
    out: list[list[int]] = []
    for i, user in enumerate(user_ids):
        k = seen.get(user, 0)
        seen[user] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(i)
    return out


@dataclass(frozen=True, slots=True)
class RoundRequest:
    """What the caches need of one request (its user distinct within the round)."""

    user_id: str
    history: I64
    candidates: I64
    hasher: PrefixHasher


@dataclass(slots=True)
class RoundCaches:
    """Steps 1-2 of one round, then step 3; see the module docstring."""

    kv: list[KvLookup]
    cached: list[int]
    unique: I64  # the round's distinct items (sorted)
    inverse: I64  # position in `unique` of each looked-up item, request by request
    counts: list[int]  # items looked up per request: new history tokens + candidates
    emb: EmbLookup

    @classmethod
    def lookup(cls, pool: Pool, reqs: Sequence[RoundRequest]) -> RoundCaches:
        """KV lookups, then the round's one EMB lookup; admission is left to :meth:`admit`."""
        kv = [pool.kv_lookup(r.user_id, int(r.history.shape[0]), r.hasher) for r in reqs]
        cached = [hit.cached_len for hit in kv]
        pieces: list[I64] = []
        counts: list[int] = []
        for r, c in zip(reqs, cached, strict=True):
            pieces += [r.history[c:], r.candidates]
            counts.append(int(r.history.shape[0]) - c + int(r.candidates.shape[0]))
        unique, inverse = _unique_inverse(np.concatenate(pieces))
        return cls(kv, cached, unique, inverse, counts, pool.emb_lookup(unique))

    def admit(self, pool: Pool) -> EmbPlacement:
        """Offer the round's misses to the EMB cache (after the hit rows were read)."""
        if not self.emb.misses:
            return EmbPlacement.empty()
        return pool.emb_admit(self.emb.miss_items)

    @staticmethod
    def commit(pool: Pool, req: RoundRequest) -> KvCommit | None:
        """Step 3 for one request with new tokens (callers skip those without)."""
        n = int(req.history.shape[0])
        return pool.kv_commit(req.user_id, n, req.hasher(n))

    def missed(self) -> npt.NDArray[np.bool_]:
        """Per distinct item of the round: did it miss the hot cache?"""
        out = np.zeros(len(self.unique), dtype=np.bool_)
        out[self.emb.miss_positions] = True
        return out

    def per_request_emb(self) -> tuple[I64, I64]:
        """(hits, misses) per request, over the distinct items each needed."""
        if len(self.counts) == 1:  # one request needed every distinct item of the round
            misses = self.emb.misses
            return np.array([self.emb.hits], dtype=np.int64), np.array([misses], dtype=np.int64)
        return per_request_emb(self.unique.shape[0], self.inverse, self.counts, self.missed())


def _unique_inverse(items: I64) -> tuple[I64, I64]:
    """``np.unique(items, return_inverse=True)`` of a 1-D array (the same arrays; the inverse int64), without
    its per-call overhead."""
    n = items.shape[0]
    if n == 0:
        return items.copy(), np.zeros(0, dtype=np.int64)
    order = items.argsort()
    ordered = items[order]
    first = np.empty(n, dtype=np.bool_)  # the first of each run of equal items
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    rank = np.cumsum(first, dtype=np.int64)
    rank -= 1
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = rank
    unique: I64 = ordered[first]
    return unique, inverse


def per_request_emb(
    n_unique: int, inverse: I64, counts: Sequence[int], missed: npt.NDArray[np.bool_]
) -> tuple[I64, I64]:
    """Hits and misses per request: one unique over (request, item) pairs; ``inverse`` maps every
    looked-up item (request after request, ``counts`` each) to its distinct item."""
    n = len(counts)
    if n_unique == 0:
        zero = np.zeros(n, dtype=np.int64)
        return zero, zero.copy()
    request_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    pairs = np.unique(request_of * n_unique + inverse)
    owner = pairs // n_unique
    misses = np.bincount(owner, weights=missed[pairs % n_unique], minlength=n).astype(np.int64)
    needed = np.bincount(owner, minlength=n).astype(np.int64)
    return needed - misses, misses
