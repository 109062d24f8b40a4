"""HSTU model: cached and uncached scoring agree, the mask isolates candidates, checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.hstu import (
    HSTU,
    PRESETS,
    AttentionLayout,
    CheckpointError,
    HSTUConfig,
    HSTUInput,
    HSTUOutput,
    _row_features,
    time_buckets,
)

TINY = PRESETS["tiny"]
# Cached and uncached runs do the same arithmetic on differently shaped matmuls, so they may differ
# by float32 rounding only: a few ulp of the O(1) scores after a handful of layers.  1e-4 relative
# (floored at |b| >= 1e-6) leaves orders of magnitude of room above that and far below any real
# change (appending history moves scores by > 1e-3, see test_more_history_changes_scores).
REL_TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())


def make_user(cfg: HSTUConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    emb = torch.randn(n, cfg.item_dim, generator=g) * 0.5
    # gaps spanning many log2 buckets, including repeated timestamps (gap 0)
    gaps = (torch.rand(n, generator=g) * 20).exp2().to(torch.int64) * (torch.rand(n, generator=g) > 0.1)
    ts = 1_700_000_000 + torch.cumsum(gaps, 0)
    return emb, ts


def make_cands(cfg: HSTUConfig, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.randn(m, cfg.item_dim, generator=g) * 0.5


def uncached(model: HSTU, emb: torch.Tensor, ts: torch.Tensor, cands: torch.Tensor) -> HSTUOutput:
    return model(emb, ts, 0, cands, None, None)


@pytest.fixture(params=[0, 1, 7])
def seed(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def model(seed: int) -> HSTU:
    m, _ = HSTU.create(TINY, checkpoint=None, seed=seed, device="cpu")
    return m


def test_cached_matches_uncached_over_several_extensions(model: HSTU, seed: int) -> None:
    emb, ts = make_user(TINY, 90, seed)
    steps = [37, 40, 41, 41, 90]  # +37, +3, +1, +0 (new candidates only), +49
    cached_len = 0
    past_k = [torch.empty(0, TINY.kv_width) for _ in range(TINY.n_layers)]
    past_v = [torch.empty(0, TINY.kv_width) for _ in range(TINY.n_layers)]
    for step, hist_len in enumerate(steps):
        cands = make_cands(TINY, 5 + step, seed * 10 + step)
        out = model(
            emb[cached_len:hist_len],
            ts[:hist_len],
            cached_len,
            cands,
            past_k if cached_len else None,
            past_v if cached_len else None,
        )
        ref = uncached(model, emb[:hist_len], ts[:hist_len], cands)
        assert out.scores.shape == (cands.shape[0],)
        assert out.scores.dtype == torch.float32
        assert rel_err(out.scores, ref.scores) <= REL_TOL, f"step {step} (history {hist_len})"
        # the K/V returned for the new tokens are the matching rows of the uncached run
        assert len(out.new_k) == len(out.new_v) == TINY.n_layers
        for layer in range(TINY.n_layers):
            assert out.new_k[layer].shape == (hist_len - cached_len, TINY.kv_width)
            torch.testing.assert_close(out.new_k[layer], ref.new_k[layer][cached_len:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.new_v[layer], ref.new_v[layer][cached_len:], rtol=1e-5, atol=1e-6)
        past_k = [torch.cat((p, n)) for p, n in zip(past_k, out.new_k, strict=True)]
        past_v = [torch.cat((p, n)) for p, n in zip(past_v, out.new_v, strict=True)]
        cached_len = hist_len


def batch_requests(seed: int) -> tuple[list[HSTUInput], list[HSTUOutput]]:
    """Requests of different shapes (cached prefixes, empty history, new candidates only), each with its
    uncached reference result."""
    shapes = [(40, 0, 5), (90, 60, 12), (0, 0, 3), (30, 30, 7), (75, 10, 1)]  # (history, cached, cands)
    requests, refs = [], []
    for i, (n, cached, m) in enumerate(shapes):
        emb, ts = make_user(TINY, n, seed * 10 + i)
        cands = make_cands(TINY, m, seed * 10 + i)
        model, _ = HSTU.create(TINY, checkpoint=None, seed=seed, device="cpu")
        refs.append(uncached(model, emb, ts, cands))
        past = uncached(model, emb[:cached], ts[:cached], cands[:1]) if cached else None
        requests.append(
            HSTUInput(
                emb[cached:],
                ts,
                cached,
                cands,
                past.new_k if past else None,
                past.new_v if past else None,
            )
        )
    return requests, refs


@pytest.mark.parametrize("layout", list(AttentionLayout))
def test_a_batch_scores_each_request_as_it_would_alone(
    model: HSTU, seed: int, layout: AttentionLayout
) -> None:
    requests, refs = batch_requests(seed)
    batch = model.forward_batch(requests, layout)
    assert len(batch.outputs) == len(requests)
    for i, (request, out, ref) in enumerate(zip(requests, batch.outputs, refs, strict=True)):
        assert out.scores.shape == (request.cand_emb.shape[0],)
        assert rel_err(out.scores, ref.scores) <= REL_TOL, f"request {i}"
        for layer in range(TINY.n_layers):
            new = slice(request.cached_len, None)
            torch.testing.assert_close(out.new_k[layer], ref.new_k[layer][new], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.new_v[layer], ref.new_v[layer][new], rtol=1e-5, atol=1e-6)
    # and in another order, another company: the same
    again = model.forward_batch([requests[3], requests[1]], layout).outputs
    assert rel_err(again[0].scores, refs[3].scores) <= REL_TOL
    assert rel_err(again[1].scores, refs[1].scores) <= REL_TOL


def dense_reference(
    model: HSTU, emb: torch.Tensor, ts: torch.Tensor, cands: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The straightforward computation, no cache: every layer over every row, the full [n + m, n + m]
    attention masked by `HSTU.attention_mask` (the model skips the masked blocks). Returns the scores and
    the history rows' K and V per layer."""
    cfg = model.cfg
    n, m = emb.shape[0], cands.shape[0]
    nh, hd = cfg.n_heads, cfg.head_dim
    pos = torch.cat((torch.arange(n), torch.full((m,), n)))
    buckets = torch.cat(
        (torch.from_numpy(time_buckets(ts.numpy(), 0, cfg.time_buckets)), torch.full((m,), cfg.time_buckets))
    )
    weight = HSTU.attention_mask(0, n, m).float() / cfg.max_history
    with torch.inference_mode():
        x = model.item_proj(torch.cat((emb, cands))) + model.pos_emb(pos) + model.time_emb(buckets)
        ks, vs = [], []
        for layer in model.layers:
            assert isinstance(layer, torch.nn.Module)
            u, v, q, k = torch.chunk(torch.nn.functional.silu(layer.uvqk(layer.norm_in(x))), 4, dim=-1)
            qh, kh, vh = (t.reshape(n + m, nh, hd).transpose(0, 1) for t in (q, k, v))
            attn = torch.nn.functional.silu(qh @ kh.transpose(1, 2) / hd**0.5) * weight
            o = (attn @ vh).transpose(0, 1).reshape(n + m, nh * hd)
            x = x + layer.out(layer.norm_attn(o) * u)
            ks.append(k[:n])
            vs.append(v[:n])
        scores = model.score_head(model.final_norm(x[n:])).squeeze(-1)
    return scores, ks, vs


@pytest.mark.parametrize("layout", list(AttentionLayout))
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_skipping_the_masked_blocks_matches_the_dense_masked_computation(
    seed: int, layout: AttentionLayout, n_layers: int
) -> None:
    """The model computes each candidate's self-term apart, never the masked candidate columns, and in the
    last layer the candidates' rows only: the same numbers as the dense masked computation, cached or not,
    alone or in a batch (1 layer: the last is the only one; 3: a middle layer too)."""
    cfg = HSTUConfig(n_layers=n_layers, max_history=128)
    model, _ = HSTU.create(cfg, checkpoint=None, seed=seed, device="cpu")
    shapes = [
        (40, 0, 5),
        (90, 60, 12),
        (0, 0, 3),
        (30, 30, 7),
        (75, 10, 1),
        (1, 0, 64),
    ]  # (history, cached, m)
    requests, refs = [], []
    for i, (n, cached, m) in enumerate(shapes):
        emb, ts = make_user(cfg, n, seed * 10 + i)
        cands = make_cands(cfg, m, seed * 10 + i)
        refs.append(dense_reference(model, emb, ts, cands))
        past = dense_reference(model, emb[:cached], ts[:cached], cands[:1]) if cached else None
        requests.append(
            HSTUInput(emb[cached:], ts, cached, cands, past[1] if past else None, past[2] if past else None)
        )
    alone = [model.forward_batch([r], layout).outputs[0] for r in requests]
    together = model.forward_batch(requests, layout).outputs
    for i, (request, (scores, ks, vs)) in enumerate(zip(requests, refs, strict=True)):
        new = slice(request.cached_len, None)
        for out in (alone[i], together[i]):
            torch.testing.assert_close(out.scores, scores, rtol=1e-5, atol=1e-6, msg=f"request {i}")
            for layer in range(n_layers):
                torch.testing.assert_close(out.new_k[layer], ks[layer][new], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(out.new_v[layer], vs[layer][new], rtol=1e-5, atol=1e-6)


def test_padding_is_counted_and_only_the_padded_layout_pays_it(model: HSTU) -> None:
    requests, _ = batch_requests(0)
    # (query rows, history keys, candidates) of each request: new + candidates, cached + new, candidates.
    # Every layer but the last: each query row over its history; the last: each candidate over it; every
    # layer: each candidate's self-term (never padded).
    shapes = [(40 + 5, 40, 5), (30 + 12, 90, 12), (3, 0, 3), (0 + 7, 30, 7), (65 + 1, 75, 1)]
    layers = TINY.n_layers
    real = sum(((layers - 1) * q + m) * h + layers * m for q, h, m in shapes)
    computed = (layers - 1) * 5 * 66 * 90 + 5 * 12 * 90 + layers * sum(m for _, _, m in shapes)
    padded = model.forward_batch(requests, AttentionLayout.PADDED)
    jagged = model.forward_batch(requests, AttentionLayout.JAGGED)
    assert (padded.real_elements, padded.computed_elements) == (real, computed)
    assert padded.padding_waste == pytest.approx(1 - real / computed)
    assert (jagged.real_elements, jagged.computed_elements) == (real, real)
    assert jagged.padding_waste == 0.0


def test_the_cpu_lays_attention_out_jagged() -> None:
    model, _ = HSTU.create(TINY, checkpoint=None, seed=0, device="cpu")
    requests, _ = batch_requests(0)
    assert model.forward_batch(requests).padding_waste == 0.0


def test_a_bad_request_in_a_batch_is_named(model: HSTU) -> None:
    requests, _ = batch_requests(0)
    bad = HSTUInput(requests[1].hist_emb, requests[1].timestamps[:-1], 60, requests[1].cand_emb, None, None)
    with pytest.raises(ValueError, match=r"timestamps .*\(batch index 2\)"):
        model.forward_batch([requests[0], requests[1], bad])
    with pytest.raises(ValueError, match="at least one request"):
        model.forward_batch([])


def test_empty_history_scores_candidates(model: HSTU, seed: int) -> None:
    cands = make_cands(TINY, 4, seed)
    out = model(torch.empty(0, TINY.item_dim), torch.empty(0, dtype=torch.int64), 0, cands, None, None)
    assert out.scores.shape == (4,)
    assert torch.isfinite(out.scores).all()
    assert all(k.shape == (0, TINY.kv_width) for k in out.new_k)


def test_candidates_do_not_influence_each_other(model: HSTU, seed: int) -> None:
    emb, ts = make_user(TINY, 50, seed)
    cands = make_cands(TINY, 6, seed)
    together = uncached(model, emb, ts, cands).scores
    for c in range(cands.shape[0]):
        alone = uncached(model, emb, ts, cands[c : c + 1]).scores
        assert rel_err(alone, together[c : c + 1]) <= REL_TOL
    # and with a cache: order and company do not matter either
    first = uncached(model, emb[:30], ts[:30], cands[:1])
    rev = model(emb[30:], ts, 30, cands.flip(0), first.new_k, first.new_v).scores
    assert rel_err(rev.flip(0), together) <= REL_TOL


def test_candidates_do_not_change_history_kv(model: HSTU, seed: int) -> None:
    emb, ts = make_user(TINY, 20, seed)
    a = uncached(model, emb, ts, make_cands(TINY, 1, seed))
    b = uncached(model, emb, ts, make_cands(TINY, 9, seed + 1))
    for layer in range(TINY.n_layers):
        torch.testing.assert_close(a.new_k[layer], b.new_k[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.new_v[layer], b.new_v[layer], rtol=1e-5, atol=1e-6)


def test_more_history_changes_scores(model: HSTU, seed: int) -> None:
    emb, ts = make_user(TINY, 60, seed)
    cands = make_cands(TINY, 8, seed)
    short = uncached(model, emb[:30], ts[:30], cands).scores
    long = uncached(model, emb, ts, cands).scores
    assert float((short - long).abs().max()) > 1e-3
    # scores also differ between candidates (the model is not constant)
    assert float(long.std()) > 1e-3


def test_timestamps_matter(model: HSTU, seed: int) -> None:
    emb, ts = make_user(TINY, 30, seed)
    cands = make_cands(TINY, 4, seed)
    a = uncached(model, emb, ts, cands).scores
    b = uncached(model, emb, ts[0] + torch.arange(30) * 10**6, cands).scores
    assert float((a - b).abs().max()) > 1e-4


def test_time_buckets(model: HSTU) -> None:
    ts = torch.tensor([100, 100, 101, 104, 99, 99 + 2**40], dtype=torch.int64)
    buckets = time_buckets(ts.numpy(), 0, TINY.time_buckets)
    # gaps: 0 (first), 0, 1, 3, -5 -> 0, 2**40 -> clamped to time_buckets - 1
    assert buckets.tolist() == [0, 0, 1, 2, 0, TINY.time_buckets - 1]
    assert time_buckets(ts.numpy(), 3, TINY.time_buckets).tolist() == [2, 0, TINY.time_buckets - 1]


def test_a_batch_takes_each_requests_positions_and_time_buckets(model: HSTU) -> None:
    """The batch computes every row's position and time bucket at once: per request, what `time_buckets`
    and the position rule give it alone (cached prefixes, an empty history, gaps of 0 and of many sizes)."""
    requests, _ = batch_requests(0)
    group = [model._checked(r, model.device, "") for r in requests]
    expected = []
    for r in group:
        hist_len = r.cached_len + r.n_new
        positions = list(range(r.cached_len, hist_len)) + [hist_len] * r.m
        buckets = time_buckets(r.timestamps, r.cached_len, TINY.time_buckets).tolist()
        expected.append((positions, buckets + [TINY.time_buckets] * r.m))
    features = _row_features(group, TINY.time_buckets)
    assert features[0].tolist() == [p for positions, _ in expected for p in positions]
    assert features[1].tolist() == [b for _, buckets in expected for b in buckets]


def test_attention_mask_shape_and_rules() -> None:
    mask = HSTU.attention_mask(cached_len=2, n_new=2, m=2)
    # rows: history pos 2, 3, candidate 0, 1; columns: history 0..3, candidate 0, 1
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    # no cache, no history: candidates see only themselves
    assert torch.equal(HSTU.attention_mask(cached_len=0, n_new=0, m=2), torch.eye(2, dtype=torch.bool))


def test_history_beyond_max_history_raises() -> None:
    cfg = HSTUConfig(max_history=16)
    model, _ = HSTU.create(cfg, checkpoint=None, seed=0, device="cpu")
    emb, ts = make_user(cfg, 17, 0)
    cands = make_cands(cfg, 2, 0)
    model(emb[:16], ts[:16], 0, cands, None, None)  # exactly max_history is fine
    with pytest.raises(ValueError, match="max_history"):
        model(emb, ts, 0, cands, None, None)
    first = model(emb[:10], ts[:10], 0, cands, None, None)
    with pytest.raises(ValueError, match="max_history"):
        model(emb[10:], ts, 10, cands, first.new_k, first.new_v)


def test_bad_inputs_raise(model: HSTU) -> None:
    emb, ts = make_user(TINY, 10, 0)
    cands = make_cands(TINY, 2, 0)
    with pytest.raises(ValueError, match="timestamps"):
        model(emb, ts[:9], 0, cands, None, None)
    with pytest.raises(ValueError, match="cand_emb"):
        model(emb, ts, 0, cands[:0], None, None)
    with pytest.raises(ValueError, match="past_k"):
        model(emb[5:], ts, 5, cands, None, None)
    first = model(emb[:5], ts[:5], 0, cands, None, None)
    with pytest.raises(ValueError, match="past_k"):
        model(emb[4:], ts, 4, cands, first.new_k, first.new_v)


def test_checkpoint_round_trip(tmp_path: Path, model: HSTU, seed: int) -> None:
    path = tmp_path / "hstu.pt"
    model.save(path)
    loaded, desc = HSTU.create(TINY, checkpoint=path, seed=seed + 100, device="cpu")
    assert desc == f"checkpoint {path}"
    assert not loaded.training
    emb, ts = make_user(TINY, 25, seed)
    cands = make_cands(TINY, 5, seed)
    assert torch.equal(uncached(model, emb, ts, cands).scores, uncached(loaded, emb, ts, cands).scores)


def test_checkpoint_with_other_config_raises(tmp_path: Path) -> None:
    path = tmp_path / "bench.pt"
    HSTU(HSTUConfig(d_model=32)).save(path)
    with pytest.raises(CheckpointError) as info:
        HSTU.create(TINY, checkpoint=path, seed=0, device="cpu")
    assert "d_model=32" in str(info.value) and "d_model=64" in str(info.value)


def test_checkpoint_garbage_raises(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        HSTU.create(TINY, checkpoint=path, seed=0, device="cpu")
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not an HSTU checkpoint"):
        HSTU.create(TINY, checkpoint=path, seed=0, device="cpu")


def test_seeded_init_is_deterministic() -> None:
    a, desc = HSTU.create(TINY, checkpoint=None, seed=3, device="cpu")
    b, _ = HSTU.create(TINY, checkpoint=None, seed=3, device="cpu")
    c, _ = HSTU.create(TINY, checkpoint=None, seed=4, device="cpu")
    assert desc == "seeded random weights (seed=3): no checkpoint given"
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_init_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    HSTU(TINY, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_heads=0"):
        HSTUConfig(n_heads=0)
    with pytest.raises(ValueError, match="max_history=-1"):
        HSTUConfig(max_history=-1)
    assert TINY.kv_width == TINY.n_heads * TINY.head_dim
    for cfg in PRESETS.values():
        cfg.validate()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_cache() -> None:
    cpu, _ = HSTU.create(TINY, checkpoint=None, seed=0, device="cpu")
    gpu, _ = HSTU.create(TINY, checkpoint=None, seed=0, device="cuda")
    emb, ts = make_user(TINY, 70, 0)
    cands = make_cands(TINY, 16, 0)
    ref = uncached(cpu, emb, ts, cands).scores
    full = gpu(emb.cuda(), ts.cuda(), 0, cands.cuda(), None, None)
    first = gpu(emb[:50].cuda(), ts[:50].cuda(), 0, cands.cuda(), None, None)
    ext = gpu(emb[50:].cuda(), ts.cuda(), 50, cands.cuda(), first.new_k, first.new_v)
    assert full.scores.device.type == "cuda"
    # TF32 may be enabled for matmuls on the GPU: compare to the CPU loosely, to itself tightly.
    assert rel_err(full.scores.cpu(), ref) <= 1e-2
    assert rel_err(ext.scores.cpu(), full.scores.cpu()) <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pads_a_batch_of_similar_requests_and_matches_jagged() -> None:
    gpu, _ = HSTU.create(TINY, checkpoint=None, seed=0, device="cuda")
    requests = []
    for i in range(4):
        emb, ts = make_user(TINY, 50 + i, i)
        requests.append(HSTUInput(emb.cuda(), ts, 0, make_cands(TINY, 8, i).cuda(), None, None))
    auto = gpu.forward_batch(requests)
    assert 0.0 < auto.padding_waste <= 0.5  # chosen: PADDED
    jagged = gpu.forward_batch(requests, AttentionLayout.JAGGED)
    for a, b in zip(auto.outputs, jagged.outputs, strict=True):
        assert rel_err(a.scores.cpu(), b.scores.cpu()) <= 1e-3
