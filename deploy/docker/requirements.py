"""Print the requirement lines of pyproject.toml's dependencies plus the given extras, one a line.

    python requirements.py PYPROJECT [EXTRA ...]

The image builds install these before the code is copied (deploy/docker/Dockerfile), so that the layer of
dependencies is rebuilt only when pyproject.toml changes. Standard library only (Python >= 3.11: tomllib).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Sequence


def requirement_lines(pyproject: str, extras: Sequence[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    lines = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject} has no extra {extra!r} (it has {', '.join(sorted(optional))})")
        lines += [line for line in optional[extra] if line not in lines]
    return lines


def main(argv: Sequence[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    print("\n".join(requirement_lines(argv[0], argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
