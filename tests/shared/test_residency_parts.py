"""Messages in parts (shared/residency/parts.py, digest.py, view.py): numbering, splitting, reassembly."""

from __future__ import annotations

import msgspec
import pytest

from shared import schemas as s
from shared.residency import (
    DEFAULT_PART_BYTES,
    Assembled,
    PartOutcome,
    PartPacker,
    PartVerdict,
    ResidencyDelta,
    ResidencySnapshot,
    SnapshotAssembler,
    digest_parts,
    pack_updates,
    part_numbers,
    snapshot_residency,
)
from shared.residency.digest import DIGEST_HEAD_BYTES
from shared.residency.parts import INT_BYTES, PartNumber, str_bytes
from shared.residency.view import VIEW_HEAD_BYTES, WORKER_STATE_BYTES

COLLECTED, COMPLETE, REJECTED = PartVerdict.COLLECTED, PartVerdict.COMPLETE, PartVerdict.REJECTED
BIG = 2**63 - 1
HUGE = 1e300


# ---- numbering ---------------------------------------------------------------------------------------------
def test_parts_take_consecutive_seq_from_the_first() -> None:
    assert part_numbers(10, 3) == [PartNumber(10, 0, 3), PartNumber(11, 1, 3), PartNumber(12, 2, 3)]
    assert part_numbers(0, 1) == [PartNumber(0, 0, 1)]
    with pytest.raises(ValueError, match="at least one part"):
        part_numbers(0, 0)


# ---- splitting ---------------------------------------------------------------------------------------------
def test_nothing_to_send_is_one_empty_part() -> None:
    assert PartPacker(("a", "b")).parts() == [{"a": [], "b": []}]


def test_entries_fill_a_part_up_to_the_budget_then_begin_the_next() -> None:
    p = PartPacker(("a", "b"), part_bytes=100, head_bytes=10)
    for i in range(3):
        p.add("a", i, 30)  # 10 + 3 x 30 = 100: still within
    p.add("b", "x", 1)  # 101: the next part
    p.add("a", 3, 89)  # 10 + 1 + 89 = 100
    assert p.parts() == [{"a": [0, 1, 2], "b": []}, {"a": [3], "b": ["x"]}]


def test_an_entry_larger_than_a_part_travels_alone_and_no_part_is_empty() -> None:
    p = PartPacker(("a",), part_bytes=50, head_bytes=10)
    p.add("a", "big", 500)  # the first part is empty: it goes there, not after an empty part
    p.add("a", "small", 1)
    p.add("a", "big2", 500)
    assert p.parts() == [{"a": ["big"]}, {"a": ["small"]}, {"a": ["big2"]}]


def test_pinned_entries_stay_in_part_0_whatever_their_size() -> None:
    p = PartPacker(("w", "a"), part_bytes=50)
    p.pin("w", ["w0", "w1"], 80)
    p.pin("w", [], 0)
    p.add("a", 1, 5)
    assert p.parts() == [{"w": ["w0", "w1"], "a": []}, {"w": [], "a": [1]}]
    with pytest.raises(RuntimeError, match="pin"):
        p.pin("w", ["late"], 1)
    # An empty pin leaves part 0 empty: the next entry still goes there.
    q = PartPacker(("w", "a"), part_bytes=50)
    q.pin("w", [], 0)
    q.add("a", 1, 500)
    assert q.parts() == [{"w": [], "a": [1]}]


def test_item_runs_are_cut_to_fill_each_part() -> None:
    p = PartPacker(("items",), part_bytes=10 + 4 * INT_BYTES, head_bytes=10)
    p.add_items("items", range(10))
    assert p.parts() == [{"items": [0, 1, 2, 3]}, {"items": [4, 5, 6, 7]}, {"items": [8, 9]}]
    # a run begins in the room the part has left, and each run costs run_bytes besides its ids
    p = PartPacker(("e",), part_bytes=100)
    p.add("e", "x", 100 - 20 - 2 * INT_BYTES)  # room left: two ids after the 20-byte run head
    p.add_items("e", [1, 2, 3, 4, 5, 6, 7], run_bytes=20, wrap=tuple)
    assert p.parts() == [{"e": ["x", (1, 2)]}, {"e": [(3, 4, 5, 6, 7)]}]
    p.add_items("e", [])
    assert len(p.parts()) == 2


def test_a_part_too_small_for_one_id_takes_one_id_each_and_is_never_empty() -> None:
    p = PartPacker(("items",), part_bytes=5, head_bytes=10)
    p.add_items("items", [7, 8, 9])
    assert p.parts() == [{"items": [7]}, {"items": [8]}, {"items": [9]}]


def test_the_budget_and_header_must_make_sense() -> None:
    with pytest.raises(ValueError, match="part_bytes"):
        PartPacker(("a",), part_bytes=0)
    with pytest.raises(ValueError, match="head_bytes"):
        PartPacker(("a",), head_bytes=-1)


def test_string_estimates_are_upper_bounds() -> None:
    assert str_bytes("") == 5 and str_bytes("abc") == 8 and str_bytes("é") == 7  # two UTF-8 bytes
    for text in ("", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "é" * 200, "a" * 70_000):
        assert len(msgspec.msgpack.encode(text)) <= str_bytes(text)


# ---- reassembly --------------------------------------------------------------------------------------------
def test_a_one_part_snapshot_is_complete_at_once() -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    assert (a.collecting, a.received) == (False, None)
    out = a.offer(5, 0, 1, "only")
    assert out == PartOutcome(COMPLETE, False, Assembled(5, ("only",)))
    assert out.snapshot is not None and (out.snapshot.parts, out.snapshot.next_seq) == (1, 6)
    assert (a.collecting, a.received) == (False, None)


def test_parts_in_order_complete_the_snapshot_in_part_order() -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    assert a.offer(7, 0, 3, "a") == PartOutcome(COLLECTED, False)
    assert (a.collecting, a.received) == (True, 1)
    assert a.offer(8, 1, 3, "b") == PartOutcome(COLLECTED, False)
    assert a.received == 2
    assert a.offer(9, 2, 3, "c") == PartOutcome(COMPLETE, False, Assembled(7, ("a", "b", "c")))
    assert (a.collecting, a.received) == (False, None)


@pytest.mark.parametrize(
    ("seq", "part", "parts", "why"),
    [
        (12, 2, 3, "part 1 missing"),
        (10, 1, 3, "a seq that does not follow the first part's"),
        (10, 0, 0, "no parts at all"),
        (11, 1, 4, "another number of parts"),
        (11, 3, 3, "a part beyond the last"),
    ],
)
def test_a_part_that_is_not_the_next_one_abandons_the_snapshot(
    seq: int, part: int, parts: int, why: str
) -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    a.offer(10, 0, 3, "a")
    assert a.offer(seq, part, parts, "x") == PartOutcome(REJECTED, True), why
    assert (a.collecting, a.received) == (False, None)
    # what follows of the broken snapshot is rejected too, with nothing left to abandon
    assert a.offer(12, 2, 3, "c") == PartOutcome(REJECTED, False)


def test_a_repeated_part_abandons_the_snapshot() -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    a.offer(10, 0, 3, "a")
    a.offer(11, 1, 3, "b")
    assert a.offer(11, 1, 3, "b") == PartOutcome(REJECTED, True)
    assert not a.collecting


def test_a_part_with_no_part_0_before_it_is_rejected() -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    assert a.offer(11, 1, 3, "b") == PartOutcome(REJECTED, False)
    assert not a.collecting


def test_a_new_part_0_supersedes_the_snapshot_in_progress() -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    a.offer(10, 0, 3, "old-a")
    a.offer(11, 1, 3, "old-b")
    assert a.offer(20, 0, 2, "new-a") == PartOutcome(COLLECTED, True)
    assert a.received == 1
    assert a.offer(21, 1, 2, "new-b") == PartOutcome(COMPLETE, False, Assembled(20, ("new-a", "new-b")))
    assert a.offer(30, 0, 1, "next") == PartOutcome(COMPLETE, False, Assembled(30, ("next",)))


def test_abandon_says_whether_there_was_a_snapshot_to_drop() -> None:
    a: SnapshotAssembler[str] = SnapshotAssembler()
    assert a.abandon() is False
    a.offer(0, 0, 2, "a")
    assert a.abandon() is True
    assert (a.collecting, a.received) == (False, None)
    assert a.offer(1, 1, 2, "b") == PartOutcome(REJECTED, False)


# ---- worker digests ----------------------------------------------------------------------------------------
def _max_digest(**residency: object) -> s.WorkerDigest:
    """A digest whose every field but the residency lists is as large as the worker makes it."""
    return s.WorkerDigest(
        worker_id="w" * 64,
        incarnation="i" * 16,
        seq=BIG,
        kind="snapshot",
        part=BIG,
        parts=BIG,
        sent_at_ms=HUGE,
        period_ms=HUGE,
        load=s.LoadInfo(
            **{k: HUGE if k.endswith(("_ms", "_size")) else BIG for k in s.LoadInfo.__struct_fields__}
        ),
        alpha=0.123456789,
        alpha_target=0.987654321,
        applied_decision_id="d" * 128,
        cost=s.CostCoefficients(
            **{k: BIG if k == "samples" else HUGE for k in s.CostCoefficients.__struct_fields__}
        ),
        stats=s.PoolStats(**dict.fromkeys(s.PoolStats.__struct_fields__, BIG)),
        window=s.WindowStats(
            **{k: HUGE if k.endswith("_ms") else BIG for k in s.WindowStats.__struct_fields__}
        ),
        draining=True,
        **residency,
    )


def test_a_digest_header_fits_its_estimate() -> None:
    assert len(s.encode(_max_digest())) <= DIGEST_HEAD_BYTES


def test_a_snapshot_fits_one_digest_when_it_is_small() -> None:
    snap = ResidencySnapshot(kv={"b": 2, "a": 1}, emb=[3, 5, 9])
    assert digest_parts(snap) == [
        {
            "kv_upserts": [s.KvEntry("a", 1), s.KvEntry("b", 2)],
            "kv_removed": [],
            "emb_added": [3, 5, 9],
            "emb_removed": [],
        }
    ]


def test_a_delta_keeps_its_four_lists() -> None:
    delta = ResidencyDelta(kv_upserts={"u": 4}, kv_removed=["gone"], emb_added=[1, 2], emb_removed=[7])
    assert digest_parts(delta) == [
        {"kv_upserts": [s.KvEntry("u", 4)], "kv_removed": ["gone"], "emb_added": [1, 2], "emb_removed": [7]}
    ]
    assert digest_parts(ResidencyDelta()) == [
        {"kv_upserts": [], "kv_removed": [], "emb_added": [], "emb_removed": []}
    ]


def test_a_large_delta_is_cut_removals_first_every_entry_once() -> None:
    # 90 bytes besides the header: 10 ids, or a removal of "z" (6 bytes), two KV entries [user, length]
    # of 1-character users (16 bytes each) and 5 ids
    delta = ResidencyDelta(
        kv_upserts={"b": 2, "a": 1}, kv_removed=["z"], emb_added=list(range(100, 115)), emb_removed=[1, 2, 3]
    )
    parts = digest_parts(delta, part_bytes=DIGEST_HEAD_BYTES + 10 * INT_BYTES)
    assert [(p["kv_removed"], p["kv_upserts"], p["emb_removed"], p["emb_added"]) for p in parts] == [
        (["z"], [s.KvEntry("a", 1), s.KvEntry("b", 2)], [1, 2, 3], [100, 101]),
        ([], [], [], list(range(102, 112))),
        ([], [], [], [112, 113, 114]),
    ]


@pytest.mark.parametrize("part_bytes", [DEFAULT_PART_BYTES, 8 * 1024])
def test_every_digest_part_fits_the_budget(part_bytes: int) -> None:
    users = {f"{'u' * 250}{i:06d}": 2**40 + i for i in range(3000)}
    delta = ResidencyDelta(
        kv_upserts=users,
        kv_removed=[f"{'é' * 125}{i:06d}" for i in range(3000)],
        emb_added=list(range(2**62, 2**62 + 60_000)),
        emb_removed=list(range(2**63 - 60_000, 2**63)),
    )
    parts = digest_parts(delta, part_bytes=part_bytes)
    assert len(parts) > 4
    sizes = [len(s.encode(_max_digest(**part))) for part in parts]
    assert max(sizes) <= part_bytes
    assert [e for p in parts for e in p["kv_upserts"]] == [s.KvEntry(u, n) for u, n in sorted(users.items())]
    assert [i for p in parts for i in p["emb_added"]] == delta.emb_added
    assert [i for p in parts for i in p["emb_removed"]] == delta.emb_removed
    assert [u for p in parts for u in p["kv_removed"]] == delta.kv_removed


def test_a_complete_snapshot_says_what_its_parts_say_together() -> None:
    def part(kv: list[s.KvEntry], emb: list[int]) -> s.WorkerDigest:
        return s.WorkerDigest(
            worker_id="w",
            incarnation="i",
            seq=0,
            kind="snapshot",
            sent_at_ms=0.0,
            period_ms=1.0,
            kv_upserts=kv,
            emb_added=emb,
        )

    parts = [part([s.KvEntry("a", 1), s.KvEntry("b", 2)], [1, 2]), part([s.KvEntry("a", 3)], [2, 5])]
    assert snapshot_residency(parts) == ({"a": 3, "b": 2}, {1, 2, 5})
    assert snapshot_residency([]) == ({}, set())


# ---- the view ----------------------------------------------------------------------------------------------
def _worker_state(wid: str) -> s.WorkerState:
    d = _max_digest()
    return s.WorkerState(
        worker_id=wid,
        incarnation=d.incarnation,
        draining=True,
        load=d.load,
        alpha=d.alpha,
        cost=d.cost,
        last_seen_ms=HUGE,
    )


def test_view_headers_and_worker_records_fit_their_estimates() -> None:
    header = s.ViewUpdate(
        source="c" * 128 + "-" + "f" * 8, seq=BIG, kind="snapshot", part=BIG, parts=BIG, sent_at_ms=HUGE
    )
    assert len(s.encode(header)) <= VIEW_HEAD_BYTES
    assert len(s.encode(_worker_state("w" * 64))) <= WORKER_STATE_BYTES


def test_a_view_message_puts_worker_records_in_part_0_and_numbers_its_parts() -> None:
    workers = [_worker_state(f"w{i}") for i in range(3)]
    updates = pack_updates(
        kind="delta",
        source="cs",
        first_seq=40,
        sent_at_ms=1.0,
        workers=workers,
        workers_removed=["gone"],
        kv_upserts=[s.KvPlacement("u", "w0", 3)],
        emb_added={"w1": list(range(12)), "w2": []},
        part_bytes=VIEW_HEAD_BYTES + 5 * INT_BYTES + str_bytes("w1") + 10,  # one run of 5 ids
    )
    assert [(u.seq, u.part, u.parts, u.kind, u.source) for u in updates] == [
        (40 + i, i, 4, "delta", "cs") for i in range(4)
    ]
    assert updates[0].workers == workers and updates[0].workers_removed == ["gone"]
    assert updates[0].kv_upserts == [] and updates[0].emb_added == []  # part 0 is over budget already
    assert updates[1].kv_upserts == [s.KvPlacement("u", "w0", 3)]
    assert [u.emb_added for u in updates[1:]] == [
        [s.EmbChange("w1", [0, 1])],  # after the placement ([user, worker, length]: 23 bytes), room for 2
        [s.EmbChange("w1", [2, 3, 4, 5, 6])],
        [s.EmbChange("w1", [7, 8, 9, 10, 11])],
    ]
    assert all(u.workers == [] and u.workers_removed == [] for u in updates[1:])


def test_every_view_part_fits_the_budget() -> None:
    workers = [_worker_state(f"{'w' * 60}{i:04d}") for i in range(40)]
    kv = [s.KvPlacement(f"{'u' * 250}{i:06d}", workers[i % 40].worker_id, BIG) for i in range(2000)]
    emb = {w.worker_id: list(range(2**62, 2**62 + 5000)) for w in workers}
    updates = pack_updates(
        kind="snapshot",
        source="c" * 137,
        first_seq=0,
        sent_at_ms=HUGE,
        workers=workers,
        kv_upserts=kv,
        emb_added=emb,
        part_bytes=64 * 1024,
    )
    assert len(updates) > 20
    assert max(len(s.encode(u)) for u in updates) <= 64 * 1024
    assert [p for u in updates for p in u.kv_upserts] == kv
    assert sum(len(c.items) for u in updates for c in u.emb_added) == 40 * 5000
