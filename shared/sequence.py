"""Sequence numbers on the bus: one rule for every stream numbered per source (worker digests, the routing
view, feature reports), so that no receiver can be talked into dropping every later message.

A receiver keeps ``expected``, the seq it expects next from a source, and classifies each arrival:

* ``NEXT``: ``seq == expected``.
* ``DUPLICATE``: ``expected - REPLAY_WINDOW <= seq < expected``: already seen (or a late copy): ignore it.
* ``GAP``: ``expected < seq <= expected + GAP_WINDOW``: messages were lost; resynchronise and go on from
  ``seq``. The receiver remembers where the gap began (``gap_from``, the seq it expected then).
* ``RESTART``: anything else, a jump beyond a sane window either way, or a seq inside the last gap
  (``gap_from <= seq < expected``: a number never received, so no duplicate; NATS does not reorder, so it
  is the source resuming its own numbering after someone else's jump): the source restarted its numbering
  (or a stranger is talking in its name). Treat it like a new source: resynchronise and go on from ``seq``.
  Never "older than the newest ever seen, so drop it": one message with seq 2**63-1, or 12 ahead, would then
  silence the source.

Why the windows are what they are: NATS core delivers one publisher's messages in order and never twice,
so a genuine duplicate or late message is at most a few behind (REPLAY_WINDOW = 16 covers a publisher that
resends after a reconnect). Forward, a gap means messages lost while both ends were connected; more than
GAP_WINDOW (1024 digests, about 2 minutes at the default 100 ms of a test worker, 8.5 minutes at 500 ms)
is not a loss but a restart. Both GAP and RESTART end with the receiver resynchronised from ``seq``: the
difference is what is counted and logged. A forged seq, near or far ahead, costs the genuine source one
resynchronisation: its next message falls in the gap the forgery opened (or far behind it), a RESTART,
accepted; it is never taken for a duplicate.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

REPLAY_WINDOW: Final = 16
GAP_WINDOW: Final = 1024


class SeqOrder(StrEnum):
    NEXT = "next"
    DUPLICATE = "duplicate"
    GAP = "gap"
    RESTART = "restart"


def classify(seq: int, expected: int, gap_from: int | None = None) -> SeqOrder:
    """Where ``seq`` stands against ``expected``, the next seq the receiver expects from that source;
    ``gap_from``: where the last GAP began (None: no gap since the numbering last restarted)."""
    if seq == expected:
        return SeqOrder.NEXT
    if gap_from is not None and gap_from <= seq < expected:
        return SeqOrder.RESTART
    if expected - REPLAY_WINDOW <= seq < expected:
        return SeqOrder.DUPLICATE
    if expected < seq <= expected + GAP_WINDOW:
        return SeqOrder.GAP
    return SeqOrder.RESTART


def gap_start(order: SeqOrder, expected: int, gap_from: int | None) -> int | None:
    """The receiver's ``gap_from`` after accepting a message classified ``order`` while expecting
    ``expected``: a GAP begins at ``expected`` (an earlier gap not closed by a restart keeps its start: a
    replay from between the two is then resynchronised from, never lost), a RESTART forgets any gap, NEXT
    keeps it."""
    if order is SeqOrder.GAP:
        return expected if gap_from is None else gap_from
    if order is SeqOrder.RESTART:
        return None
    return gap_from
