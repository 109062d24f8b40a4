"""The optional parts of onepool (the extras of pyproject.toml) and how a command asks for one.

The control plane (gateway, cachestate, controller) runs on the core dependencies alone. A command that
needs more names its extra, either up front (`require_extra`: found, not imported, before anything slow
starts) or around its imports (`extra_imports`), so that a missing extra ends in one line, "install
onepool[worker]", and exit code 2 (`onepool up` gives such a child up at once), never in a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from shared.errors import MissingExtra

# Extra -> the top-level modules it brings; tests/test_extras.py keeps this in step with pyproject.toml.
EXTRAS: Final[Mapping[str, tuple[str, ...]]] = {
    "worker": ("torch",),
    "train": ("torch", "gymnasium"),
    "plots": ("matplotlib",),
}


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # an import hook refused it
        return True
    except ValueError:  # already imported, without a spec (only a module made by hand): there
        return False


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtra for the first module of `extra` that cannot be found; `what` is the command that
    needs it ("onepool worker")."""
    for module in EXTRAS[extra]:
        if _absent(module):
            raise MissingExtra(what, extra, module)


@contextmanager
def extra_imports(extra: str, what: str) -> Iterator[None]:
    """Turn the ModuleNotFoundError of one of `extra`'s modules, raised in the block, into MissingExtra when
    that module is not installed (any other import error goes through unchanged, a part missing inside an
    installed torch too: a broken install, not a missing extra)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0]
        if module not in EXTRAS[extra] or not _absent(module):
            raise
        raise MissingExtra(what, extra, module) from exc
