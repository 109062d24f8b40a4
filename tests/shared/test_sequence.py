"""The one sequence rule every receiver of a numbered stream applies (shared/sequence.py)."""

from __future__ import annotations

from shared.sequence import GAP_WINDOW, REPLAY_WINDOW, SeqOrder, classify, gap_start


def test_the_windows() -> None:
    assert classify(10, 10) is SeqOrder.NEXT
    assert classify(9, 10) is SeqOrder.DUPLICATE
    assert classify(10 - REPLAY_WINDOW, 10) is SeqOrder.DUPLICATE
    assert classify(10 - REPLAY_WINDOW - 1, 10) is SeqOrder.RESTART  # far behind: a new numbering
    assert classify(11, 10) is SeqOrder.GAP
    assert classify(10 + GAP_WINDOW, 10) is SeqOrder.GAP
    assert classify(10 + GAP_WINDOW + 1, 10) is SeqOrder.RESTART  # far ahead: not a loss
    assert classify(2**63 - 1, 10) is SeqOrder.RESTART
    assert classify(0, 2**63) is SeqOrder.RESTART


def test_a_seq_inside_the_last_gap_is_a_restart_not_a_duplicate() -> None:
    # expected 5, then 17 arrived (a gap from 5): expecting 18 now
    gap_from = gap_start(SeqOrder.GAP, 5, None)
    assert gap_from == 5
    assert classify(5, 18, gap_from) is SeqOrder.RESTART  # never received: the source resuming
    assert classify(17, 18, gap_from) is SeqOrder.RESTART
    assert classify(4, 18, gap_from) is SeqOrder.DUPLICATE  # received before the gap
    assert classify(18, 18, gap_from) is SeqOrder.NEXT
    # NEXT and DUPLICATE keep the gap; a restart forgets it; a second gap keeps the first one's start
    assert gap_start(SeqOrder.NEXT, 18, gap_from) == 5
    assert gap_start(SeqOrder.DUPLICATE, 18, gap_from) == 5
    assert gap_start(SeqOrder.RESTART, 18, gap_from) is None
    assert gap_start(SeqOrder.GAP, 30, gap_from) == 5
