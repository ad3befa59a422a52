"""House rules for the scripts outside the package: benchmarks/ is a package run as
`python -m benchmarks.<name>` (no `sys.path` patches), and no function in benchmarks/ or pipelines/
is longer than 80 lines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
SCRIPT_DIRS = ("benchmarks", "pipelines")


def _python_files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_no_function_over_80_lines() -> None:
    """Counted from the `def` line to the function's last line (decorators and signature included)."""
    too_long = []
    for folder in SCRIPT_DIRS:
        for path in _python_files(folder):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_benchmarks_do_not_patch_sys_path() -> None:
    """Every script, shell helper and research patch under benchmarks/ (results excepted) runs from the
    repository root as a package module; none edits `sys.path`."""
    found = []
    for path in sorted((REPO / "benchmarks").rglob("*")):
        if path.is_file() and "results" not in path.relative_to(REPO / "benchmarks").parts:
            text = path.read_text(errors="replace")
            found += [
                f"{path.relative_to(REPO)}:{i}"
                for i, line in enumerate(text.splitlines(), 1)
                if "sys.path" in line
            ]
    assert not found, f"sys.path edits: {found}"


SCRIPTS = [p for p in sorted((REPO / "benchmarks").glob("*.py")) if p.stem not in ("__init__", "common")]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_imports_as_package_module(path: Path) -> None:
    """`python -m benchmarks.<name>` finds `benchmarks` in the repository root (pytest's
    `pythonpath = ["."]` puts it on the path here, as `-m` does from the root); each script is a
    module of that package with a `main(argv)`."""
    module = importlib.import_module(f"benchmarks.{path.stem}")
    assert callable(getattr(module, "main", None)), f"{path.relative_to(REPO)} has no main(argv)"
