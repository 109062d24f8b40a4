"""End-to-end tests run the `LocalCluster` that `onepool up` runs, on free ports, each child logging to a
file of the test's directory; a few helpers read the gateway the way a client does."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from services.localcluster import ClusterSettings, GatewaySpec
from tests.helpers import free_port

# Small and quick: tiny model, small pool, fast digests so that liveness and affinity show within seconds.
WORKER_ENV = {
    "ONEPOOL_WORKER_MODEL": "tiny",
    "ONEPOOL_WORKER_NUM_ITEMS": "20000",
    "ONEPOOL_WORKER_BUDGET_MIB": "8",
    "ONEPOOL_WORKER_CHUNK_KIB": "64",
    "ONEPOOL_WORKER_DIGEST_MS": "100",
    "ONEPOOL_WORKER_LINK_LATENCY_US": "1",
}
CACHESTATE_ENV = {"ONEPOOL_CACHESTATE_DEAD_AFTER_PERIODS": "3"}


def cluster_settings(
    workdir: Path,
    *,
    gateways: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    worker_env: Mapping[str, str] | None = None,
    cachestate_env: Mapping[str, str] | None = None,
    controller_env: Mapping[str, str] | None = None,
) -> ClusterSettings:
    """A test cluster of 2 workers and a static:0.5 controller: `gateways` maps replica names to routing
    policies (default one joint "g0"); the envs add to the children's environments."""
    specs = tuple(
        GatewaySpec(name=name, port=free_port(), routing=routing)
        for name, routing in (gateways or {"g0": "joint"}).items()
    )
    return ClusterSettings(
        workers=2,
        nats_port=free_port(),
        gateways=specs,
        alpha_policy="static:0.5",
        env=dict(env or {}),
        worker_env={**WORKER_ENV, **(worker_env or {})},
        cachestate_env={**CACHESTATE_ENV, **(cachestate_env or {})},
        controller_env=dict(controller_env or {}),
        log_dir=workdir,
        ready_timeout_s=120.0,
    )


async def readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """The gateway's /readyz: (status, body); (0, {}) when it does not answer."""
    try:
        async with http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status, await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}
