"""Checking and converting config values: range checks with flag-named errors, misspelt-name hints,
sd-scripts' flattening of config tables and TOML value coercion. Imports nothing from the project but
``library.errors``."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from library.errors import UserError


def check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_rate(name: str, value: float) -> None:
    check(0.0 <= value <= 1.0, f"--{name} must be in [0, 1], got {value}")


def check_positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is not None:
        check(value > 0 or (allow_zero and value == 0), f"--{name} must be {'>= 0' if allow_zero else '> 0'}, "
               f"got {value}")


def check_choices(config: Any, choices: Mapping[str, tuple[str, ...]]) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in choices and value is not None and value not in choices[f.name]:
            raise unknown_name_error(f"--{f.name} value", value, choices[f.name])


def flatten_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts' reading of a config file: top-level keys plus the keys of each table, one level deep."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items: Iterable[tuple[str, Any]] = value.items() if isinstance(value, Mapping) else ((key, value),)
        for name, item in items:
            if isinstance(item, Mapping):
                raise UserError(f"config table [{key}.{name}] is nested too deep: use flag names in [{key}]")
            if name in flat:
                raise UserError(f"config key {name!r} is given twice")
            flat[name] = item
    return flat


def unknown_name_error(what: str, name: str, valid: Iterable[str]) -> UserError:
    """``unknown <what> 'name' (did you mean 'nearest'?)`` — the one message for misspelt keys and values."""
    near = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return UserError(f"unknown {what} {name!r}{hint}")


def coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as the field type ``hint`` (int -> float where a float is wanted, list -> tuple)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for option in typing.get_args(hint):
            try:
                return coerce(name, option, value)
            except UserError:
                continue
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(coerce(name, item, v) for v in value)
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint in (int, str, bool) and type(value) is hint:
        return value
    raise UserError(f"config key {name!r}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def read_toml_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The TOML table of ``path``; a missing or unreadable file is a UserError starting with ``what``
    (e.g. ``"--config_file run.toml"``)."""
    import toml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what}: file not found")
    try:
        return toml.loads(file.read_text(encoding="utf-8-sig"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: not valid TOML ({exc})") from None
