"""The cost model: one estimate per worker for one request, in milliseconds (pure numpy).

Every term comes from the worker's own digest (its fitted ``cost`` coefficients and its ``load``, carried in
the view's ``WorkerState``); there are no hand-tuned weights:

    total_ms   = queue_ms + compute_ms + emb_ms
    compute_ms = fixed + ms_per_new_token * new + ms_per_cached_token * cached + ms_per_candidate * K
    emb_ms     = ms_per_emb_miss * misses

- ``cached`` is the prefix of the user's history whose KV the worker holds: the view's covered length if it
  is <= len(history) (a longer one does not match this history: 0), raised by predict-on-route
  (``router.py``). ``new = len(history) - cached``.
- ``misses`` counts the distinct items the worker would look up that its EMB hot cache lacks: the unique
  items of ``history[cached:]`` together with the unique candidates (K = len(candidates), duplicates
  included, since every candidate is scored). Counted by ``emb_misses.py``.
- ``queue_ms = ahead * service_ms`` (anti-herding):
    ahead      = max(view queue_depth, this gateway's own in-flight count to the worker)
    service_ms = ewma_service_ms                        if the worker reports it (model time per request),
                 else ewma_latency_ms / (1 + queue_depth)   if the worker reports a latency,
                 else the request's compute_ms on that worker with no KV credit (fixed + new-token cost of
                 the whole history + candidates).
  The view's ``queue_depth`` (requests waiting at the worker, from every gateway) lags by up to one digest;
  each of this gateway's requests answered by the worker since the view changed counts one off it (the queue
  has moved on by at least that much), so a queue that drains is seen draining before the next digest;
  its ``in_flight`` is not used because it also counts the request running when the digest was cut, often
  one of ours long finished, and that stale count flips users away from their KV. The own count is exact
  now but covers this gateway only: their maximum is a lower bound of the work ahead. The worker's
  ``ewma_service_ms`` is the service time itself. Without it, ``ewma_latency_ms`` (receipt-to-reply,
  queueing included) divided by ``1 + queue_depth`` stands for it (a FIFO arrival that found ``q`` waiting
  spends about ``(q + 1) * service``), but only in a steady state: when a long queue has just drained, the
  latency still remembers the queue while the depth does not, and the quotient overestimates the service
  time many times over (an admission rule built on it sheds everything until the next digest). The
  fallback uses the no-cache compute on purpose: requests ahead of us are other users', so this user's KV
  credit must not shrink the wait (that would herd a hot user's burst).

The per-worker arrays these functions read (coefficients, ``ahead``, the queue terms ``q0``/``a0`` built
from ``service_ms``) live in the ``WorkerTable`` (``table.py``). Which terms a policy scores is the
router's business. Arrays returned as "shared" belong to the table or to another term: never write into
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from services.gateway.core.table import WorkerTable

__all__ = ["compute_ms", "emb_ms", "no_kv_compute_ms", "queue_ms", "service_ms"]

F64 = npt.NDArray[np.float64]


def service_ms(ewma_service_ms: F64, ewma_latency_ms: F64, queue_depth: F64) -> F64:
    """Per worker: what each request ahead of ours costs it (the rule above); 0 where it reports neither
    figure (the queue then falls back to the request's no-KV compute)."""
    out: F64 = np.where(ewma_service_ms > 0.0, ewma_service_ms, ewma_latency_ms / (1.0 + queue_depth))
    return out


def no_kv_compute_ms(t: WorkerTable, hist_len: int, k: int) -> F64:
    """Per worker: compute_ms with no KV credit (fixed + new-token cost of the whole history + candidates).
    Kept on the table for the last (history length, candidates) asked: shared."""
    if t.full_key == (hist_len, k):
        return t.full
    if t.cand_k != k:  # the candidate part, kept for the last K (the history length varies more)
        part: F64 = t.mcand * float(k)
        part += t.fixed
        t.cand_k = k
        t.cand_part = part
    full: F64 = t.mnew * float(hist_len)
    full += t.cand_part  # (mcand * K + fixed) + mnew * history: the same rounding in the same order
    t.full_key = (hist_len, k)
    t.full = full
    return full


def queue_ms(t: WorkerTable, no_kv: F64) -> F64:
    """Per worker: ahead x service time, the no-KV compute standing for an unknown service time."""
    queue: F64 = t.a0 * no_kv
    queue += t.q0
    return queue


def compute_ms(t: WorkerTable, no_kv: F64, cached: Mapping[int, int]) -> F64:
    """Per worker: compute_ms with its cached prefix (worker index -> tokens, > 0) credited; without any,
    the no-KV compute itself (shared)."""
    if not cached:
        return no_kv
    compute = no_kv.copy()
    mcm = t.mcached_minus_new
    for i, c in cached.items():
        compute[i] += mcm[i] * c
    return compute


def emb_ms(t: WorkerTable, misses: F64) -> F64:
    """Per worker: its EMB misses x its cost of one miss."""
    out: F64 = t.miss * misses
    return out
