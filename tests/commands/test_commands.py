"""The command layer (issue 14, item 3): argparse and printing live in pep_torchrec/commands/ and the
entry points only; every command module has the same three names and is mounted by the CLI."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from pep_torchrec import cli

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pep_torchrec"
COMMANDS = PACKAGE / "commands"
# The entry points: the `pep-torchrec` command, the module torchx / torchrun launch, `python -m` shims.
ENTRY_POINTS = {"pep_torchrec/cli.py", "pep_torchrec/train.py"}
# Library code that may print, and why: `prepare_dataset`'s progress line redraws itself in place (\r)
# on a terminal's stderr, which a log handler cannot do (without a terminal it logs instead).
PRINT_ALLOWED = {("pep_torchrec/data/prepare/progress.py", "Progress")}


def _library_modules() -> list[Path]:
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if COMMANDS not in p.parents
        and str(p.relative_to(ROOT)) not in ENTRY_POINTS
        and p.name != "__main__.py"
        and "__pycache__" not in p.parts
    )


def _cli_uses(path: Path, name: str | None = None) -> list[str]:
    """`import argparse` anywhere in the module, and `print(` outside PRINT_ALLOWED's classes."""
    name = name or str(path.relative_to(ROOT))
    found = []

    def visit(node: ast.AST, owner: str | None) -> None:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and owner is None:
            owner = node.name
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            found.append(f"{name}:{node.lineno}: import argparse")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            found.append(f"{name}:{node.lineno}: from argparse import")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
            and (name, owner) not in PRINT_ALLOWED
        ):
            found.append(f"{name}:{node.lineno}: print(")
        for child in ast.iter_child_nodes(node):
            visit(child, owner)

    visit(ast.parse(path.read_text(encoding="utf-8")), None)
    return found


def test_library_modules_neither_parse_flags_nor_print() -> None:
    modules = _library_modules()
    assert len(modules) > 40, "the scan found too few modules"
    found = [use for path in modules for use in _cli_uses(path)]
    assert not found, "CLI code outside pep_torchrec/commands/ (move it into a command):\n" + "\n".join(found)


def test_the_scan_sees_what_it_forbids(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text("import argparse\n\n\ndef f():\n    print('x')\n", encoding="utf-8")
    assert [use.split(": ")[1] for use in _cli_uses(module, "probe.py")] == ["import argparse", "print("]


def _command_modules() -> list[str]:
    return sorted(p.stem for p in COMMANDS.glob("*_command.py"))


@pytest.mark.parametrize("name", _command_modules())
def test_command_module_interface(name: str) -> None:
    import importlib

    module = importlib.import_module(f"pep_torchrec.commands.{name}")
    assert isinstance(module.DESCRIPTION, str) and module.DESCRIPTION.strip()
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    assert callable(module.run)


def test_cli_mounts_every_command_module() -> None:
    parser = cli.build_parser()
    handlers = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if sub.get_default("handler") is not None:
                        handlers.add(sub.get_default("handler").__module__.rsplit(".", 1)[1])
                    walk(sub)

    walk(parser)
    assert handlers == set(_command_modules())


def test_one_user_error_catch(capsys: pytest.CaptureFixture[str]) -> None:
    from pep_torchrec.utils.errors import USER_ERROR_EXIT, UserError

    def refuse(args: argparse.Namespace) -> int:
        raise UserError("--flag: bad")

    assert cli.run_command(refuse, argparse.Namespace()) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --flag: bad\n"
