"""What every `onepool bench ...` does at the end: write the JSON report (with the machine's reference
timings beside the figures) and print its summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

# The shared reference timings (numpy only): the same code runs 2-3x slower on one VM than on another, so
# every report carries these, taken in the same run, to compare absolute figures across machines as ratios.
# Beside the checkout by default (../shared/tools/machine_ref.py); ONEPOOL_MACHINE_REF names another file.
MACHINE_REF = Path(__file__).resolve().parents[2] / "shared" / "tools" / "machine_ref.py"


def machine_ref() -> dict[str, Any]:
    """`measure()` of the machine_ref file, or why there is none."""
    path = Path(os.environ.get("ONEPOOL_MACHINE_REF", MACHINE_REF))
    spec = importlib.util.spec_from_file_location("machine_ref", path) if path.is_file() else None
    if spec is None or spec.loader is None:
        return {"unavailable": f"no reference timings: {path} not found"}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    timings: dict[str, Any] = module.measure()
    return timings


def json_safe(value: Any) -> Any:
    """The value with every NaN or infinity (not JSON) replaced by null, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_report(json_path: str, report: dict[str, Any], summary: str) -> None:
    """Write the report with its machine reference timings: measured here unless it carries them already
    (a bench that also shows them elsewhere, e.g. in its --report markdown, measures them once)."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "machine_ref" not in report:
        report = {**report, "machine_ref": machine_ref()}
    report = json_safe(report)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(summary)
    print(f"wrote {path}")
