"""Pool storage views, KV page layout, host table, the host links (emulated, CUDA) and prefetch channel."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
import torch

from services.worker.storage import (
    CudaLink,
    EmulatedLink,
    HostEmbeddingTable,
    HostLink,
    LinkSpec,
    PoolStorage,
    PrefetchChannel,
    open_host_link,
)

EMB_DIM = 8
N_LAYERS = 2
PAGE_TOKENS = 4
KV_WIDTH = 8
EMB_BYTES = EMB_DIM * 4  # 32
PAGE_BYTES = N_LAYERS * 2 * PAGE_TOKENS * KV_WIDTH * 4  # 512
CHUNK = PAGE_BYTES * 2  # 1024: a multiple of both, 2 pages or 32 EMB slots
CPU = torch.device("cpu")


def make_pool(chunks: int = 8, device: torch.device = CPU) -> PoolStorage:
    pool = PoolStorage(
        budget_bytes=chunks * CHUNK,
        emb_dim=EMB_DIM,
        n_layers=N_LAYERS,
        page_tokens=PAGE_TOKENS,
        kv_width=KV_WIDTH,
        device=device,
    )
    pool.arena.zero_()
    return pool


def kv_rows(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(n, KV_WIDTH, generator=g) for _ in range(N_LAYERS)]
    vs = [torch.randn(n, KV_WIDTH, generator=g) for _ in range(N_LAYERS)]
    return ks, vs


def test_geometry_and_views_share_arena() -> None:
    pool = make_pool()
    assert pool.emb_entry_bytes == EMB_BYTES == PoolStorage.emb_entry_bytes_for(EMB_DIM)
    assert pool.kv_page_bytes == PAGE_BYTES == PoolStorage.kv_page_bytes_for(N_LAYERS, PAGE_TOKENS, KV_WIDTH)
    assert pool.arena.dtype == torch.uint8 and pool.arena.numel() == 8 * CHUNK
    assert pool.emb_view.shape == (8 * CHUNK // EMB_BYTES, EMB_DIM)
    assert pool.kv_view.shape == (8 * CHUNK // PAGE_BYTES, N_LAYERS, 2, PAGE_TOKENS, KV_WIDTH)
    assert pool.n_emb_slots == 256 and pool.n_kv_pages == 16
    lo = pool.arena.data_ptr()
    hi = lo + pool.arena.numel()
    for view in (pool.emb_view, pool.kv_view):
        assert view.dtype == torch.float32
        assert view.untyped_storage().data_ptr() == pool.arena.untyped_storage().data_ptr()
        assert lo <= view.data_ptr() and view.data_ptr() + view.numel() * 4 <= hi
    # a write through one view is visible as bytes of the arena at the documented offset
    pool.emb_view[3].fill_(1.0)
    assert torch.equal(pool.arena[3 * EMB_BYTES : 4 * EMB_BYTES].view(torch.float32), torch.ones(EMB_DIM))
    pool.kv_view[5].fill_(2.0)
    page = pool.arena[5 * PAGE_BYTES : 6 * PAGE_BYTES].view(torch.float32)
    assert torch.equal(page, torch.full((PAGE_BYTES // 4,), 2.0))


def test_divisibility_errors_are_clear() -> None:
    kwargs = dict(emb_dim=EMB_DIM, n_layers=N_LAYERS, page_tokens=PAGE_TOKENS, kv_width=KV_WIDTH, device=CPU)
    with pytest.raises(ValueError, match="EMB entry size 32 bytes"):
        PoolStorage(budget_bytes=CHUNK + 16, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="KV page size 512 bytes"):
        PoolStorage(budget_bytes=CHUNK + EMB_BYTES, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget_bytes must be a positive integer"):
        PoolStorage(budget_bytes=0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page_tokens"):
        PoolStorage(
            budget_bytes=CHUNK,
            emb_dim=EMB_DIM,
            n_layers=N_LAYERS,
            page_tokens=0,
            kv_width=KV_WIDTH,
            device=CPU,
        )


def test_emb_round_trip() -> None:
    pool = make_pool()
    rows = torch.randn(4, EMB_DIM)
    pool.write_emb([7, 0, 255, 31], rows)
    assert torch.equal(pool.read_emb([7, 0, 255, 31]), rows)
    assert torch.equal(pool.read_emb(torch.tensor([255, 7])), rows[[2, 0]])
    # read_emb returns a copy
    got = pool.read_emb([7])
    got.zero_()
    assert torch.equal(pool.read_emb([7]), rows[:1])
    with pytest.raises(IndexError, match="EMB slots"):
        pool.read_emb([256])
    with pytest.raises(ValueError, match="rows must be"):
        pool.write_emb([1, 2], rows)


def test_emb_ids_as_numpy_arrays() -> None:
    pool = make_pool()
    rows = torch.randn(4, EMB_DIM)
    slots = np.array([7, 0, 255, 31], dtype=np.int64)
    pool.write_emb(slots, rows)
    assert torch.equal(pool.read_emb(slots), rows)
    assert torch.equal(pool.read_emb([7, 0, 255, 31]), rows)  # the same slots as a list
    # other integer dtypes, 2-D, strided and read-only arrays are accepted (read-only: copied, no warning)
    assert torch.equal(pool.read_emb(np.array([31, 7], dtype=np.int32)), rows[[3, 0]])
    assert torch.equal(pool.read_emb(np.array([[7], [0]])), rows[:2])
    assert torch.equal(pool.read_emb(slots[::-1]), rows.flip(0))
    frozen = slots.copy()
    frozen.setflags(write=False)
    assert torch.equal(pool.read_emb(frozen), rows)
    assert pool.read_emb(np.array([], dtype=np.int64)).shape == (0, EMB_DIM)
    with pytest.raises(IndexError, match=r"EMB slots out of range: ids span \[-1, 7\]"):
        pool.read_emb(np.array([7, -1]))
    with pytest.raises(IndexError, match="EMB slots"):
        pool.write_emb(np.array([1, 256]), rows[:2])
    with pytest.raises(TypeError, match="integers"):
        pool.read_emb(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="rows must be"):
        pool.write_emb(np.array([1, 2]), rows)


def test_kv_write_read_spanning_pages_mid_page_start() -> None:
    pool = make_pool()
    pages = [9, 2, 14, 5]  # deliberately out of order: the entry's token order follows this list
    k1, v1 = kv_rows(3, 1)
    pool.write_kv(pages, 0, k1, v1)  # tokens 0..2 (page 9)
    k2, v2 = kv_rows(10, 2)
    pool.write_kv(pages, 3, k2, v2)  # tokens 3..12: starts at the last row of page 9, spans 2, 14, 5
    k, v = pool.read_kv(pages, 13)
    for layer in range(N_LAYERS):
        assert k[layer].shape == (13, KV_WIDTH)
        assert torch.equal(k[layer], torch.cat((k1[layer], k2[layer])))
        assert torch.equal(v[layer], torch.cat((v1[layer], v2[layer])))
    # physical layout: token t at page pages[t // T], row t % T, [layer, K/V]
    assert torch.equal(pool.kv_view[14, 1, 0, 3], k2[1][11 - 3])
    assert torch.equal(pool.kv_view[2, 0, 1, 0], v2[0][4 - 3])
    # a shorter read returns the prefix; a zero-length read is empty
    k5, _ = pool.read_kv(pages, 5)
    assert torch.equal(k5[0], torch.cat((k1[0], k2[0][:2])))
    k0, v0 = pool.read_kv(pages, 0)
    assert all(t.shape == (0, KV_WIDTH) for t in k0 + v0)


def test_kv_write_bounds() -> None:
    pool = make_pool()
    k, v = kv_rows(5, 0)
    with pytest.raises(ValueError, match="do not fit"):
        pool.write_kv([1], 0, k, v)
    with pytest.raises(ValueError, match="does not fit"):
        pool.read_kv([1], 5)
    with pytest.raises(IndexError, match="KV pages"):
        pool.write_kv([1, 99], 0, k, v)
    with pytest.raises(ValueError, match="layers"):
        pool.write_kv([1, 2], 0, k[:1], v)


def test_kv_write_leaves_other_pages_and_emb_slots_alone() -> None:
    pool = make_pool()
    pool.arena.copy_(torch.randint(0, 256, (pool.arena.numel(),), dtype=torch.uint8))
    before = pool.arena.clone()
    page = 6  # bytes [3072, 3584): chunk 3 (bytes 3072..4095)
    k, v = kv_rows(PAGE_TOKENS, 3)
    pool.write_kv([page], 0, k, v)
    changed = (pool.arena != before).nonzero().flatten()
    assert changed.numel() > 0
    assert int(changed.min()) >= page * PAGE_BYTES and int(changed.max()) < (page + 1) * PAGE_BYTES
    # EMB slots of another chunk, and a neighbouring page, are untouched
    assert torch.equal(pool.arena[: 3 * CHUNK], before[: 3 * CHUNK])
    assert torch.equal(pool.arena[(page + 1) * PAGE_BYTES :], before[(page + 1) * PAGE_BYTES :])
    # an EMB write touches exactly its slot
    before = pool.arena.clone()
    pool.write_emb([40], torch.randn(1, EMB_DIM))
    changed = (pool.arena != before).nonzero().flatten()
    assert int(changed.min()) >= 40 * EMB_BYTES and int(changed.max()) < 41 * EMB_BYTES


def test_relocations_copy_bytes() -> None:
    pool = make_pool()
    rows = torch.randn(4, EMB_DIM)
    pool.write_emb([0, 1, 2, 3], rows)
    pool.copy_emb([(0, 10), (1, 11)])  # batchable
    assert torch.equal(pool.read_emb([10, 11]), rows[:2])
    # a chain (dst of one pair is the src of a later pair) must act sequentially
    pool.copy_emb([(2, 20), (3, 2), (2, 21)])
    assert torch.equal(pool.read_emb([20, 2, 21]), rows[[2, 3, 3]])
    # a swap through a temporary slot
    pool.copy_emb([(0, 30), (1, 0), (30, 1)])
    assert torch.equal(pool.read_emb([0, 1]), rows[[1, 0]])
    # repeated destination: last write wins
    pool.copy_emb([(10, 40), (3, 40)])
    assert torch.equal(pool.read_emb([40]), rows[3:4])

    k, v = kv_rows(2 * PAGE_TOKENS, 4)
    pool.write_kv([3, 4], 0, k, v)
    pool.copy_kv([(3, 12), (4, 13)])
    k2, v2 = pool.read_kv([12, 13], 2 * PAGE_TOKENS)
    assert all(torch.equal(a, b) for a, b in zip(k2 + v2, k + v, strict=True))
    pool.copy_kv([(12, 3), (13, 12), (3, 13)])  # swap 12 and 13 via 3 (sequential)
    k3, _ = pool.read_kv([13, 12], 2 * PAGE_TOKENS)
    assert torch.equal(k3[0], k[0])
    with pytest.raises(IndexError, match="KV pages"):
        pool.copy_kv([(0, 16)])


def test_host_table_seeded_and_from_files(tmp_path: Path) -> None:
    a = HostEmbeddingTable(100, EMB_DIM, seed=1, pin=False)
    b = HostEmbeddingTable(100, EMB_DIM, seed=1, pin=False)
    c = HostEmbeddingTable(100, EMB_DIM, seed=2, pin=False)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    assert a.table.shape == (100, EMB_DIM) and a.table.dtype == torch.float32
    assert 0.05 < float(a.table.std()) < 0.2
    assert a.row_bytes == EMB_BYTES and a.num_items == 100 and a.emb_dim == EMB_DIM
    assert torch.equal(a.gather([5, 99, 5]), a.table[[5, 99, 5]])
    assert torch.equal(a.gather(np.array([5, 99, 5])), a.table[[5, 99, 5]])
    assert torch.equal(a.gather(torch.tensor([99, 0])), a.table[[99, 0]])
    assert a.gather(np.array([], dtype=np.int64)).shape == (0, EMB_DIM)
    with pytest.raises(IndexError, match="items"):
        a.gather(np.array([0, 100]))
    with pytest.raises(IndexError, match="items"):
        a.gather([100])
    np.save(tmp_path / "t.npy", a.table.numpy())
    torch.save(a.table, tmp_path / "t.pt")
    for name in ("t.npy", "t.pt"):  # the checks on files: tests/worker/test_model_inputs.py
        loaded = HostEmbeddingTable.from_file(tmp_path / name, pin=False, emb_dim=EMB_DIM)
        assert torch.equal(loaded.table, a.table) and loaded.num_items == 100


def test_link_spec_defaults_and_validation() -> None:
    spec = LinkSpec()
    assert spec.bandwidth_gbps == 25.0 and spec.latency_us == 10.0
    assert spec.transfer_seconds(25_000_000) == pytest.approx(10e-6 + 1e-3)
    with pytest.raises(ValueError):
        LinkSpec(bandwidth_gbps=0)
    with pytest.raises(ValueError):
        LinkSpec(latency_us=-1)


def test_emulated_link_spends_the_time_and_counts() -> None:
    table = HostEmbeddingTable(1000, EMB_DIM, seed=0, pin=False)
    # 64 rows x 32 B = 2048 B at 0.1 GB/s = 20.48 us, + 5 ms latency
    link = open_host_link(table, CPU, LinkSpec(bandwidth_gbps=0.1, latency_us=5000.0))
    assert isinstance(link, EmulatedLink) and link.emulated
    assert (
        link.describe() == "emulated PCIe link: 0.1 GB/s, 5000.0 us per transfer (CPU mode, real wall time)"
    )
    items = list(range(100, 164))
    expected = 5e-3 + 64 * EMB_BYTES / 0.1e9
    t0 = time.perf_counter()
    rows = link.fetch(items)
    elapsed = time.perf_counter() - t0
    assert elapsed >= expected  # no upper bound: the machine is shared
    assert rows.device == CPU and torch.equal(rows, table.table[100:164])
    assert link.transfers == 1 and link.bytes_moved == 64 * EMB_BYTES
    # a short transfer (below the spin threshold) still takes at least its time
    t0 = time.perf_counter()
    EmulatedLink(table, CPU, LinkSpec(latency_us=50.0)).fetch([1])
    assert time.perf_counter() - t0 >= 50e-6
    # an empty request is not a transfer
    assert link.fetch([]).shape == (0, EMB_DIM) and link.transfers == 1
    assert link.fetch(np.array([], dtype=np.int64)).shape == (0, EMB_DIM) and link.transfers == 1


def test_fetch_of_a_numpy_array_is_one_transfer() -> None:
    table = HostEmbeddingTable(1000, EMB_DIM, seed=0, pin=False)
    link = open_host_link(table, "cpu", LinkSpec(latency_us=1.0))
    items = np.array([999, 3, 3, 500], dtype=np.int64)
    rows = link.fetch(items)
    assert torch.equal(rows, table.table[[999, 3, 3, 500]])
    assert link.transfers == 1 and link.bytes_moved == 4 * EMB_BYTES
    assert torch.equal(link.fetch(torch.tensor([1, 2])), table.table[1:3]) and link.transfers == 2
    with pytest.raises(IndexError, match="items"):
        link.fetch(np.array([1000]))
    assert link.transfers == 2
    link.close()
    # fetch needs nothing that close releases; background transfers are refused
    assert torch.equal(link.fetch(items[:1]), table.table[999:1000])
    with pytest.raises(RuntimeError, match="EmulatedLink is closed"):
        link.start_background([1])


def test_open_host_link_picks_the_implementation() -> None:
    table = HostEmbeddingTable(10, EMB_DIM, seed=0, pin=False)
    spec = LinkSpec()
    with open_host_link(table, torch.device("cpu"), spec) as link:
        assert type(link) is EmulatedLink and isinstance(link, HostLink)
        assert link.device == CPU and link.table is table and link.spec is spec
    for device in ("meta", torch.device("meta"), "mps"):
        with pytest.raises(ValueError, match=r"unsupported pool device .*: expected cpu or cuda"):
            open_host_link(table, device, spec)
    with pytest.raises(ValueError, match="EmulatedLink needs a cpu pool device"):
        EmulatedLink(table, "meta", spec)
    with pytest.raises(TypeError, match="abstract"):
        HostLink(table, CPU, spec)  # type: ignore[abstract]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_open_host_link_for_cuda_without_cuda_says_so() -> None:
    table = HostEmbeddingTable(10, EMB_DIM, seed=0, pin=False)
    with pytest.raises(ValueError, match=r"needs CUDA, and torch.cuda.is_available\(\) is False"):
        open_host_link(table, "cuda", LinkSpec())


def test_background_transfer_on_the_links_worker() -> None:
    table = HostEmbeddingTable(100, EMB_DIM, seed=0, pin=False)
    link = open_host_link(table, CPU, LinkSpec(latency_us=200_000.0))
    try:
        items = np.array([4, 2, 42], dtype=np.int64)
        first = link.start_background(items)
        second = link.start_background([1])
        assert second.cancel() and second.done()  # queued behind `first` (200 ms) on the one worker
        second.wait()
        with pytest.raises(CancelledError):
            second.result()
        assert torch.equal(first.result(), table.table[[4, 2, 42]])  # result waits
        assert first.done() and not first.cancel()
        first.wait()
        with pytest.raises(IndexError, match="items"):
            link.start_background(np.array([100]))
        empty = link.start_background([])
        assert empty.result().shape == (0, EMB_DIM)
        assert link.transfers == 1  # the cancelled and the empty one are not transfers
    finally:
        link.close()


def test_prefetch_does_not_block_and_returns_rows() -> None:
    table = HostEmbeddingTable(500, EMB_DIM, seed=3, pin=False)
    link = open_host_link(table, CPU, LinkSpec(bandwidth_gbps=25.0, latency_us=50_000.0))  # 50 ms each
    chan = PrefetchChannel(link, max_inflight=1)
    try:
        t0 = time.perf_counter()
        assert chan.submit([3, 1, 4, 1, 5])
        submit_s = time.perf_counter() - t0
        assert submit_s < 0.025, f"submit blocked for {submit_s * 1e3:.1f} ms"
        assert chan.busy and chan.inflight == 1
        assert not chan.submit([9])  # max_inflight reached
        done: list[tuple[list[int], torch.Tensor]] = []
        deadline = time.perf_counter() + 10.0
        while not done and time.perf_counter() < deadline:
            done = chan.poll()
            time.sleep(0.002)
        assert time.perf_counter() - t0 >= 0.05
        assert len(done) == 1
        items, rows = done[0]
        assert items == [3, 1, 4, 1, 5]
        assert torch.equal(rows, table.table[[3, 1, 4, 1, 5]])
        assert not chan.busy
        assert link.transfers == 1 and link.bytes_moved == 5 * EMB_BYTES
        assert chan.submit(np.array([7, 8]))  # a slot is free again; numpy items are fine
    finally:
        chan.close()
        link.close()
    chan.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        chan.submit([1])


def test_prefetch_close_waits_and_link_close_joins_worker_thread() -> None:
    table = HostEmbeddingTable(10, EMB_DIM, seed=0, pin=False)
    before = {t.ident for t in threading.enumerate()}
    with open_host_link(table, CPU, LinkSpec(latency_us=20_000.0)) as link:
        with PrefetchChannel(link, max_inflight=2) as chan:
            assert chan.submit([1]) and chan.submit([2])
            assert not chan.submit([3])
        # the running transfer finished, the queued one was cancelled (unless it had started already)
        assert 1 <= link.transfers <= 2
        assert chan.poll() == [] and chan.inflight == 0
        # the link outlives the channel: a new channel uses the same worker
        with PrefetchChannel(link) as again:
            assert again.submit([3])
    extra = [t for t in threading.enumerate() if t.ident not in before]
    assert not extra, f"threads left running: {extra}"


def test_prefetch_failed_transfer_is_dropped_and_reraised(monkeypatch: pytest.MonkeyPatch) -> None:
    table = HostEmbeddingTable(10, EMB_DIM, seed=0, pin=False)
    real_gather = table.gather

    def gather(items: object) -> torch.Tensor:
        rows = real_gather(items)  # type: ignore[arg-type]
        if rows.shape[0] == 2:
            raise RuntimeError("host memory on fire")
        return rows

    monkeypatch.setattr(table, "gather", gather)
    with open_host_link(table, CPU, LinkSpec(latency_us=1.0)) as link:
        chan = PrefetchChannel(link, max_inflight=3)
        assert chan.submit([1]) and chan.submit([2, 3]) and chan.submit([4])
        deadline = time.perf_counter() + 10.0
        while chan.inflight and time.perf_counter() < deadline:
            try:
                done = chan.poll()
            except RuntimeError as exc:
                assert "on fire" in str(exc)
                break
            assert not done or done[0][0] == [1]  # batches that finished first may come back first
            time.sleep(0.002)
        else:
            pytest.fail("the failed transfer was never reported")
        # the failed batch is gone; the others come back (those polled already are not repeated)
        got: list[list[int]] = []
        while chan.inflight and time.perf_counter() < deadline:
            got += [items for items, _ in chan.poll()]
            time.sleep(0.002)
        assert chan.inflight == 0 and [2, 3] not in got and [4] in got
        chan.close()


def test_prefetch_rejects_bad_items() -> None:
    table = HostEmbeddingTable(10, EMB_DIM, seed=0, pin=False)
    with open_host_link(table, CPU, LinkSpec()) as link, PrefetchChannel(link) as chan:
        with pytest.raises(IndexError):
            chan.submit([10])
        with pytest.raises(IndexError):
            chan.submit(np.array([-1]))
        assert chan.inflight == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_arena_pinned_table_fetch_and_prefetch() -> None:
    dev = torch.device("cuda")
    pool = make_pool(device=dev)
    assert pool.arena.device.type == "cuda" and pool.emb_view.device.type == "cuda"
    k, v = kv_rows(6, 0)
    pool.write_kv([3, 1], 1, [t.to(dev) for t in k], [t.to(dev) for t in v])
    k2, _ = pool.read_kv([3, 1], 7)
    assert torch.equal(k2[0][1:].cpu(), k[0])
    table = HostEmbeddingTable(1000, EMB_DIM, seed=0, pin=True)
    assert table.table.is_pinned() and table.gather([1, 2]).is_pinned()
    link = open_host_link(table, dev, LinkSpec())
    assert isinstance(link, CudaLink) and not link.emulated
    assert link.describe() == "CUDA H2D (pinned host table)"
    rows = link.fetch([5, 6, 7])
    assert rows.device.type == "cuda" and torch.equal(rows.cpu(), table.table[5:8])
    rows = link.fetch(np.array([7, 5], dtype=np.int64))
    assert rows.device.type == "cuda" and torch.equal(rows.cpu(), table.table[[7, 5]])
    assert link.transfers == 2
    pool.write_emb([0, 1, 2], rows)
    assert torch.equal(pool.read_emb([2]).cpu(), table.table[7:8])
    with PrefetchChannel(link) as chan:
        assert chan.submit(list(range(200)))
        assert not chan.submit([1])
        done: list[tuple[list[int], torch.Tensor]] = []
        deadline = time.perf_counter() + 10.0
        while not done and time.perf_counter() < deadline:
            done = chan.poll()
        assert len(done) == 1
        assert torch.equal(done[0][1].cpu(), table.table[:200])
    assert link.transfers == 3
    background = link.start_background(np.arange(300, 310))
    assert link.side_stream != torch.cuda.current_stream(dev)
    background.wait()
    assert background.done() and torch.equal(background.result().cpu(), table.table[300:310])
    assert not background.cancel()
    pool.write_emb(np.array([3, 4]), background.result()[:2])
    assert torch.equal(pool.read_emb(np.array([4])).cpu(), table.table[301:302])
    link.close()
    with pytest.raises(RuntimeError, match="CudaLink is closed"):
        link.start_background([1])
