"""One module per `pep-torchrec` subcommand: the argparse set-up and what only a command does.

Each module exposes `DESCRIPTION` (the subcommand's `--help` text), `add_arguments(parser)` and
`run(args) -> int`: it turns parsed flags into typed arguments for the library function that does the
work, and prints that function's result as a summary on stdout. The library modules take typed
arguments and return values; they never parse flags or print. `pep_torchrec/cli.py` mounts every
module here as a subcommand and turns a `UserError` (pep_torchrec/utils/errors.py) into one line,
`error: <message>`, and `USER_ERROR_EXIT`; the stand-alone entry points (`python -m pep_torchrec.train`,
`python -m pep_torchrec.report`, `python -m pep_torchrec.data.prepare`) go through the same
`pep_torchrec.cli.run_command`.

    data_prepare_command.py  pep-torchrec data prepare   raw files → Parquet splits + schema.json
    train_command.py         pep-torchrec train          a baseline, search or retrain run
    prune_command.py         pep-torchrec prune          magnitude pruning and the size controls
    report_command.py        pep-torchrec report         plots and report.md of a run
    export_command.py        pep-torchrec export         a run → a serving artifact
    serve_command.py         pep-torchrec serve          an artifact over HTTP

The modules carry a `_command` suffix because the package keeps one base name per module (`train.py`
is the entry point torchx launches, `data/prepare/` the preparation pipeline).
"""
