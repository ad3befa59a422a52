"""No function in the library is longer than 80 lines (issue 14): a long function is split into named
helpers, so each reads in one screen. Lines are counted as `ast` sees them (first line of the `def`
to the last line of the body, docstring and comments included); nested functions count on their own
and inside their parent.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pep_torchrec"
MAX_LINES = 80


def _functions(node: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function under `node` with its qualified name (`Class.method`, `outer.inner`)."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((prefix + child.name, child))
            found += _functions(child, prefix + child.name + ".")
        elif isinstance(child, ast.ClassDef):
            found += _functions(child, prefix + child.name + ".")
        else:
            found += _functions(child, prefix)
    return found


def _long_functions() -> list[tuple[str, str, int]]:
    """(path under pep_torchrec/, qualified name, lines) of each function over the limit."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, node in _functions(tree):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append((path.relative_to(PACKAGE).as_posix(), name, length))
    return found


def test_no_function_over_80_lines():
    too_long = _long_functions()
    listed = ", ".join(f"pep_torchrec/{path}:{name} ({length})" for path, name, length in too_long)
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named helpers): {listed}"
