"""Training entry point (`pep-torchrec train`, `python -m pep_torchrec.train`, torchrun, torchx): parse
the flags of pep_torchrec/commands/train_command.py, then config → Trainer → train → summary.

Launch-agnostic; the same module runs as::

    pep-torchrec train --config configs/movielens_fm.yaml --data out/ml100k --run-dir runs/fm
    python -m pep_torchrec.train --config ...
    torchrun --nproc-per-node 2 pep_torchrec/train.py --config ...
    torchx run -s local_cwd dist.ddp -j 1x2 --script pep_torchrec/train.py -- --config ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (torchrun/torchx `--script pep_torchrec/train.py`): make the package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from pep_torchrec.cli import run_command
    from pep_torchrec.commands import train_command
    from pep_torchrec.utils.logging import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="pep-torchrec train",
        description=train_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_command.add_arguments(parser)
    return run_command(train_command.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
