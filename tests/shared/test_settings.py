from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from shared.errors import ErrorKind, OnepoolError, SettingsError
from shared.settings import add_settings_arguments, describe_settings, load_settings, overrides_from_args

PREFIX = "ONEPOOL_TEST_"


class Precision(enum.StrEnum):
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class Example:
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL"})
    port: int = field(default=8080, metadata={"help": "HTTP port (100% local)"})
    ratio: float = 0.5
    verbose: bool = False
    cache_dir: Path = Path("/tmp/onepool")
    max_users: int | None = None
    mode: Literal["fast", "safe"] = "safe"
    precision: Precision = Precision.BF16
    label: str | None = "x"


@dataclass(frozen=True)
class NeedsName:
    name: str
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")


def test_defaults_when_nothing_is_set() -> None:
    assert load_settings(Example, prefix=PREFIX, env={}) == Example()


def test_every_type_parses_from_env() -> None:
    env = {
        "ONEPOOL_TEST_NATS_URL": "nats://nats:4222",
        "ONEPOOL_TEST_PORT": " 9090 ",
        "ONEPOOL_TEST_RATIO": "0.25",
        "ONEPOOL_TEST_VERBOSE": "Yes",
        "ONEPOOL_TEST_CACHE_DIR": "/var/cache/onepool",
        "ONEPOOL_TEST_MAX_USERS": "1000",
        "ONEPOOL_TEST_MODE": "fast",
        "ONEPOOL_TEST_PRECISION": "fp16",
        "ONEPOOL_TEST_LABEL": "",
        "UNRELATED": "ignored",
    }
    s = load_settings(Example, prefix=PREFIX, env=env)
    assert s == Example(
        nats_url="nats://nats:4222",
        port=9090,
        ratio=0.25,
        verbose=True,
        cache_dir=Path("/var/cache/onepool"),
        max_users=1000,
        mode="fast",
        precision=Precision.FP16,
        label=None,  # empty string means None for optional fields
    )
    assert isinstance(s.precision, Precision)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("ON", True),
        ("yes", True),
        ("0", False),
        ("False", False),
        ("off", False),
    ],
)
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert load_settings(Example, prefix=PREFIX, env={"ONEPOOL_TEST_VERBOSE": raw}).verbose is expected


def test_optional_empty_is_none_and_value_parses() -> None:
    assert load_settings(Example, prefix=PREFIX, env={"ONEPOOL_TEST_MAX_USERS": ""}).max_users is None
    assert load_settings(Example, prefix=PREFIX, env={"ONEPOOL_TEST_MAX_USERS": "7"}).max_users == 7


@pytest.mark.parametrize(
    ("var", "raw", "expected_text"),
    [
        ("ONEPOOL_TEST_PORT", "80a", "int"),
        ("ONEPOOL_TEST_PORT", "", "int"),
        ("ONEPOOL_TEST_RATIO", "half", "float"),
        ("ONEPOOL_TEST_RATIO", "nan", "float"),
        ("ONEPOOL_TEST_VERBOSE", "maybe", "bool"),
        ("ONEPOOL_TEST_MAX_USERS", "many", "int or empty for none"),
        ("ONEPOOL_TEST_MODE", "reckless", "one of fast, safe"),
        ("ONEPOOL_TEST_PRECISION", "fp8", "one of fp16, bf16"),
        ("ONEPOOL_TEST_CACHE_DIR", "", "Path"),
    ],
)
def test_bad_values_name_the_env_var_and_type(var: str, raw: str, expected_text: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(Example, prefix=PREFIX, env={var: raw})
    err = info.value
    assert err.field == var and err.kind is ErrorKind.CLIENT and err.code == "bad_setting"
    assert var in err.message and expected_text in err.message and repr(raw) in err.message


def test_missing_required_field_names_the_env_var() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(NeedsName, prefix="ONEPOOL_X_", env={})
    assert info.value.field == "ONEPOOL_X_NAME" and "required" in info.value.message
    assert load_settings(NeedsName, prefix="ONEPOOL_X_", env={"ONEPOOL_X_NAME": "w1"}) == NeedsName("w1")


def test_post_init_failure_becomes_settings_error() -> None:
    with pytest.raises(SettingsError, match="replicas must be at least 1"):
        load_settings(NeedsName, prefix="ONEPOOL_X_", env={"ONEPOOL_X_NAME": "w", "ONEPOOL_X_REPLICAS": "0"})


def test_overrides_win_over_env_typed_or_strings() -> None:
    env = {"ONEPOOL_TEST_PORT": "9090", "ONEPOOL_TEST_RATIO": "0.1", "ONEPOOL_TEST_MODE": "fast"}
    s = load_settings(
        Example,
        prefix=PREFIX,
        env=env,
        overrides={
            "port": "7070",
            "ratio": 1,
            "precision": Precision.FP16,
            "cache_dir": Path("/x"),
            "label": None,
        },
    )
    assert (s.port, s.ratio, s.mode, s.precision, s.cache_dir, s.label) == (
        7070,
        1.0,
        "fast",
        Precision.FP16,
        Path("/x"),
        None,
    )


def test_bad_override_names_flag_and_env_var() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(Example, prefix=PREFIX, env={}, overrides={"port": True})
    assert info.value.field == "ONEPOOL_TEST_PORT" and "--port" in info.value.message
    with pytest.raises(SettingsError, match="--mode"):
        load_settings(Example, prefix=PREFIX, env={}, overrides={"mode": "nope"})


def test_unknown_override_is_a_bug() -> None:
    with pytest.raises(OnepoolError) as info:
        load_settings(Example, prefix=PREFIX, env={}, overrides={"prot": 1})
    assert info.value.kind is ErrorKind.BUG and not isinstance(info.value, SettingsError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onepool-test")
    add_settings_arguments(parser, Example, prefix=PREFIX)
    return parser


def test_cli_flags_become_overrides_only_when_given() -> None:
    ns = _parser().parse_args(["--port", "1234", "--verbose", "--max-users", "", "--precision", "fp16"])
    overrides = overrides_from_args(ns, Example)
    assert overrides == {"port": "1234", "verbose": True, "max_users": "", "precision": "fp16"}
    s = load_settings(
        Example,
        prefix=PREFIX,
        env={"ONEPOOL_TEST_PORT": "9", "ONEPOOL_TEST_RATIO": "0.9"},
        overrides=overrides,
    )
    assert (s.port, s.verbose, s.max_users, s.precision, s.ratio) == (1234, True, None, Precision.FP16, 0.9)
    assert overrides_from_args(_parser().parse_args([]), Example) == {}
    assert overrides_from_args(_parser().parse_args(["--no-verbose"]), Example) == {"verbose": False}


def test_help_names_env_vars_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for var in (
        "ONEPOOL_TEST_NATS_URL",
        "ONEPOOL_TEST_PORT",
        "ONEPOOL_TEST_PRECISION",
        "ONEPOOL_TEST_MAX_USERS",
    ):
        assert var in out
    assert "NATS server URL (env ONEPOOL_TEST_NATS_URL, default nats://127.0.0.1:4222)" in out
    assert "HTTP port (100% local)" in out
    assert "--nats-url" in out and "--cache-dir" in out and "{fast,safe}" in out


def test_describe_settings_is_a_markdown_table() -> None:
    table = describe_settings(NeedsName, "ONEPOOL_X_")
    lines = table.strip().splitlines()
    assert lines[0] == "| env var | default | help |"
    assert lines[2].startswith("| `ONEPOOL_X_NAME` | *required* |")
    assert lines[3].startswith("| `ONEPOOL_X_REPLICAS` | `1` |")
    full = describe_settings(Example, PREFIX)
    assert "| `ONEPOOL_TEST_MODE` | `safe` | (one of `fast`, `safe`) |" in full
    assert "NATS server URL" in full and len(full.strip().splitlines()) == 2 + 9
