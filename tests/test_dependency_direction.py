"""The dependency direction of DESIGN §1, read from the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_TOP = ("library", "networks", "tools", "sd3_train", "sd3_train_network", "sd3_minimal_inference")

# module prefix -> project prefixes it may import (library.errors is a leaf every layer may use)
ALLOWED = {
    "library.flow": ("library.flow", "library.errors"),
    "library.config": ("library.errors", "library.config_values"),  # config_values: its checks and coercion
    "library.models": ("library.models", "library.flow", "library.errors"),
    "library.data": ("library.data", "library.flow", "library.config", "library.errors", "library.runtime"),
    "networks.functional": (),
}
FORBIDDEN = {
    "library.training": ("networks",),
    "library.inference": ("networks",),
    "library.data": ("library.models",),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in PROJECT_TOP}


def _sources() -> list[Path]:
    return sorted(p for top in ("library", "networks") for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layering(path):
    module = _module_name(path)
    imports = _project_imports(path)
    for prefix, allowed in ALLOWED.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = [m for m in imports if not any(m == a or m.startswith(a + ".") for a in allowed)]
            assert not bad, f"{module} may not import {bad}"
    for prefix, forbidden in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = [m for m in imports if any(m == f or m.startswith(f + ".") for f in forbidden)]
            assert not bad, f"{module} may not import {bad}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_code_does_not_parse_arguments_or_exit(path):
    text = path.read_text(encoding="utf-8")
    module = _module_name(path)
    if not (module == "library.cli" or module.startswith("library.cli.")):
        assert "import argparse" not in text, f"{module} parses arguments; only library/cli/ may"
    assert "sys.exit(" not in text, f"{module} calls sys.exit; raise UserError instead"
