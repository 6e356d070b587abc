"""Prompt lines with sd-scripts' inline options, e.g. ``a cat --n blurry --w 768 --h 512 --d 42 --s 28 --l 5``.

Options: ``--w`` width, ``--h`` height, ``--s`` steps, ``--d`` seed, ``--n`` negative prompt,
``--l`` CFG scale, ``--ss`` sampler, ``--fs`` flow shift. Unset options fall back to the defaults
given by the caller. Parsing is pure; a malformed option is a one-line UserError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

from library.errors import UserError


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    shift: float | None = None


_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "w": ("width", int),
    "h": ("height", int),
    "s": ("steps", int),
    "d": ("seed", int),
    "n": ("negative_prompt", str),
    "l": ("cfg_scale", float),
    "ss": ("sampler", str),
    "fs": ("shift", float),
}


def parse_prompt_line(line: str, source: str = "prompt") -> PromptSpec:
    """Split ``line`` at `` --`` into the prompt and its inline options."""
    parts = re.split(r"(?:^|\s)--(?=[a-z])", line.strip())
    spec = PromptSpec(prompt=parts[0].strip())
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        if name not in _OPTIONS:
            raise UserError(f"{source}: unknown inline option --{name}; use one of " + ", ".join(f"--{k}" for k in _OPTIONS))
        field_name, convert = _OPTIONS[name]
        value = value.strip()
        if not value and field_name != "negative_prompt":
            raise UserError(f"{source}: inline option --{name} needs a value")
        try:
            spec = replace(spec, **{field_name: convert(value)})
        except ValueError:
            raise UserError(f"{source}: inline option --{name} {value!r} is not a valid {convert.__name__}") from None
    return spec


def read_prompt_file(path: str) -> list[PromptSpec]:
    """One prompt per non-empty line; lines starting with ``#`` are comments."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text; re-save it as UTF-8") from None
    specs = [parse_prompt_line(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise UserError(f"prompt file {path} has no prompts")
    return specs
