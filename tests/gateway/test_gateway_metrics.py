"""The gateway's own metrics that explain its answers: routing decisions by reason (and the span attribute
that says the same), latency by outcome, the shared latency buckets, and the dashboard reading them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from services.gateway.core.router import Policy, RouteReason
from services.gateway.service import SHED_REASONS, GatewayMetrics
from shared.metrics import LATENCY_SECONDS_BUCKETS
from shared.slo import DEFAULT_SLO_MS
from tests.gateway.scripted import HasUrl, ScriptedWorker, assert_served_by, scripted_gateway

# A bound as Prometheus text writes it in `le` (prometheus_client's formatter; untyped, hence the alias).
le_label: Callable[[float], str] = floatToGoString
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/compose/grafana/dashboards/onepool.json"


def samples(metrics: GatewayMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called `name` in one scrape: sorted labels -> value."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.mark.parametrize("policy", list(Policy))
def test_every_series_with_known_labels_is_scraped_at_zero_from_the_start(policy: Policy) -> None:
    metrics = GatewayMetrics(policy)
    assert samples(metrics, "onepool_gateway_route_decisions_total") == {
        (("policy", str(policy)), ("reason", str(reason))): 0.0 for reason in RouteReason
    }
    assert samples(metrics, "onepool_gateway_shed_total") == {
        (("reason", reason),): 0.0 for reason in ("concurrency", "saturated", "bus", "connections")
    }
    assert SHED_REASONS == ("concurrency", "saturated", "bus", "connections")
    assert samples(metrics, "onepool_gateway_request_seconds_count") == {
        (("outcome", "ok"),): 0.0,
        (("outcome", "error"),): 0.0,
    }


def test_latency_is_filed_by_outcome_2xx_ok_and_every_other_status_error() -> None:
    metrics = GatewayMetrics(Policy.JOINT)
    for status, seconds in ((200, 0.004), (204, 0.3), (400, 0.001), (503, 0.001), (504, 2.5)):
        metrics.observe_latency(status, seconds)
    assert samples(metrics, "onepool_gateway_request_seconds_count") == {
        (("outcome", "ok"),): 2.0,
        (("outcome", "error"),): 3.0,
    }
    slo = le_label(DEFAULT_SLO_MS / 1e3)
    within = samples(metrics, "onepool_gateway_request_seconds_bucket")
    # the dashboard's SLO satisfaction: OK within the SLO over every request; the fast errors count against
    assert within[(("le", slo), ("outcome", "ok"))] == 1.0
    assert within[(("le", slo), ("outcome", "error"))] == 2.0


def test_the_latency_buckets_are_shared_and_hold_the_default_slo() -> None:
    assert DEFAULT_SLO_MS == 50.0
    assert LATENCY_SECONDS_BUCKETS == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    assert DEFAULT_SLO_MS / 1e3 in LATENCY_SECONDS_BUCKETS
    bounds = {
        dict(labels)["le"]
        for labels in samples(GatewayMetrics(Policy.JOINT), "onepool_gateway_request_seconds_bucket")
    }
    assert bounds == {*map(le_label, LATENCY_SECONDS_BUCKETS), "+Inf"}


@pytest.mark.parametrize(
    ("ranks", "reason"),
    [((0,), RouteReason.SINGLE), ((0, 1), RouteReason.LOAD), ((0, 0), RouteReason.TIE)],
    ids=["one-worker", "one-busier", "two-alike"],
)
async def test_each_routed_request_counts_its_reason_and_names_it_on_the_route_span(
    nats_server: HasUrl, ranks: tuple[int, ...], reason: RouteReason
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    workers = [ScriptedWorker(f"w{i}", rank=rank) for i, rank in enumerate(ranks)]
    async with scripted_gateway(nats_server, workers, tracer=provider.get_tracer("test")) as h:
        for _ in range(2):
            answer = await h.recommend()
            assert answer.status == 200, answer.body
            if reason is not RouteReason.TIE:
                assert_served_by(answer, "w0")
        counted = {
            r: await h.metric("onepool_gateway_route_decisions_total", policy="joint", reason=str(r))
            for r in RouteReason
        }
        assert await h.metric("onepool_gateway_request_seconds_count", outcome="ok") == 2.0
        assert await h.metric("onepool_gateway_request_seconds_count", outcome="error") == 0.0
    assert counted == {r: 2.0 if r is reason else 0.0 for r in RouteReason}
    routes = [sp for sp in exporter.get_finished_spans() if sp.name == "gateway.route"]
    assert [dict(sp.attributes or {})["onepool.route.reason"] for sp in routes] == [str(reason)] * 2


async def test_refusals_are_errors_not_fast_answers_and_route_nothing(nats_server: HasUrl) -> None:
    async with scripted_gateway(nats_server, [ScriptedWorker("w0")]) as h:
        assert (await h.recommend({"user_id": "u", "history": [1], "candidates": []})).status == 400
        assert (await h.recommend(data=b"{}", headers={"Content-Type": "text/plain"})).status == 415
        assert await h.metric("onepool_gateway_request_seconds_count", outcome="error") == 2.0
        assert await h.metric("onepool_gateway_request_seconds_count", outcome="ok") == 0.0
        assert await h.metric("onepool_gateway_request_seconds_bucket", outcome="ok", le="+Inf") == 0.0
        for reason in RouteReason:  # neither reached the router
            assert (
                await h.metric("onepool_gateway_route_decisions_total", policy="joint", reason=str(reason))
                == 0.0
            )


def test_the_dashboards_slo_is_a_variable_offering_the_gateways_bucket_bounds() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = (v for v in dashboard["templating"]["list"] if v["name"] == "slo_seconds")
    bounds = {le_label(b) for b in LATENCY_SECONDS_BUCKETS}
    choices = variable["query"].split(",")
    assert set(choices) <= bounds
    assert [o["value"] for o in variable["options"]] == choices
    default = le_label(DEFAULT_SLO_MS / 1e3)
    assert variable["current"]["value"] == default
    assert [o["value"] for o in variable["options"] if o["selected"]] == [default]
    exprs = {panel["title"]: [t["expr"] for t in panel.get("targets", [])] for panel in dashboard["panels"]}
    slo = exprs["SLO satisfaction"][0]
    numerator, denominator = slo.split(" / ")
    assert 'outcome="ok"' in numerator and 'le="$slo_seconds"' in numerator
    assert "outcome" not in denominator  # errors count against the SLO
    assert all('{outcome="ok"}' in e for e in exprs["Latency P50 / P99 (OK answers)"])
    assert exprs["Routing decisions by reason"] == [
        "sum by (reason) (rate(onepool_gateway_route_decisions_total[$__rate_interval]))"
    ]
    every = " ".join(e for es in exprs.values() for e in es)
    assert 'le="0.05"' not in every  # no SLO literal left
