"""Sequence numbers on the bus: one rule for every stream numbered per source (worker digests, the routing
view, feature reports), so that no receiver can be talked into dropping every later message.

A receiver keeps ``expected``, the seq it expects next from a source, and classifies each arrival:

* ``NEXT``: ``seq == expected``.
* ``DUPLICATE``: ``expected - REPLAY_WINDOW <= seq < expected``: already seen (or a late copy): ignore it.
* ``GAP``: ``expected < seq <= expected + GAP_WINDOW``: messages were lost; resynchronise and go on from
  ``seq``.
* ``RESTART``: anything else, a jump beyond a sane window either way: the source restarted its numbering
  (or a stranger is talking in its name). Treat it like a new source: resynchronise and go on from ``seq``.
  Never "older than the newest ever seen, so drop it": one message with seq 2**63-1 would then silence the
  source until it restarts.

Why the windows are what they are: NATS core delivers one publisher's messages in order and never twice,
so a genuine duplicate or late message is at most a few behind (REPLAY_WINDOW = 16 covers a publisher that
resends after a reconnect). Forward, a gap means messages lost while both ends were connected; more than
GAP_WINDOW (1024 digests, about 2 minutes at the default 100 ms of a test worker, 8.5 minutes at 500 ms)
is not a loss but a restart. Both GAP and RESTART end with the receiver resynchronised from ``seq``: the
difference is what is counted and logged, and that a forged far-ahead seq costs the genuine source at most
one message (its next one is a RESTART, accepted), never its future.
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


def classify(seq: int, expected: int) -> SeqOrder:
    """Where ``seq`` stands against ``expected``, the next seq the receiver expects from that source."""
    if seq == expected:
        return SeqOrder.NEXT
    if expected - REPLAY_WINDOW <= seq < expected:
        return SeqOrder.DUPLICATE
    if expected < seq <= expected + GAP_WINDOW:
        return SeqOrder.GAP
    return SeqOrder.RESTART
