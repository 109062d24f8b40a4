"""HELM: the three-layer alpha policy (``--alpha-policy helm``); the serving side, numpy only.

Map
---
* :func:`observe` -- one worker's :class:`~shared.schemas.WorkerFeatures` as the actor's input vector
  (:data:`FEATURES`); the simulator's training environment calls the same function.
* :class:`Actor` -- layer 1, the frozen PPO actor: a small tanh MLP whose two outputs are the parameters of
  a Beta distribution over the alpha target; serving takes the Beta's mean. Loaded from a ``.npz`` (no
  pickle) holding the weights, the frozen normalisation statistics, a version and a hash
  (:meth:`Actor.load`, :meth:`Actor.save`); the normalisation is folded into the first layer at load.
* :class:`Adapter` -- layer 2, a bounded residual correction learnt online per worker.
* :class:`BurstDetector` -- layer 3's change detector (two-sided CUSUM of z-scores against slow EWMA
  baselines) and :class:`HelmPolicy`'s recovery mode around it.
* :class:`HelmPolicy` -- the three layers per worker, the :class:`~.policies.AlphaPolicy` the controller
  and the simulator call; ``helm:layers=1`` (the PPO base alone), ``adapter=0``, ``recovery=0`` are the
  ablations.

The decision is plain float arithmetic plus three small matrix products: no torch on the serving path
(training lives in :mod:`sim.ppo`). It is timed against a 10-us P99 (``onepool bench controller``,
docs/controller.md): at a few numbers per call every numpy call costs ~0.3 us and a Python call or a
builtin min/max ~0.05 us, so the hot path counts them (eight numpy calls in the actor, the window's
features built once, scalar state in Python floats); tests/controller/test_helm.py holds it equal, bit for
bit, to the plain composition of the layers.
"""

from __future__ import annotations

import enum
import hashlib
import io
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from services.controller.core.policies import DEFAULT_ALPHA_MAX, DEFAULT_ALPHA_MIN, DEFAULT_MAX_STEP
from services.controller.core.split_model import miss_pressures
from shared.schemas import WorkerFeatures

__all__ = [
    "CUSUM_BASELINE",
    "CUSUM_FLOOR",
    "CUSUM_H",
    "CUSUM_K",
    "CUSUM_WARMUP",
    "DEFAULT_WEIGHTS",
    "FEATURES",
    "OBS_CLIP",
    "Actor",
    "Adapter",
    "BurstDetector",
    "HelmPolicy",
    "observe",
    "pressures",
]

F64 = npt.NDArray[np.float64]

# The weights shipped with the package (written by `onepool train-controller`).
DEFAULT_WEIGHTS: Final = Path(__file__).resolve().parent.parent / "weights" / "helm-actor.npz"
ACTOR_FORMAT: Final = 1  # bump when the file's layout or FEATURES change
# Normalised inputs are clipped to +-5 standard deviations, in training and in serving: a feature almost
# constant in training (an SLO violation rate of ~0) must not saturate the network when it moves.
OBS_CLIP: Final = 5.0

# What the actor sees of one worker's window, in this order. Rates and sizes enter as logs (they span
# orders of magnitude between the local and the paper presets); the two miss pressures as their share and
# their log total (the share says which side hurts, the total how much).
FEATURES: Final = (
    "alpha",
    "alpha_target",
    "emb_hit_rate",
    "kv_hit_rate",
    "log_request_rate",
    "rate_change",  # request_rate_delta x window / rate: the relative change over one window
    "hot_user_share",
    "log_mean_history",
    "new_token_fraction",
    "log_emb_misses_per_request",
    "log_p99_ms",
    "slo_violation_rate",
    "emb_pressure_share",  # emb_ms / (emb_ms + kv_ms), 0.5 when both are zero
    "log_pressure_ms",  # log1p(emb_ms + kv_ms)
)


def pressures(f: WorkerFeatures) -> tuple[float, float]:
    """(emb_ms, kv_ms): per request, what each cache's misses cost in this window, priced with the worker's
    fitted service-time model (:func:`~.split_model.miss_pressures`), zero while it has none."""
    return miss_pressures(f) if f.cost.samples > 0 else (0.0, 0.0)


def observe(f: WorkerFeatures) -> list[float]:
    """The actor's input for one worker's window (:data:`FEATURES`, in order)."""
    return _observe(f)[0]


def _observe(f: WorkerFeatures) -> tuple[list[float], float]:
    """:func:`observe`'s features and the window's pressure imbalance ``(emb_ms - kv_ms) / (emb_ms + kv_ms)``
    (0 when both are zero), from one pricing: what :meth:`HelmPolicy.decide` needs of the window."""
    rate = f.request_rate
    change = f.request_rate_delta * f.window_ms * 1e-3 / rate if rate > 0.0 else 0.0
    change = change if change < 4.0 else 4.0  # max(-4, min(4, change)) as the builtins do it, NaN included
    change = change if change > -4.0 else -4.0
    emb_ms, kv_ms = pressures(f)
    total = emb_ms + kv_ms
    log1p = math.log1p
    x = [
        f.alpha,
        f.alpha_target,
        f.emb_hit_rate,
        f.kv_hit_rate,
        log1p(rate),
        change,
        f.hot_user_share,
        log1p(f.mean_history),
        f.new_token_fraction,
        log1p(f.emb_misses_per_request),
        log1p(f.p99_latency_ms),
        f.slo_violation_rate,
        emb_ms / total if total > 0.0 else 0.5,
        log1p(total),
    ]
    return x, ((emb_ms - kv_ms) / total if total > 0.0 else 0.0)


@dataclass(frozen=True, eq=False)
class Actor:
    """Layer 1: ``x -> tanh(W1 x' + b1) -> tanh(W2 . + b2) -> W3 . + b3 = (a, b)``, with ``x'`` the
    features normalised by the frozen running statistics, and the Beta parameters ``1 + softplus(a)``,
    ``1 + softplus(b)`` (both > 1: a unimodal Beta). Its output is the Beta's mean in [0, 1]; the policy
    maps it onto the clamp's range."""

    w1: F64
    b1: F64
    w2: F64
    b2: F64
    w3: F64
    b3: F64
    obs_mean: F64
    obs_std: F64
    version: str
    meta: str = ""  # JSON text: how it was trained (seed, episodes, reward weights)
    digest: str = field(init=False)
    # beta(x): the Beta's two parameters for one feature vector (raw, not normalised). The forward pass,
    # prepared at load (:meth:`_compile`): the normalisation folded into the first layer and every bias into
    # its matrix (an input augmented with a constant 1), computed into preallocated buffers by a closure
    # over them. Not reentrant (the controller decides one report at a time).
    beta: Callable[[Sequence[float] | F64], tuple[float, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        d = len(FEATURES)
        h1, h2 = self.w1.shape[0], self.w2.shape[0]
        shapes = {
            "w1": (h1, d),
            "b1": (h1,),
            "w2": (h2, h1),
            "b2": (h2,),
            "w3": (2, h2),
            "b3": (2,),
            "obs_mean": (d,),
            "obs_std": (d,),
        }
        for name, shape in shapes.items():
            arr = getattr(self, name)
            if arr.shape != shape:
                raise ValueError(f"HELM actor: {name} has shape {arr.shape}, expected {shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"HELM actor: {name} has non-finite values")
        if np.any(self.obs_std <= 0.0):
            raise ValueError("HELM actor: obs_std must be > 0")
        object.__setattr__(self, "beta", self._compile())
        object.__setattr__(self, "digest", self._digest())

    def _compile(self) -> Callable[[Sequence[float] | F64], tuple[float, float]]:
        """The forward pass as a closure over its buffers: the features packed into the input, then eight
        numpy calls on at most 33 numbers (the input clipped from below and from above, one matrix product
        per layer, one in-place tanh per hidden layer, the two outputs out as Python floats) and the Beta's
        parameters in Python floats. Each call costs ~0.3 us whatever the size, so the count is the cost:
        ``np.clip`` (~2 us: a Python wrapper) is ``maximum`` then ``minimum`` here, and every matrix
        product ``ndarray.dot`` into a buffer (the BLAS call of ``np.dot(..., out=)`` without its
        dispatch). Same arithmetic as before the rewrite, to the last bit (tests/controller/test_helm.py
        compares it with the plain computation)."""
        d = len(FEATURES)
        w1 = self.w1 / self.obs_std
        b1 = self.b1 - w1 @ self.obs_mean
        m1 = np.ascontiguousarray(np.hstack([w1, b1[:, None]]))
        m2 = np.ascontiguousarray(np.hstack([self.w2, self.b2[:, None]]))
        m3 = np.ascontiguousarray(np.hstack([self.w3, self.b3[:, None]]))
        lo = self.obs_mean - OBS_CLIP * self.obs_std  # inputs clipped to mean +- OBS_CLIP std, as in training
        hi = self.obs_mean + OBS_CLIP * self.obs_std
        xa, ha, hb, o = np.ones(d + 1), np.ones(m1.shape[0] + 1), np.ones(m2.shape[0] + 1), np.zeros(2)
        x, va, vb = xa[:d], ha[:-1], hb[:-1]  # views: each layer's input ends with its constant 1
        dot1, dot2, dot3 = m1.dot, m2.dot, m3.dot
        # The features written straight into the input's memory as d native doubles: half the time of
        # `x[:] = features` on a list (exactly d numbers).
        pack_into, memory = struct.Struct(f"={d}d").pack_into, xa.data
        maximum, minimum, tanh, log1p, exp = np.maximum, np.minimum, np.tanh, math.log1p, math.exp

        def forward(features: Sequence[float] | F64) -> tuple[float, float]:
            try:
                pack_into(memory, 0, *features)
            except struct.error:  # the wrong number of features (a try costs nothing when it passes)
                raise ValueError(f"the actor takes {d} features, got {len(features)}") from None
            maximum(x, lo, out=x)
            minimum(x, hi, out=x)
            dot1(xa, va)
            tanh(va, va)
            dot2(ha, vb)
            tanh(vb, vb)
            dot3(hb, o)
            p, q = o.tolist()
            # 1 + softplus, the overflow-safe form
            p = 1.0 + (p + log1p(exp(-p)) if p > 0.0 else log1p(exp(p)))
            q = 1.0 + (q + log1p(exp(-q)) if q > 0.0 else log1p(exp(q)))
            return p, q

        return forward

    def _digest(self) -> str:
        h = hashlib.sha256()
        for name in ("w1", "b1", "w2", "b2", "w3", "b3", "obs_mean", "obs_std"):
            h.update(np.ascontiguousarray(getattr(self, name), dtype="<f8").tobytes())
        return h.hexdigest()[:16]

    def mean(self, x: F64 | Sequence[float]) -> float:
        """The Beta's mean for one feature vector (raw): the actor's output, in [0, 1]."""
        a, b = self.beta(x)
        return a / (a + b)

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(
            buf,
            format=np.array(ACTOR_FORMAT),
            features=np.array(FEATURES),
            version=np.array(self.version),
            digest=np.array(self.digest),
            meta=np.array(self.meta),
            **{n: getattr(self, n) for n in ("w1", "b1", "w2", "b2", "w3", "b3", "obs_mean", "obs_std")},
        )
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Actor:
        """Read a file :meth:`save` wrote; refuses another format, other features or a wrong hash."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                fmt = int(z["format"])
                if fmt != ACTOR_FORMAT:
                    raise ValueError(f"HELM actor {path}: format {fmt}, this code reads {ACTOR_FORMAT}")
                features = tuple(str(x) for x in z["features"])
                if features != FEATURES:
                    raise ValueError(
                        f"HELM actor {path}: trained on features {features}, expected {FEATURES}"
                    )
                arrays = {n: np.asarray(z[n], dtype=np.float64) for n in ("w1", "b1", "w2", "b2", "w3", "b3")}
                actor = cls(
                    **arrays,
                    obs_mean=np.asarray(z["obs_mean"], dtype=np.float64),
                    obs_std=np.asarray(z["obs_std"], dtype=np.float64),
                    version=str(z["version"]),
                    meta=str(z["meta"]),
                )
                stored = str(z["digest"])
        except (OSError, KeyError) as e:
            raise ValueError(f"HELM actor {path}: cannot read it ({e})") from None
        if stored != actor.digest:
            raise ValueError(f"HELM actor {path}: hash {actor.digest} does not match the stored {stored}")
        return actor


@dataclass(slots=True)
class Adapter:
    """Layer 2 for one worker: a residual ``r`` added to the base alpha with an authority that ramps in.

    Each decision moves ``r`` toward the side whose misses cost more in the worker's own window (the
    pressure imbalance ``e = (emb_ms - kv_ms) / (emb_ms + kv_ms)`` in [-1, 1], zero inside ``deadband``):
    ``r <- (1 - leak) r + clip(rate e, +-step_cap)``, then ``|r| <= cap``. The correction applied is
    ``authority x r`` with ``authority = min(1, decisions / ramp)``. It resets (``r = 0``, ramp restarted)
    when the worker's P99 has been more than ``tolerance`` above its reference for ``patience`` decisions in
    a row: the adapter is then trailing the base policy, not helping it. The reference is the P99 when the
    correction (re)started, re-armed whenever the correction is back near zero (``|r|`` below a quarter of
    ``step_cap``) or changes sign: it judges the correction now applied, not an old one."""

    rate: float
    step_cap: float
    cap: float
    leak: float
    deadband: float
    ramp: int
    patience: int
    tolerance: float
    r: float = 0.0
    decisions: int = 0
    reference_p99: float = math.nan
    worse: int = 0
    resets: int = 0

    def correction(self) -> float:
        ramp = self.ramp
        if ramp > 0:
            authority = self.decisions / ramp
            return (authority if authority < 1.0 else 1.0) * self.r  # min(1, decisions / ramp) x r
        return self.r

    def update(self, imbalance: float, p99_ms: float) -> None:
        # Plain float arithmetic, min/max written out (builtin calls cost more than the arithmetic).
        r0, step_cap, reference = self.r, self.step_cap, self.reference_p99
        if abs(r0) < 0.25 * step_cap or not math.isfinite(reference):
            self.reference_p99 = p99_ms  # where the worker stood when the correction (re)started
            self.worse = 0
        elif p99_ms > reference * (1.0 + self.tolerance):
            self.worse = worse = self.worse + 1
            if worse >= self.patience:
                self.r, self.decisions, self.worse = 0.0, 0, 0
                self.reference_p99 = math.nan
                self.resets += 1
                return
        else:
            self.worse = 0
        e = imbalance if abs(imbalance) > self.deadband else 0.0
        step = self.rate * e  # max(-step_cap, min(step_cap, .)), r then max(-cap, min(cap, .)), NaN alike
        step = step if step < step_cap else step_cap
        step = step if step > -step_cap else -step_cap
        cap = self.cap
        r = (1.0 - self.leak) * r0 + step
        r = r if r < cap else cap
        r = r if r > -cap else -cap
        if r * r0 < 0.0:  # the correction turned: judge the new one from here
            self.reference_p99, self.worse = p99_ms, 0
        self.r = r
        self.decisions += 1


@dataclass(slots=True)
class BurstDetector:
    """Two-sided CUSUM on z-scores of several signals against slow EWMA baselines (one worker).

    For each signal ``x``: ``z = (x - mean) / sqrt(var + floor)``, ``S+ = max(0, S+ + z - k)``,
    ``S- = max(0, S- - z - k)``; an alarm when any statistic exceeds ``h``. The baseline (mean, var) is an
    EWMA with weight ``baseline``; it learns only when the caller says the worker is in its normal mode and
    the window raised no alarm (a burst must not become the norm). :meth:`step` restarts the sums after an
    alarm, so a burst that goes on alarms again. ``k`` and ``h`` trade false alarms against detection
    delay: :func:`sim.detector.operating_points` measures both and the defaults come from it
    (docs/controller.md)."""

    k: float
    h: float
    baseline: float
    warmup: int
    floor: float
    mean: list[float] = field(default_factory=list)
    var: list[float] = field(default_factory=list)
    pos: list[float] = field(default_factory=list)
    neg: list[float] = field(default_factory=list)
    seen: int = 0

    def step(self, signals: list[float], *, learn: bool = True) -> bool:
        """One window: :meth:`update`, and the sums restarted if it alarmed."""
        alarm = self.update(signals, learn=learn)
        if alarm:
            self.reset()
        return alarm

    def update(self, signals: list[float], *, learn: bool = True) -> bool:
        """Feed one window's signals; returns whether a change is flagged now."""
        mean = self.mean
        if not mean:
            n = len(signals)
            self.mean, self.var = list(signals), [0.0] * n
            self.pos, self.neg = [0.0] * n, [0.0] * n
            self.seen = 1
            return False
        self.seen = seen = self.seen + 1
        var = self.var
        # plain float arithmetic on a few signals: this runs in every decision
        if seen > self.warmup:
            pos, neg, k, h, floor, sqrt = self.pos, self.neg, self.k, self.h, self.floor, math.sqrt
            alarmed = False
            for i, x in enumerate(signals):
                z = (x - mean[i]) / sqrt(var[i] + floor)
                p = pos[i] + z - k
                q = neg[i] - z - k
                pos[i] = p = p if p > 0.0 else 0.0
                neg[i] = q = q if q > 0.0 else 0.0
                if p > h or q > h:
                    alarmed = True
            if alarmed or not learn:
                return alarmed
            w = self.baseline
        elif learn:
            w = 1.0 / seen
        else:
            return False
        keep = 1.0 - w
        for i, x in enumerate(signals):
            d = x - mean[i]
            mean[i] += w * d
            var[i] = keep * (var[i] + w * d * d)
        return False

    def statistic(self) -> float:
        return max(max(self.pos, default=0.0), max(self.neg, default=0.0))

    def reset(self) -> None:
        """Restart the sums (after an alarm: a burst that goes on raises a new one)."""
        self.pos = [0.0] * len(self.pos)
        self.neg = [0.0] * len(self.neg)

    def rebase(self, signals: list[float]) -> None:
        """Take ``signals`` as the new normal (a change that lasted is no longer a burst)."""
        self.mean = list(signals)
        self.reset()


# The burst detector's defaults: of the operating points `onepool bench detector` measured, the shortest
# detection delay on Burst with at most ~5 false alarms per worker-hour on Steady (docs/controller.md).
CUSUM_K: Final = 1.0
CUSUM_H: Final = 6.0
CUSUM_BASELINE: Final = 0.02  # EWMA weight of the baseline: a 50-window memory
CUSUM_WARMUP: Final = 20  # windows before the sums start (the baseline settles first)
# Added to the baseline's variance: a signal that was flat through the warm-up (variance 0) still gives
# finite z-scores; 1e-4 is a standard deviation of 0.01, 1% of a log rate or a share's hundredth.
CUSUM_FLOOR: Final = 1e-4


class _Mode(enum.Enum):
    """One worker's lifecycle under layer 3."""

    NORMAL = "normal"
    RECOVERY = "recovery"  # a burst: the split held, the adapter frozen
    BLEND = "blend"  # handing back: protective and normal outputs blended


@dataclass(slots=True)
class _WorkerState:
    adapter: Adapter
    detector: BurstDetector
    mode: _Mode = _Mode.NORMAL
    calm: int = 0  # recovery: windows in a row without an alarm
    held: int = 0  # recovery: windows since it took over
    blend: int = 0  # blend: windows since recovery handed back
    protective: float = math.nan  # recovery's alpha


def detector_signals(f: WorkerFeatures) -> list[float]:
    """What the burst detector watches: the log request rate, the hot-user share and the share of history
    tokens computed (new users), the three things the paper's bursts spike."""
    return [math.log1p(f.request_rate), f.hot_user_share, f.new_token_fraction]


# Where observe() holds detector_signals' three values (HelmPolicy.decide takes them from there).
_RATE: Final = FEATURES.index("log_request_rate")
_HOT: Final = FEATURES.index("hot_user_share")
_NEW: Final = FEATURES.index("new_token_fraction")
_NORMAL: Final = _Mode.NORMAL
_RECOVERY: Final = _Mode.RECOVERY
_BLEND: Final = _Mode.BLEND


@dataclass
class HelmPolicy:
    """The three layers for every worker; see the module docstring and docs/controller.md.

    Constants (all overridable as ``helm:key=value``):
    - ``lo``/``hi``: the range the actor's [0, 1] output is mapped onto, the controller's clamp range.
    - adapter: ``adapter_rate`` a twentieth of the clamp's step (0.005: the adapter nudges, the base
      leads; at a fifth, the pressure imbalance, which leans toward KV on the local preset, took trend's
      P99 from the base's 39.8 to 44.0 ms, docs/controller.md), ``adapter_step`` half of that per decision
      (binds beyond an imbalance of 0.5: one window's extreme reading moves it no more than a moderate
      one), ``adapter_cap`` 0.15 (the base stays in charge of the split's range), ``adapter_leak`` 0.05 (an
      unreinforced correction halves in ~14 windows), ``adapter_deadband`` 0.2 (an imbalance within +-20%
      is window-to-window noise), ``adapter_ramp`` 30 decisions (half a minute of 1-s windows before full
      authority), ``adapter_patience`` 10 windows ``adapter_tolerance`` 0.2 above the reference P99 before
      a reset.
    - recovery: the detector's :data:`CUSUM_K`, :data:`CUSUM_H`, :data:`CUSUM_BASELINE`,
      :data:`CUSUM_WARMUP` (a measured operating point); an alarm restarts the sums, so a burst that goes
      on alarms again; ``calm_windows`` 5 windows without an alarm hand back, blended over
      ``blend_windows`` 5; a burst still alarming after ``max_recovery`` 30 windows is taken as the new
      normal (the baseline rebased) and handed back too; the protective action holds the split where the
      burst found the worker (``protect_gain`` 0; a positive gain moves it that much per window toward the
      side whose misses cost more, which measured worse: docs/controller.md).
    """

    actor: Actor
    layers: int = 3
    adapter: bool = True
    recovery: bool = True
    lo: float = DEFAULT_ALPHA_MIN
    hi: float = DEFAULT_ALPHA_MAX
    adapter_rate: float = DEFAULT_MAX_STEP / 20
    adapter_step: float = DEFAULT_MAX_STEP / 40
    adapter_cap: float = 0.15
    adapter_leak: float = 0.05
    adapter_deadband: float = 0.2
    adapter_ramp: int = 30
    adapter_patience: int = 10
    adapter_tolerance: float = 0.2
    cusum_k: float = CUSUM_K
    cusum_h: float = CUSUM_H
    cusum_baseline: float = CUSUM_BASELINE
    cusum_warmup: int = CUSUM_WARMUP
    calm_windows: int = 5
    max_recovery: int = 30
    blend_windows: int = 5
    protect_gain: float = 0.0
    name: str = field(init=False)
    _workers: dict[str, _WorkerState] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layers not in (1, 2, 3):
            raise ValueError(f"helm: layers must be 1, 2 or 3, got {self.layers}")
        if not 0.0 <= self.lo < self.hi <= 1.0:
            raise ValueError(f"helm: need 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"helm: {f.name} must be a finite number >= 0, got {value}")
        for name in ("adapter_patience", "calm_windows", "max_recovery", "blend_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"helm: {name} must be an integer >= 1, got {getattr(self, name)}")
        for name in ("adapter_ramp", "cusum_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"helm: {name} must be an integer >= 0, got {getattr(self, name)}")
        for name in ("adapter_leak", "cusum_baseline"):
            if getattr(self, name) > 1.0:
                raise ValueError(f"helm: {name} is a weight and must be <= 1, got {getattr(self, name)}")
        if self.layers < 2:
            self.adapter = False
        if self.layers < 3:
            self.recovery = False
        options = [f"layers={self.layers}"] if self.layers < 3 else []
        if self.layers >= 2 and not self.adapter:
            options.append("adapter=0")
        if self.layers == 3 and not self.recovery:
            options.append("recovery=0")
        self.name = "helm:" + ",".join(options) if options else "helm"

    @property
    def weights(self) -> str:
        """The actor's version and hash (what the controller logs)."""
        return f"{self.actor.version} sha256:{self.actor.digest}"

    def _state(self, worker_id: str) -> _WorkerState:
        st = self._workers.get(worker_id)
        if st is None:
            st = self._workers[worker_id] = _WorkerState(
                Adapter(
                    rate=self.adapter_rate,
                    step_cap=self.adapter_step,
                    cap=self.adapter_cap,
                    leak=self.adapter_leak,
                    deadband=self.adapter_deadband,
                    ramp=self.adapter_ramp,
                    patience=self.adapter_patience,
                    tolerance=self.adapter_tolerance,
                ),
                BurstDetector(
                    k=self.cusum_k,
                    h=self.cusum_h,
                    baseline=self.cusum_baseline,
                    warmup=self.cusum_warmup,
                    floor=CUSUM_FLOOR,
                ),
            )
        return st

    def _base(self, x: list[float]) -> float:
        """Layer 1: the actor's alpha for the window's features ``x``, in ``[lo, hi]``."""
        a, b = self.actor.beta(x)
        return self.lo + (self.hi - self.lo) * (a / (a + b))

    def decide(self, features: WorkerFeatures, current: float) -> float:
        f = features
        if not (f.request_rate > 0.0 and f.window_ms > 0.0):
            return current  # no traffic: nothing to decide on
        x, imbalance = _observe(f)  # the window priced once, for the actor and the adapter
        if self.layers == 1:
            return self._base(x)
        st = self._workers.get(f.worker_id) or self._state(f.worker_id)
        mode = st.mode
        if self.recovery:
            signals = [x[_RATE], x[_HOT], x[_NEW]]  # detector_signals(f), from the features at hand
            detector = st.detector
            alarm = detector.update(signals, learn=mode is _NORMAL)
            if alarm:
                detector.reset()  # detector.step(), inline
            if mode is _RECOVERY:
                st.held += 1
                st.calm = 0 if alarm else st.calm + 1
                if st.held >= self.max_recovery:
                    detector.rebase(signals)  # it lasted: the new level is the norm
                if st.calm >= self.calm_windows or st.held >= self.max_recovery:
                    mode = st.mode = _BLEND
                    st.blend = 0
            elif alarm:
                mode = st.mode = _RECOVERY
                st.calm, st.held = 0, 0
                st.protective = current
        if mode is _RECOVERY:  # the split held: the actor need not be asked (it keeps no state)
            st.protective = min(self.hi, max(self.lo, st.protective + self.protect_gain * imbalance))
            return st.protective
        normal = self._base(x)
        if self.adapter:
            adapter = st.adapter
            if mode is _NORMAL:
                adapter.update(imbalance, f.p99_latency_ms)  # frozen during recovery and its blend
            normal += adapter.correction()
        if mode is _BLEND:
            st.blend += 1
            w = st.blend / self.blend_windows
            if st.blend >= self.blend_windows:
                st.mode = _NORMAL
            return (1.0 - w) * st.protective + w * normal
        return normal

    def mode(self, worker_id: str) -> str:
        st = self._workers.get(worker_id)
        return st.mode.value if st is not None else _Mode.NORMAL.value


_INT_KEYS: Final = (
    "layers",
    "adapter_ramp",
    "adapter_patience",
    "cusum_warmup",
    "calm_windows",
    "max_recovery",
    "blend_windows",
)
_BOOL_KEYS: Final = ("adapter", "recovery")
HELM_KEYS: Final = tuple(
    f.name for f in fields(HelmPolicy) if f.name not in ("actor", "name") and not f.name.startswith("_")
)


def build_helm(arg: str, weights: str | Path | None = None) -> HelmPolicy:
    """``helm[:key=value,...]`` (keys: :data:`HELM_KEYS`, plus ``weights=PATH``); ValueError names the key."""
    params: dict[str, float | int | bool] = {}
    path: str | Path = weights if weights is not None else DEFAULT_WEIGHTS
    for item in arg.split(",") if arg else []:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "weights" and eq:
            path = value
            continue
        if not eq or key not in HELM_KEYS:
            raise ValueError(
                f"helm: {item.strip()!r} is not key=value with a known key "
                f"({', '.join((*HELM_KEYS, 'weights'))})"
            )
        try:
            if key in _BOOL_KEYS:
                if value not in ("0", "1"):
                    raise ValueError
                params[key] = value == "1"
            elif key in _INT_KEYS:
                params[key] = int(value)
            else:
                params[key] = float(value)
        except ValueError:
            kind = "0 or 1" if key in _BOOL_KEYS else "an integer" if key in _INT_KEYS else "a number"
            raise ValueError(f"helm: {key} must be {kind}, got {value!r}") from None
    if not Path(path).is_file():
        raise ValueError(
            f"helm: no actor weights at {path}; train them with `onepool train-controller` "
            "or pass weights=PATH"
        )
    policy = HelmPolicy(Actor.load(path), **params)  # type: ignore[arg-type]
    if arg:
        policy.name = f"helm:{arg}"  # every key given, so that two variants never share a name in a report
    return policy
