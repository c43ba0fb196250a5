"""DESIGN.md: dependencies point one way; ``exporters`` and ``eval`` never import the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("compressor.pipeline", "compressor.stages", "compressor.cli", "compressor.commands")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from … import`` statement in ``path`` names (nested ones too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_check_sees_a_forbidden_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from compressor.pipeline.runner import run\n")
    assert any(m.startswith(FORBIDDEN) for m in imported_modules(f))


@pytest.mark.parametrize("package", ["eval", "exporters"])
def test_package_never_imports_the_pipeline(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    bad = {
        str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m.startswith(FORBIDDEN)) for f in files
    }
    assert not {k: v for k, v in bad.items() if v}
