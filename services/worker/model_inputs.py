"""Writes a worker's model input files (docs/model-inputs.md): a host embedding table and an HSTU checkpoint,
from seeds, for `onepool make-inputs`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.worker.hstu import HSTU
from services.worker.model_config import TABLE_DTYPES, HSTUConfig, preset_name
from services.worker.storage import HostEmbeddingTable

__all__ = ["WrittenFile", "sha256_of", "write_checkpoint", "write_table"]

_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class WrittenFile:
    """One file written: where, what it holds (one line), its size and its SHA-256."""

    path: Path
    what: str
    nbytes: int
    sha256: str

    def describe(self) -> str:
        return f"{self.path}: {self.what}, {self.nbytes} bytes, sha256 {self.sha256}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file in the same directory, then rename it over `path`: a worker never reads
    half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would keep a worker running as another user from reading it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(path: Path, *, num_items: int, model: HSTUConfig, seed: int, dtype: str) -> WrittenFile:
    """A .npy table [num_items, model.item_dim] of `dtype`: the worker's synthetic rows of `seed` (so a
    worker serving the file serves what one with no file and that seed does, up to float16 rounding).
    Holds the whole table in memory while writing."""
    if dtype not in TABLE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TABLE_DTYPES)}, got {dtype!r}")
    if path.suffix != ".npy":
        raise ValueError(f"a table file must end in .npy, got {path}")
    rows = HostEmbeddingTable(num_items, model.item_dim, seed=seed, pin=False).table.numpy()
    array = rows.astype(dtype, copy=False)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would add .npy to a name
            np.save(f, array, allow_pickle=False)

    _write_atomically(path, write)
    return WrittenFile(path, f"shape {list(array.shape)} {dtype}", path.stat().st_size, sha256_of(path))


def write_checkpoint(path: Path, *, model: HSTUConfig, seed: int) -> WrittenFile:
    """An HSTU checkpoint (`HSTU.save`'s format) of `model` with the seeded random weights of `seed`."""
    _write_atomically(path, HSTU(model, seed=seed).save)
    what = f"model preset {preset_name(model)}, seeded weights (seed={seed})"
    return WrittenFile(path, what, path.stat().st_size, sha256_of(path))
