"""Appending a section to bench/RESULTS.md (date, machine, command, figures)."""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def header(name: str) -> list[str]:
    """The first lines of a section: title with date and machine, then the command that ran."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = f"{platform.machine()} {torch.get_num_threads()} threads, {device}, torch {torch.__version__}"
    command = f"python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    return [f"## {name} {datetime.date.today().isoformat()} — {machine}", f"`{command.strip()}`", ""]


def append_section(lines: list[str]) -> None:
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach row: date, machine, command, figures (ratios from one run).\n\n")
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n\n")
