"""What every `onepool bench ...` does at the end: write the JSON report and print its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(json_path: str, report: dict[str, Any], summary: str) -> None:
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(summary)
    print(f"wrote {path}")
