"""The engine behind every fedfusion setting: declare, parse, coerce, check, explain.

A setting is a dataclass field declared with :func:`option` (its default, help text and
rules). Tables (a TOML file's, Flower's flat ``run_config`` and ``node_config``) are
parsed against those fields: an unknown key or an ill-typed value raises
:class:`ConfigError` naming the key (and the closest known one), so a typo never falls
back silently to a default.

Hand-written, not pydantic: pydantic is no declared dependency, would add about 0.1 s to
each hospital process's start, and its errors would still need rewriting into these messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from shared_model.errors import ExplainedError

__all__ = [
    "ConfigError",
    "coerce",
    "construct",
    "flatten_toml",
    "load_toml",
    "option",
    "parse_overrides",
    "parse_table",
    "unknown_key_message",
]


class ConfigError(ExplainedError, ValueError):
    """A setting is unknown, of the wrong type or out of range. The message names it."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
) -> Any:
    """Declare a config field with its documentation and validation rules."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "min": min,
            "max": max,
            "min_exclusive": min_exclusive,
        },
    )


def flatten_toml(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as Flower's flat dotted keys (``{"a": {"b": 1}}`` -> ``a.b``)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten_toml(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# ------------------------------------------------------------------------- internals


def parse_table(cls: type, table: Mapping[str, Any], prefix: str, kind: str) -> dict[str, Any]:
    """Check every key of a table against ``cls``'s fields and coerce its value."""
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            raise ConfigError(
                unknown_key_message(dotted(key), {dotted(k): v for k, v in fields.items()}, kind)
            )
        values[fields[key].name] = coerce(dotted(key), fields[key], cls, raw)
    return values


def load_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError saying ``what`` could not be read and why."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path} ({err})") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: {path} is not valid TOML ({err})") from err


def unknown_key_message(key: str, known: Mapping[str, Any], kind: str = "run") -> str:
    """The error for an unknown ``key``: the closest known one, and all of them."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} config key '{key}'.{hint} Known keys: {', '.join(sorted(known))}"


def coerce(key: str, fld: dataclasses.Field[Any], owner: type, raw: Any) -> Any:
    """``raw`` as the type of field ``fld`` of ``owner``; ConfigError naming ``key``."""
    typ = get_type_hints(owner)[fld.name]
    if get_origin(typ) is tuple:
        if not isinstance(raw, str):
            raise ConfigError(f"config key '{key}': expected a '|'-separated string, got {raw!r}")
        return tuple(part.strip() for part in raw.split("|") if part.strip())
    if typ is bool or typ == bool | None:  # None: a default that depends on the site
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"config key '{key}': expected true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise ConfigError(f"config key '{key}': expected an integer, got {raw!r}")
    if typ is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw)
        raise ConfigError(f"config key '{key}': expected a finite number, got {raw!r}")
    if typ is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"config key '{key}': expected a string, got {raw!r}")
    raise TypeError(f"unsupported config field type {typ} for {key}")  # a bug, not user error


def construct(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """``cls(**values)`` after checking each field's choices and range."""
    for fld in dataclasses.fields(cls):
        if fld.name not in values:
            continue
        meta = fld.metadata
        value = values[fld.name]
        key = (f"{prefix}." if prefix else "") + fld.name.replace("_", "-")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(
                f"config key '{key}': {value!r} is not one of {', '.join(meta['choices'])}"
            )
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"config key '{key}': must be {op} {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"config key '{key}': must be <= {hi}, got {value}")
    return cls(**values)


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``--run-config "k=v k2=v2"`` items (values in TOML syntax; bare words are text)."""
    out: dict[str, Any] = {}
    for item in items:
        for token in shlex.split(item):
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise ConfigError(f"--run-config: expected key=value, got {token!r}")
            out[key.strip()] = _toml_value(value.strip())
    return out
