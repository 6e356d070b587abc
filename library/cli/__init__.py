"""Command-line parsers (the only argparse in the library) and their conversion to typed configs.

One module per command family: ``inference`` (sd3_minimal_inference.py), ``data`` (dataset and cache
flags shared by the trainers and the cache tools), ``models`` (checkpoint and encoder flags).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: … (see --help)``) instead of the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def run_command(run: Callable[[], None]) -> int:
    """Run an entry point's body with logging set up: 0 on success, 2 with a one-line ``error:`` for
    a :class:`library.errors.UserError` (no traceback for problems the user can fix)."""
    from library.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU 4-bit kernel notice is not for us
    try:
        run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
