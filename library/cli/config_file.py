"""``--config_file`` / ``--output_config`` as sd-scripts does them, with strict keys.

A config file is a TOML table of flag names (flat, or in [sections] that are flattened one level, as
sd-scripts reads them). Its values are turned into command-line arguments and parsed by the same
parser before the real command line, so types and choices are checked once, the same way, and flags
on the command line override the file. An unknown key is a :class:`UserError` naming the nearest
flag. As in sd-scripts, a path without ``.toml`` gets it appended, and ``--output_config`` writes the
resolved flags to the ``--config_file`` path (refusing to overwrite) instead of training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, NoReturn

import toml

from library.config import flatten_toml, unknown_name_error
from library.config_values import read_toml_file
from library.errors import UserError

NOT_IN_FILES = ("help", "config_file", "output_config", "stages")


def config_path(text: str | os.PathLike[str]) -> Path:
    """sd-scripts' rule: ``x`` means ``x.toml``."""
    path = Path(text)
    return path if path.suffix == ".toml" else path.with_name(path.name + ".toml")


def file_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long flag name (aliases included) that a config file may set -> its action."""
    keys = {}
    for option, action in parser._option_string_actions.items():
        name = option[2:]
        if option.startswith("--") and action.dest not in NOT_IN_FILES:
            keys[name] = action
    return keys


def _text(key: str, value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple)) or isinstance(value, bool):
        raise UserError(f"config key {key!r}: expected a single value, got {value!r}")
    return repr(value) if isinstance(value, float) else str(value)


def arguments_for(key: str, value: Any, action: argparse.Action) -> list[str]:
    """The command-line arguments that set flag ``key`` to the TOML ``value``."""
    option = f"--{key}"
    if action.nargs == 0:  # an on/off switch
        if not isinstance(value, bool):
            raise UserError(f"config key {key!r} is a switch: write {key} = true (or leave it out), not {value!r}")
        return [option] if value else []
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [option, *(_text(key, item) for item in items)]
    return [f"{option}={_text(key, value)}"]


def _fail(where: Path) -> Any:
    def error(message: str) -> NoReturn:
        raise UserError(f"{where}: {message}")

    return error


def read_config_file(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The file's settings as command-line arguments, checked by ``parser`` (errors raise UserError
    naming the file; ``parser`` is used for checking only and must be a fresh one)."""
    data = read_toml_file(path, f"--config_file {path}")
    try:
        flat = flatten_toml(data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    keys = file_keys(parser)
    argv: list[str] = []
    for key, value in flat.items():
        if key not in keys:
            raise UserError(f"{path}: {unknown_name_error('key', key, keys)}")
        try:
            argv += arguments_for(key, value, keys[key])
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    parser.error = _fail(path)  # type: ignore[method-assign]
    parser.parse_args(argv)
    return argv


def write_config_file(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``tables`` ([section] -> flag -> value) atomically; an existing file is not overwritten."""
    if path.exists():
        raise UserError(f"--output_config: {path} already exists; remove it or pass another --config_file")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# sd3-trainer config: sd-scripts flag names; train with --config_file " + path.name + "\n\n"
    text += toml.dumps({name: dict(values) for name, values in tables.items() if values})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
