"""Semantic checks of an inference request beyond what the schema decoder already enforced."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.worker.errors import InvalidRequest
from shared.schemas import InferenceRequest


@dataclass(frozen=True)
class RequestLimits:
    num_items: int
    max_history: int
    max_candidates: int


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request as arrays, ready for the model thread."""

    request_id: str
    user_id: str
    history: np.ndarray  # int64 [n]
    timestamps: np.ndarray  # int64 [n]
    candidates: np.ndarray  # int64 [m]
    k: int


def _first_out_of_range(values: np.ndarray, limit: int) -> int | None:
    bad = np.flatnonzero(values >= limit)
    return int(bad[0]) if bad.size else None


def prepare(req: InferenceRequest, limits: RequestLimits) -> PreparedRequest:
    """Check `req` against the catalogue and the model's limits; raise InvalidRequest naming the field."""
    n = len(req.history)
    if n > limits.max_history:
        raise InvalidRequest(
            f"history has {n} items, more than the model's limit {limits.max_history}", "history"
        )
    if req.timestamps is not None and len(req.timestamps) != n:
        raise InvalidRequest(
            f"timestamps has {len(req.timestamps)} entries but history has {n}; they must match", "timestamps"
        )
    m = len(req.candidates)
    if m == 0:
        raise InvalidRequest("candidates must not be empty", "candidates")
    if m > limits.max_candidates:
        raise InvalidRequest(f"{m} candidates, more than the limit {limits.max_candidates}", "candidates")
    history = np.asarray(req.history, dtype=np.int64)
    candidates = np.asarray(req.candidates, dtype=np.int64)
    for name, values in (("history", history), ("candidates", candidates)):
        idx = _first_out_of_range(values, limits.num_items)
        if idx is not None:
            raise InvalidRequest(
                f"item id {int(values[idx])} is outside the catalogue [0, {limits.num_items})",
                f"{name}[{idx}]",
            )
    timestamps = (
        np.asarray(req.timestamps, dtype=np.int64)
        if req.timestamps is not None
        else np.zeros(n, dtype=np.int64)
    )
    # k larger than the candidate list means "rank them all" (a client asking top-10 of 5 expects 5).
    k = m if req.k is None else min(req.k, m)
    return PreparedRequest(
        request_id=req.request_id,
        user_id=req.user_id,
        history=history,
        timestamps=timestamps,
        candidates=candidates,
        k=k,
    )
