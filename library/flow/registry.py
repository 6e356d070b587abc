"""Name lookups in the flow registries, with a helpful error for a misspelt name."""

from __future__ import annotations

import difflib
from typing import Mapping


def check_choice(kind: str, name: str, choices: Mapping[str, object]) -> None:
    """Raise ValueError naming the nearest valid choice when ``name`` is not a key of ``choices``."""
    if name in choices:
        return
    near = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"unknown {kind} {name!r}{hint}; choose one of {', '.join(choices)}")
