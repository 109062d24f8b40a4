"""Model input files (docs/model-inputs.md): a real engine serves the rows of its table file and the weights
of its checkpoint, and refuses at start-up, with the file, what it found and what it expected, files that do
not fit its model preset."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.worker.engine import Engine, EngineConfig
from services.worker.errors import CheckpointError, EmbeddingTableError, ModelInputError
from services.worker.hstu import HSTU, PRESETS
from services.worker.model_inputs import sha256_of, write_checkpoint, write_table
from services.worker.service import engine_config_from
from services.worker.settings import DEFAULT_NUM_ITEMS
from services.worker.storage import LinkSpec
from services.worker.validation import PreparedRequest
from tests.worker.harness import SETTINGS

TINY = PRESETS["tiny"]
ITEMS = 300
ROOT = Path(__file__).resolve().parents[2]
TABLE_VAR = "ONEPOOL_WORKER_EMBEDDING_TABLE"


def config(**overrides: Any) -> EngineConfig:
    cfg = EngineConfig(
        model=TINY,
        num_items=None,
        budget_bytes=2 * 1024 * 1024,
        chunk_bytes=64 * 1024,
        page_tokens=16,
        alpha=0.5,
        link=LinkSpec(latency_us=0.0),
        seed=5,
    )
    return replace(cfg, **overrides)


def request(items: np.ndarray) -> PreparedRequest:
    history, candidates = items[:20], items[20:]
    return PreparedRequest(
        request_id="r",
        user_id="alice",
        history=history,
        timestamps=np.arange(len(history), dtype=np.int64) * 60,
        candidates=candidates,
        k=len(candidates),
    )


def scores(engine: Engine, items: np.ndarray) -> list[float]:
    out = engine.serve(request(items))
    return [s for _, s in sorted(zip(out.items, out.scores, strict=True))]


@pytest.fixture
def table_file(tmp_path: Path) -> Path:
    path = tmp_path / "table.npy"
    write_table(path, num_items=ITEMS, model=TINY, seed=5, dtype="float32")
    return path


@pytest.mark.parametrize(
    ("dtype", "order"), [("float32", "C"), ("float16", "C"), (">f4", "C"), ("float32", "F")]
)
def test_engine_gathers_the_rows_of_its_table_file(tmp_path: Path, dtype: str, order: str) -> None:
    path = tmp_path / "table.npy"
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((ITEMS, TINY.item_dim)).astype(dtype, order=order)  # big-endian, Fortran
    np.save(path, rows)
    engine = Engine(config(embedding_table=str(path)))
    try:
        assert engine.num_items == ITEMS and engine.limits.num_items == ITEMS  # the file's row count
        assert engine.table.table.dtype == torch.float32
        items = rng.permutation(ITEMS)[:64].astype(np.int64)
        want = rows[items].astype(np.float32)
        first, missed = engine.embeddings(items)  # misses: over the host link from the file's rows
        assert missed.all() and np.array_equal(first.numpy(), want)
        again, missed = engine.embeddings(items)  # now hits: the rows the pool cached from the file
        assert missed.sum() < len(items) and np.array_equal(again.numpy(), want)
        engine.serve(request(items))  # and serves requests over them
    finally:
        engine.stop()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_table_file_is_pinned_for_a_cuda_pool(tmp_path: Path) -> None:
    path = tmp_path / "table.npy"
    rows = np.random.default_rng(4).standard_normal((ITEMS, TINY.item_dim)).astype(np.float16)
    np.save(path, rows)
    engine = Engine(config(embedding_table=str(path), device="cuda"))
    try:
        assert engine.table.table.is_pinned() and not engine.link.emulated
        items = np.arange(0, ITEMS, 3, dtype=np.int64)
        gathered, _ = engine.embeddings(items)
        assert gathered.is_cuda and np.array_equal(gathered.cpu().numpy(), rows[items].astype(np.float32))
    finally:
        engine.stop()


def test_a_table_file_written_from_a_seed_serves_as_the_synthetic_table_of_that_seed(
    table_file: Path,
) -> None:
    from_file = Engine(config(embedding_table=str(table_file)))
    synthetic = Engine(config(num_items=ITEMS))
    try:
        assert torch.equal(from_file.table.table, synthetic.table.table)
        items = np.random.default_rng(2).permutation(ITEMS)[:40].astype(np.int64)
        assert scores(from_file, items) == scores(synthetic, items)
    finally:
        from_file.stop()
        synthetic.stop()


def test_num_items_is_the_files_and_another_explicit_count_is_refused(table_file: Path) -> None:
    Engine(config(embedding_table=str(table_file), num_items=ITEMS)).stop()  # the same count: fine
    with pytest.raises(EmbeddingTableError) as info:
        Engine(config(embedding_table=str(table_file), num_items=ITEMS + 1))
    err = info.value
    assert (err.path, err.field) == (str(table_file), TABLE_VAR)
    assert err.found == f"shape [{ITEMS}, 32]"
    assert err.expected == f"shape [{ITEMS + 1}, 32 (item_dim of model preset tiny)]"


def test_worker_settings_leave_num_items_to_the_table_file(table_file: Path) -> None:
    assert SETTINGS.num_items is not None  # the harness sets its own
    unset = replace(SETTINGS, num_items=None)
    assert engine_config_from(unset).num_items == DEFAULT_NUM_ITEMS  # the synthetic table's catalogue
    cfg = engine_config_from(replace(unset, embedding_table=str(table_file)))
    assert (cfg.num_items, cfg.embedding_table) == (None, str(table_file))
    explicit = engine_config_from(replace(SETTINGS, embedding_table=str(table_file)))
    assert explicit.num_items == SETTINGS.num_items  # checked against the file by the engine


def _save(path: Path, value: np.ndarray | bytes) -> Path:
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        np.save(path, value, allow_pickle=True)  # an object array too: the worker must refuse it
    return path


NAN_ROWS = np.zeros((ITEMS, 32), dtype=np.float32)
NAN_ROWS[7, 3] = np.nan


@pytest.mark.parametrize(
    ("name", "value", "found", "expected"),
    [
        ("wide.npy", np.zeros((ITEMS, 64), np.float32), "shape [300, 64]", "shape [300, 32 (item_dim of "),
        ("flat.npy", np.zeros(ITEMS * 32, np.float32), "shape [9600]", "shape [num_items, 32 "),
        ("empty.npy", np.zeros((0, 32), np.float32), "shape [0, 32]", "shape [num_items, 32 "),
        ("double.npy", np.zeros((ITEMS, 32), np.float64), "float64", "float32 or float16"),
        ("ints.npy", np.zeros((ITEMS, 32), np.int32), "int32", "float32 or float16"),
        ("nan.npy", NAN_ROWS, "non-finite values", "finite"),
        ("table.bin", b"\0" * 64, ".bin", ".npy or .pt"),
        ("objects.npy", np.array([1, "a"], dtype=object), None, None),
        ("truncated.npy", b"\x93NUMPY", None, None),
    ],
)
def test_a_table_that_does_not_fit_is_refused_at_start_up(
    tmp_path: Path, name: str, value: Any, found: str | None, expected: str | None
) -> None:
    path = _save(tmp_path / name, value)
    with pytest.raises(EmbeddingTableError) as info:
        Engine(config(embedding_table=str(path)))
    err = info.value
    assert (err.path, err.field, err.code, err.found) == (str(path), TABLE_VAR, "bad_embedding_table", found)
    assert (expected is None) == (err.expected is None)
    assert expected is None or expected in (err.expected or "")
    assert str(path) in str(err)


def test_a_table_in_a_pt_file_is_checked_the_same(tmp_path: Path) -> None:
    good, wide, half = tmp_path / "good.pt", tmp_path / "wide.pt", tmp_path / "half.pt"
    torch.save(torch.ones(ITEMS, 32), good)
    torch.save(torch.ones(ITEMS, 16), wide)
    torch.save(torch.ones(ITEMS, 32, dtype=torch.bfloat16), half)
    engine = Engine(config(embedding_table=str(good)))
    engine.stop()
    assert engine.num_items == ITEMS and bool((engine.table.table == 1).all())
    with pytest.raises(EmbeddingTableError) as info:
        Engine(config(embedding_table=str(wide)))
    assert info.value.found == "shape [300, 16]"
    with pytest.raises(EmbeddingTableError) as info:
        Engine(config(embedding_table=str(half)))
    assert info.value.found == "bfloat16"
    torch.save({"table": torch.ones(ITEMS, 32)}, good)
    with pytest.raises(EmbeddingTableError) as info:
        Engine(config(embedding_table=str(good)))
    assert info.value.found == "dict"


def test_engine_loads_its_checkpoint(tmp_path: Path, table_file: Path) -> None:
    path = tmp_path / "hstu.pt"
    write_checkpoint(path, model=TINY, seed=11)
    loaded = Engine(config(embedding_table=str(table_file), checkpoint=str(path)))
    seeded = Engine(config(embedding_table=str(table_file), seed=11))  # the same weights, drawn here
    other = Engine(config(embedding_table=str(table_file)))  # seed 5
    try:
        assert loaded.model_source == f"checkpoint {path}"
        items = np.random.default_rng(3).permutation(ITEMS)[:40].astype(np.int64)
        assert scores(loaded, items) == scores(seeded, items) != scores(other, items)
    finally:
        for engine in (loaded, seeded, other):
            engine.stop()


def test_a_checkpoint_of_another_preset_is_refused_naming_what_differs(tmp_path: Path) -> None:
    path = tmp_path / "bench.pt"
    write_checkpoint(path, model=PRESETS["bench"], seed=0)
    with pytest.raises(CheckpointError) as info:
        Engine(config(checkpoint=str(path), num_items=ITEMS))
    err = info.value
    assert (err.path, err.field, err.code) == (str(path), "ONEPOOL_WORKER_CHECKPOINT", "bad_checkpoint")
    assert err.found == "item_dim=64, d_model=128, n_layers=4, n_heads=4"
    assert err.expected == "item_dim=32, d_model=64, n_layers=2, n_heads=2"
    assert "bench" in err.problem and "tiny" in err.problem


def test_a_checkpoint_with_bad_parameters_is_refused_naming_the_parameter(tmp_path: Path) -> None:
    path = tmp_path / "hstu.pt"
    HSTU(TINY).save(path)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["score_head.weight"][0, 1] = float("inf")
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        HSTU.create(TINY, checkpoint=path, seed=0, device="cpu")
    assert "score_head.weight" in info.value.problem and info.value.found == "non-finite values"
    blob["state_dict"]["score_head.weight"] = torch.zeros(2, 64)
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        HSTU.create(TINY, checkpoint=path, seed=0, device="cpu")
    assert "score_head.weight" in info.value.problem
    assert (info.value.found, info.value.expected) == ("[2, 64]", "[1, 64]")
    del blob["state_dict"]["score_head.bias"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        HSTU.create(TINY, checkpoint=path, seed=0, device="cpu")
    assert "score_head.bias" in info.value.problem
    with pytest.raises(CheckpointError) as info:
        HSTU.create(TINY, checkpoint=tmp_path / "missing.pt", seed=0, device="cpu")
    assert info.value.path == str(tmp_path / "missing.pt")


def test_write_table_reports_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    written = write_table(path, num_items=10, model=PRESETS["bench"], seed=0, dtype="float16")
    assert written.what == "shape [10, 64] float16"
    assert (written.nbytes, written.sha256) == (path.stat().st_size, sha256_of(path))
    assert np.load(path).shape == (10, 64) and [p.name for p in tmp_path.iterdir()] == ["t.npy"]
    with pytest.raises(ValueError, match="dtype"):
        write_table(path, num_items=10, model=TINY, seed=0, dtype="float64")


def test_worker_refuses_a_bad_table_at_start_up_with_the_exit_code_of_bad_settings(
    nats_server: Any, tmp_path: Path
) -> None:
    path = _save(tmp_path / "wide.npy", np.zeros((ITEMS, 64), np.float32))
    env = {
        **os.environ,
        "ONEPOOL_WORKER_NATS_URL": nats_server.url,
        "ONEPOOL_WORKER_DEVICE": "cpu",
        TABLE_VAR: str(path),
    }
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "worker"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert str(path) in run.stderr and TABLE_VAR in run.stderr


def test_model_input_errors_are_client_errors() -> None:
    err = EmbeddingTableError("/models/t.npy", "its rows have the wrong width", found="a", expected="b")
    assert isinstance(err, ModelInputError) and err.kind == "client"
    assert err.to_dict()["field"] == TABLE_VAR
    assert str(err) == "embedding table /models/t.npy: its rows have the wrong width (found a, expected b)"
