"""`pep-torchrec report` (and `python -m pep_torchrec.report`): plots and report.md of one run
(pep_torchrec/report/)."""

from __future__ import annotations

import argparse

from pep_torchrec import report
from pep_torchrec.report import make_report

DESCRIPTION = report.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a baseline, search or retrain run directory")
    parser.add_argument(
        "--out", default=None, help="output directory (default RUN_DIR/report); replaced atomically"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="prepared dataset for the frequency analysis (default: config.yaml's data.path)",
    )
    parser.add_argument(
        "--no-search-diagnostics",
        dest="search_diagnostics",
        action="store_false",
        help="a search run: leave out what the search learned (it reads every snapshot's checkpoint)",
    )


def run(args: argparse.Namespace) -> int:
    result = make_report(
        args.run_dir,
        args.out,
        data=args.data,
        search_diagnostics=getattr(args, "search_diagnostics", True),
    )
    print(f"{result['report_md']}: {len(result['plots'])} plots in {result['seconds']:.1f}s")
    for m in result["masks"]:
        rho = m["spearman"]
        print(
            f"  {m['label']}: {m['kept']:,} kept, {m['pruned_rows']:,} of {m['rows']:,} ids pruned"
            + (f", Spearman(freq, dims) = {rho:+.3f}" if rho is not None else "")
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pep_torchrec.report ...`: the same as `pep-torchrec report ...`."""
    from pep_torchrec.cli import run_command

    parser = argparse.ArgumentParser(
        prog="pep-torchrec report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))
