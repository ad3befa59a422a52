"""`pep-torchrec data prepare` (and `python -m pep_torchrec.data.prepare`): raw files or a dataset spec
→ a prepared dataset (pep_torchrec/data/prepare/pipeline.py, pep_torchrec/data/prepare/from_spec.py).

The flags become one `PrepareOptions` (pep_torchrec/data/prepare/options.py), built by the typed machinery."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from pep_torchrec.data.prepare import pipeline
from pep_torchrec.data.prepare.from_spec import prepare_from_spec
from pep_torchrec.data.prepare.options import (
    COMPRESSIONS,
    DATASETS,
    DEFAULT_ROW_GROUP_SIZE,
    DEFAULT_ROWS_PER_FILE,
    SPLIT_METHODS,
    SYNTHETIC_OPTIONS,
    PrepareOptions,
    prepare_options,
    synthetic_config,
)
from pep_torchrec.data.prepare.pipeline import check_options, format_summary, prepare_dataset
from pep_torchrec.data.raw.readers import DEFAULT_BLOCK_SIZE
from pep_torchrec.data.synthetic import SyntheticConfig
from pep_torchrec.utils.errors import UserError

DESCRIPTION = pipeline.__doc__


def _size(text: str) -> int:
    """'16M' → 16777216 (suffixes K, M, G, binary)."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16M)") from None


def _int_list(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(float(x)) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or comma-separated integers: {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `data prepare` options to `parser` (for `pep-torchrec data prepare`)."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", choices=DATASETS, help="which built-in dataset to prepare")
    what.add_argument("--spec", help="a dataset spec YAML (or a shipped spec's name): any tabular data, "
                      "see pep_torchrec/data/spec.py")  # fmt: skip
    parser.add_argument(
        "--raw",
        type=Path,
        nargs="+",
        default=None,
        help="raw input: file or directory (movielens: the dataset directory); with --spec, one or more "
        "files, directories or globs",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created atomically)")
    parser.add_argument(
        "--min-count",
        type=int,
        default=None,
        help="values seen fewer times map to the OOV id 0 (default: 10 criteo/avazu, 1 movielens)",
    )
    parser.add_argument(
        "--split", choices=SPLIT_METHODS, default=None, help="random (seeded, the default) or temporal"
    )
    parser.add_argument(
        "--split-fractions",
        default=None,
        help="train,valid,test fractions (default 0.8,0.1,0.1)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="split seed (and generator seed for synthetic; default 0)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first malformed row (file:line: reason)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing prepared dataset at --out"
    )
    parser.add_argument(
        "--block-size", type=_size, default=DEFAULT_BLOCK_SIZE, help="bytes read per block (16M)"
    )
    parser.add_argument(
        "--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE, help="rows per row group"
    )
    parser.add_argument(
        "--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE, help="rows per Parquet file (0: one file)"
    )
    parser.add_argument("--compression", choices=COMPRESSIONS, default="snappy", help="Parquet codec")
    _add_synthetic_arguments(parser.add_argument_group("synthetic dataset (--dataset synthetic)"))
    return parser


def _add_synthetic_arguments(syn: argparse._ArgumentGroup) -> None:
    """The generator's options (`SYNTHETIC_OPTIONS` but seed), each defaulting to `SyntheticConfig`'s value."""
    defaults = SyntheticConfig()
    syn.add_argument("--rows", type=int, default=None, help=f"examples (default {defaults.rows:,})")
    syn.add_argument(
        "--num-sparse", type=int, default=None, help=f"sparse features (default {defaults.num_sparse})"
    )
    syn.add_argument(
        "--num-dense", type=int, default=None, help=f"dense features (default {defaults.num_dense})"
    )
    syn.add_argument(
        "--cardinality",
        type=_int_list,
        default=None,
        help=f"ids per table, one value or one per table, comma-separated (default {defaults.cardinality})",
    )
    syn.add_argument(
        "--zipf-exponent", type=float, default=None, help=f"id skew (default {defaults.zipf_exponent})"
    )
    syn.add_argument(
        "--signal-fraction",
        type=float,
        default=None,
        help=f"share of features in the planted model (default {defaults.signal_fraction})",
    )
    syn.add_argument(
        "--interaction-rank",
        type=int,
        default=None,
        help=f"planted FM rank (default {defaults.interaction_rank})",
    )
    syn.add_argument(
        "--base-ctr", type=float, default=None, help=f"base click rate (default {defaults.base_ctr})"
    )
    syn.add_argument(
        "--oov-rate", type=float, default=None, help=f"share of OOV ids (default {defaults.oov_rate})"
    )
    syn.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help=f"rows generated at once (default {defaults.chunk_rows:,})",
    )


def _options(args: argparse.Namespace) -> tuple[PrepareOptions, dict[str, Any]]:
    """The flags as one `PrepareOptions`, and the synthetic generator's flags that were given."""
    synthetic = {
        k: getattr(args, k) for k in SYNTHETIC_OPTIONS if k != "seed" and getattr(args, k, None) is not None
    }
    flags = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(PrepareOptions) if f.name != "synthetic"
    }
    return prepare_options(flags), synthetic


def run(args: argparse.Namespace) -> int:
    """Run `data prepare` with parsed arguments; print the summary. Returns the exit code."""
    options, synthetic = _options(args)
    if getattr(args, "spec", None):  # a declared dataset: pep_torchrec/data/prepare/from_spec.py
        if synthetic:
            raise UserError(f"options {sorted(synthetic)} apply to the synthetic dataset only")
        report = prepare_from_spec(args.spec, args.raw or [], args.out, options)
        print(format_summary(report))
        return 0
    if args.raw is not None and len(args.raw) > 1:
        raise UserError(f"--dataset {args.dataset} takes one --raw path (several are for --spec)")
    raw = args.raw[0] if args.raw else None
    if synthetic:  # refused or built after the checks prepare_dataset makes first, as always
        check_options(args.dataset, raw, options)
        if args.dataset != "synthetic":
            raise UserError(f"options {sorted(synthetic)} apply to the synthetic dataset only")
        options = dataclasses.replace(options, synthetic=synthetic_config(synthetic))
    report = prepare_dataset(args.dataset, raw, args.out, options)
    print(format_summary(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pep_torchrec.data.prepare --dataset ... --out ...`."""
    from pep_torchrec.cli import run_command

    parser = argparse.ArgumentParser(
        prog="pep-torchrec data prepare", description=DESCRIPTION.split("\n\n")[0].replace("\n", " ")
    )
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))
