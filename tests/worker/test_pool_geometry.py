from __future__ import annotations

from collections.abc import Callable

import pytest

from services.worker.core.geometry import Owner, PoolGeometry


def make(**overrides: int) -> PoolGeometry:
    params = {
        "budget_bytes": 1000,
        "chunk_bytes": 96,
        "emb_entry_bytes": 8,
        "kv_page_bytes": 32,
        "kv_page_tokens": 4,
    }
    params.update(overrides)
    return PoolGeometry(**params)


def test_derived_sizes() -> None:
    g = make()
    assert g.total_chunks == 10
    assert g.pool_bytes == 960
    assert g.unused_bytes == 40
    assert g.emb_slots_per_chunk == 12
    assert g.kv_pages_per_chunk == 3
    assert g.emb_slot_count == 120
    assert g.kv_page_count == 30


def test_global_addressing() -> None:
    g = make()
    assert g.emb_slots_of_chunk(0) == range(0, 12)
    assert g.emb_slots_of_chunk(3) == range(36, 48)
    assert g.kv_pages_of_chunk(3) == range(9, 12)
    assert g.chunk_of_emb_slot(35) == 2
    assert g.chunk_of_emb_slot(36) == 3
    assert g.chunk_of_kv_page(11) == 3
    assert g.chunk_of_kv_page(12) == 4
    # the same bytes: chunk c spans [c*chunk_bytes, (c+1)*chunk_bytes) in both views
    c = 7
    slots = g.emb_slots_of_chunk(c)
    pages = g.kv_pages_of_chunk(c)
    assert slots.start * g.emb_entry_bytes == pages.start * g.kv_page_bytes == c * g.chunk_bytes
    assert slots.stop * g.emb_entry_bytes == pages.stop * g.kv_page_bytes == (c + 1) * g.chunk_bytes


@pytest.mark.parametrize(
    "call",
    [
        lambda g: g.chunk_of_emb_slot(-1),
        lambda g: g.chunk_of_emb_slot(120),
        lambda g: g.chunk_of_kv_page(30),
        lambda g: g.emb_slots_of_chunk(10),
        lambda g: g.kv_pages_of_chunk(-1),
    ],
)
def test_out_of_range_ids_raise(call: Callable[[PoolGeometry], object]) -> None:
    g = make()
    with pytest.raises(ValueError):
        call(g)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget_bytes": 0}, "budget_bytes must be > 0"),
        ({"chunk_bytes": -96}, "chunk_bytes must be > 0"),
        ({"emb_entry_bytes": 0}, "emb_entry_bytes must be > 0"),
        ({"kv_page_bytes": 0}, "kv_page_bytes must be > 0"),
        ({"kv_page_tokens": 0}, "kv_page_tokens must be > 0"),
        ({"emb_entry_bytes": 7}, "multiple of emb_entry_bytes"),
        ({"kv_page_bytes": 64}, "multiple of kv_page_bytes"),
        ({"budget_bytes": 95}, "smaller than one chunk"),
    ],
)
def test_invalid_geometry(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_exactly_one_chunk_is_valid() -> None:
    g = make(budget_bytes=96)
    assert g.total_chunks == 1
    assert g.unused_bytes == 0


def test_owner_values() -> None:
    assert [int(o) for o in (Owner.FREE, Owner.EMB, Owner.KV)] == [0, 1, 2]
