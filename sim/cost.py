"""Cost profiles: what the simulator charges a worker's model thread for a batch.

    batch_ms = batch_fixed_ms + sum over requests of (request_ms + ms_per_new_token * new_tokens
               + ms_per_cached_token * cached_tokens + ms_per_candidate * candidates
               + ms_per_emb_miss * emb_misses)

plus ``tick_ms_per_chunk`` per chunk a reallocation tick moves (the relocation copies, between batches) and,
in naive refill mode, the synchronous refill's bytes at ``link_gbps``. ``overhead_ms`` is added to every
request's latency outside the model (gateway, bus, reply). The counts are what the real caches said for the
request (:mod:`services.worker.core.batch`). A profile is a JSON object with these keys plus ``name`` and
``source``: ``onepool calibrate`` measures one on this machine; ``sim/profiles/`` ships ``cpu`` (measured
here, the command in its ``source``) and ``a100`` (derived from public figures, see its ``source``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["PROFILE_DIR", "CostProfile", "load_profile"]

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class CostProfile:
    name: str
    source: str
    batch_fixed_ms: float
    request_ms: float
    ms_per_new_token: float
    ms_per_cached_token: float
    ms_per_candidate: float
    ms_per_emb_miss: float
    tick_ms_per_chunk: float
    link_gbps: float
    overhead_ms: float

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if f.type == "float" and not getattr(self, f.name) >= 0]
        if bad or not self.link_gbps > 0:
            raise ValueError(
                f"cost profile {self.name!r}: {', '.join(bad) or 'link_gbps'} must be >= 0 (> 0)"
            )

    def request_cost_ms(self, new_tokens: int, cached_tokens: int, candidates: int, emb_misses: int) -> float:
        return (
            self.request_ms
            + self.ms_per_new_token * new_tokens
            + self.ms_per_cached_token * cached_tokens
            + self.ms_per_candidate * candidates
            + self.ms_per_emb_miss * emb_misses
        )

    def transfer_ms(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9) * 1e3

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any], *, where: str = "cost profile") -> CostProfile:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - raw.keys())
        if missing:
            raise ValueError(f"{where}: missing keys {', '.join(missing)}")
        try:
            numbers = {k: float(raw[k]) for k in names - {"name", "source"}}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: every key but name and source must be a number") from None
        return cls(name=str(raw["name"]), source=str(raw["source"]), **numbers)


def load_profile(spec: str) -> CostProfile:
    """A shipped profile by name (``cpu``, ``a100``) or a JSON file written by ``onepool calibrate``."""
    path = PROFILE_DIR / f"{spec}.json" if "/" not in spec and not spec.endswith(".json") else Path(spec)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.json")))
        raise ValueError(f"cost profile {spec!r}: no such file (shipped profiles: {shipped})")
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and "profile" in raw:  # a calibration report: the profile is one key of it
        raw = raw["profile"]
    if not isinstance(raw, dict):
        raise ValueError(f"cost profile {path}: expected a JSON object")
    return CostProfile.from_json(raw, where=f"cost profile {path}")
