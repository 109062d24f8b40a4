"""Torch storage behind the HELM pool, and the host -> device link that fills it.

`PoolStorage` is the pool itself: ONE ``uint8`` allocation of ``budget_bytes`` on the pool device.
A pure-Python bookkeeping core (``services/worker/core``) decides what lives where and hands out
global ids; this module only turns ids into bytes:

* EMB slot ``s`` (one item embedding, ``emb_dim`` float32) lives at byte offset
  ``s * emb_entry_bytes``;
* KV page ``p`` (``page_tokens`` tokens of K and V for every layer, float32) lives at byte offset
  ``p * kv_page_bytes``, laid out ``[n_layers, 2 (K, V), page_tokens, kv_width]``.

The chunk size of the core is a multiple of both entry sizes, so a chunk can switch between EMB and
KV use without moving anything; here the whole arena is simply viewed, without copies, both as
``[budget // emb_entry_bytes, emb_dim]`` and as ``[budget // kv_page_bytes, n_layers, 2, page_tokens,
kv_width]`` float32.

Host side: `HostEmbeddingTable` holds the full item embedding table in host memory (pinned when the
pool is on CUDA), `HostLink` moves rows to the pool device on the critical path, and
`PrefetchChannel` moves them in the background.  When the pool device is the CPU there is no HBM and
a "miss" would cost nothing, so `HostLink` emulates a PCIe link (`LinkSpec`) by spending the transfer
time as real wall time.

Nothing here uses asyncio; the prefetch worker is a plain thread (CPU) or a side CUDA stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HostEmbeddingTable",
    "HostLink",
    "LinkSpec",
    "PoolStorage",
    "PrefetchChannel",
]

_F32 = 4  # bytes per float32
_SPIN_S = 200e-6  # busy-wait at most this long at the end of an emulated transfer


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_ids(name: str, ids: Sequence[int] | Tensor, limit: int) -> None:
    """Range-check ids on the host (a CUDA tensor of ids is trusted: checking it would synchronise)."""
    if isinstance(ids, Tensor):
        if ids.device.type == "cuda" or ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
    else:
        if len(ids) == 0:
            return
        lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= limit:
        raise IndexError(f"{name} out of range: ids span [{lo}, {hi}], valid ids are 0..{limit - 1}")


def _index(ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    if isinstance(ids, Tensor):
        return ids.to(device=device, dtype=torch.int64).reshape(-1)
    return torch.tensor(list(ids), dtype=torch.int64, device=device)


def _batchable(relocations: Sequence[tuple[int, int]]) -> bool:
    """True when gathering every src first and then scattering to every dst gives the same result as
    applying the pairs one by one: no src is written by an earlier pair and no dst repeats."""
    written: set[int] = set()
    for src, dst in relocations:
        if src in written or dst in written:
            return False
        written.add(dst)
    return True


class PoolStorage:
    """The pool's one device allocation, with float32 EMB-slot and KV-page views into it."""

    def __init__(
        self,
        *,
        budget_bytes: int,
        emb_dim: int,
        n_layers: int,
        page_tokens: int,
        kv_width: int,
        device: torch.device | str,
    ) -> None:
        for name, value in (
            ("budget_bytes", budget_bytes),
            ("emb_dim", emb_dim),
            ("n_layers", n_layers),
            ("page_tokens", page_tokens),
            ("kv_width", kv_width),
        ):
            _positive(name, value)
        self.emb_dim = emb_dim
        self.n_layers = n_layers
        self.page_tokens = page_tokens
        self.kv_width = kv_width
        self.device = torch.device(device)
        eb, pb = self.emb_entry_bytes, self.kv_page_bytes
        if budget_bytes % eb:
            raise ValueError(
                f"budget_bytes={budget_bytes} is not a multiple of the EMB entry size {eb} bytes "
                f"(emb_dim={emb_dim} float32); round the budget down to whole chunks first"
            )
        if budget_bytes % pb:
            raise ValueError(
                f"budget_bytes={budget_bytes} is not a multiple of the KV page size {pb} bytes "
                f"(n_layers={n_layers} x 2 x page_tokens={page_tokens} x kv_width={kv_width} float32); "
                "round the budget down to whole chunks first"
            )
        self.budget_bytes = budget_bytes
        self.arena: Tensor = torch.empty(budget_bytes, dtype=torch.uint8, device=self.device)
        flat = self.arena.view(torch.float32)
        self.emb_view: Tensor = flat.view(budget_bytes // eb, emb_dim)
        self.kv_view: Tensor = flat.view(budget_bytes // pb, n_layers, 2, page_tokens, kv_width)
        base = self.arena.untyped_storage().data_ptr()
        assert self.emb_view.untyped_storage().data_ptr() == base
        assert self.kv_view.untyped_storage().data_ptr() == base
        assert self.emb_view.data_ptr() == self.kv_view.data_ptr() == self.arena.data_ptr()

    # ---------------------------------------------------------------- geometry

    @staticmethod
    def emb_entry_bytes_for(emb_dim: int) -> int:
        return emb_dim * _F32

    @staticmethod
    def kv_page_bytes_for(n_layers: int, page_tokens: int, kv_width: int) -> int:
        return n_layers * 2 * page_tokens * kv_width * _F32

    @property
    def emb_entry_bytes(self) -> int:
        return self.emb_entry_bytes_for(self.emb_dim)

    @property
    def kv_page_bytes(self) -> int:
        return self.kv_page_bytes_for(self.n_layers, self.page_tokens, self.kv_width)

    @property
    def n_emb_slots(self) -> int:
        return int(self.emb_view.shape[0])

    @property
    def n_kv_pages(self) -> int:
        return int(self.kv_view.shape[0])

    # ---------------------------------------------------------------- EMB slots

    def read_emb(self, slots: Sequence[int] | Tensor) -> Tensor:
        """Gathered copy [n, emb_dim] of the given slots."""
        _check_ids("EMB slots", slots, self.n_emb_slots)
        return self.emb_view.index_select(0, _index(slots, self.device))

    def write_emb(self, slots: Sequence[int] | Tensor, rows: Tensor) -> None:
        """Write rows [n, emb_dim] into the given (distinct) slots."""
        idx = _index(slots, self.device)
        if rows.dim() != 2 or rows.shape[1] != self.emb_dim or rows.shape[0] != idx.shape[0]:
            raise ValueError(f"rows must be [{idx.shape[0]}, {self.emb_dim}], got {list(rows.shape)}")
        _check_ids("EMB slots", slots, self.n_emb_slots)
        self.emb_view.index_copy_(0, idx, rows.to(device=self.device, dtype=torch.float32))

    def copy_emb(self, relocations: Sequence[tuple[int, int]]) -> None:
        """Copy slot src -> dst for each (src, dst) pair, applied in order."""
        self._relocate(self.emb_view, relocations, self.n_emb_slots, "EMB slots")

    # ---------------------------------------------------------------- KV pages

    def read_kv(self, pages: Sequence[int], length: int) -> tuple[list[Tensor], list[Tensor]]:
        """K and V of tokens 0..length-1 of an entry stored in `pages` (in order): per layer
        [length, kv_width] each (copies)."""
        t = self.page_tokens
        if length < 0 or length > len(pages) * t:
            raise ValueError(f"length={length} does not fit in {len(pages)} pages of {t} tokens")
        n_pages = -(-length // t)
        used = list(pages[:n_pages])
        _check_ids("KV pages", used, self.n_kv_pages)
        sel = self.kv_view.index_select(0, _index(used, self.device))  # [P, L, 2, T, W]
        seq = sel.permute(1, 2, 0, 3, 4).reshape(self.n_layers, 2, n_pages * t, self.kv_width)
        seq = seq[:, :, :length]
        return [seq[i, 0] for i in range(self.n_layers)], [seq[i, 1] for i in range(self.n_layers)]

    def write_kv(
        self, pages: Sequence[int], start: int, new_k: Sequence[Tensor], new_v: Sequence[Tensor]
    ) -> None:
        """Write per-layer K/V [n, kv_width] as tokens start..start+n-1 of the entry stored in `pages`
        (may start mid-page and span pages); one vectorised scatter over (page, row)."""
        if len(new_k) != self.n_layers or len(new_v) != self.n_layers:
            raise ValueError(f"need K and V for {self.n_layers} layers, got {len(new_k)} and {len(new_v)}")
        n = int(new_k[0].shape[0])
        for name, ts in (("new_k", new_k), ("new_v", new_v)):
            for i, x in enumerate(ts):
                if x.dim() != 2 or x.shape[0] != n or x.shape[1] != self.kv_width:
                    raise ValueError(f"{name}[{i}] must be [{n}, {self.kv_width}], got {list(x.shape)}")
        t = self.page_tokens
        if start < 0 or start + n > len(pages) * t:
            raise ValueError(
                f"tokens {start}..{start + n - 1} do not fit in {len(pages)} pages of {t} tokens"
            )
        if n == 0:
            return
        first, last = start // t, (start + n - 1) // t
        used = list(pages[first : last + 1])
        _check_ids("KV pages", used, self.n_kv_pages)
        page_idx = _index(used, self.device)
        tok = torch.arange(start, start + n, device=self.device)
        dst_page = page_idx[tok // t - first]
        dst_row = tok % t
        vals = torch.stack((torch.stack(list(new_k)), torch.stack(list(new_v))), dim=1)  # [L, 2, n, W]
        vals = vals.to(device=self.device, dtype=torch.float32).permute(2, 0, 1, 3)  # [n, L, 2, W]
        # Advanced indices on dims 0 and 3 (separated by slices): the indexed result is [n, L, 2, W].
        self.kv_view[dst_page, :, :, dst_row] = vals

    def copy_kv(self, relocations: Sequence[tuple[int, int]]) -> None:
        """Copy page src -> dst for each (src, dst) pair, applied in order."""
        self._relocate(self.kv_view, relocations, self.n_kv_pages, "KV pages")

    # ---------------------------------------------------------------- helpers

    def _relocate(self, view: Tensor, relocations: Sequence[tuple[int, int]], limit: int, what: str) -> None:
        if not relocations:
            return
        srcs = [s for s, _ in relocations]
        dsts = [d for _, d in relocations]
        _check_ids(what, srcs + dsts, limit)
        if _batchable(relocations):
            src_idx, dst_idx = _index(srcs, self.device), _index(dsts, self.device)
            view.index_copy_(0, dst_idx, view.index_select(0, src_idx))
        else:
            for src, dst in relocations:
                if src != dst:
                    view[dst].copy_(view[src])


class HostEmbeddingTable:
    """The full item embedding table [num_items, emb_dim] float32 in host memory.

    Built from `seed` (N(0, 1) * 0.1 from a private torch.Generator: deterministic) or, with `data`,
    from given values (see `from_file`).  With ``pin=True`` (pool on CUDA) the table is page-locked
    and `gather` returns page-locked rows, so H2D copies can be asynchronous.
    """

    def __init__(
        self, num_items: int, emb_dim: int, *, seed: int, pin: bool, data: Tensor | None = None
    ) -> None:
        _positive("num_items", num_items)
        _positive("emb_dim", emb_dim)
        if pin and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA (page-locked memory only helps H2D copies)")
        if data is None:
            g = torch.Generator(device="cpu").manual_seed(seed)
            table = torch.randn((num_items, emb_dim), generator=g, dtype=torch.float32).mul_(0.1)
        else:
            if tuple(data.shape) != (num_items, emb_dim):
                raise ValueError(f"data must be [{num_items}, {emb_dim}], got {list(data.shape)}")
            table = data.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.pin = pin
        self.table: Tensor = table.pin_memory() if pin else table
        self.num_items = num_items
        self.emb_dim = emb_dim

    @classmethod
    def from_file(cls, path: str | Path, *, pin: bool) -> HostEmbeddingTable:
        """Load a 2-D table from a .npy file (numpy) or a .pt file (a tensor saved with torch.save)."""
        p = Path(path)
        if p.suffix == ".npy":
            data = torch.from_numpy(np.ascontiguousarray(np.load(p), dtype=np.float32))
        elif p.suffix == ".pt":
            loaded: Any = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Tensor):
                raise ValueError(f"{p} does not hold a tensor (got {type(loaded).__name__})")
            data = loaded
        else:
            raise ValueError(f"unsupported embedding table file {p}: expected .npy or .pt")
        if data.dim() != 2:
            raise ValueError(f"embedding table in {p} must be 2-D, got shape {list(data.shape)}")
        return cls(int(data.shape[0]), int(data.shape[1]), seed=0, pin=pin, data=data)

    @property
    def row_bytes(self) -> int:
        return self.emb_dim * _F32

    def gather(self, items: Sequence[int] | Tensor) -> Tensor:
        """Host rows [n, emb_dim] for `items` (a fresh tensor; page-locked when the table is pinned,
        taken from torch's caching host allocator, which does not reuse it while an async copy from it
        is still pending)."""
        _check_ids("items", items, self.num_items)
        idx = _index(items, torch.device("cpu"))
        out = torch.empty((idx.shape[0], self.emb_dim), dtype=torch.float32, pin_memory=self.pin)
        torch.index_select(self.table, 0, idx, out=out)
        return out


@dataclass(frozen=True)
class LinkSpec:
    """The emulated host -> device link used when the pool device is the CPU.

    One transfer of `nbytes` costs ``latency_us * 1e-6 + nbytes / (bandwidth_gbps * 1e9)`` seconds.
    """

    # GB/s (1e9 bytes/s).  PCIe Gen4 x16 carries 16 GT/s x 16 lanes x 128/130 = 31.5 GB/s per direction
    # raw; practical pinned H2D copy-engine bandwidth is ~25 GB/s: NVIDIA nvbandwidth
    # host_to_device_memcpy_ce reports 24-26 GB/s per RTX 4090 on PCIe Gen4 x16 (NVIDIA/nvbandwidth
    # issue #15), and ~25 GB/s H2D on A100 (NVIDIA/nvbandwidth issue #42).
    bandwidth_gbps: float = 25.0
    # Microseconds per transfer, independent of size: cudaMemcpyAsync submission plus the stream
    # synchronisation the critical path waits on.  A modelling assumption of ~10 us, the order of
    # magnitude of CUDA launch/synchronisation overheads (a few us each); not a measurement of ours.
    latency_us: float = 10.0

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        if not self.latency_us >= 0:
            raise ValueError(f"latency_us must be >= 0, got {self.latency_us}")

    def transfer_seconds(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbps * 1e9)


def _spend(seconds: float) -> None:
    """Let `seconds` of wall time pass: sleep for the bulk (releasing the GIL), spin only for the last
    < 200 us so short transfers are not rounded up to the scheduler's sleep granularity."""
    deadline = time.perf_counter() + seconds
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        pass


class HostLink:
    """Moves embedding rows from the host table to the pool device.

    CUDA: rows are gathered into page-locked staging memory and copied with a non-blocking H2D copy on
    the current stream, then that stream is synchronised.  CPU: rows are gathered and the `LinkSpec`
    transfer time is spent as real wall time (emulated link).  One transfer per call.
    """

    def __init__(self, table: HostEmbeddingTable, device: torch.device | str, spec: LinkSpec) -> None:
        self.table = table
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"unsupported pool device {self.device}: expected cpu or cuda")
        self.spec = spec
        self._lock = threading.Lock()
        self.transfers = 0
        self.bytes_moved = 0

    @property
    def emulated(self) -> bool:
        return self.device.type == "cpu"

    def describe(self) -> str:
        if self.emulated:
            return (
                f"emulated PCIe link: {self.spec.bandwidth_gbps:.1f} GB/s, "
                f"{self.spec.latency_us:.1f} us per transfer (CPU mode, real wall time)"
            )
        kind = "pinned" if self.table.pin else "pageable"
        return f"CUDA H2D ({kind} host table)"

    def transfer_seconds(self, n_rows: int) -> float:
        """Emulated cost of moving `n_rows` rows in one transfer."""
        return self.spec.transfer_seconds(n_rows * self.table.row_bytes)

    def _account(self, n_rows: int) -> None:
        with self._lock:
            self.transfers += 1
            self.bytes_moved += n_rows * self.table.row_bytes

    def fetch(self, items: Sequence[int] | Tensor) -> Tensor:
        """Rows [n, emb_dim] for `items` on the pool device, waiting for the transfer to finish.
        An empty request returns an empty tensor without a transfer."""
        host = self.table.gather(items)
        n = int(host.shape[0])
        if n == 0:
            return host.to(self.device)
        if self.emulated:
            _spend(self.transfer_seconds(n))
            rows = host
        else:
            rows = host.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        self._account(n)
        return rows


class PrefetchChannel:
    """Background host -> device transfers that never block the submitter.

    CUDA: `submit` gathers the rows into page-locked memory, queues the H2D copy on a dedicated side
    stream and records an event; `poll` hands back batches whose event has completed (after making the
    current stream wait for it).  CPU: one worker thread owned by the channel gathers the rows and
    spends the emulated transfer time.  A batch occupies one of `max_inflight` slots from `submit`
    until `poll` hands it back.
    """

    def __init__(self, link: HostLink, max_inflight: int = 1) -> None:
        _positive("max_inflight", max_inflight)
        self.link = link
        self.max_inflight = max_inflight
        self._closed = False
        self._inflight: list[tuple[list[int], Any]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._stream: Any = None
        if link.emulated:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onepool-prefetch")
        else:
            self._stream = torch.cuda.Stream(device=link.device)  # type: ignore[no-untyped-call]

    @property
    def busy(self) -> bool:
        return len(self._inflight) >= self.max_inflight

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def submit(self, items: Sequence[int]) -> bool:
        """Start moving `items`; False (nothing started) when `max_inflight` batches are outstanding."""
        if self._closed:
            raise RuntimeError("PrefetchChannel is closed")
        if self.busy:
            return False
        batch = [int(i) for i in items]
        if self._executor is not None:
            _check_ids("items", batch, self.link.table.num_items)
            self._inflight.append((batch, self._executor.submit(self._cpu_transfer, batch)))
        else:
            host = self.link.table.gather(batch)
            with torch.cuda.stream(self._stream):
                rows = host.to(self.link.device, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self._stream)
            self.link._account(len(batch))
            self._inflight.append((batch, (rows, event)))
        return True

    def _cpu_transfer(self, batch: list[int]) -> Tensor:
        rows = self.link.table.gather(batch)
        if batch:
            _spend(self.link.transfer_seconds(len(batch)))
            self.link._account(len(batch))
        return rows

    def poll(self) -> list[tuple[list[int], Tensor]]:
        """Completed batches (items, rows on the pool device), oldest first; never waits.  Re-raises
        the error of a failed CPU transfer."""
        done: list[tuple[list[int], Tensor]] = []
        pending: list[tuple[list[int], Any]] = []
        failure: BaseException | None = None
        for batch, handle in self._inflight:
            if isinstance(handle, Future):
                if not handle.done():
                    pending.append((batch, handle))
                elif handle.exception() is not None:
                    failure = failure or handle.exception()  # dropped, not retried forever
                else:
                    done.append((batch, handle.result()))
            else:
                rows, event = handle
                if event.query():
                    current = torch.cuda.current_stream(self.link.device)
                    current.wait_event(event)
                    rows.record_stream(current)
                    done.append((batch, rows))
                else:
                    pending.append((batch, handle))
        self._inflight = pending
        if failure is not None:
            raise failure
        return done

    def close(self) -> None:
        """Wait for in-flight transfers (queued CPU ones are cancelled), drop their results and stop
        the worker.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        elif self._stream is not None:
            self._stream.synchronize()
        self._inflight = []

    def __enter__(self) -> PrefetchChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
