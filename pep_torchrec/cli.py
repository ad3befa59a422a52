"""The `pep-torchrec` command: one subcommand per stage of the workflow (pep_torchrec/commands/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType


def _mount(sub: argparse._SubParsersAction, name: str, module: ModuleType, help: str) -> None:
    """Each command module exposes `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`."""
    parser = sub.add_parser(
        name, help=help, description=module.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    from pep_torchrec.commands import (
        data_prepare_command,
        export_command,
        prune_command,
        report_command,
        serve_command,
        train_command,
    )

    parser = argparse.ArgumentParser(
        prog="pep-torchrec", description="Learnable embedding sizes for TorchRec models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="dataset preparation")
    _mount(
        data.add_subparsers(dest="data_command", required=True),
        "prepare",
        data_prepare_command,
        "raw files → Parquet splits + schema.json",
    )
    _mount(sub, "train", train_command, "train a model (baseline, search or retrain stage)")
    _mount(
        sub, "prune", prune_command, "magnitude-prune a trained run into masks (the baseline PEP must beat)"
    )
    _mount(sub, "report", report_command, "plots and a Markdown summary of a run")
    _mount(sub, "export", export_command, "a trained run → a compact serving artifact")
    _mount(sub, "serve", serve_command, "serve an artifact over HTTP (FastAPI + uvicorn)")
    return parser


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's `run(args)`: the one place a `UserError` becomes `error: <message>` and
    `USER_ERROR_EXIT` (pep_torchrec/utils/errors.py); anything else is a bug and keeps its traceback.
    `main` and the stand-alone entry points (`python -m pep_torchrec.train`, `... .report`,
    `... .data.prepare`) all go through it."""
    from pep_torchrec.utils.errors import USER_ERROR_EXIT, UserError

    try:
        return int(handler(args) or 0)
    except UserError as e:  # bad input: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
    from pep_torchrec.utils.logging import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
