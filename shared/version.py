"""The installed onepool's version: one source, the package metadata (pyproject.toml's `version`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def onepool_version() -> str:
    """``0+unknown`` when the code runs from a checkout that was never installed."""
    try:
        return version("onepool")
    except PackageNotFoundError:
        return "0+unknown"
