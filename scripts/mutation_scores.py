"""Per-module mutation score from the result files mutmut leaves under mutants/ (run from the repo root).

    python scripts/mutation_scores.py    a Markdown table: killed, survived, timeout, no tests per module

Reads mutants/**/*.py.meta (mutmut 3.x: ``exit_code_by_key`` maps each mutant to its test run's exit code).
The score is (killed + timeout) / (killed + survived + timeout): mutants that no selected test reaches are
listed under "no tests" and left out of it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# exit codes as mutmut 3.x records them (mutmut/stats.py)
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not checked",
}
COLUMNS = ("killed", "survived", "timeout", "no tests", "not checked", "other")


def row(name: str, c: Counter[str]) -> str:
    tested = c["killed"] + c["survived"] + c["timeout"]
    score = f"{100 * (c['killed'] + c['timeout']) / tested:.1f}%" if tested else "-"
    return f"| `{name}` | {sum(c.values())} | " + " | ".join(str(c[k]) for k in COLUMNS) + f" | {score} |"


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/: run `make mutation` first", file=sys.stderr)
        return 1
    print("| module | mutants | " + " | ".join(COLUMNS) + " | score |")
    print("|---|" + "---:|" * (len(COLUMNS) + 2))
    total: Counter[str] = Counter()
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        c = Counter(STATUS.get(code, "other") for code in codes.values())
        total += c
        print(row(str(meta.relative_to(root)).removesuffix(".meta"), c))
    print(row("total", total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
