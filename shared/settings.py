"""Typed settings from environment variables and command-line flags.

Settings are frozen dataclasses; only service shells call :func:`load_settings`,
everything below them receives the resulting object.  Precedence: CLI override >
environment variable ``{prefix}{FIELD_NAME_UPPER}`` > dataclass default.

Supported field annotations: ``int``, ``float``, ``str``, ``bool``, ``Path``,
``Literal[...]``, ``enum.StrEnum`` subclasses, and ``X | None`` of those (an empty
string means ``None``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from shared.errors import ErrorKind, OnepoolError, SettingsError

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_MISSING_TEXT = "required"


def env_var_name(prefix: str, field_name: str) -> str:
    return f"{prefix}{field_name.upper()}"


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def load_settings(
    cls: type[T],
    *,
    prefix: str,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> T:
    """Build ``cls`` from ``overrides`` (field name -> typed value or string), ``env`` and defaults.

    Raises SettingsError (naming the variable and the expected type) for a bad or missing value.
    """
    env = os.environ if env is None else env
    overrides = dict(overrides or {})
    fields = _fields(cls)
    unknown = set(overrides) - {f.name for f in fields}
    if unknown:
        # Overrides come from code (overrides_from_args), so an unknown name is a bug, not bad input.
        raise OnepoolError(
            f"unknown setting(s) for {cls.__name__}: {sorted(unknown)}",
            code="unknown_setting",
            kind=ErrorKind.BUG,
        )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields:
        var = env_var_name(prefix, f.name)
        tp = hints[f.name]
        if f.name in overrides:
            raw = overrides[f.name]
            where = f"{flag_name(f.name)} (env {var})"
            if isinstance(raw, str):
                values[f.name] = _parse(raw, tp, var, where)
            else:
                values[f.name] = _check(raw, tp, var, where)
        elif var in env:
            values[f.name] = _parse(env[var], tp, var, var)
        elif not _has_default(f):
            raise SettingsError(var, f"{var} is required ({_type_text(tp)})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a __post_init__ check across fields
        raise SettingsError(prefix + "*", f"invalid {cls.__name__} settings: {e}") from e


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[Any], *, prefix: str) -> None:
    """Add one ``--field-name`` option per field; values stay strings and are parsed by load_settings."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls):
        tp = hints[f.name]
        var = env_var_name(prefix, f.name)
        text = str(f.metadata.get("help", "")).strip()
        suffix = f"(env {var}, default {_default_text(f)})"
        # argparse %-formats help strings
        help_text = (f"{text} {suffix}" if text else suffix).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if _strip_optional(tp)[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = _choices(tp)
            kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else _type_text(tp).upper()
        parser.add_argument(flag_name(f.name), **kwargs)


def overrides_from_args(ns: argparse.Namespace, cls: type[Any]) -> dict[str, object]:
    """The settings flags actually given on the command line (absent ones were SUPPRESSed)."""
    given = vars(ns)
    return {f.name: given[f.name] for f in _fields(cls) if f.name in given}


def describe_settings(cls: type[Any], prefix: str) -> str:
    """A markdown table (env var | default | help) for generated docs."""
    hints = typing.get_type_hints(cls)
    lines = ["| env var | default | help |", "| --- | --- | --- |"]
    for f in _fields(cls):
        tp = hints[f.name]
        text = str(f.metadata.get("help", "")).strip()
        choices = _choices(tp)
        kind = f"one of {', '.join(f'`{c}`' for c in choices)}" if choices else _type_text(tp)
        text = f"{text} ({kind})" if text else f"({kind})"
        default = _default_text(f)
        default_cell = f"`{default}`" if _has_default(f) else "*required*"
        cell = text.replace("|", "\\|")  # a pipe would end the markdown cell
        lines.append(f"| `{env_var_name(prefix, f.name)}` | {default_cell} | {cell} |")
    return "\n".join(lines) + "\n"


# ---- internals ----


def _fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return [f for f in dataclasses.fields(cls) if f.init]


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default_value(f: dataclasses.Field[Any]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default_text(f: dataclasses.Field[Any]) -> str:
    value = _default_value(f)
    if value is dataclasses.MISSING:
        return _MISSING_TEXT
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``; other unions are not supported."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported settings annotation {tp!r}: only `X | None` unions are allowed")
    return tp, False


def _choices(tp: Any) -> list[str]:
    inner, _ = _strip_optional(tp)
    if get_origin(inner) is Literal:
        return [str(a) for a in get_args(inner)]
    if isinstance(inner, type) and issubclass(inner, enum.StrEnum):
        return [m.value for m in inner]
    return []


def _type_text(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    if get_origin(inner) is Literal or (isinstance(inner, type) and issubclass(inner, enum.StrEnum)):
        text = "one of " + ", ".join(_choices(inner))
    elif inner is bool:
        text = "bool (1/0/true/false/yes/no/on/off)"
    elif isinstance(inner, type):
        text = inner.__name__
    else:
        text = str(inner)
    return f"{text} or empty for none" if optional else text


def _bad(var: str, where: str, raw: object, tp: Any) -> SettingsError:
    return SettingsError(var, f"{where}={raw!r} is not a valid value: expected {_type_text(tp)}")


def _parse(raw: str, tp: Any, var: str, where: str) -> Any:
    inner, optional = _strip_optional(tp)
    text = raw.strip()
    if optional and text == "":
        return None
    try:
        if inner is str:
            return raw
        if inner is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if inner is int:
            return int(text, 10)
        if inner is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if inner is Path:
            if not text:
                raise ValueError(raw)
            return Path(text).expanduser()
        if get_origin(inner) is Literal:
            for option in get_args(inner):
                if str(option) == text:
                    return option
            raise ValueError(raw)
        if isinstance(inner, type) and issubclass(inner, enum.StrEnum):
            return inner(text)
    except ValueError:
        raise _bad(var, where, raw, tp) from None
    raise TypeError(f"unsupported settings annotation {tp!r} for {var}")


def _check(value: object, tp: Any, var: str, where: str) -> Any:
    """Validate an already-typed override (e.g. from code or a typed CLI parser)."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise _bad(var, where, value, tp)
    if get_origin(inner) is Literal:
        if value in get_args(inner):
            return value
        raise _bad(var, where, value, tp)
    if isinstance(inner, type) and issubclass(inner, enum.StrEnum):
        if isinstance(value, inner):
            return value
        raise _bad(var, where, value, tp)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is Path and isinstance(value, os.PathLike):
        return Path(value)
    if inner is int and isinstance(value, bool):  # bool is an int subclass, but True is no port number
        raise _bad(var, where, value, tp)
    if isinstance(inner, type) and isinstance(value, inner):
        return value
    raise _bad(var, where, value, tp)


# Where cachestate, the controller and a worker serve /metrics and /healthz by default: every interface, as a
# container needs for Prometheus to reach it (the port itself is off until set).
DEFAULT_METRICS_HOST = "0.0.0.0"


def check_port(var: str, port: int, *, allow_zero: bool = False) -> None:
    """Raise ValueError naming ``var`` unless ``port`` is a TCP port (1-65535; 0 too with ``allow_zero``,
    which settings use for "off")."""
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{var} must be {low}-65535, got {port}")


def doc(text: str) -> dict[str, str]:
    """Field metadata carrying the help text of a setting: `field(default=..., metadata=doc("..."))`."""
    return {"help": text}


def host_instance_id(fallback: str) -> str:
    """A default instance id, `<hostname>-<pid>`, usable as a NATS subject token (compose gives each
    container its own hostname; locally the pid tells processes apart)."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:48]
    return f"{host or fallback}-{os.getpid()}"
