"""The latency SLO every part of onepool assumes unless told otherwise (pure: no imports).

The workers count their digests' SLO violations against it (``ONEPOOL_WORKER_SLO_MS``), the simulator and
the benches score SLO satisfaction against it, and it is one of the latency histograms' bucket bounds
(``shared.metrics.LATENCY_SECONDS_BUCKETS``), so the dashboards can read "answered within the SLO" exactly.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_SLO_MS"]

# Receipt to reply, in milliseconds.
DEFAULT_SLO_MS: Final = 50.0
