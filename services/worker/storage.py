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

Host side:

* `HostEmbeddingTable`: the full item embedding table in host memory (pinned when the pool is on CUDA);
* `HostLink` (ABC, opened with `open_host_link`): moves rows to the pool device, `fetch` on the
  critical path (one transfer per call) and `start_background` -> `BackgroundTransfer` off it;
  - `EmulatedLink`, pool on the CPU: there is no HBM, so a "miss" would cost nothing; the link
    emulates PCIe (`LinkSpec`) by spending the transfer time as real wall time; background transfers
    run on one worker thread owned by the link;
  - `CudaLink`, pool on CUDA: gathers into page-locked memory, non-blocking H2D copies (the current
    stream for `fetch`, a side stream and an event for background transfers);
* `PrefetchChannel`: at most `max_inflight` background transfers, polled without waiting.

Ids (items, EMB slots) may be given as a sequence of ints, an integer numpy array (an int64 array is
cheapest: it is used without a copy) or a tensor.  Nothing here uses asyncio.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from services.worker.errors import EmbeddingTableError
from services.worker.model_config import F32, TABLE_DTYPES, TABLE_SUFFIXES

__all__ = [
    "BackgroundTransfer",
    "CudaLink",
    "EmulatedLink",
    "HostEmbeddingTable",
    "HostLink",
    "IntArray",
    "ItemIds",
    "LinkSpec",
    "PoolStorage",
    "PrefetchChannel",
    "open_host_link",
]

IntArray: TypeAlias = npt.NDArray[np.integer[Any]]
ItemIds: TypeAlias = Sequence[int] | IntArray | Tensor  # item ids or EMB slots


_SPIN_S = 200e-6  # busy-wait at most this long at the end of an emulated transfer
_LOAD_BLOCK_BYTES = 64 * 1024 * 1024  # a table file is copied in blocks of about this size


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _int_array(ids: IntArray) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got a numpy array of {ids.dtype}")


def _check_ids(name: str, ids: ItemIds, limit: int) -> None:
    """Range-check ids on the host (a CUDA tensor of ids is trusted: checking it would synchronise)."""
    if isinstance(ids, Tensor):
        if ids.device.type == "cuda" or ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
    elif isinstance(ids, np.ndarray):
        _int_array(ids)
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
    else:
        if len(ids) == 0:
            return
        lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= limit:
        raise IndexError(f"{name} out of range: ids span [{lo}, {hi}], valid ids are 0..{limit - 1}")


def _index(ids: ItemIds, device: torch.device) -> Tensor:
    """Ids as a flat int64 tensor on `device`; a writable int64 numpy array is shared, not copied."""
    if isinstance(ids, Tensor):
        return ids.to(device=device, dtype=torch.int64).reshape(-1)
    if isinstance(ids, np.ndarray):
        _int_array(ids)
        arr = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        if not arr.flags.writeable:  # torch.from_numpy warns about read-only arrays
            arr = arr.copy()
        return torch.from_numpy(arr).to(device)
    return torch.tensor(ids if isinstance(ids, list) else list(ids), dtype=torch.int64, device=device)


def _batchable(relocations: Sequence[tuple[int, int]]) -> bool:
    """True when gathering every src first and then scattering to every dst gives the same result as
    applying the pairs one by one: no src is written by an earlier pair and no dst repeats."""
    written: set[int] = set()
    for src, dst in relocations:
        if src in written or dst in written:
            return False
        written.add(dst)
    return True


def _check_pin(pin: bool) -> None:
    if pin and not torch.cuda.is_available():
        raise ValueError("pin=True needs CUDA (page-locked memory only helps H2D copies)")


def _open_table_file(path: Path) -> np.ndarray[Any, Any]:
    """The array in a table file, memory-mapped (nothing past the header is read yet)."""
    if path.suffix not in TABLE_SUFFIXES:
        raise EmbeddingTableError(
            path,
            "unsupported file type",
            found=path.suffix or "no suffix",
            expected=" or ".join(TABLE_SUFFIXES),
        )
    try:
        if path.suffix == ".npy":
            array: np.ndarray[Any, Any] = np.load(path, mmap_mode="r", allow_pickle=False)
            return array
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # whatever numpy or torch raise for a missing, truncated or foreign file
        raise EmbeddingTableError(path, f"cannot read it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, Tensor):
        raise EmbeddingTableError(
            path, "it does not hold a tensor", found=type(loaded).__name__, expected="a torch.Tensor"
        )
    if loaded.dtype not in (torch.float32, torch.float16):
        raise EmbeddingTableError(
            path,
            "its values have the wrong dtype",
            found=str(loaded.dtype).removeprefix("torch."),
            expected=" or ".join(TABLE_DTYPES),
        )
    return loaded.numpy()


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
        return emb_dim * F32

    @staticmethod
    def kv_page_bytes_for(n_layers: int, page_tokens: int, kv_width: int) -> int:
        return n_layers * 2 * page_tokens * kv_width * F32

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

    def read_emb(self, slots: ItemIds) -> Tensor:
        """Gathered copy [n, emb_dim] of the given slots."""
        _check_ids("EMB slots", slots, self.n_emb_slots)
        return self.emb_view.index_select(0, _index(slots, self.device))

    def write_emb(self, slots: ItemIds, rows: Tensor) -> None:
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
        t = self.page_tokens
        n = int(new_k[0].shape[0]) if len(new_k) else 0
        if start < 0 or start + n > len(pages) * t:
            raise ValueError(
                f"tokens {start}..{start + n - 1} do not fit in {len(pages)} pages of {t} tokens"
            )
        tokens = np.arange(start, start + n)
        self.write_kv_tokens(np.asarray(pages, dtype=np.int64)[tokens // t], tokens % t, new_k, new_v)

    def write_kv_tokens(
        self, pages: IntArray, rows: IntArray, new_k: Sequence[Tensor], new_v: Sequence[Tensor]
    ) -> None:
        """Write per-layer K/V [n, kv_width]: token i into row `rows[i]` of page `pages[i]` (tokens of
        any number of entries at once); one vectorised scatter over (page, row)."""
        if len(new_k) != self.n_layers or len(new_v) != self.n_layers:
            raise ValueError(f"need K and V for {self.n_layers} layers, got {len(new_k)} and {len(new_v)}")
        n = int(pages.shape[0])
        if rows.shape != (n,):
            raise ValueError(f"rows must be [{n}] like pages, got {list(rows.shape)}")
        for name, ts in (("new_k", new_k), ("new_v", new_v)):
            for i, x in enumerate(ts):
                if x.dim() != 2 or x.shape[0] != n or x.shape[1] != self.kv_width:
                    raise ValueError(f"{name}[{i}] must be [{n}, {self.kv_width}], got {list(x.shape)}")
        if n == 0:
            return
        _check_ids("KV pages", pages, self.n_kv_pages)
        _check_ids("KV page rows", rows, self.page_tokens)
        dst_page, dst_row = _index(pages, self.device), _index(rows, self.device)
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
        _check_pin(pin)
        if data is None:
            g = torch.Generator(device="cpu").manual_seed(seed)
            table = torch.randn((num_items, emb_dim), generator=g, dtype=torch.float32).mul_(0.1)
        else:
            if tuple(data.shape) != (num_items, emb_dim):
                raise ValueError(f"data must be [{num_items}, {emb_dim}], got {list(data.shape)}")
            table = data.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.pin = pin
        self.table: Tensor = table.pin_memory() if pin and not table.is_pinned() else table
        self.num_items = num_items
        self.emb_dim = emb_dim

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        pin: bool,
        emb_dim: int,
        num_items: int | None = None,
        model: str = "",
    ) -> HostEmbeddingTable:
        """Load a table file (docs/model-inputs.md): a .npy array, or a tensor saved with torch.save in a
        .pt file, [rows, emb_dim] float32 or float16, every value finite.  Memory-mapped, then copied in
        blocks (as float32) into the table, page-locked at once with ``pin=True``.

        Raises `EmbeddingTableError` (path, found, expected) for a file that is not such a table, has
        rows of another width than `emb_dim` (the item_dim of `model`, named in the message) or, when
        `num_items` is given, another row count.  The file is only read past its header once its shape and
        dtype are right."""
        p = Path(path)
        arr = _open_table_file(p)
        dtype = arr.dtype.name  # whatever the byte order
        if dtype not in TABLE_DTYPES:
            raise EmbeddingTableError(
                p, "its values have the wrong dtype", found=dtype, expected=" or ".join(TABLE_DTYPES)
            )
        if num_items is not None:
            rows = str(num_items)
        else:  # the file's own row count, where it has one
            rows = str(arr.shape[0]) if arr.ndim == 2 and arr.shape[0] > 0 else "num_items"
        width = f"{emb_dim} (item_dim of model preset {model})" if model else str(emb_dim)
        expected = f"shape [{rows}, {width}]"
        found = f"shape {list(arr.shape)}"
        if arr.ndim != 2:
            raise EmbeddingTableError(p, "it is not a 2-D array", found=found, expected=expected)
        if arr.shape[0] == 0:
            raise EmbeddingTableError(p, "it has no rows", found=found, expected=expected)
        if arr.shape[1] != emb_dim:
            raise EmbeddingTableError(p, "its rows have the wrong width", found=found, expected=expected)
        if num_items is not None and arr.shape[0] != num_items:
            raise EmbeddingTableError(
                p,
                "its row count is not the configured num_items (leave that unset to take the file's)",
                found=found,
                expected=expected,
            )
        n = int(arr.shape[0])
        _check_pin(pin)
        table = torch.empty((n, emb_dim), dtype=torch.float32, pin_memory=pin)
        dst = table.numpy()
        step = max(1, _LOAD_BLOCK_BYTES // (emb_dim * F32))
        for start in range(0, n, step):
            block = dst[start : start + step]
            block[...] = arr[start : start + step]  # reads the file; float16 becomes float32 here
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                raise EmbeddingTableError(
                    p, f"row {row} holds a NaN or an infinity", found="non-finite values", expected="finite"
                )
        return cls(n, emb_dim, seed=0, pin=pin, data=table)

    @property
    def row_bytes(self) -> int:
        return self.emb_dim * F32

    def gather(self, items: ItemIds) -> Tensor:
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


class BackgroundTransfer(ABC):
    """One host -> device transfer started by `HostLink.start_background`, finishing on its own."""

    @abstractmethod
    def done(self) -> bool:
        """True once the transfer has finished (or failed, or was cancelled); never waits."""

    @abstractmethod
    def result(self) -> Tensor:
        """Rows [n, emb_dim] on the pool device, safe to use on the current stream.

        Meant for a transfer that is `done`; otherwise it waits for it (CPU: the host waits; CUDA: only the
        current stream does).  Re-raises the error of a failed transfer.
        """

    @abstractmethod
    def cancel(self) -> bool:
        """Cancel the transfer if it has not started; True when it will never run."""

    @abstractmethod
    def wait(self) -> None:
        """Block the host until the transfer has finished or was cancelled; never raises."""


class _ThreadTransfer(BackgroundTransfer):
    """A transfer running (or queued) on an `EmulatedLink`'s worker thread."""

    def __init__(self, future: Future[Tensor]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Tensor:
        return self._future.result()

    def cancel(self) -> bool:
        return self._future.cancel()

    def wait(self) -> None:
        wait_futures((self._future,))


class _StreamTransfer(BackgroundTransfer):
    """A copy queued on a `CudaLink`'s side stream, with the event recorded after it."""

    def __init__(self, rows: Tensor, event: torch.cuda.Event, device: torch.device) -> None:
        self._rows = rows
        self._event = event
        self._device = device

    def done(self) -> bool:
        return bool(self._event.query())  # type: ignore[no-untyped-call]

    def result(self) -> Tensor:
        current = torch.cuda.current_stream(self._device)
        current.wait_event(self._event)
        # The rows were allocated on the side stream: keep the allocator from reusing them while the
        # current stream may still read them.
        self._rows.record_stream(current)
        return self._rows

    def cancel(self) -> bool:
        return False  # already queued on the stream

    def wait(self) -> None:
        self._event.synchronize()


class HostLink(ABC):
    """Moves embedding rows from the host table to the pool device: `fetch` on the critical path (one
    transfer per call, waited for), `start_background` off it.  Open one with `open_host_link`.

    Shared here: the accounting (`transfers`, `bytes_moved`; updated under a lock, since background
    transfers may finish on another thread) and the `LinkSpec` cost model.  `close` ends background
    work (running transfers finish, queued ones are cancelled, later `start_background` calls raise);
    `fetch` needs nothing that `close` releases and keeps working.
    """

    device_type: ClassVar[str]

    def __init__(self, table: HostEmbeddingTable, device: torch.device | str, spec: LinkSpec) -> None:
        self.table = table
        self.device = torch.device(device)
        if self.device.type != self.device_type:
            raise ValueError(
                f"{type(self).__name__} needs a {self.device_type} pool device, got {self.device}"
            )
        self.spec = spec
        self._lock = threading.Lock()
        self._closed = False
        self.transfers = 0
        self.bytes_moved = 0

    @property
    @abstractmethod
    def emulated(self) -> bool:
        """True when the transfer time is spent as wall time rather than by a real copy."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs: what kind of link this is."""

    @abstractmethod
    def _move(self, host: Tensor) -> Tensor:
        """Critical path: gathered host rows (n > 0) on the pool device, the transfer finished."""

    @abstractmethod
    def _start(self, items: ItemIds) -> BackgroundTransfer:
        """Off the critical path: start moving `items` (already range-checked) without waiting."""

    @abstractmethod
    def _release(self) -> None:
        """End background work: let running transfers finish, cancel queued ones."""

    def transfer_seconds(self, n_rows: int) -> float:
        """Emulated cost of moving `n_rows` rows in one transfer."""
        return self.spec.transfer_seconds(n_rows * self.table.row_bytes)

    def _account(self, n_rows: int) -> None:
        with self._lock:
            self.transfers += 1
            self.bytes_moved += n_rows * self.table.row_bytes

    def fetch(self, items: ItemIds) -> Tensor:
        """Rows [n, emb_dim] for `items` on the pool device, in ONE transfer, waiting for it to finish.
        An empty request returns an empty tensor without a transfer."""
        host = self.table.gather(items)
        n = int(host.shape[0])
        if n == 0:
            return host.to(self.device)
        rows = self._move(host)
        self._account(n)
        return rows

    def start_background(self, items: ItemIds) -> BackgroundTransfer:
        """Start moving `items` in one background transfer and return at once (bad ids raise here).
        The caller must not change `items` until the transfer is done.  An empty request is not
        counted as a transfer."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        _check_ids("items", items, self.table.num_items)
        return self._start(items)

    def close(self) -> None:
        """End background work (see the class docstring).  Idempotent."""
        self._closed = True
        self._release()

    def __enter__(self) -> HostLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmulatedLink(HostLink):
    """Pool on the CPU: there is no HBM, so a miss would cost nothing; the link emulates PCIe
    (`LinkSpec`) by spending each transfer's time as real wall time.  Background transfers run on
    one worker thread owned by the link (started on first use, joined by `close`)."""

    device_type = "cpu"

    def __init__(self, table: HostEmbeddingTable, device: torch.device | str, spec: LinkSpec) -> None:
        super().__init__(table, device, spec)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onepool-prefetch")

    @property
    def emulated(self) -> bool:
        return True

    def describe(self) -> str:
        return (
            f"emulated PCIe link: {self.spec.bandwidth_gbps:.1f} GB/s, "
            f"{self.spec.latency_us:.1f} us per transfer (CPU mode, real wall time)"
        )

    def _move(self, host: Tensor) -> Tensor:
        _spend(self.transfer_seconds(int(host.shape[0])))
        return host

    def _start(self, items: ItemIds) -> BackgroundTransfer:
        return _ThreadTransfer(self._worker.submit(self._background, items))

    def _background(self, items: ItemIds) -> Tensor:
        rows = self.table.gather(items)
        n = int(rows.shape[0])
        if n:
            _spend(self.transfer_seconds(n))
            self._account(n)
        return rows

    def _release(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


class CudaLink(HostLink):
    """Pool on a CUDA device: rows are gathered into page-locked staging memory (when the table is
    pinned) and copied with a non-blocking H2D copy.  `fetch` copies on the current stream and
    synchronises it; background transfers are queued on the link's `side_stream`, each followed by
    an event."""

    device_type = "cuda"

    def __init__(self, table: HostEmbeddingTable, device: torch.device | str, spec: LinkSpec) -> None:
        if not torch.cuda.is_available():
            raise ValueError(f"pool device {device} needs CUDA, and torch.cuda.is_available() is False")
        super().__init__(table, device, spec)
        self.side_stream: torch.cuda.Stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

    @property
    def emulated(self) -> bool:
        return False

    def describe(self) -> str:
        kind = "pinned" if self.table.pin else "pageable"
        return f"CUDA H2D ({kind} host table)"

    def _move(self, host: Tensor) -> Tensor:
        rows = host.to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return rows

    def _start(self, items: ItemIds) -> BackgroundTransfer:
        host = self.table.gather(items)
        with torch.cuda.stream(self.side_stream):
            rows = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.side_stream)
        if host.shape[0]:
            self._account(int(host.shape[0]))
        return _StreamTransfer(rows, event, self.device)

    def _release(self) -> None:
        self.side_stream.synchronize()


def open_host_link(table: HostEmbeddingTable, device: torch.device | str, spec: LinkSpec) -> HostLink:
    """The link for a pool on `device`: `EmulatedLink` for cpu, `CudaLink` for cuda."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return EmulatedLink(table, dev, spec)
    if dev.type == "cuda":
        return CudaLink(table, dev, spec)
    raise ValueError(f"unsupported pool device {dev}: expected cpu or cuda")


class PrefetchChannel:
    """Background host -> device transfers that never block the submitter, on `link`'s
    `start_background`.  A batch occupies one of `max_inflight` slots from `submit` until `poll` hands
    it back.  Closing the channel does not close the link."""

    def __init__(self, link: HostLink, max_inflight: int = 1) -> None:
        _positive("max_inflight", max_inflight)
        self.link = link
        self.max_inflight = max_inflight
        self._closed = False
        self._inflight: list[tuple[list[int], BackgroundTransfer]] = []
        # Finished batches not yet handed back because `poll` raised for a failed one.
        self._ready: list[tuple[list[int], Tensor]] = []

    @property
    def busy(self) -> bool:
        return self.inflight >= self.max_inflight

    @property
    def inflight(self) -> int:
        return len(self._inflight) + len(self._ready)

    def submit(self, items: Sequence[int] | IntArray) -> bool:
        """Start moving `items`; False (nothing started) when `max_inflight` batches are outstanding."""
        if self._closed:
            raise RuntimeError("PrefetchChannel is closed")
        if self.busy:
            return False
        batch = np.array(items, dtype=np.int64).reshape(-1)  # our own copy: the caller may reuse theirs
        self._inflight.append((batch.tolist(), self.link.start_background(batch)))
        return True

    def poll(self) -> list[tuple[list[int], Tensor]]:
        """Completed batches (items, rows on the pool device), oldest first; never waits.

        A failed transfer is dropped and its error re-raised; batches that completed alongside it are
        handed back by the next call.
        """
        ready, self._ready = self._ready, []
        pending: list[tuple[list[int], BackgroundTransfer]] = []
        failure: Exception | None = None
        for batch, transfer in self._inflight:
            if not transfer.done():
                pending.append((batch, transfer))
                continue
            try:
                rows = transfer.result()
            except Exception as exc:  # dropped, not retried forever
                failure = failure or exc
                continue
            ready.append((batch, rows))
        self._inflight = pending
        if failure is not None:
            self._ready = ready
            raise failure
        return ready

    def close(self) -> None:
        """Cancel queued transfers, wait for running ones and drop all results.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        transfers = [t for _, t in self._inflight]
        for t in transfers:  # cancel every queued one before waiting for any, or the worker starts them
            t.cancel()
        for t in transfers:
            t.wait()
        self._inflight = []
        self._ready = []

    def __enter__(self) -> PrefetchChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
