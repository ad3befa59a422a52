"""The `pep-torchrec` command: one subcommand per stage of the workflow."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from pep_torchrec import prune, report, train
    from pep_torchrec.data import prepare

    parser = argparse.ArgumentParser(prog="pep-torchrec", description="Learnable embedding sizes for TorchRec models.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="raw files → Parquet splits + schema.json",
                               description=prepare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_arguments(prep)
    prep.set_defaults(handler=prepare.run)

    tr = sub.add_parser("train", help="train a model (baseline, search or retrain stage)", description=train.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(tr)
    tr.set_defaults(handler=train.run)

    pr = sub.add_parser("prune", help="magnitude-prune a trained run into masks (the baseline PEP must beat)",
                        description=prune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_arguments(pr)
    pr.set_defaults(handler=prune.run)

    rep = sub.add_parser("report", help="plots and a Markdown summary of a run", description=report.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(rep)
    rep.set_defaults(handler=report.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pep_torchrec.config import ConfigError
    from pep_torchrec.data.report import PrepareError
    from pep_torchrec.data.schema import SchemaError
    from pep_torchrec.logging_utils import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, SchemaError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
