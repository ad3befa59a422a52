"""`pep-torchrec prune`: masks without PEP's thresholds (pep_torchrec/pep/controls.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pep_torchrec.config import ConfigError
from pep_torchrec.pep import controls
from pep_torchrec.pep.controls import (
    DEFAULT_BUDGETS,
    magnitude_masks,
    random_element_masks,
    size_control_masks,
)
from pep_torchrec.pep.masks import MASK_LAYOUTS, MASK_METHODS

DESCRIPTION = controls.__doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default="magnitude",
        choices=MASK_METHODS,
        help="how the masks are chosen (see above); default magnitude",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="magnitude: a finished baseline run; uniform / frequency: a search run (its init/)",
    )
    parser.add_argument(
        "--budgets",
        default=None,
        help=f"comma-separated shares of the embedding in (0, 1) (default {DEFAULT_BUDGETS}; "
        "random-elements: every budget_* of --sizes-from)",
    )
    parser.add_argument(
        "--out", required=True, help="output directory (masks/budget_*, and init/ for magnitude)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="uniform, random-elements: seed of the random choices (default 0)",
    )
    parser.add_argument(
        "--sizes-from",
        default=None,
        help="random-elements: a masks/ directory of budget_* masks, or one mask directory",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="frequency: the prepared dataset whose train split is counted (default: the run's data.path)",
    )
    parser.add_argument(
        "--layout",
        default="elementwise",
        choices=MASK_LAYOUTS,
        help="magnitude: mask layout, as pep.mask_layout (aligned: each row's kept count in one "
        "shared column order)",
    )
    parser.add_argument(
        "--min-row-dims",
        type=int,
        default=0,
        help="magnitude: every row keeps at least this many elements (clipped to what a budget "
        "affords, with a warning)",
    )
    parser.add_argument(
        "--max-row-dims", type=int, default=0, help="magnitude: no row keeps more (0 = embedding_dim)"
    )


def _budgets(text: str) -> list[float]:
    """--budgets "0.2,0.1": shares of the embedding in (0, 1); ConfigError naming the bad item."""
    budgets = []
    for item in (b.strip() for b in text.split(",")):
        try:
            budget = float(item)
        except ValueError:
            raise ConfigError(
                f"--budgets: {item!r} is not a number (expected shares such as 0.2,0.1)"
            ) from None
        if not 0.0 < budget < 1.0:
            raise ConfigError(f"--budgets: {item} is not a share of the embedding in (0, 1) (0.1 keeps 10 %)")
        budgets.append(budget)
    return budgets


def run(args: argparse.Namespace) -> int:
    budgets = _budgets(args.budgets) if args.budgets is not None else None
    method = args.method
    magnitude_flags = {
        "--layout": args.layout != "elementwise",
        "--min-row-dims": args.min_row_dims != 0,
        "--max-row-dims": args.max_row_dims != 0,
    }
    misplaced = [flag for flag, given in magnitude_flags.items() if given and method != "magnitude"]
    misplaced += ["--sizes-from"] if args.sizes_from is not None and method != "random-elements" else []
    misplaced += ["--data"] if args.data is not None and method != "frequency" else []
    misplaced += ["--seed"] if args.seed is not None and method not in ("uniform", "random-elements") else []
    if misplaced:
        raise ConfigError(f"{misplaced[0]}: not an option of --method {method}")
    seed = 0 if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError(f"--seed {seed}: must be >= 0")
    if method == "random-elements":
        if args.sizes_from is None:
            raise ConfigError(
                "--sizes-from: --method random-elements needs the masks whose row sizes it keeps"
            )
        results = random_element_masks(Path(args.sizes_from), Path(args.out), budgets=budgets, seed=seed)
    else:
        if args.run_dir is None:
            raise ConfigError(f"--run-dir: --method {method} needs a run directory")
        if not Path(args.run_dir).is_dir():
            raise ConfigError(f"--run-dir {args.run_dir}: no such directory")
        budgets = budgets if budgets is not None else _budgets(DEFAULT_BUDGETS)
        if method == "magnitude":
            results = magnitude_masks(
                Path(args.run_dir),
                budgets,
                Path(args.out),
                layout=args.layout,
                min_row_dims=args.min_row_dims,
                max_row_dims=args.max_row_dims,
            )
        else:
            results = size_control_masks(
                method, Path(args.run_dir), budgets, Path(args.out), seed=seed, data=args.data
            )
    for result in results:
        print(f"{result['path']}: {result['kept']:,} elements kept (budget {result['budget']:g})")
    return 0
