"""Random operation sequences against the pool, with a shadow of device memory.

The shadow storage applies exactly what the engine is told (admitted rows, KV token writes,
relocations in list order, naive refills). After every step each resident EMB item's slot must hold
that item and every KV entry's pages must hold that user's committed tokens in order: this is what
proves relocations are complete and correctly ordered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.worker.core.geometry import Owner, PoolGeometry
from services.worker.core.pool import EmbPlacement, Pool, RefillMode

ITEMS = st.integers(min_value=0, max_value=40)
USERS = st.sampled_from([f"u{i}" for i in range(8)])
TOKENS = st.lists(st.integers(min_value=0, max_value=3), max_size=10)


@st.composite
def geometries(draw: st.DrawFn) -> PoolGeometry:
    chunk = draw(st.sampled_from([16, 32]))
    chunks = draw(st.integers(min_value=1, max_value=6))
    return PoolGeometry(
        budget_bytes=chunk * chunks + draw(st.integers(min_value=0, max_value=chunk - 1)),
        chunk_bytes=chunk,
        emb_entry_bytes=draw(st.sampled_from([4, 8])),
        kv_page_bytes=draw(st.sampled_from([4, 8, 16])),
        kv_page_tokens=draw(st.integers(min_value=1, max_value=3)),
    )


def prefix_hasher(history: list[int]) -> Callable[[int], bytes]:
    return lambda n: repr(history[:n]).encode()


class PoolMachine(RuleBasedStateMachine):
    pool: Pool
    geometry: PoolGeometry

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.emb_storage: dict[int, int] = {}  # slot -> item
        self.kv_storage: dict[tuple[int, int], tuple[str, tuple[int, ...]]] = {}  # (page, row) -> token data
        self.histories: dict[str, list[int]] = {}  # current history per user
        self.committed: dict[str, list[int]] = {}  # history each entry was committed from
        self.view_emb: set[int] = set()  # residency as reconstructed from snapshots + deltas
        self.view_kv: dict[str, int] = {}

    @initialize(
        geometry=geometries(),
        alpha=st.floats(min_value=0.0, max_value=1.0),
        max_per_tick=st.integers(min_value=1, max_value=4),
        mode=st.sampled_from(RefillMode),
        ghost=st.none() | st.integers(min_value=0, max_value=12),
        sample_factor=st.integers(min_value=1, max_value=3),
    )
    def setup(
        self,
        *,
        geometry: PoolGeometry,
        alpha: float,
        max_per_tick: int,
        mode: RefillMode,
        ghost: int | None,
        sample_factor: int,
    ) -> None:
        self.geometry = geometry
        self.pool = Pool(
            geometry,
            alpha=alpha,
            max_chunks_per_tick=max_per_tick,
            refill_mode=mode,
            ghost_capacity=ghost,
            sketch_sample_factor=sample_factor,
        )
        self.ready = True

    # ------------------------------------------------------------------ helpers
    def token_data(self, user: str, history: list[int], t: int) -> tuple[str, tuple[int, ...]]:
        return (user, tuple(history[: t + 1]))

    def kv_row(self, pages: list[int], t: int) -> tuple[int, int]:
        pt = self.geometry.kv_page_tokens
        return (pages[t // pt], t % pt)

    def write_emb(self, placed: EmbPlacement, offered: list[int]) -> None:
        """Apply a placement as the engine does: row ``offered[positions[i]]`` into ``slots[i]``."""
        assert placed.positions.dtype == placed.items.dtype == placed.slots.dtype == np.int64
        assert [offered[p] for p in placed.positions.tolist()] == placed.items.tolist()
        slots = placed.slots.tolist()
        assert len(set(slots)) == len(slots)  # a slot is never handed to two items in one call
        for item, slot in placed.pairs():
            self.emb_storage[slot] = item

    # ------------------------------------------------------------------ rules
    @rule(
        items=st.lists(ITEMS, max_size=8, unique=True),
        admit=st.booleans(),
        form=st.sampled_from(["list", "array", "sorted"]),
        same_array=st.booleans(),
    )
    def emb_request(self, items: list[int], admit: bool, form: str, same_array: bool) -> None:
        if form == "sorted":
            items = sorted(items)
        offered: list[int] | np.ndarray = np.array(items, dtype=np.int64) if form != "list" else items
        lookup = self.pool.emb_lookup(offered)
        positions = sorted(lookup.hit_positions.tolist() + lookup.miss_positions.tolist())
        assert positions == list(range(len(items)))
        assert (lookup.hits, lookup.misses) == (len(lookup.hit_slots), len(lookup.miss_items))
        # the engine gathers hit rows before writing new ones
        for pos, slot in zip(lookup.hit_positions.tolist(), lookup.hit_slots.tolist(), strict=True):
            assert self.emb_storage[slot] == items[pos]
        for pos, item in zip(lookup.miss_positions.tolist(), lookup.miss_items.tolist(), strict=True):
            assert items[pos] == item
            assert self.pool.emb.slot_of(item) is None
        if admit:
            # the lookup's own array (estimates reused) or an equal one (recomputed)
            misses = lookup.miss_items if same_array else lookup.miss_items.tolist()
            accepted = self.pool.emb_admit(misses)
            assert set(accepted.items.tolist()) <= set(lookup.miss_items.tolist())
            self.write_emb(accepted, lookup.miss_items.tolist())

    @rule(user=USERS, rewrite=st.booleans(), tokens=TOKENS, commit=st.booleans())
    def kv_request(self, user: str, rewrite: bool, tokens: list[int], commit: bool) -> None:
        history = list(tokens) if rewrite else [*self.histories.get(user, []), *tokens]
        self.histories[user] = history
        lookup = self.pool.kv_lookup(user, len(history), prefix_hasher(history))
        assert lookup.cached_len <= len(history)
        for t in range(lookup.cached_len):  # reused KV must be this history's KV
            assert self.kv_storage[self.kv_row(lookup.pages, t)] == self.token_data(user, history, t)
        if not commit:
            return
        result = self.pool.kv_commit(user, len(history), repr(history).encode())
        if result is None:
            assert self.pool.kv.get(user) is None
            return
        assert result.write_from == lookup.cached_len
        assert result.pages[: len(lookup.pages)] == lookup.pages
        for t in range(result.write_from, len(history)):
            self.kv_storage[self.kv_row(result.pages, t)] = self.token_data(user, history, t)
        self.committed[user] = list(history)

    @rule(alpha=st.floats(min_value=0.0, max_value=1.0))
    def set_target(self, alpha: float) -> None:
        self.pool.set_target(alpha)
        assert self.pool.target_emb_chunks == round(alpha * self.geometry.total_chunks)

    @rule()
    def tick(self) -> None:
        pool = self.pool
        before = pool.emb_chunks
        critical_before = pool.counters.critical_refill_bytes
        plan = pool.tick()
        expected = min(pool.max_chunks_per_tick, abs(pool.target_emb_chunks - before))
        assert plan.chunks_moved == expected
        assert abs(pool.emb_chunks - before) == expected
        if plan.emb_relocations:
            assert pool.emb_chunks < before
        if plan.kv_relocations:
            assert pool.emb_chunks > before
        for r in plan.emb_relocations:
            self.emb_storage[r.dst_slot] = self.emb_storage[r.src_slot]
        for r in plan.kv_relocations:
            for row in range(self.geometry.kv_page_tokens):
                data = self.kv_storage.get((r.src_slot, row))
                if data is None:
                    self.kv_storage.pop((r.dst_slot, row), None)
                else:
                    self.kv_storage[(r.dst_slot, row)] = data
        if pool.refill_mode is RefillMode.INCREMENTAL or pool.emb_chunks <= before:
            assert len(plan.refill) == 0
        critical = pool.counters.critical_refill_bytes - critical_before
        assert critical == len(plan.refill) * self.geometry.emb_entry_bytes
        if pool.refill_mode is RefillMode.INCREMENTAL:
            assert pool.counters.critical_refill_bytes == 0
        self.write_emb(plan.refill, plan.refill.items.tolist())  # positions index the drawn candidates

    @rule(max_bytes=st.integers(min_value=0, max_value=64))
    def prefetch(self, max_bytes: int) -> None:
        pool = self.pool
        wanted = pool.prefetch_plan(max_bytes)
        assert wanted.dtype == np.int64
        if pool.refill_mode is RefillMode.NAIVE:
            assert len(wanted) == 0
        assert len(wanted) <= min(pool.emb.free_slots, max_bytes // self.geometry.emb_entry_bytes)
        assert len(set(wanted.tolist())) == len(wanted)
        assert all(pool.emb.slot_of(item) is None for item in wanted.tolist())
        self.install(wanted.tolist())

    @rule(items=st.lists(ITEMS, max_size=6))
    def install(self, items: list[int]) -> None:
        pool = self.pool
        resident = dict((item, pool.emb.slot_of(item)) for item in pool.emb.items())
        evictions = pool.counters.emb_evictions
        prefetched = pool.counters.prefetch_bytes
        installed = pool.install_prefetched(items)
        assert pool.counters.emb_evictions == evictions  # prefetch never evicts
        assert all(pool.emb.slot_of(item) == slot for item, slot in resident.items())
        assert pool.counters.prefetch_bytes - prefetched == len(installed) * self.geometry.emb_entry_bytes
        self.write_emb(installed, items)

    @rule()
    def drain(self) -> None:
        delta = self.pool.drain_deltas()
        assert delta.emb_added == sorted(delta.emb_added)
        assert not set(delta.emb_added) & set(delta.emb_removed)
        self.view_emb |= set(delta.emb_added)
        self.view_emb -= set(delta.emb_removed)
        for user in delta.kv_removed:
            self.view_kv.pop(user, None)
        self.view_kv.update(delta.kv_upserts)
        assert self.view_emb == set(self.pool.emb.items())
        assert self.view_kv == self.pool.kv.entries_snapshot()
        assert self.pool.drain_deltas().empty

    @rule()
    def snapshot(self) -> None:
        snap = self.pool.snapshot()
        self.view_emb = set(snap.emb)
        self.view_kv = dict(snap.kv)
        assert self.pool.drain_deltas().empty

    # ------------------------------------------------------------------ invariants
    @invariant()
    def pool_is_consistent(self) -> None:
        if not self.ready:
            return
        pool = self.pool
        g = self.geometry
        pool.check_invariants()
        assert pool.emb_chunks + pool.kv_chunks + pool.free_chunks == g.total_chunks
        assert (pool.emb_chunks + pool.kv_chunks) * g.chunk_bytes <= g.budget_bytes

    @invariant()
    def storage_holds_what_the_caches_claim(self) -> None:
        if not self.ready:
            return
        pool = self.pool
        g = self.geometry
        for item in pool.emb.items():
            slot = pool.emb.slot_of(item)
            assert slot is not None
            assert pool.owner(g.chunk_of_emb_slot(slot)) is Owner.EMB
            assert self.emb_storage[slot] == item
        for user, length in pool.kv.entries_snapshot().items():
            entry = pool.kv.get(user)
            assert entry is not None
            assert all(pool.owner(g.chunk_of_kv_page(page)) is Owner.KV for page in entry.pages)
            history = self.committed[user]
            assert len(history) == length
            for t in range(length):
                assert self.kv_storage[self.kv_row(entry.pages, t)] == self.token_data(user, history, t)


TestPoolStateMachine = PoolMachine.TestCase
TestPoolStateMachine.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------- bulk moves
# The state machine rarely fills the KV region before a big reallocation; this test does it on
# purpose so several chunks move in one tick and relocations chain (A -> B, then B -> C).

KV_OPS = st.lists(
    st.tuples(st.sampled_from([f"u{i}" for i in range(10)]), st.integers(min_value=0, max_value=12)),
    max_size=40,
)
EMB_OPS = st.lists(st.lists(ITEMS, min_size=1, max_size=8, unique=True), max_size=20)
ALPHAS = st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]) | st.floats(min_value=0.0, max_value=1.0)


@settings(max_examples=400, deadline=None, database=None)
@given(
    geometry=geometries(),
    start=ALPHAS,
    targets=st.lists(ALPHAS, min_size=1, max_size=4),
    kv_ops=KV_OPS,
    emb_ops=EMB_OPS,
)
def test_bulk_reallocation_preserves_data(
    geometry: PoolGeometry,
    start: float,
    targets: list[float],
    kv_ops: list[tuple[str, int]],
    emb_ops: list[list[int]],
) -> None:
    pool = Pool(geometry, alpha=start, max_chunks_per_tick=geometry.total_chunks)
    pt = geometry.kv_page_tokens
    emb_storage: dict[int, int] = {}
    kv_storage: dict[int, list[tuple[str, int] | None]] = {}  # page -> rows
    for items in emb_ops:
        lookup = pool.emb_lookup(items)
        for item, slot in pool.emb_admit(lookup.miss_items).pairs():
            emb_storage[slot] = item
    for user, grow in kv_ops:
        entry = pool.kv.get(user)
        length = (0 if entry is None else entry.length) + grow
        result = pool.kv_commit(user, length, b"")
        if result is None:
            continue
        for t in range(result.write_from, length):
            kv_storage.setdefault(result.pages[t // pt], [None] * pt)[t % pt] = (user, t)
    for alpha in targets:
        pool.set_target(alpha)
        plan = pool.tick()
        assert pool.emb_chunks == pool.target_emb_chunks
        for r in plan.emb_relocations:
            emb_storage[r.dst_slot] = emb_storage[r.src_slot]
        for r in plan.kv_relocations:
            kv_storage[r.dst_slot] = list(kv_storage[r.src_slot])
        for item, slot in plan.refill.pairs():
            emb_storage[slot] = item
        pool.check_invariants()
        for item in pool.emb.items():
            assert emb_storage[pool.emb.slot_of(item)] == item  # type: ignore[index]
        for user, length in pool.kv.entries_snapshot().items():
            entry = pool.kv.get(user)
            assert entry is not None
            for t in range(length):
                assert kv_storage[entry.pages[t // pt]][t % pt] == (user, t)
