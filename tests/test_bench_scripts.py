"""The benchmarks still start. No test runs them (they take minutes and report, not assert), so a
rename in ``src/`` used to break one unseen: ``bench/loop_stalls.py`` stopped at its first import
after the ledger was split. Two cheap checks per script: it parses ``--help`` (its top-level
imports work), and every name it imports from ``bucketsync``, at any depth, still exists."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_benchmarks() -> None:
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_a_benchmark_parses_its_help(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout, proc.stdout[:500]


def _missing(script: Path) -> list[str]:
    """The ``from bucketsync... import name`` lines of ``script`` whose name is not there."""
    missing = []
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bucketsync"):
            continue
        try:
            module = importlib.import_module(node.module)
        except ImportError as exc:
            missing.append(f"line {node.lineno}: {node.module} ({exc})")
            continue
        for alias in node.names:
            if hasattr(module, alias.name):
                continue
            try:  # a submodule: from bucketsync.stores import s3
                importlib.import_module(f"{node.module}.{alias.name}")
            except ImportError:
                missing.append(f"line {node.lineno}: {alias.name} from {node.module}")
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_what_a_benchmark_imports_from_bucketsync_exists(script: Path) -> None:
    assert _missing(script) == []


def test_a_missing_name_is_found(tmp_path: Path) -> None:
    """The check itself can fail: the import loop_stalls.py had."""
    script = tmp_path / "old.py"
    script.write_text("def main():\n    from bucketsync.ledger.sqlite import Ledger\n")
    assert _missing(script) == ["line 2: Ledger from bucketsync.ledger.sqlite"]
