"""Per-user KV cache: paged entries over the KV chunks the pool hands it.

An entry covers the first ``length`` history tokens of one user; token ``t`` lives in page
``pages[t // kv_page_tokens]`` at row ``t % kv_page_tokens``. Entries are only ever extended
(history is append-only); any other history invalidates the entry. Candidates are never cached:
callers commit history tokens only. Eviction is LRU over users, whole entries at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.worker.core.chunk_allocator import ChunkAllocator
from services.worker.core.counters import PoolCounters
from services.worker.core.geometry import PoolGeometry
from services.worker.core.relocation import Relocation

__all__ = ["KvCache", "KvCommit", "KvEntry", "KvLookup", "Relocation"]


@dataclass(slots=True)
class KvEntry:
    """One user's cached prefix. Owned by the cache: read it, never mutate it."""

    user: str
    length: int
    prefix_hash: bytes
    pages: list[int]


@dataclass(frozen=True, slots=True)
class KvLookup:
    cached_len: int  # tokens the caller may reuse (0 on a miss)
    pages: list[int]  # pages covering them, token order


@dataclass(frozen=True, slots=True)
class KvCommit:
    pages: list[int]  # all pages of the entry, token order
    write_from: int  # first token the caller must write (the previous length)


class KvCache:
    def __init__(self, geometry: PoolGeometry, *, counters: PoolCounters | None = None) -> None:
        self._geometry = geometry
        self._pages_per_chunk = geometry.kv_pages_per_chunk
        self._page_tokens = geometry.kv_page_tokens
        self._alloc = ChunkAllocator(self._pages_per_chunk)
        self._entries: OrderedDict[str, KvEntry] = OrderedDict()  # LRU first
        self._page_owner: dict[int, tuple[str, int]] = {}  # page -> (user, index in entry.pages)
        self._counters = counters if counters is not None else PoolCounters()
        self._touched: set[str] = set()  # users whose entry changed since the last drain

    # ----------------------------------------------------------------- read access
    @property
    def counters(self) -> PoolCounters:
        return self._counters

    @property
    def capacity_pages(self) -> int:
        return self._alloc.capacity

    @property
    def free_pages(self) -> int:
        return self._alloc.free_count

    @property
    def used_pages(self) -> int:
        return len(self._page_owner)

    @property
    def size(self) -> int:
        return len(self._entries)

    def chunks(self) -> list[int]:
        return self._alloc.chunks()

    def get(self, user: str) -> KvEntry | None:
        return self._entries.get(user)

    def entries_snapshot(self) -> dict[str, int]:
        """user -> covered length, LRU order."""
        return {user: entry.length for user, entry in self._entries.items()}

    def used_in_chunk(self, chunk: int) -> int:
        return self._alloc.used_in(chunk)

    # ----------------------------------------------------------------- serving path
    def lookup(self, user: str, history_len: int, prefix_hash: Callable[[int], bytes]) -> KvLookup:
        """Reuse the user's entry iff it is a prefix of the current history.

        ``prefix_hash(n)`` must hash the first ``n`` history tokens exactly as they were hashed at
        commit time. A stale entry (longer than the history or a different prefix) is dropped now.
        """
        entry = self._entries.get(user)
        if entry is not None:
            if entry.length <= history_len and prefix_hash(entry.length) == entry.prefix_hash:
                self._entries.move_to_end(user)
                self._counters.kv_hits += 1
                return KvLookup(cached_len=entry.length, pages=list(entry.pages))
            self._drop(user)
        self._counters.kv_misses += 1
        return KvLookup(cached_len=0, pages=[])

    def commit(self, user: str, length: int, prefix_hash: bytes) -> KvCommit | None:
        """Make ``user``'s entry cover ``length`` tokens, keeping existing pages as a prefix.

        Evicts other users LRU-first when short of pages (never ``user``). Returns None (and
        drops the entry) when it cannot fit even in the whole KV region.
        """
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        entry = self._entries.get(user)
        old_len = 0 if entry is None else entry.length
        if length < old_len:
            raise ValueError(f"commit for {user!r} would shrink its entry from {old_len} to {length} tokens")
        needed = -(-length // self._page_tokens)
        if self._alloc.chunk_count == 0 or needed > self._alloc.capacity:
            if entry is not None:
                self._drop(user)
            self._counters.kv_rejects += 1
            return None
        if entry is None:
            entry = KvEntry(user=user, length=0, prefix_hash=prefix_hash, pages=[])
            self._entries[user] = entry
        else:
            self._entries.move_to_end(user)
        extra = needed - len(entry.pages)
        # The user is now the MRU entry; if it were the only one, free >= capacity - have >= extra,
        # so the loop below only ever evicts other users.
        while self._alloc.free_count < extra:
            victim = next(iter(self._entries))
            if victim == user:  # pragma: no cover - excluded by the argument above
                raise AssertionError("KV commit would evict its own entry")
            self._evict(victim)
        pages = entry.pages
        if extra > 0:
            new = self._alloc.allocate_many(extra)
            if len(new) != extra:  # pragma: no cover - guaranteed by the eviction loop above
                raise AssertionError("KV commit: allocator out of pages")
            start = len(pages)
            self._page_owner.update(zip(new, [(user, i) for i in range(start, start + extra)], strict=True))
            pages.extend(new)
        entry.length = length
        entry.prefix_hash = prefix_hash
        self._touched.add(user)
        return KvCommit(pages=list(pages), write_from=old_len)

    def discard(self, user: str) -> None:
        """Forget ``user``'s entry if there is one (its bytes could not be written: never serve them)."""
        if user in self._entries:
            self._drop(user)

    # ----------------------------------------------------------------- chunk ownership
    def add_chunk(self, chunk: int) -> None:
        self._geometry.kv_pages_of_chunk(chunk)  # range check
        self._alloc.add_chunk(chunk)

    def choose_chunk_to_release(self) -> int:
        """The KV chunk with the fewest used pages (fewest copies); ties: highest index."""
        chunks = self._alloc.chunks()
        if not chunks:
            raise ValueError("KvCache owns no chunks")
        return min(chunks, key=lambda c: (self._alloc.used_in(c), -c))

    def release_chunk(self, chunk: int) -> list[Relocation]:
        """Give ``chunk`` up: evict LRU users until its remaining pages fit elsewhere, move those."""
        if not self._alloc.owns(chunk):
            raise ValueError(f"chunk {chunk} is not owned by KV")
        pages = self._geometry.kv_pages_of_chunk(chunk)
        owner = self._page_owner
        live = [page for page in pages if page in owner]
        self._alloc.detach_chunk(chunk)
        remaining = len(live)
        while self._alloc.free_count < remaining:
            victim = next(iter(self._entries))
            remaining -= sum(1 for page in self._entries[victim].pages if page in pages)
            self._evict(victim)  # frees its pages in other chunks; the leaving chunk is detached
        relocations: list[Relocation] = []
        for src in live:
            ref = owner.pop(src, None)
            if ref is None:
                continue
            dst = self._alloc.allocate()
            if dst is None:  # pragma: no cover - guaranteed by the eviction loop above
                raise AssertionError("KV release: no free page for a survivor")
            user, index = ref
            self._entries[user].pages[index] = dst
            owner[dst] = ref
            relocations.append(Relocation(src, dst))
        return relocations

    # ----------------------------------------------------------------- deltas / checks
    def drain_touched(self) -> set[str]:
        touched, self._touched = self._touched, set()
        return touched

    def check_invariants(self) -> None:
        """Raise AssertionError on any inconsistency (O(capacity); for tests and debugging)."""
        n = self._pages_per_chunk
        used_per_chunk: dict[int, int] = {}
        total_pages = 0
        for user, entry in self._entries.items():
            if entry.user != user:
                raise AssertionError(f"KV entry keyed {user!r} names user {entry.user!r}")
            expected = -(-entry.length // self._page_tokens)
            if len(entry.pages) != expected:
                raise AssertionError(
                    f"KV entry {user!r}: {len(entry.pages)} pages for {entry.length} tokens (want {expected})"
                )
            for index, page in enumerate(entry.pages):
                if self._page_owner.get(page) != (user, index):
                    raise AssertionError(
                        f"KV page {page} of {user!r}[{index}] is recorded as {self._page_owner.get(page)}"
                    )
                chunk = page // n
                if not self._alloc.owns(chunk):
                    raise AssertionError(f"KV page {page} of {user!r} in chunk {chunk}, not owned by KV")
                used_per_chunk[chunk] = used_per_chunk.get(chunk, 0) + 1
            total_pages += len(entry.pages)
        if total_pages != len(self._page_owner):
            raise AssertionError("KV page used by two entries, or a stale page owner record")
        free_total = 0
        for chunk in self._alloc.chunks():
            free = self._alloc.free_units(chunk)
            free_set = set(free)
            if len(free_set) != len(free):
                raise AssertionError(f"KV chunk {chunk} free list has duplicates")
            for page in free_set:
                if page // n != chunk:
                    raise AssertionError(f"KV free page {page} listed under chunk {chunk}")
                if page in self._page_owner:
                    raise AssertionError(f"KV page {page} is both free and used")
            if len(free) + used_per_chunk.get(chunk, 0) != n:
                raise AssertionError(f"KV chunk {chunk}: free + used != {n}")
            free_total += len(free)
        if free_total != self._alloc.free_count:
            raise AssertionError("KV free count out of sync")
        if self.used_pages > self.capacity_pages:
            raise AssertionError(f"KV uses {self.used_pages} pages > capacity {self.capacity_pages}")

    # ----------------------------------------------------------------- internals
    def _drop(self, user: str) -> None:
        """Remove an entry, returning its pages in owned chunks to the free lists."""
        entry = self._entries.pop(user)
        owner = self._page_owner
        for page in entry.pages:
            del owner[page]
        # reversed: the LIFO free lists hand them back in order; pages of a chunk being released (already
        # detached from the allocator) are skipped
        self._alloc.release_owned(reversed(entry.pages))
        self._touched.add(user)

    def _evict(self, user: str) -> None:
        self._drop(user)
        self._counters.kv_evictions += 1
