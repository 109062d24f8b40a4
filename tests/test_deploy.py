"""Deployment files are valid without a Docker engine: compose, Prometheus, Grafana (its queries read only
metrics that docs/metrics.md lists)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.metrics_doc import COMMON, SERVICES, TYPES, documented, documented_series, promql_metric_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"


def test_compose_file_matches_the_compose_spec() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_settings_are_real_settings() -> None:
    from services.cachestate.settings import CacheStateSettings
    from services.controller.settings import ControllerSettings
    from services.gateway.settings import GatewaySettings
    from services.worker.settings import WorkerSettings
    from shared.bus_auth import ENV_PREFIX as BUS_AUTH_PREFIX
    from shared.bus_auth import BusAuth

    spec = yaml.safe_load(COMPOSE.read_text())
    known = {
        f"{prefix}{name.upper()}"
        for prefix, cls in (
            ("ONEPOOL_WORKER_", WorkerSettings),
            ("ONEPOOL_GATEWAY_", GatewaySettings),
            ("ONEPOOL_CACHESTATE_", CacheStateSettings),
            ("ONEPOOL_CONTROLLER_", ControllerSettings),
            (BUS_AUTH_PREFIX, BusAuth),  # every service's NATS credentials and TLS files
        )
        for name in cls.__dataclass_fields__
        if cls.__dataclass_fields__[name].init
    }
    for service in ("worker", "gateway", "cachestate", "controller"):
        env = spec["services"][service]["environment"]
        onepool_vars = {k for k in env if k.startswith("ONEPOOL_")}
        assert onepool_vars and onepool_vars <= known, (service, onepool_vars - known)
        assert spec["services"][service]["command"] == [service]
    dockerfile = (ROOT / "deploy" / "compose" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["onepool"]' in dockerfile


PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "compose" / "grafana"


def test_prometheus_scrapes_every_service_where_compose_serves_its_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"gateway", "cachestate", "controller", "worker"}
    targets = {
        name: [t for static in job["static_configs"] for t in static["targets"]] for name, job in jobs.items()
    }
    assert targets["gateway"] == ["gateway:8080"]
    assert targets["cachestate"] == ["cachestate:9101"]
    assert targets["controller"] == ["controller:9103"]
    assert targets["worker"] and all(re.fullmatch(r"worker-\d+:9102", t) for t in targets["worker"])
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboards() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "onepool.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((GRAFANA / "dashboards" / "onepool.json").read_text())
    assert dashboard["uid"] == "onepool"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_promql_metric_names_leaves_out_functions_labels_ranges_and_numbers() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, worker) "
        '(rate(a_seconds_bucket{le="0.05", x=~"y|z"}[$__rate_interval])))'
        " / on (worker) group_left sum without (mode) (b_total offset 5m) * 1e3 - count(c)"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def test_every_dashboard_query_reads_documented_metrics() -> None:
    metrics = {name: m for section in documented().values() for name, m in section.items()}
    dashboard = json.loads((GRAFANA / "dashboards" / "onepool.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names = promql_metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            unknown = {n for n in names if not documented_series(n, metrics)}
            assert not unknown, (panel["title"], unknown)
            queried |= names
    # what the dashboard must show (issue 10): each of these is read by some panel
    for wanted in (
        "onepool_gateway_requests_total",
        "onepool_gateway_request_seconds_bucket",
        "onepool_cachestate_worker_alpha",
        "onepool_cachestate_worker_alpha_target",
        "onepool_cachestate_worker_emb_hits_total",
        "onepool_cachestate_worker_kv_hits_total",
        "onepool_cachestate_worker_refill_bytes_total",
        "onepool_gateway_attempts_total",
        "onepool_controller_decision_seconds_bucket",
    ):
        assert wanted in queried, wanted


def test_the_metrics_doc_follows_the_naming_conventions() -> None:
    doc = documented()
    assert set(doc) == {COMMON, *SERVICES}
    for section, metrics in doc.items():
        for name, m in metrics.items():
            assert m.type in TYPES, name
            assert name.endswith("_total") == (m.type == "counter"), name
            assert name.endswith("_info") == (m.type == "info"), name
            if section != COMMON:
                assert name.startswith(f"onepool_{section}_") or name == f"onepool_{section}_info", name
