"""What the router reads of the cluster: the ``RoutingView`` interface, and ``IndexView``, its residency
answered by a :class:`~shared.residency.ResidencyIndex`.

The gateway implements it over its replica of cachestate's view (``ReplicaView`` in ``service.py``), the
simulator over its own index (both ``IndexView``s); tests and the routing benchmark implement their own. Every
part the router uses is declared here, the optional fast paths with working defaults: the router never probes
a view for attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from shared.residency import ResidencyIndex
from shared.schemas import WorkerState

__all__ = ["IndexView", "RoutingView"]


class RoutingView(ABC):
    """What the router reads of the cluster (the gateway's replica of the routing view). Subclass it.

    Optional parts, with defaults:
    - ``version``: an int changed whenever ``routable_workers()`` (the set or any field) or ``worker_bit()``
      answers change: the router then reuses its per-worker arrays while it holds. None (the default): the
      arrays are rebuilt on every call.
    - ``emb_masks_array(items: NDArray[int64])``: the same answer as ``emb_masks``, as a uint64 array, for
      a view that keeps masks in numpy (the router asks only while every bit index is below 64): saves the
      list round trip (~10 us for 500 items). None (the default): not offered, the router asks
      ``emb_masks``.
    ``emb_masks`` may also return a numpy uint64 array instead of a list when every bit index is below 64.
    Keeping ``emb_masks`` fast matters: one Python dict lookup per item costs more than the rest of route().
    """

    version: int | None = None

    @abstractmethod
    def routable_workers(self) -> Sequence[WorkerState]:
        """Live, not draining workers."""

    @abstractmethod
    def kv_workers(self, user_id: str) -> Mapping[str, int]:
        """worker_id -> history length that worker's KV of this user covers."""

    @abstractmethod
    def worker_bit(self, worker_id: str) -> int | None:
        """Bit index of that worker in EMB masks (None: it has none yet, it holds nothing)."""

    @abstractmethod
    def emb_masks(self, items: Sequence[int]) -> Sequence[int] | npt.NDArray[np.uint64]:
        """Per item: bitmask of the workers whose EMB holds it (0 if none)."""

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        """The fast path of ``emb_masks`` (see the class docstring); None: not offered."""
        return None


class IndexView(RoutingView):
    """A RoutingView whose residency is a ResidencyIndex (with its array fast path); subclasses say which
    workers are routable."""

    def __init__(self, index: ResidencyIndex) -> None:
        self.index = index

    def kv_workers(self, user_id: str) -> Mapping[str, int]:
        return self.index.kv_workers(user_id)

    def worker_bit(self, worker_id: str) -> int | None:
        return self.index.worker_bit(worker_id)

    def emb_masks(self, items: Sequence[int]) -> list[int]:
        return self.index.emb_masks(items)

    def emb_masks_array(self, items: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64] | None:
        """The router's fast path (it calls this only while every routable worker's bit is < 64)."""
        return self.index.emb_masks_array(items)
