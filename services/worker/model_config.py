"""HSTU model sizes: the configuration and its presets, without torch (the simulator and the presets of
`workloads/` size pools from them; `services/worker/hstu.py` builds the model)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = [
    "F32",
    "PRESETS",
    "TABLE_DTYPES",
    "TABLE_SUFFIXES",
    "HSTUConfig",
    "emb_entry_bytes",
    "kv_bytes_per_token",
    "preset_name",
]

F32 = 4  # bytes per float32: the pool stores embedding rows and K/V in float32
# Host embedding table files (docs/model-inputs.md): their suffixes and value types (the first: the default).
TABLE_SUFFIXES = (".npy", ".pt")
TABLE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class HSTUConfig:
    """Sizes of the model.  ``kv_width = n_heads * head_dim`` floats of K (and of V) per token per layer."""

    item_dim: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    head_dim: int = 32
    max_history: int = 1024
    time_buckets: int = 32

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_width(self) -> int:
        return self.n_heads * self.head_dim

    def validate(self) -> None:
        """Raise ValueError naming every field that is not a positive integer."""
        bad = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad.append(f"{f.name}={value!r}")
        if bad:
            raise ValueError(f"HSTUConfig sizes must be positive integers; got {', '.join(bad)}")


# Presets.
#  tiny:  tests and quick runs.
#  bench: a CPU size where an uncached 1024-token history costs tens of milliseconds.
#  paper: a GPU size close to a published HSTU ranking model: d_model 512 with 4 heads of 128
#         (attention_dim = hidden_dim = 128), the DLRM-HSTU ranking configuration of Meta's
#         generative-recommenders as mirrored by alibaba/TorchEasyRec's dlrm_hstu example
#         (embedding_dim 512, num_heads 4, hidden_dim 128, attention_dim 128).  The HSTU paper
#         (arXiv 2402.17152) evaluates sequences up to 8192 long and does not publish its production
#         depth; n_layers 8, item_dim 256 and max_history 4096 are our choices for a one-GPU model.
PRESETS: dict[str, HSTUConfig] = {
    "tiny": HSTUConfig(),
    "bench": HSTUConfig(item_dim=64, d_model=128, n_layers=4, n_heads=4, head_dim=32, max_history=1024),
    "paper": HSTUConfig(item_dim=256, d_model=512, n_layers=8, n_heads=4, head_dim=128, max_history=4096),
}


def preset_name(cfg: HSTUConfig) -> str:
    """The name of the preset `cfg` is, for messages ("custom" when it is none of them)."""
    return next((name for name, preset in PRESETS.items() if preset == cfg), "custom")


def emb_entry_bytes(cfg: HSTUConfig) -> int:
    """Bytes of one item's embedding row in the pool."""
    return cfg.item_dim * F32


def kv_bytes_per_token(cfg: HSTUConfig) -> int:
    """Bytes of one history token's K and V over every layer in the pool."""
    return cfg.n_layers * 2 * cfg.kv_width * F32
