"""The `pep-torchrec` command: one subcommand per stage of the workflow."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType


def _mount(sub: argparse._SubParsersAction, name: str, module: ModuleType, help: str) -> None:
    """Each stage module exposes `add_arguments(parser)` and `run(args) -> int`."""
    parser = sub.add_parser(
        name, help=help, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    from pep_torchrec import report, train
    from pep_torchrec.data import prepare
    from pep_torchrec.export import converter
    from pep_torchrec.pep import controls
    from pep_torchrec.serving import app as serving_app

    parser = argparse.ArgumentParser(
        prog="pep-torchrec", description="Learnable embedding sizes for TorchRec models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="dataset preparation")
    _mount(
        data.add_subparsers(dest="data_command", required=True),
        "prepare",
        prepare,
        "raw files → Parquet splits + schema.json",
    )
    _mount(sub, "train", train, "train a model (baseline, search or retrain stage)")
    _mount(sub, "prune", controls, "magnitude-prune a trained run into masks (the baseline PEP must beat)")
    _mount(sub, "report", report, "plots and a Markdown summary of a run")
    _mount(sub, "export", converter, "a trained run → a compact serving artifact")
    _mount(sub, "serve", serving_app, "serve an artifact over HTTP (FastAPI + uvicorn)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pep_torchrec.utils.errors import USER_ERROR_EXIT, UserError
    from pep_torchrec.utils.logging import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as e:  # bad input: one line naming it (pep_torchrec/utils/errors.py)
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
