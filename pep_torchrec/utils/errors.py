"""The one base class of user errors.

A `UserError` is bad input from the person running a command: a flag, a config key or value, a
file, a line of a file. Its message names which. Every `pep-torchrec` subcommand (and
`python -m pep_torchrec.train`) prints it as one line, `error: <message>`, and exits with
`USER_ERROR_EXIT`; anything else is a bug and keeps its traceback (exit 1). The specific kinds
(`ConfigError`, `SchemaError`, `PrepareError`, `ArtifactError`) live beside the code that raises
them and subclass this one; it is a ValueError, as they were.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""Exit status of a command refused for bad input (argparse uses 2 for bad flags too)."""


class UserError(ValueError):
    """Bad input from the user; the message names the flag, key, file or line."""
