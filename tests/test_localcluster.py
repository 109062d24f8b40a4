"""LocalCluster's plan before anything starts: which child gets which metrics port (no process is run)."""

from __future__ import annotations

import pytest

from services.localcluster import ClusterSettings, GatewaySpec, LocalCluster


def test_every_service_gets_its_own_metrics_port_unless_its_env_names_one() -> None:
    settings = ClusterSettings(
        workers=3,
        nats_port=4999,
        gateways=(GatewaySpec(name="g0", port=8999),),
        cachestate_env={"ONEPOOL_CACHESTATE_METRICS_PORT": "9911"},
    )
    cluster = LocalCluster(settings)
    ports = cluster.metrics_ports
    assert set(ports) == {"cachestate", "controller", "w0", "w1", "w2"}
    assert ports["cachestate"] == 9911  # named by the caller: kept
    assert len(set(ports.values())) == 5 and not {4999, 8999} & set(ports.values())
    for name in ("controller", "w0"):
        env = cluster.child(name).env
        prefix = "ONEPOOL_CONTROLLER_" if name == "controller" else "ONEPOOL_WORKER_"
        assert env[prefix + "METRICS_PORT"] == str(ports[name])
        assert env[prefix + "METRICS_HOST"] == settings.host
    assert cluster.metrics_url("w2") == f"http://127.0.0.1:{ports['w2']}/metrics"
    assert cluster.metrics_url("g0") == "http://127.0.0.1:8999/metrics"


def test_metrics_off_leaves_the_ports_alone() -> None:
    cluster = LocalCluster(ClusterSettings(workers=1, metrics=False))
    assert cluster.metrics_ports == {}
    assert "ONEPOOL_WORKER_METRICS_PORT" not in cluster.child("w0").env


def test_a_port_exported_in_the_shell_is_not_every_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEPOOL_WORKER_METRICS_PORT", "9102")
    monkeypatch.setenv("ONEPOOL_CONTROLLER_METRICS_HOST", "0.0.0.0")
    cluster = LocalCluster(ClusterSettings(workers=2))
    ports = cluster.metrics_ports
    assert ports["w0"] != ports["w1"] and 9102 not in (ports["w0"], ports["w1"])
    assert cluster.child("controller").env["ONEPOOL_CONTROLLER_METRICS_HOST"] == "127.0.0.1"


def test_zero_is_off_and_one_fixed_port_for_several_workers_is_refused() -> None:
    cluster = LocalCluster(
        ClusterSettings(workers=2, controller_env={"ONEPOOL_CONTROLLER_METRICS_PORT": "0"})
    )
    assert "controller" not in cluster.metrics_ports
    assert cluster.child("controller").env["ONEPOOL_CONTROLLER_METRICS_PORT"] == "0"
    with pytest.raises(ValueError, match="ONEPOOL_WORKER_METRICS_PORT=9102"):
        ClusterSettings(workers=2, worker_env={"ONEPOOL_WORKER_METRICS_PORT": "9102"})
    one = LocalCluster(ClusterSettings(workers=1, worker_env={"ONEPOOL_WORKER_METRICS_PORT": "9102"}))
    assert one.metrics_ports["w0"] == 9102
