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

Attention is computed without the blocks the mask zeroes: every query row attends to its request's
*history* keys (causal for history rows; the whole history for a candidate), and a candidate's attention
to itself, the only candidate column it sees, is a row-wise dot product over all candidates at once. The
candidate key columns (an [n_new + m, m] block per request, all masked but its diagonal) are never formed.
In the last layer only the candidates query: the history rows' outputs of that layer feed nothing (the
K/V the cache keeps come from each layer's *input*). The 1 / max_history factor multiplies the attention
output instead of the weights (the same sum, rounded differently).

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
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.worker.errors import CheckpointError
from services.worker.model_config import PRESETS, HSTUConfig, preset_name

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
    return _gap_buckets(timestamps[start:] - prev, n_buckets)


def _gap_buckets(gaps: np.ndarray, n_buckets: int) -> np.ndarray:
    gap = np.maximum(gaps, 0)
    bucket: np.ndarray = np.floor(np.log2(gap.astype(np.float64) + 1.0)).astype(np.int64)
    out: np.ndarray = np.minimum(bucket, n_buckets - 1)
    return out


def _row_features(group: Sequence[_Checked], n_buckets: int) -> np.ndarray:
    """[2, N] int64: the position and the time bucket of every query row of the batch (request after
    request, its new history tokens, then its candidates), `time_buckets` of each request's new tokens
    computed for the whole batch at once."""
    cached = np.array([r.cached_len for r in group], dtype=np.int64)
    n_new = np.array([r.n_new for r in group], dtype=np.int64)
    m = np.array([r.m for r in group], dtype=np.int64)
    hist_len = cached + n_new
    queries = n_new + m
    n = int(queries.sum())
    first = np.repeat(np.cumsum(queries) - queries, queries)  # each row's request's first row
    local = np.arange(n) - first  # row within its request
    is_hist = local < np.repeat(n_new, queries)
    features = np.empty((2, n), dtype=np.int64)
    features[0] = np.where(is_hist, np.repeat(cached, queries) + local, np.repeat(hist_len, queries))
    features[1] = n_buckets  # candidates' bucket; the history rows' below
    timestamps = np.concatenate([r.timestamps for r in group])
    base = np.repeat(np.cumsum(hist_len) - hist_len, n_new)  # each new token's request in `timestamps`
    token = local[is_hist] + np.repeat(cached, n_new)  # each new token's position in its history
    gaps = timestamps[base + token] - timestamps[base + np.maximum(token - 1, 0)]  # first token: gap 0
    features[1, is_hist] = _gap_buckets(gaps, n_buckets)
    return features


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
    """Results for the whole batch (`scores`: every request's candidates, request after request;
    `history_k`/`history_v`: per layer, every request's new history tokens, request after request); each
    request's own (`output(i)`, all of them in request order: `outputs`) are views into these, made when
    asked for; and the attention elements (per head) the requests needed and the layout computed (more when
    padded)."""

    scores: Tensor
    history_k: list[Tensor]
    history_v: list[Tensor]
    real_elements: int
    computed_elements: int
    candidates: tuple[int, ...]  # per request, its candidates
    new_tokens: tuple[int, ...]  # per request, its new history tokens

    def output(self, i: int) -> HSTUOutput:
        """Request i's results (views)."""
        cand = sum(self.candidates[:i])
        new = slice(sum(self.new_tokens[:i]), sum(self.new_tokens[: i + 1]))
        return HSTUOutput(
            scores=self.scores[cand : cand + self.candidates[i]],
            new_k=[k[new] for k in self.history_k],
            new_v=[v[new] for v in self.history_v],
        )

    @property
    def outputs(self) -> list[HSTUOutput]:
        """Every request's results, in request order."""
        return [self.output(i) for i in range(len(self.candidates))]

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
    def hist_len(self) -> int:
        return self.cached_len + self.n_new


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
    """Where each request's rows are in one pass; built once, used by every layer.

    Attention is split by the target-aware mask: every query row attends to its request's history keys
    (cached, then new) under a causal mask (a candidate sees the whole history), and each candidate also to
    itself, a row-wise dot product over the batch's candidates (`_HSTULayer._self_term`). The masked
    candidate key columns are never computed. In the last layer only the candidates query: the history
    rows' outputs feed nothing (their K/V, what is cached, come from the layer's input)."""

    rows: list[slice]  # each request's query rows in x (new history, then candidates)
    history: list[slice]  # each request's new history rows in x
    candidate_rows: Tensor  # rows of x that are candidates, request after request
    history_rows: Tensor  # rows of x that are new history tokens, request after request
    real_elements: int  # attention elements per head, all layers, the requests need
    computed_elements: int  # ... and that the layout computes (padding included)


@dataclass(frozen=True)
class _JaggedPlan(_Plan):
    keys: list[slice]  # each request's history key rows in the layer's key tensor
    candidates: list[slice]  # each request's rows among the candidate rows
    offsets: list[int]  # per request, its cached_len: query row i sees history keys 0..offset + i
    cached: bool  # some request has cached rows (else a request's keys are its own new history rows of k)


@dataclass(frozen=True)
class _PaddedPlan(_Plan):
    """Padded query rows of request b are b*max_q .. (its new history rows, then its candidates; in the last
    layer b*max_m .., its candidates), its key rows b*max_h .., its cached rows, then its new history rows."""

    batch: int
    max_q: int
    max_m: int
    max_h: int
    q_rows: Tensor  # [N] padded query row of each query row
    c_rows: Tensor  # [N_c] padded query row of each candidate in the last layer
    past_rows: Tensor  # [C] padded key row of each cached row
    new_rows: Tensor  # [N_h] padded key row of each new history row
    mask: Tensor  # [B, 1, max_q, max_h]: 1 where a query row sees a history key, 0 elsewhere and on padding
    last_mask: Tensor  # [B, 1, 1, max_h]: 1 on a request's history keys (the last layer's candidates)


def _mask_limits(cached_len: int, n_new: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The target-aware mask as row limits: query row i sees key columns 0..limits[i] (a new history
    token: the cached history and the new tokens up to itself; a candidate: the whole history), and
    candidate j also its own column, self_cols[j]."""
    hist_len = cached_len + n_new
    limits = np.empty(n_new + m, dtype=np.int64)
    limits[:n_new] = np.arange(cached_len, hist_len)
    limits[n_new:] = hist_len - 1
    return limits, np.arange(hist_len, hist_len + m)


def _padded_logits(group: Sequence[_Checked]) -> int:
    """Elements per head of the padded logits of a layer (the largest: every query row)."""
    return len(group) * max(r.queries for r in group) * max(r.hist_len for r in group)


def _padded_elements(group: Sequence[_Checked], n_layers: int) -> int:
    """`_attention_elements` as the padded layout computes them (the self-terms are never padded)."""
    b, max_m, max_h = len(group), max(r.m for r in group), max(r.hist_len for r in group)
    return (n_layers - 1) * _padded_logits(group) + b * max_m * max_h + n_layers * sum(r.m for r in group)


def _attention_elements(group: Sequence[_Checked], n_layers: int) -> int:
    """(query, key) pairs per head over all layers: each query row and its request's history, then each
    candidate and itself; in the last layer the candidates only."""
    return sum(((n_layers - 1) * r.queries + r.m) * r.hist_len + n_layers * r.m for r in group)


def _plan(
    group: Sequence[_Checked], layout: AttentionLayout, n_layers: int, dev: torch.device
) -> _JaggedPlan | _PaddedPlan:
    """Row maps for one pass (one host-to-device copy of them) and, for the padded layout, its masks."""
    rows, history, candidate_rows, history_rows = [], [], [], []
    row = cached = 0
    for r in group:
        rows.append(slice(row, row + r.queries))
        history.append(slice(row, row + r.n_new))
        candidate_rows.append(np.arange(row + r.n_new, row + r.queries))
        history_rows.append(np.arange(row, row + r.n_new))
        row += r.queries
        cached += r.cached_len
    n_hist = sum(r.n_new for r in group)
    n_cands = row - n_hist
    max_h = max(r.hist_len for r in group)
    real = _attention_elements(group, n_layers)
    if layout is AttentionLayout.JAGGED:
        index = torch.from_numpy(np.concatenate([*candidate_rows, *history_rows])).to(dev)
        keys, candidates = [], []
        key = cand = 0
        for r in group:
            keys.append(slice(key, key + r.hist_len))
            candidates.append(slice(cand, cand + r.m))
            key += r.hist_len
            cand += r.m
        return _JaggedPlan(
            rows,
            history,
            index[:n_cands],
            index[n_cands:],
            real,
            real,
            keys=keys,
            candidates=candidates,
            offsets=[r.cached_len for r in group],
            cached=cached > 0,
        )
    b = len(group)
    max_q = max(r.queries for r in group)
    max_m = max(r.m for r in group)
    limits, q_rows, c_rows, past_rows, new_rows = [], [], [], [], []
    for i, r in enumerate(group):
        limits.append(_mask_limits(r.cached_len, r.n_new, r.m)[0])
        q_rows.append(np.arange(i * max_q, i * max_q + r.queries))
        c_rows.append(np.arange(i * max_m, i * max_m + r.m))
        past_rows.append(np.arange(i * max_h, i * max_h + r.cached_len))
        new_rows.append(np.arange(i * max_h + r.cached_len, i * max_h + r.hist_len))
    parts = [candidate_rows, history_rows, q_rows, c_rows, past_rows, new_rows, limits]
    host = [np.concatenate(p) for p in parts] + [np.array([r.hist_len for r in group], dtype=np.int64)]
    index = torch.from_numpy(np.concatenate(host)).to(dev)  # one copy of every map
    cuts = list(itertools.accumulate((len(h) for h in host), initial=0))
    maps = [index[start:stop] for start, stop in itertools.pairwise(cuts)]
    key_cols = torch.arange(max_h, device=dev)
    # Row limits padded with -1 (a padding row sees nothing).
    padded_limits = torch.full((b * max_q,), -1, dtype=torch.int64, device=dev)
    padded_limits.index_copy_(0, maps[2], maps[6])
    mask = (key_cols <= padded_limits.view(b, max_q, 1)).to(torch.float32)
    last_mask = (key_cols < maps[7][:, None]).to(torch.float32)
    return _PaddedPlan(
        rows,
        history,
        maps[0],
        maps[1],
        real,
        _padded_elements(group, n_layers),
        batch=b,
        max_q=max_q,
        max_m=max_m,
        max_h=max_h,
        q_rows=maps[2],
        c_rows=maps[3],
        past_rows=maps[4],
        new_rows=maps[5],
        mask=mask[:, None],
        last_mask=last_mask[:, None, None],
    )


class _HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        w = cfg.kv_width
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.inv_max_history = 1.0 / cfg.max_history  # the fixed attention normalisation
        self.norm_in = nn.LayerNorm(cfg.d_model, eps=_LN_EPS)
        self.uvqk = nn.Linear(cfg.d_model, 4 * w)  # f1
        self.norm_attn = nn.LayerNorm(w, eps=_LN_EPS)
        self.out = nn.Linear(w, cfg.d_model)  # f2

    def forward(
        self,
        x: Tensor,
        past_k: Sequence[Tensor],
        past_v: Sequence[Tensor],
        plan: _JaggedPlan | _PaddedPlan,
        last: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, d_model], every request's query rows (its new history rows, then its candidate rows),
        request after request; past_k/v: per request its cached rows [cached_len, kv_width]. Returns
        (y, k, v): k and v [N, kv_width] for every query row; y [N, d_model], or in the `last` layer the
        candidate rows' only ([N_c, d_model], request after request)."""
        h = F.silu(self.uvqk(self.norm_in(x)), inplace=True)
        u, v, q, k = torch.chunk(h, 4, dim=-1)
        # The candidates' own rows: their self-term in every layer, their queries in the last.
        u_c, v_c, q_c, k_c = torch.chunk(h.index_select(0, plan.candidate_rows), 4, dim=-1)
        q_c = q_c * self.scale
        own = self._self_term(q_c, k_c, v_c)
        if isinstance(plan, _PaddedPlan):
            o = self._padded(q_c if last else q * self.scale, k, v, past_k, past_v, plan, last)
        else:
            o = self._jagged(q_c if last else q * self.scale, k, v, past_k, past_v, plan, last)
        if last:
            o.add_(own)
            x, u = x.index_select(0, plan.candidate_rows), u_c
        else:
            o.index_add_(0, plan.candidate_rows, own)
        y = x + self.out(self.norm_attn(o.mul_(self.inv_max_history)) * u)
        return y, k, v

    def _self_term(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Each candidate's attention to itself, all candidates at once: q, k, v [N_c, W] -> [N_c, W]."""
        n = q.shape[0]
        logits = (q * k).view(n, self.n_heads, self.head_dim).sum(-1, keepdim=True)  # [N_c, H, 1]
        return (F.silu(logits, inplace=True) * v.reshape(n, self.n_heads, self.head_dim)).view(n, -1)

    def _jagged(  # noqa: PLR0917 -- the layer's tensors, then the plan
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        past_k: Sequence[Tensor],
        past_v: Sequence[Tensor],
        plan: _JaggedPlan,
        last: bool,
    ) -> Tensor:
        """Per request, its query rows (scaled; the candidates' in the `last` layer) over its history keys;
        the masked sum without the candidates' self-term and without 1 / max_history."""
        if plan.cached:  # each request's cached rows, then its new history rows
            parts_k: list[Tensor] = []
            parts_v: list[Tensor] = []
            for pk, pv, hist in zip(past_k, past_v, plan.history, strict=True):
                parts_k += [pk, k[hist]]
                parts_v += [pv, v[hist]]
            keys, values = torch.cat(parts_k), torch.cat(parts_v)
            key_rows = plan.keys
        else:  # a request's keys are its new history rows
            keys, values, key_rows = k, v, plan.history
        nh, hd = self.n_heads, self.head_dim
        # Head-major views of the whole batch (no copies); each request's blocks are views into them.
        qh = q.view(q.shape[0], nh, hd).transpose(0, 1)  # [H, N_q, D]
        kh = keys.view(keys.shape[0], nh, hd).permute(1, 2, 0)  # [H, D, N_k]
        vh = values.view(values.shape[0], nh, hd).transpose(0, 1)  # [H, N_k, D]
        outs: list[Tensor] = []
        if last:  # the candidates see the whole history: no mask
            for cands, cols in zip(plan.candidates, key_rows, strict=True):
                attn = F.silu(torch.bmm(qh[:, cands], kh[:, :, cols]), inplace=True)
                outs.append(torch.bmm(attn, vh[:, cols]))
        else:
            for rows, cols, offset in zip(plan.rows, key_rows, plan.offsets, strict=True):
                attn = F.silu(torch.bmm(qh[:, rows], kh[:, :, cols]), inplace=True)
                # The causal mask in place: query row i (position offset + i) keeps keys 0..offset + i; a
                # candidate row (i >= n_new, so offset + i >= hist_len) keeps them all.
                outs.append(torch.bmm(attn.tril_(offset), vh[:, cols]))
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # [H, N_q, D]
        return o.transpose(0, 1).reshape(q.shape[0], nh * hd)

    def _padded(  # noqa: PLR0917 -- the layer's tensors, then the plan
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        past_k: Sequence[Tensor],
        past_v: Sequence[Tensor],
        plan: _PaddedPlan,
        last: bool,
    ) -> Tensor:
        """All requests at once, padded with zeros (masked out): the same as `_jagged`."""
        nh, hd = self.n_heads, self.head_dim
        b, lk = plan.batch, plan.max_h
        lq, q_rows, mask = (
            (plan.max_m, plan.c_rows, plan.last_mask) if last else (plan.max_q, plan.q_rows, plan.mask)
        )
        width = q.shape[1]
        queries = q.new_zeros((b * lq, width)).index_copy_(0, q_rows, q)
        new_k, new_v = k.index_select(0, plan.history_rows), v.index_select(0, plan.history_rows)
        keys = (
            k.new_zeros((b * lk, width))
            .index_copy_(0, plan.past_rows, torch.cat(tuple(past_k)))
            .index_copy_(0, plan.new_rows, new_k)
        )
        values = (
            v.new_zeros((b * lk, width))
            .index_copy_(0, plan.past_rows, torch.cat(tuple(past_v)))
            .index_copy_(0, plan.new_rows, new_v)
        )
        qh = queries.reshape(b, lq, nh, hd).permute(0, 2, 1, 3).reshape(b * nh, lq, hd)
        kh = keys.reshape(b, lk, nh, hd).permute(0, 2, 3, 1).reshape(b * nh, hd, lk)
        vh = values.reshape(b, lk, nh, hd).permute(0, 2, 1, 3).reshape(b * nh, lk, hd)
        attn = F.silu(torch.bmm(qh, kh), inplace=True).view(b, nh, lq, lk).mul_(mask).view(b * nh, lq, lk)
        o = torch.bmm(attn, vh).view(b, nh, lq, hd).permute(0, 2, 1, 3).reshape(b * lq, nh * hd)
        return o.index_select(0, q_rows)


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
        from) for the caller to log.  A checkpoint that cannot be read or does not fit `cfg` raises
        `CheckpointError` (docs/model-inputs.md)."""
        if checkpoint is None:
            model = cls(cfg, seed=seed)
            description = f"seeded random weights (seed={seed}): no checkpoint given"
        else:
            path = Path(checkpoint)
            model = cls(cfg, seed=seed)
            model.load_state_dict(_checkpoint_state(path, cfg, model.state_dict()), strict=True)
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
        return self.forward_batch([request]).output(0)

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
        group = [self._checked(r, dev, f" (batch index {i})" if name else "") for i, r in enumerate(requests)]
        plan = _plan(group, layout or self.choose_layout(group), cfg.n_layers, dev)
        index = torch.from_numpy(_row_features(group, cfg.time_buckets)).to(dev)
        x = self.item_proj(torch.cat([e for r in group for e in (r.hist_emb, r.cand_emb)]))
        x = x + self.pos_emb(index[0]) + self.time_emb(index[1])

        layer_k: list[Tensor] = []
        layer_v: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            past_k = [r.past_k[i] for r in group]
            past_v = [r.past_v[i] for r in group]
            x, k, v = layer(x, past_k, past_v, plan, i == cfg.n_layers - 1)
            layer_k.append(k)
            layer_v.append(v)
        # The last layer returned the candidates' rows only.
        scores = self.score_head(self.final_norm(x)).squeeze(-1).float()
        if len(group) > 1:
            history_k = [k.index_select(0, plan.history_rows) for k in layer_k]
            history_v = [v.index_select(0, plan.history_rows) for v in layer_v]
        else:  # one request: its new history rows come first
            history_k = [k[: group[0].n_new] for k in layer_k]
            history_v = [v[: group[0].n_new] for v in layer_v]
        return HSTUBatchOutput(
            scores,
            history_k,
            history_v,
            plan.real_elements,
            plan.computed_elements,
            candidates=tuple(r.m for r in group),
            new_tokens=tuple(r.n_new for r in group),
        )

    def choose_layout(self, group: Sequence[_Checked]) -> AttentionLayout:
        """PADDED on CUDA for a batch whose padding is small and whose padded logits fit the budget;
        JAGGED otherwise (always on the CPU, and for a single request, which has nothing to pad)."""
        if self.device.type != "cuda" or len(group) == 1:
            return AttentionLayout.JAGGED
        n_layers = self.cfg.n_layers
        padded, real = _padded_elements(group, n_layers), _attention_elements(group, n_layers)
        logits = _padded_logits(group) * self.cfg.n_heads
        if logits > ATTENTION_BUDGET or 1 - real / padded > MAX_PADDING_WASTE:
            return AttentionLayout.JAGGED
        return AttentionLayout.PADDED

    def _checked(self, r: HSTUInput, dev: torch.device, where: str) -> _Checked:
        cfg = self.cfg
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
            return [torch.empty((0, width), device=dev)] * n_layers
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


def _checkpoint_state(path: Path, cfg: HSTUConfig, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state_dict of the checkpoint at `path` (written by `HSTU.save`), checked against the model
    `cfg` builds (whose parameters are `expected`): the config, every parameter's name and shape, finite
    values. Raises `CheckpointError` naming the mismatch."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever torch raises for a missing, truncated or foreign file
        raise CheckpointError(path, f"cannot read it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        found = f"a dict of {sorted(map(str, blob))}" if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            path,
            "it is not an HSTU checkpoint",
            found=found,
            expected="a dict of ['config', 'state_dict'] (HSTU.save)",
        )
    try:
        stored = HSTUConfig(**blob["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"its config is invalid: {exc}", found=repr(blob["config"])) from exc
    if stored != cfg:
        diff = [f.name for f in fields(cfg) if getattr(stored, f.name) != getattr(cfg, f.name)]
        raise CheckpointError(
            path,
            f"it was saved for model preset {preset_name(stored)}, the worker runs {preset_name(cfg)}",
            found=", ".join(f"{name}={getattr(stored, name)}" for name in diff),
            expected=", ".join(f"{name}={getattr(cfg, name)}" for name in diff),
        )
    state = blob["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(path, "its state_dict is not a dict of tensors")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            path, f"its parameters are not the model's: missing {missing}, not in the model {unexpected}"
        )
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape:
            raise CheckpointError(
                path,
                f"parameter {name} has the wrong shape",
                found=str(list(got.shape)),
                expected=str(list(want.shape)),
            )
        if want.is_floating_point() and not got.is_floating_point():
            raise CheckpointError(
                path, f"parameter {name} is not floating point", found=str(got.dtype), expected="float32"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CheckpointError(
                path,
                f"parameter {name} holds a NaN or an infinity",
                found="non-finite values",
                expected="finite",
            )
    return state
