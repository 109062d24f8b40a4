"""The trace file format, version 1 (JSON Lines), written once for every reader and writer.

Line 1 is a header ``{"onepool_trace": 1, "num_items": int, "description": str}`` (extra keys are kept
in ``TraceHeader.extra``: the generators record their parameters there). Every further non-empty line is
one request ``{"t": float, "user_id": str, "history": [int], "timestamps": [int] (optional, same length as
history), "candidates": [int]}``; ``t`` is seconds from the start of the trace and never decreases. Item
ids lie in ``[0, num_items)``. A bad line raises :class:`TraceFormatError` naming its line number (1-based)
and field. docs/trace-format.md is the user's description of this format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "TRACE_VERSION",
    "TraceFormatError",
    "TraceHeader",
    "TraceRequest",
    "TraceWriter",
    "read_trace",
    "write_trace",
]

TRACE_VERSION = 1

I64 = npt.NDArray[np.int64]


class TraceFormatError(ValueError):
    """A trace that breaks the format: the line (1-based) and the field at fault, with a message."""

    def __init__(self, path: str, line: int, field_name: str | None, message: str) -> None:
        where = f"{path}:{line}" + (f": field {field_name!r}" if field_name else "")
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.field = field_name
        self.message = message


@dataclass(frozen=True, slots=True)
class TraceHeader:
    num_items: int
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the generator's parameters

    def to_json(self) -> dict[str, Any]:
        return {
            "onepool_trace": TRACE_VERSION,
            "num_items": self.num_items,
            "description": self.description,
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload: what a client POSTs at ``t`` seconds from the start."""

    t: float
    user_id: str
    history: I64
    candidates: I64
    timestamps: I64 | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "t": round(self.t, 6),
            "user_id": self.user_id,
            "history": self.history.tolist(),
        }
        if self.timestamps is not None:
            out["timestamps"] = self.timestamps.tolist()
        out["candidates"] = self.candidates.tolist()
        return out

    def body(self) -> dict[str, Any]:
        """The gateway's POST /v1/recommend body for this request."""
        out = self.to_json()
        del out["t"]
        return out


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    t: float
    user_id: str
    history: list[int]
    candidates: list[int]
    timestamps: list[int] | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_encoder = msgspec.json.Encoder()


def _field_of(message: str) -> str | None:
    """msgspec's 'at `$.history[3]`' (or 'missing required field `t`') -> 'history'."""
    if "`$." in message:
        rest = message.split("`$.", 1)[1]
        name = rest.split("`", 1)[0]
        return name.split("[", 1)[0].split(".", 1)[0]
    if "field `" in message:
        return message.split("field `", 1)[1].split("`", 1)[0]
    return None


def _parse_header(path: str, text: str) -> TraceHeader:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, 1, None, f"header is not JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise TraceFormatError(path, 1, None, "header must be a JSON object")
    version = raw.pop("onepool_trace", None)
    if version != TRACE_VERSION:
        raise TraceFormatError(
            path, 1, "onepool_trace", f"expected version {TRACE_VERSION}, got {version!r} (is this a trace?)"
        )
    num_items = raw.pop("num_items", None)
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise TraceFormatError(path, 1, "num_items", f"must be an integer >= 1, got {num_items!r}")
    description = raw.pop("description", "")
    if not isinstance(description, str):
        raise TraceFormatError(path, 1, "description", f"must be a string, got {description!r}")
    return TraceHeader(num_items=num_items, description=description, extra=raw)


def _check_items(path: str, line: int, name: str, values: list[int], num_items: int) -> I64:
    arr = np.asarray(values, dtype=np.int64)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_items):
        bad = int(arr[(arr < 0) | (arr >= num_items)][0])
        raise TraceFormatError(path, line, name, f"item id {bad} outside [0, {num_items})")
    return arr


def _parse_request(path: str, line: int, text: str, header: TraceHeader, last_t: float) -> TraceRequest:
    try:
        raw = _line_decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise TraceFormatError(path, line, _field_of(str(exc)), str(exc)) from None
    except msgspec.DecodeError as exc:
        raise TraceFormatError(path, line, None, f"not a JSON object: {exc}") from None
    if not math.isfinite(raw.t) or raw.t < 0:
        raise TraceFormatError(path, line, "t", f"must be a finite number >= 0, got {raw.t}")
    if raw.t < last_t:
        raise TraceFormatError(path, line, "t", f"{raw.t} is before the previous request's {last_t}")
    if not raw.user_id:
        raise TraceFormatError(path, line, "user_id", "must not be empty")
    if not raw.candidates:
        raise TraceFormatError(path, line, "candidates", "must not be empty")
    history = _check_items(path, line, "history", raw.history, header.num_items)
    candidates = _check_items(path, line, "candidates", raw.candidates, header.num_items)
    timestamps = None
    if raw.timestamps is not None:
        if len(raw.timestamps) != len(raw.history):
            raise TraceFormatError(
                path,
                line,
                "timestamps",
                f"has {len(raw.timestamps)} entries, history has {len(raw.history)}",
            )
        timestamps = np.asarray(raw.timestamps, dtype=np.int64)
    return TraceRequest(raw.t, raw.user_id, history, candidates, timestamps)


@dataclass
class Trace:
    """A trace being read: its header, then its requests (lazily, validated line by line)."""

    path: str
    header: TraceHeader
    _lines: Generator[tuple[int, str]]

    def __iter__(self) -> Iterator[TraceRequest]:
        """The requests, once; the file is closed at the end, on the first bad line, or when the caller
        stops early."""
        last_t = 0.0
        try:
            for number, text in self._lines:
                if not text.strip():
                    continue
                req = _parse_request(self.path, number, text, self.header, last_t)
                last_t = req.t
                yield req
        finally:
            self._lines.close()


def read_trace(path: str | Path) -> Trace:
    """Open a trace and check its header; iterating it reads and checks the requests one line at a time."""
    p = Path(path)
    try:
        handle = p.open("r", encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"cannot read trace {p}: {exc.strerror}") from None

    try:
        first = handle.readline()
        if not first:
            raise TraceFormatError(str(p), 1, None, "empty file: expected a header line")
        header = _parse_header(str(p), first)
    except BaseException:
        handle.close()
        raise

    def lines() -> Generator[tuple[int, str]]:
        with handle:
            yield from enumerate(handle, start=2)

    return Trace(str(p), header, lines())


class TraceWriter:
    """Writes a header, then requests one per line; checks the order of ``t`` as it goes."""

    def __init__(self, out: IO[str], header: TraceHeader) -> None:
        self._out = out
        self._last_t = 0.0
        self.count = 0
        out.write(json.dumps(header.to_json(), separators=(",", ":")) + "\n")

    def write(self, req: TraceRequest) -> None:
        if req.t < self._last_t:
            raise ValueError(f"request at t={req.t} after one at t={self._last_t}: t must not decrease")
        self._last_t = req.t
        self._out.write(_encoder.encode(req.to_json()).decode() + "\n")
        self.count += 1


def write_trace(path: str | Path, header: TraceHeader, requests: Iterable[TraceRequest]) -> int:
    """Write a whole trace; returns the number of requests."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as out:
        writer = TraceWriter(out, header)
        for req in requests:
            writer.write(req)
        return writer.count
