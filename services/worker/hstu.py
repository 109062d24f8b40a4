"""HSTU ranking model, written so that a user's history K/V can be cached and reused exactly.

This is the Hierarchical Sequential Transduction Unit of Zhai et al., "Actions Speak Louder than
Words" (arXiv 2402.17152), as implemented in Meta's ``generative_recommenders`` (``modules/stu.py``
and ``ops/hstu_attention``), restricted to a variant in which the keys and values of a history token
depend only on that token and the tokens *before* it.  That property is what the HELM pool
(arXiv 2605.04450) needs: K/V computed for a user's history in one request can be stored in the pool
and extended by the next request, and the candidate scores come out the same (up to float rounding
of differently shaped matmuls) as scoring the whole history from scratch.

One layer, for the token rows X (``d_model`` wide)::

    U, V, Q, K = split(SiLU(f1(LayerNorm(X))))            # each n_heads * head_dim wide
    A          = SiLU(Q K^T / sqrt(head_dim)) / max_history, masked      (per head)
    Y          = X + f2(LayerNorm(A V) * U)

The choices, and why each one keeps cross-request KV reuse exact:

* **Fixed attention normalisation.**  Meta divides SiLU(QK^T) by ``max_seq_len``, the longest
  sequence *in the batch* (a runtime argument).  Then a token's output, and so the K/V it feeds the
  next layer, would change with whatever else shares the batch and with how long its own history
  has grown since it was cached.  We divide by the constant ``cfg.max_history`` instead, so a
  token's output depends on nothing but the tokens it attends to.
* **Absolute positions counted forward.**  History token t has position t (counted from the start
  of the history, never from the end), and every candidate has position ``len(history)``.  A learned
  position embedding of ``max_history + 1`` rows covers 0..max_history.  Counting from the end (as
  "most recent = 0" schemes do) would renumber every cached token whenever the history grows.
* **Per-token time feature.**  Token t gets a learned embedding of the bucket
  ``floor(log2(1 + max(0, ts[t] - ts[t-1])))`` (first token: gap 0), clamped to
  ``time_buckets - 1``; every candidate uses one extra dedicated bucket (index ``time_buckets``).
  This reads only the token's own timestamp and its predecessor's, both fixed once the token is in
  the history, so appending later tokens never changes it.
* **Target-aware mask.**  History tokens are causal (token t attends to history tokens 0..t,
  itself included).  Each candidate attends to every history token and to itself, never to other
  candidates, so a candidate's score does not depend on which other candidates are in the request,
  and nothing a history token computes depends on the candidates.  Candidates are never cached.
* **No relative attention bias.**  Meta's ``RelativeBucketedTimeAndPositionBasedBias`` (in the
  original HSTU code) adds to logit (i, j) a weight indexed by ``bucket(ts[i+1] - ts[j])``, i.e. it
  uses the *next* token's timestamp for the query row i; for the last token the successor does not
  exist yet and its own timestamp is substituted.  When the history grows, the last cached token's
  row therefore changes, hence its layer output and the K/V it feeds every later layer: cached K/V
  would go stale.  (The relative *position* part, a function of i - j, would be cache-safe; we drop
  it too, since the absolute position embedding already gives order information, and keep one
  simple, cache-exact rule: no bias at all.)  Meta's newer ``STULayer`` also has no relative bias.
* **Inference only.**  Eval mode, no dropout: the same inputs always give the same outputs.

Batching: ``forward_batch`` scores several users at once. The row-wise parts of a layer run over all
requests' rows together; attention is either jagged (per request, over its own rows) or padded (one
batched matmul, padding masked out), see ``AttentionLayout``. Either way a request's result does not
depend on its batch.

Input token representation: ``x = item_proj(item_embedding) + pos_emb[pos] + time_emb[bucket]``.
Item embeddings are not part of the model: the caller passes them (they come from the embedding
cache of the pool).  Output: final LayerNorm on each candidate's last hidden state, then
``score = Linear(d_model -> 1)``.

K and V per token per layer are each ``kv_width = n_heads * head_dim`` floats (attention dim ==
value dim on purpose, so one page layout holds both), laid out head after head.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.worker.model_config import PRESETS, HSTUConfig

__all__ = [
    "HSTU",
    "PRESETS",
    "AttentionLayout",
    "CheckpointError",
    "HSTUBatchOutput",
    "HSTUConfig",
    "HSTUInput",
    "HSTUOutput",
]

_LN_EPS = 1e-6  # as in Meta's STULayer (norm_eps=1e-6)


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded or does not match the configured model."""


@dataclass
class HSTUOutput:
    """Result of one forward pass.

    scores: float32 [m], one per candidate.
    new_k, new_v: per layer, [n_new, kv_width]: K/V of the new *history* tokens only, in token order,
    to be appended to the user's cache (candidates are never cached).
    """

    scores: Tensor
    new_k: list[Tensor]
    new_v: list[Tensor]


def time_buckets(timestamps: np.ndarray, start: int, n_buckets: int) -> np.ndarray:
    """Bucket ``floor(log2(1 + max(0, ts[t] - ts[t-1])))`` (first token: gap 0), clamped to
    ``n_buckets - 1``, of history tokens start..len(timestamps)-1 (int64)."""
    n = timestamps.shape[0]
    prev = (
        timestamps[start - 1 : n - 1] if start > 0 else np.concatenate((timestamps[:1], timestamps[: n - 1]))
    )
    gap = np.maximum(timestamps[start:] - prev, 0)
    bucket: np.ndarray = np.floor(np.log2(gap.astype(np.float64) + 1.0)).astype(np.int64)
    out: np.ndarray = np.minimum(bucket, n_buckets - 1)
    return out


def _host_int64(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        host: np.ndarray = values.detach().to("cpu", torch.int64).numpy()
        return host
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class HSTUInput:
    """One request of a batch: the arguments of `HSTU.forward`."""

    hist_emb: Tensor
    timestamps: Tensor | np.ndarray
    cached_len: int
    cand_emb: Tensor
    past_k: Sequence[Tensor] | None
    past_v: Sequence[Tensor] | None


@dataclass(frozen=True)
class HSTUBatchOutput:
    """Results in request order; the same results for the whole batch (`scores`: every request's
    candidates, request after request; `history_k`/`history_v`: per layer, every request's new history
    tokens, request after request; each request's own are views into these); and the attention elements
    (per head) the requests needed and the layout computed (more when padded)."""

    outputs: list[HSTUOutput]
    scores: Tensor
    history_k: list[Tensor]
    history_v: list[Tensor]
    real_elements: int
    computed_elements: int

    @property
    def padding_waste(self) -> float:
        """Share of the computed attention elements that were padding."""
        return 1.0 - self.real_elements / self.computed_elements


@dataclass(frozen=True)
class _Checked:
    hist_emb: Tensor
    cand_emb: Tensor
    timestamps: np.ndarray
    cached_len: int
    n_new: int
    m: int
    past_k: list[Tensor]
    past_v: list[Tensor]

    @property
    def queries(self) -> int:
        return self.n_new + self.m

    @property
    def keys(self) -> int:
        return self.cached_len + self.n_new + self.m


class AttentionLayout(enum.StrEnum):
    """How a batch's attention is laid out (the row-wise parts always run over all rows at once).

    JAGGED: per request, over its own rows: nothing is padded, a few small ops per request and layer
    (the cheaper layout on a CPU, where an op costs microseconds).
    PADDED: every request padded to the batch's longest query and key lengths, one batched matmul for all
    (the cheaper layout on a GPU, where each op is a kernel launch), at the cost of the padding.
    """

    JAGGED = "jagged"
    PADDED = "padded"


# PADDED is chosen (on CUDA) only while padding is at most this share of the attention elements, and while
# the padded logits fit ATTENTION_BUDGET elements (2**26 float32: 256 MiB, and as much for their SiLU).
MAX_PADDING_WASTE = 0.5
ATTENTION_BUDGET = 1 << 26


@dataclass(frozen=True)
class _Plan:
    """Where each request's rows are in one pass; built once, used by every layer."""

    rows: list[slice]  # each request's query rows in x
    past: list[slice]  # each request's cached rows in the concatenated past K/V
    candidate_rows: Tensor  # rows of x that are candidates, request after request
    history_rows: Tensor  # rows of x that are new history tokens, request after request
    real_elements: int  # attention elements per head the requests need
    computed_elements: int  # ... and that the layout computes (padding included)


@dataclass(frozen=True)
class _JaggedPlan(_Plan):
    weights: list[Tensor]  # per request [n_q, n_k]: the target-aware mask times 1 / max_history
    keys: list[slice]  # each request's key rows (cached, then new) in the layer's key tensor
    # Row order that turns [every cached row; every new row] into each request's cached rows followed by
    # its new rows, request after request (None: nothing is cached, the new rows are the keys as they are).
    key_order: Tensor | None


@dataclass(frozen=True)
class _PaddedPlan(_Plan):
    """Padded query rows of request b are b*max_q .., its key rows b*max_k .., cached rows first, then its
    new rows (history, candidates) in query order."""

    batch: int
    max_q: int
    max_k: int
    q_rows: Tensor  # [N] padded query row of each real query row
    past_rows: Tensor  # [C] padded key row of each cached row
    new_rows: Tensor  # [N] padded key row of each real query row's own key
    weight: Tensor  # [B, 1, max_q, max_k]: the mask times 1 / max_history, 0 on padding


def _mask_limits(cached_len: int, n_new: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The target-aware mask as row limits: query row i sees key columns 0..limits[i] (a new history
    token: the cached history and the new tokens up to itself; a candidate: the whole history), and
    candidate j also its own column, self_cols[j]. Small host vectors; the dense mask is built from them
    on the model's device."""
    hist_len = cached_len + n_new
    limits = np.empty(n_new + m, dtype=np.int64)
    limits[:n_new] = np.arange(cached_len, hist_len)
    limits[n_new:] = hist_len - 1
    return limits, np.arange(hist_len, hist_len + m)


def _padded_elements(group: Sequence[_Checked]) -> int:
    return len(group) * max(r.queries for r in group) * max(r.keys for r in group)


def _plan(
    group: Sequence[_Checked], layout: AttentionLayout, max_history: int, dev: torch.device
) -> _JaggedPlan | _PaddedPlan:
    """Row maps and attention weights (the mask times 1 / max_history) for one pass. The masks travel to
    the device as row limits (`_mask_limits`, one small copy for the batch) and are expanded there."""
    scale = 1.0 / max_history
    rows, past, candidate_rows, history_rows, limits, self_cols = [], [], [], [], [], []
    row = cached = real = 0
    for r in group:
        rows.append(slice(row, row + r.queries))
        past.append(slice(cached, cached + r.cached_len))
        candidate_rows.append(np.arange(row + r.n_new, row + r.queries))
        history_rows.append(np.arange(row, row + r.n_new))
        lim, own_cols = _mask_limits(r.cached_len, r.n_new, r.m)
        limits.append(lim)
        self_cols.append(own_cols)
        row += r.queries
        cached += r.cached_len
        real += r.queries * r.keys
    n_hist = sum(r.n_new for r in group)
    n_cands = row - n_hist
    host = [*candidate_rows, *history_rows, *limits, *self_cols]
    if layout is AttentionLayout.JAGGED and cached:
        host += [
            part
            for p, r in zip(past, rows, strict=True)
            for part in (np.arange(p.start, p.stop), np.arange(r.start, r.stop) + cached)
        ]
    index = torch.from_numpy(np.concatenate(host)).to(dev)  # one copy of every index the pass needs
    candidates, history = index[:n_cands], index[n_cands:row]
    lim_all, own_all = index[row : 2 * row], index[2 * row : 2 * row + n_cands]
    max_k = max(r.keys for r in group)
    keys = torch.arange(max_k, device=dev)
    if layout is AttentionLayout.JAGGED:
        weights: list[Tensor] = []
        own_at = 0
        for r, rs in zip(group, rows, strict=True):
            weight = (keys[: r.keys] <= lim_all[rs, None]).to(torch.float32)
            own = own_all[own_at : own_at + r.m]
            weight[torch.arange(r.n_new, r.queries, device=dev), own] = 1.0
            weights.append(weight.mul_(scale))
            own_at += r.m
        if cached == 0:
            return _JaggedPlan(rows, past, candidates, history, real, real, weights, rows, None)
        key_slices, at = [], 0
        for r in group:
            key_slices.append(slice(at, at + r.keys))
            at += r.keys
        key_order = index[2 * row + n_cands :]
        return _JaggedPlan(rows, past, candidates, history, real, real, weights, key_slices, key_order)
    b = len(group)
    max_q = max(r.queries for r in group)
    # Row limits padded with -1 (a padding row sees nothing), then the candidates' own columns.
    padded_limits = torch.full((b, max_q), -1, dtype=torch.int64, device=dev)
    q_rows, past_rows, new_rows, cand_q = [], [], [], []
    for i, r in enumerate(group):
        q_rows.append(np.arange(i * max_q, i * max_q + r.queries))
        past_rows.append(np.arange(i * max_k, i * max_k + r.cached_len))
        new_rows.append(np.arange(i * max_k + r.cached_len, i * max_k + r.keys))
        cand_q.append(np.arange(i * max_q + r.n_new, i * max_q + r.queries))
    maps = torch.from_numpy(np.concatenate([*q_rows, *past_rows, *new_rows, *cand_q])).to(dev)
    n, c = row, cached
    q_index = maps[:n]
    padded_limits.view(-1).index_copy_(0, q_index, lim_all)
    weight = (keys <= padded_limits[:, :, None]).to(torch.float32)
    weight.view(b * max_q, max_k)[maps[n + c + n :], own_all] = 1.0
    return _PaddedPlan(
        rows,
        past,
        candidates,
        history,
        real,
        b * max_q * max_k,
        batch=b,
        max_q=max_q,
        max_k=max_k,
        q_rows=q_index,
        past_rows=maps[n : n + c],
        new_rows=maps[n + c : n + c + n],
        weight=weight.mul_(scale)[:, None],
    )


class _HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        w = cfg.kv_width
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.norm_in = nn.LayerNorm(cfg.d_model, eps=_LN_EPS)
        self.uvqk = nn.Linear(cfg.d_model, 4 * w)  # f1
        self.norm_attn = nn.LayerNorm(w, eps=_LN_EPS)
        self.out = nn.Linear(w, cfg.d_model)  # f2

    def forward(
        self, x: Tensor, past_k: Tensor, past_v: Tensor, plan: _JaggedPlan | _PaddedPlan
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, d_model], every request's query rows (its new history rows, then its candidate rows),
        request after request; past_k/v: [C, kv_width], every request's cached rows, request after
        request. Returns (y, k, v) with k and v [N, kv_width] for every query row."""
        h = F.silu(self.uvqk(self.norm_in(x)))
        u, v, q, k = torch.chunk(h, 4, dim=-1)
        if isinstance(plan, _PaddedPlan):
            o = self._padded(q, k, v, past_k, past_v, plan)
        else:
            if plan.key_order is None:
                keys, values = k, v
            else:
                keys = torch.cat((past_k, k), dim=0).index_select(0, plan.key_order)
                values = torch.cat((past_v, v), dim=0).index_select(0, plan.key_order)
            scaled = q * self.scale
            outs = [
                self._attend(scaled[rows], keys[cols], values[cols], weight)
                for rows, cols, weight in zip(plan.rows, plan.keys, plan.weights, strict=True)
            ]
            o = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        y = x + self.out(self.norm_attn(o) * u)
        return y, k, v

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, weight: Tensor) -> Tensor:
        """One request: q [n_q, W] (scaled by 1/sqrt(head_dim)), keys/values [n_k, W], weight [n_q, n_k]
        -> [n_q, W]."""
        nh, hd = self.n_heads, self.head_dim
        n_q, n_k = q.shape[0], keys.shape[0]
        qh = q.reshape(n_q, nh, hd).transpose(0, 1)  # [H, n_q, D]
        kh = keys.reshape(n_k, nh, hd).permute(1, 2, 0)  # [H, D, n_k]
        vh = values.reshape(n_k, nh, hd).transpose(0, 1)  # [H, n_k, D]
        logits = torch.bmm(qh, kh)
        # Masking by multiplication (one pass instead of scale + masked_fill): exact as long as the
        # logits are finite, which they are for finite inputs (an fp32 overflow would need |q.k| ~ 1e38).
        attn = F.silu(logits, inplace=True).mul_(weight)
        return torch.bmm(attn, vh).transpose(0, 1).reshape(n_q, nh * hd)

    def _padded(  # noqa: PLR0917 -- the layer's tensors, then the plan
        self, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, plan: _PaddedPlan
    ) -> Tensor:
        """All requests at once, padded with zeros (masked out by the zero weight)."""
        nh, hd = self.n_heads, self.head_dim
        b, lq, lk = plan.batch, plan.max_q, plan.max_k
        width = q.shape[1]
        queries = q.new_zeros((b * lq, width)).index_copy_(0, plan.q_rows, q)
        keys = (
            k.new_zeros((b * lk, width))
            .index_copy_(0, plan.past_rows, past_k)
            .index_copy_(0, plan.new_rows, k)
        )
        values = (
            v.new_zeros((b * lk, width))
            .index_copy_(0, plan.past_rows, past_v)
            .index_copy_(0, plan.new_rows, v)
        )
        qh = queries.reshape(b, lq, nh, hd).permute(0, 2, 1, 3).reshape(b * nh, lq, hd)
        kh = keys.reshape(b, lk, nh, hd).permute(0, 2, 3, 1).reshape(b * nh, hd, lk)
        vh = values.reshape(b, lk, nh, hd).permute(0, 2, 1, 3).reshape(b * nh, lk, hd)
        logits = torch.bmm(qh * self.scale, kh)
        attn = F.silu(logits, inplace=True).view(b, nh, lq, lk).mul_(plan.weight).view(b * nh, lq, lk)
        o = torch.bmm(attn, vh).view(b, nh, lq, hd).permute(0, 2, 1, 3).reshape(b * lq, nh * hd)
        return o.index_select(0, plan.q_rows)


class HSTU(nn.Module):
    """HSTU ranker with an externally managed, exactly reusable per-user K/V cache (see module doc)."""

    def __init__(self, cfg: HSTUConfig, *, seed: int = 0) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # Build on the meta device (no memory, no draw from the global RNG), then materialise on the
        # CPU and initialise from a private generator: the weights depend only on `seed`.
        with torch.device("meta"):
            self.item_proj = nn.Linear(cfg.item_dim, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.max_history + 1, cfg.d_model)
            self.time_emb = nn.Embedding(cfg.time_buckets + 1, cfg.d_model)  # last row: candidates
            self.layers = nn.ModuleList(_HSTULayer(cfg) for _ in range(cfg.n_layers))
            self.final_norm = nn.LayerNorm(cfg.d_model, eps=_LN_EPS)
            self.score_head = nn.Linear(cfg.d_model, 1)
        self.to_empty(device="cpu")
        self.reset_parameters(seed)
        self.eval()

    # ------------------------------------------------------------------ construction / persistence

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from `seed`: Xavier-uniform linear weights with zero biases (as Meta's
        STULayer), N(0, 0.02) embeddings, LayerNorm weight 1 / bias 0.  Drawn on the CPU, so a model
        gets the same weights whatever device it is moved to afterwards."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                w.copy_(torch.rand(w.shape, generator=g) * (2 * bound) - bound)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    @classmethod
    def create(
        cls,
        cfg: HSTUConfig,
        *,
        checkpoint: str | Path | None,
        seed: int,
        device: torch.device | str,
    ) -> tuple[HSTU, str]:
        """Build the model in eval mode on `device`, from `checkpoint` (written by `save`) if given,
        else from seeded random weights.  Returns (model, short description of where the weights came
        from) for the caller to log."""
        if checkpoint is None:
            model = cls(cfg, seed=seed)
            description = f"seeded random weights (seed={seed}): no checkpoint given"
        else:
            path = Path(checkpoint)
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read HSTU checkpoint {path}: {exc}") from exc
            if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
                raise CheckpointError(
                    f"{path} is not an HSTU checkpoint (expected a dict with 'config' and 'state_dict')"
                )
            try:
                stored = HSTUConfig(**blob["config"])
            except (TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"checkpoint {path} has an invalid config {blob['config']!r}: {exc}"
                ) from exc
            if stored != cfg:
                raise CheckpointError(
                    f"checkpoint {path} was saved for {stored}, but the model is configured as {cfg}"
                )
            model = cls(cfg, seed=seed)
            try:
                model.load_state_dict(blob["state_dict"], strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from exc
            description = f"checkpoint {path}"
        model = model.to(device)
        model.eval()
        return model, description

    def save(self, path: str | Path) -> None:
        """Write {"config": asdict(cfg), "state_dict": ...} (tensors moved to the CPU)."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"config": asdict(self.cfg), "state_dict": state}, Path(path))

    @property
    def device(self) -> torch.device:
        return self.item_proj.weight.device

    # ------------------------------------------------------------------ inference

    @staticmethod
    def attention_mask(cached_len: int, n_new: int, m: int, device: torch.device | str = "cpu") -> Tensor:
        """Bool [n_new + m, cached_len + n_new + m]: query rows = new history tokens then candidates;
        key columns = cached history, new history, candidates (the rule of `_mask_limits`)."""
        limits, self_cols = _mask_limits(cached_len, n_new, m)
        dev = torch.device(device)
        keys = torch.arange(cached_len + n_new + m, device=dev)
        mask = keys <= torch.from_numpy(limits).to(dev)[:, None]
        mask[torch.arange(n_new, n_new + m, device=dev), torch.from_numpy(self_cols).to(dev)] = True
        return mask

    @torch.inference_mode()
    def forward(  # noqa: PLR0917 -- the argument order is the documented calling convention
        self,
        hist_emb: Tensor,
        timestamps: Tensor | np.ndarray,
        cached_len: int,
        cand_emb: Tensor,
        past_k: Sequence[Tensor] | None,
        past_v: Sequence[Tensor] | None,
    ) -> HSTUOutput:
        """Score `cand_emb` against a history whose first `cached_len` tokens are covered by
        past_k/past_v (per layer [cached_len, kv_width]) and whose remaining tokens are `hist_emb`
        ([n_new, item_dim], positions cached_len..cached_len+n_new-1).  `timestamps` (int64) covers the
        whole history.  Returns candidate scores and the K/V of the new history tokens."""
        request = HSTUInput(hist_emb, timestamps, cached_len, cand_emb, past_k, past_v)
        return self.forward_batch([request]).outputs[0]

    @torch.inference_mode()
    def forward_batch(
        self, requests: Sequence[HSTUInput], layout: AttentionLayout | None = None
    ) -> HSTUBatchOutput:
        """Score several users' requests in one pass, results in request order. The row-wise parts of
        every layer (LayerNorms, the linear maps, SiLU) run once over all requests' rows; attention is laid
        out by `layout` (default: `choose_layout`). A request attends to nothing of another's, so each
        gets what `forward` gives it alone, up to float rounding."""
        if not requests:
            raise ValueError("forward_batch needs at least one request")
        cfg = self.cfg
        dev = self.device
        name = len(requests) > 1
        group = [self._checked(r, f" (batch index {i})" if name else "") for i, r in enumerate(requests)]
        plan = _plan(group, layout or self.choose_layout(group), cfg.max_history, dev)
        positions: list[np.ndarray] = []
        buckets: list[np.ndarray] = []
        embeddings: list[Tensor] = []
        for r in group:
            hist_len = r.cached_len + r.n_new
            positions += [np.arange(r.cached_len, hist_len), np.full(r.m, hist_len)]
            buckets += [
                time_buckets(r.timestamps, r.cached_len, cfg.time_buckets),
                np.full(r.m, cfg.time_buckets),
            ]
            embeddings += [r.hist_emb, r.cand_emb]
        index = torch.from_numpy(np.stack((np.concatenate(positions), np.concatenate(buckets)))).to(dev)
        x = self.item_proj(torch.cat(embeddings, dim=0))
        x = x + self.pos_emb(index[0]) + self.time_emb(index[1])

        layer_k: list[Tensor] = []
        layer_v: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            past_k = torch.cat([r.past_k[i] for r in group]) if len(group) > 1 else group[0].past_k[i]
            past_v = torch.cat([r.past_v[i] for r in group]) if len(group) > 1 else group[0].past_v[i]
            x, k, v = layer(x, past_k, past_v, plan)
            layer_k.append(k)
            layer_v.append(v)
        scores = self.score_head(self.final_norm(x.index_select(0, plan.candidate_rows))).squeeze(-1).float()
        if len(group) > 1:
            history_k = [k.index_select(0, plan.history_rows) for k in layer_k]
            history_v = [v.index_select(0, plan.history_rows) for v in layer_v]
        else:  # one request: its new history rows come first
            history_k = [k[: group[0].n_new] for k in layer_k]
            history_v = [v[: group[0].n_new] for v in layer_v]
        outputs = []
        cand = new = 0
        for r in group:
            rows = slice(new, new + r.n_new)
            outputs.append(
                HSTUOutput(
                    scores=scores[cand : cand + r.m],
                    new_k=[k[rows] for k in history_k],
                    new_v=[v[rows] for v in history_v],
                )
            )
            cand += r.m
            new += r.n_new
        return HSTUBatchOutput(
            outputs, scores, history_k, history_v, plan.real_elements, plan.computed_elements
        )

    def choose_layout(self, group: Sequence[_Checked]) -> AttentionLayout:
        """PADDED on CUDA for a batch whose padding is small and whose padded logits fit the budget;
        JAGGED otherwise (always on the CPU, and for a single request, which has nothing to pad)."""
        if self.device.type != "cuda" or len(group) == 1:
            return AttentionLayout.JAGGED
        padded = _padded_elements(group)
        real = sum(r.queries * r.keys for r in group)
        if padded * self.cfg.n_heads > ATTENTION_BUDGET or 1 - real / padded > MAX_PADDING_WASTE:
            return AttentionLayout.JAGGED
        return AttentionLayout.PADDED

    def _checked(self, r: HSTUInput, where: str) -> _Checked:
        cfg = self.cfg
        dev = self.device
        w = cfg.kv_width
        hist_emb, cand_emb, cached_len = r.hist_emb, r.cand_emb, r.cached_len
        if hist_emb.dim() != 2 or hist_emb.shape[1] != cfg.item_dim:
            raise ValueError(f"hist_emb must be [n_new, {cfg.item_dim}], got {list(hist_emb.shape)}{where}")
        if cand_emb.dim() != 2 or cand_emb.shape[1] != cfg.item_dim or cand_emb.shape[0] < 1:
            raise ValueError(f"cand_emb must be [m >= 1, {cfg.item_dim}], got {list(cand_emb.shape)}{where}")
        if cached_len < 0:
            raise ValueError(f"cached_len must be >= 0, got {cached_len}{where}")
        n_new, m = int(hist_emb.shape[0]), int(cand_emb.shape[0])
        hist_len = cached_len + n_new
        if hist_len > cfg.max_history:
            raise ValueError(
                f"history of {hist_len} tokens (cached {cached_len} + new {n_new}) exceeds "
                f"max_history={cfg.max_history}{where}"
            )
        timestamps = _host_int64(r.timestamps)
        if timestamps.ndim != 1 or timestamps.shape[0] != hist_len:
            raise ValueError(
                f"timestamps must be 1-D with one entry per history token ({hist_len}), "
                f"got {list(timestamps.shape)}{where}"
            )
        return _Checked(
            hist_emb=hist_emb.to(dev, torch.float32),
            cand_emb=cand_emb.to(dev, torch.float32),
            timestamps=timestamps,
            cached_len=cached_len,
            n_new=n_new,
            m=m,
            past_k=self._check_past(f"past_k{where}", r.past_k, cached_len, w, dev),
            past_v=self._check_past(f"past_v{where}", r.past_v, cached_len, w, dev),
        )

    def _check_past(
        self,
        name: str,
        past: Sequence[Tensor] | None,
        cached_len: int,
        width: int,
        dev: torch.device,
    ) -> list[Tensor]:
        n_layers = self.cfg.n_layers
        if cached_len == 0 and (past is None or len(past) == 0):
            empty = torch.zeros((0, width), device=dev, dtype=torch.float32)
            return [empty] * n_layers
        if past is None or len(past) != n_layers:
            got = "None" if past is None else f"{len(past)} tensors"
            raise ValueError(
                f"{name} must hold one tensor per layer ({n_layers}) when cached_len > 0; got {got}"
            )
        out = []
        for i, t in enumerate(past):
            if t.dim() != 2 or t.shape[0] != cached_len or t.shape[1] != width:
                raise ValueError(f"{name}[{i}] must be [{cached_len}, {width}], got {list(t.shape)}")
            out.append(t.to(dev, torch.float32))
        return out
