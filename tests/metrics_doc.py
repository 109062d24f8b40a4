"""docs/metrics.md as data, and the metric names a scrape or a PromQL expression uses: what the tests that
tie the doc to real scrapes (tests/test_cluster.py) and to the dashboard (tests/test_deploy.py) compare."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
COMMON = "every service"
SERVICES = ("gateway", "cachestate", "worker", "controller")
TYPES = {"counter", "gauge", "histogram", "info"}
_ROW = re.compile(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|\s*(\w+)\s*\|([^|]*)\|")


@dataclass(frozen=True)
class Metric:
    name: str  # as queried: counters with _total, info metrics with _info, histograms without suffix
    type: str  # counter, gauge, histogram or info
    labels: frozenset[str] | None  # None: not known (a scraped family without samples)


def documented() -> dict[str, dict[str, Metric]]:
    """Section ("gateway", ..., "every service") -> name -> the metric, from the tables of docs/metrics.md."""
    out: dict[str, dict[str, Metric]] = {}
    section: dict[str, Metric] | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = out.setdefault(line[3:].strip(), {})
            continue
        m = _ROW.match(line)
        if m is None:
            continue
        if section is None:
            raise AssertionError(f"a metric row before any section: {line}")
        name, type_, labels = m.groups()
        if name in section:
            raise AssertionError(f"{name} listed twice")
        section[name] = Metric(name, type_, frozenset(re.findall(r"`(\w+)`", labels)))
    return out


def for_service(service: str) -> dict[str, Metric]:
    doc = documented()
    return {**doc[COMMON], **doc[service]}


def scraped(text: str) -> dict[str, Metric]:
    """The metrics of one /metrics page, named the way the doc names them (`name_created` dropped)."""
    families = list(text_string_to_metric_families(text))
    counted = {f.name for f in families if f.type in ("counter", "histogram")}
    out: dict[str, Metric] = {}
    for f in families:
        if f.name.endswith("_created") and f.name[: -len("_created")] in counted:
            continue  # the start time of a counter or histogram series (prometheus_client's objects)
        if f.type == "counter":
            name, type_ = f.name + "_total", "counter"
        elif f.type == "gauge" and f.name.endswith("_info"):
            name, type_ = f.name, "info"
        else:
            name, type_ = f.name, f.type
        labels = frozenset(k for s in f.samples for k in s.labels if k not in ("le", "quantile"))
        out[name] = Metric(name, type_, labels if f.samples else None)
    return out


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_KEYWORDS |= {"offset", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, aggregations, label matchers, ranges,
    grouping labels, durations and numbers left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:])(\d+(ms|[smhdwy]))+\b", " ", text)  # durations (offset 5m)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if m.group() in _KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation being called
        names.add(m.group())
    return names


def documented_series(name: str, metrics: dict[str, Metric]) -> bool:
    """Whether `name`, as a query uses it, is a documented metric or one of a histogram's series."""
    if name in metrics:
        return True
    base, _, suffix = name.rpartition("_")
    return (
        suffix in ("bucket", "sum", "count") and metrics.get(base, Metric("", "", None)).type == "histogram"
    )
