from __future__ import annotations

from collections.abc import Callable

import pytest

from services.worker.core.geometry import PoolGeometry
from services.worker.core.kv_cache import KvCache, KvCommit, KvLookup, Relocation

PAGE_TOKENS = 2


def make_cache(chunks: int = 2, pages_per_chunk: int = 2, owned: int | None = None) -> KvCache:
    geometry = PoolGeometry(
        budget_bytes=chunks * pages_per_chunk * 16,
        chunk_bytes=pages_per_chunk * 16,
        emb_entry_bytes=16,
        kv_page_bytes=16,
        kv_page_tokens=PAGE_TOKENS,
    )
    cache = KvCache(geometry)
    for chunk in range(chunks if owned is None else owned):
        cache.add_chunk(chunk)
    return cache


def hasher(history: list[int]) -> Callable[[int], bytes]:
    return lambda n: bytes(history[:n])


def commit(cache: KvCache, user: str, history: list[int]) -> KvCommit:
    result = cache.commit(user, len(history), bytes(history))
    assert result is not None
    return result


def test_commit_new_entry_allocates_pages_in_order() -> None:
    cache = make_cache()
    result = commit(cache, "a", [1, 2, 3])
    assert result == KvCommit(pages=[0, 1], write_from=0)
    entry = cache.get("a")
    assert entry is not None
    assert (entry.user, entry.length, entry.prefix_hash, entry.pages) == ("a", 3, bytes([1, 2, 3]), [0, 1])
    assert (cache.used_pages, cache.free_pages) == (2, 2)
    cache.check_invariants()


def test_extension_writes_from_old_length_and_keeps_old_pages_as_prefix() -> None:
    cache = make_cache(chunks=3)
    first = commit(cache, "a", [1, 2, 3])
    second = commit(cache, "a", [1, 2, 3, 4, 5, 6, 7])
    assert second.write_from == 3
    assert second.pages[: len(first.pages)] == first.pages
    assert second.pages == [0, 1, 2, 3]
    same = commit(cache, "a", [1, 2, 3, 4, 5, 6, 7])
    assert same == KvCommit(pages=[0, 1, 2, 3], write_from=7)
    cache.check_invariants()


def test_commit_shorter_than_entry_raises() -> None:
    cache = make_cache()
    commit(cache, "a", [1, 2, 3])
    with pytest.raises(ValueError, match="shrink"):
        cache.commit("a", 2, b"x")
    with pytest.raises(ValueError):
        cache.commit("b", -1, b"x")


def test_lookup_hit_returns_cached_prefix() -> None:
    cache = make_cache()
    history = [1, 2, 3]
    commit(cache, "a", history)
    history += [4, 5]
    assert cache.lookup("a", len(history), hasher(history)) == KvLookup(cached_len=3, pages=[0, 1])
    assert (cache.counters.kv_hits, cache.counters.kv_misses) == (1, 0)


def test_lookup_without_entry_is_a_miss() -> None:
    cache = make_cache()
    assert cache.lookup("nobody", 5, hasher([])) == KvLookup(cached_len=0, pages=[])
    assert cache.counters.kv_misses == 1


@pytest.mark.parametrize(
    "new_history",
    [
        [1, 2],  # shorter than the entry
        [9, 2, 3, 4],  # different prefix
    ],
)
def test_non_extension_history_removes_entry(new_history: list[int]) -> None:
    cache = make_cache()
    commit(cache, "a", [1, 2, 3])
    assert cache.lookup("a", len(new_history), hasher(new_history)) == KvLookup(0, [])
    assert cache.get("a") is None
    assert cache.free_pages == 4
    assert cache.counters.kv_misses == 1
    assert cache.counters.kv_evictions == 0  # invalidation, not eviction
    # the recompute starts from scratch
    assert commit(cache, "a", new_history).write_from == 0
    cache.check_invariants()


def test_history_shorter_than_entry_misses_even_if_the_hash_matches() -> None:
    cache = make_cache()
    commit(cache, "a", [1, 2, 3])
    assert cache.lookup("a", 2, lambda n: bytes([1, 2, 3])) == KvLookup(0, [])
    assert cache.get("a") is None


def test_commit_evicts_least_recently_used_users_first() -> None:
    cache = make_cache()  # 4 pages
    commit(cache, "a", [1, 2, 3])  # pages 0, 1
    commit(cache, "b", [1, 2, 3, 4])  # pages 2, 3
    cache.lookup("a", 3, hasher([1, 2, 3]))  # LRU order: b, a
    result = commit(cache, "c", [7])
    assert result == KvCommit(pages=[2], write_from=0)  # reuses b's freed pages
    assert cache.get("b") is None
    assert list(cache.entries_snapshot()) == ["a", "c"]
    assert cache.counters.kv_evictions == 1
    cache.check_invariants()


def test_commit_never_evicts_the_committing_user() -> None:
    cache = make_cache()
    commit(cache, "a", [1, 2])  # page 0
    commit(cache, "b", [1, 2])  # page 1  (LRU order a, b)
    commit(cache, "c", [1, 2])  # page 2
    result = commit(cache, "a", [1, 2, 3, 4, 5, 6, 7])  # needs 4 pages: evicts b and c, not a
    assert result.write_from == 2
    assert result.pages[0] == 0
    assert sorted(result.pages) == [0, 1, 2, 3]
    assert cache.entries_snapshot() == {"a": 7}
    assert cache.counters.kv_evictions == 2
    cache.check_invariants()


def test_entry_larger_than_kv_region_is_rejected_and_dropped() -> None:
    cache = make_cache()  # 4 pages = 8 tokens
    commit(cache, "a", [1, 2, 3])
    commit(cache, "b", [1])
    assert cache.commit("a", 9, b"long") is None
    assert cache.get("a") is None
    assert cache.get("b") is not None  # nobody was evicted for a hopeless entry
    assert cache.counters.kv_rejects == 1
    assert cache.counters.kv_evictions == 0
    cache.check_invariants()


def test_commit_without_kv_chunks_is_rejected() -> None:
    cache = make_cache(owned=0)
    assert cache.commit("a", 0, b"") is None
    assert cache.commit("a", 1, b"") is None
    assert cache.counters.kv_rejects == 2


def test_release_chunk_relocates_pages_and_evicts_coldest_users() -> None:
    cache = make_cache(chunks=3)  # chunk0 = pages {0,1}, chunk1 = {2,3}, chunk2 = {4,5}
    commit(cache, "a", [1, 2, 3, 4])  # pages 0, 1
    commit(cache, "b", [1, 2, 3])  # pages 2, 3
    commit(cache, "c", [1])  # page 4; page 5 free
    relocations = cache.release_chunk(1)
    # b's 2 pages need 2 free pages elsewhere, only page 5 is free -> evict LRU user a
    assert relocations == [Relocation(src_slot=2, dst_slot=0), Relocation(src_slot=3, dst_slot=1)]
    entry_b = cache.get("b")
    assert entry_b is not None
    assert entry_b.pages == [0, 1]
    assert cache.entries_snapshot() == {"b": 3, "c": 1}
    assert cache.chunks() == [0, 2]
    assert cache.counters.kv_evictions == 1
    cache.check_invariants()


def test_release_chunk_moves_pages_of_entries_spanning_chunks() -> None:
    cache = make_cache(chunks=3)
    commit(cache, "a", [1])  # page 0
    commit(cache, "b", [1, 2, 3, 4, 5])  # pages 1, 2, 3
    relocations = cache.release_chunk(1)  # pages 4, 5 are free in chunk 2: no eviction needed
    assert relocations == [Relocation(src_slot=2, dst_slot=4), Relocation(src_slot=3, dst_slot=5)]
    entry_b = cache.get("b")
    assert entry_b is not None
    assert entry_b.pages == [1, 4, 5]
    assert cache.counters.kv_evictions == 0
    cache.check_invariants()


def test_release_chunk_evicting_the_chunks_own_user_needs_no_copy() -> None:
    cache = make_cache()
    commit(cache, "a", [1, 2, 3, 4])  # pages 0, 1 (chunk 0)
    commit(cache, "b", [1, 2, 3, 4])  # pages 2, 3 (chunk 1)
    cache.lookup("a", 4, hasher([1, 2, 3, 4]))  # LRU: b, a
    assert cache.release_chunk(1) == []
    assert cache.entries_snapshot() == {"a": 4}
    cache.check_invariants()


def test_choose_chunk_to_release_prefers_fewest_used_pages_then_highest_index() -> None:
    cache = make_cache(chunks=3)
    assert cache.choose_chunk_to_release() == 2
    commit(cache, "a", [1, 2, 3])  # chunk 0 full
    commit(cache, "b", [1])  # chunk 1 one page
    assert cache.choose_chunk_to_release() == 2
    commit(cache, "c", [1, 2, 3, 4, 5, 6])  # chunk1 full, chunk2 full
    assert cache.choose_chunk_to_release() == 2
    with pytest.raises(ValueError):
        cache.release_chunk(7)


def test_entries_snapshot_is_in_lru_order() -> None:
    cache = make_cache(chunks=4)
    commit(cache, "a", [1])
    commit(cache, "b", [1, 2, 3])
    cache.lookup("a", 1, hasher([1]))
    assert list(cache.entries_snapshot().items()) == [("b", 3), ("a", 1)]
    assert cache.size == 2


def test_drain_touched_includes_invalidated_and_evicted_users() -> None:
    cache = make_cache()
    commit(cache, "a", [1, 2, 3, 4])
    commit(cache, "b", [1, 2, 3, 4])
    cache.drain_touched()
    cache.lookup("a", 1, hasher([1]))  # invalidates a
    commit(cache, "c", [1, 2, 3, 4, 5, 6])  # evicts b
    assert cache.drain_touched() == {"a", "b", "c"}
