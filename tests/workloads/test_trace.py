"""The trace format: round trip, and every kind of bad line named by its line number and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workloads.trace import TraceFormatError, TraceHeader, TraceRequest, read_trace, write_trace

HEADER = '{"onepool_trace": 1, "num_items": 100, "description": "test"}'
GOOD = '{"t": 0.5, "user_id": "u1", "history": [1, 2], "timestamps": [10, 20], "candidates": [3, 4]}'


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip(tmp_path: Path) -> None:
    reqs = [
        TraceRequest(0.0, "a", np.array([1, 2, 3]), np.array([4, 5]), np.array([7, 8, 9])),
        TraceRequest(0.25, "b", np.array([], dtype=np.int64), np.array([6])),
    ]
    path = tmp_path / "t.jsonl"
    assert write_trace(path, TraceHeader(10, "two requests", {"generator": {"seed": 3}}), reqs) == 2
    trace = read_trace(path)
    assert trace.header == TraceHeader(10, "two requests", {"generator": {"seed": 3}})
    back = list(trace)
    assert [(r.t, r.user_id) for r in back] == [(0.0, "a"), (0.25, "b")]
    assert back[0].history.tolist() == [1, 2, 3]
    assert back[0].timestamps is not None and back[0].timestamps.tolist() == [7, 8, 9]
    assert back[1].timestamps is None
    assert back[1].candidates.tolist() == [6]
    assert json.loads(path.read_text().splitlines()[0])["onepool_trace"] == 1


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("not json", None, "JSON"),
        ('{"t": 1, "history": [], "candidates": [1]}', "user_id", "user_id"),
        ('{"t": "x", "user_id": "u", "history": [], "candidates": [1]}', "t", "float"),
        ('{"t": 1, "user_id": "u", "history": [1, "a"], "candidates": [1]}', "history", "int"),
        ('{"t": 0.1, "user_id": "u", "history": [], "candidates": [1]}', "t", "before"),
        ('{"t": -1, "user_id": "u", "history": [], "candidates": [1]}', "t", ">= 0"),
        ('{"t": 1, "user_id": "", "history": [], "candidates": [1]}', "user_id", "empty"),
        ('{"t": 1, "user_id": "u", "history": [], "candidates": []}', "candidates", "empty"),
        ('{"t": 1, "user_id": "u", "history": [100], "candidates": [1]}', "history", "outside"),
        ('{"t": 1, "user_id": "u", "history": [1], "candidates": [-1]}', "candidates", "outside"),
        (
            '{"t": 1, "user_id": "u", "history": [1], "timestamps": [], "candidates": [1]}',
            "timestamps",
            "entries",
        ),
        ('{"t": 1, "user_id": "u", "history": [], "candidates": [1], "extra": 1}', "extra", "unknown"),
    ],
)
def test_a_bad_line_is_named(tmp_path: Path, line: str, field: str | None, words: str) -> None:
    path = _write(tmp_path, HEADER, GOOD, "", line)
    with pytest.raises(TraceFormatError) as info:
        list(read_trace(path))
    assert info.value.line == 4
    assert info.value.field == field
    assert words.lower() in str(info.value).lower()
    assert f"{path}:4" in str(info.value)


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ('{"onepool_trace": 2, "num_items": 5}', "onepool_trace"),
        ('{"num_items": 5}', "onepool_trace"),
        ('{"onepool_trace": 1, "num_items": 0}', "num_items"),
        ('{"onepool_trace": 1, "num_items": 5, "description": 3}', "description"),
        ("[1]", None),
    ],
)
def test_a_bad_header_is_named(tmp_path: Path, header: str, field: str | None) -> None:
    with pytest.raises(TraceFormatError) as info:
        read_trace(_write(tmp_path, header, GOOD))
    assert (info.value.line, info.value.field) == (1, field)


def test_an_empty_file_and_a_missing_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TraceFormatError, match="empty file"):
        read_trace(empty)
    with pytest.raises(FileNotFoundError, match="cannot read trace"):
        read_trace(tmp_path / "nope.jsonl")


def test_the_writer_refuses_time_going_backwards(tmp_path: Path) -> None:
    reqs = [
        TraceRequest(1.0, "a", np.array([1]), np.array([1])),
        TraceRequest(0.5, "a", np.array([1]), np.array([1])),
    ]
    with pytest.raises(ValueError, match="must not decrease"):
        write_trace(tmp_path / "t.jsonl", TraceHeader(5), reqs)
