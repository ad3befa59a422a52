"""`pep-torchrec export`: a trained run → a serving artifact (pep_torchrec/export/converter.py)."""

from __future__ import annotations

import argparse

from pep_torchrec.config import ConfigError
from pep_torchrec.export import converter
from pep_torchrec.export.converter import ArtifactConverter
from pep_torchrec.export.format import DTYPES, LAYOUTS, ArtifactError

DESCRIPTION = converter.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a finished run (search, retrain or baseline)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--budget", type=float, help="search run: export the mask of this budget (e.g. 0.05)")
    which.add_argument("--mask", help="an explicit mask directory (default for a retrain run: its own)")
    parser.add_argument("--out", required=True, help="artifact directory (written atomically)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="embedding values (int8: per-row scales)"
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="compact",
        help="compact (CSR, default) or dense [R, D] tables (for comparisons)",
    )
    parser.add_argument("--step", type=int, help="export this checkpoint step (default: see the docs)")
    parser.add_argument("--data", help="the prepared dataset, if it moved since training")


def run(args: argparse.Namespace) -> int:
    try:
        converter = ArtifactConverter(
            args.run_dir, budget=args.budget, mask=args.mask, step=args.step, data_path=args.data
        )
        manifest = converter.convert(args.out, dtype=args.dtype, layout=args.layout)
    except (ArtifactError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    ratio = manifest["total_bytes"] / manifest["dense_fp32_bytes"]
    print(
        f"{args.out}: {manifest['kept_params']:,}/{manifest['embedding_params']:,} embedding params kept, "
        f"tables {manifest['total_bytes']:,} B = {100 * ratio:.2f}% of dense fp32 "
        f"({manifest['dense_fp32_bytes']:,} B); artifact {manifest['artifact_bytes']:,} B; "
        f"version {manifest['model_version']}"
    )
    return 0
