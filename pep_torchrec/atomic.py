"""Atomic replacement of a directory: build it under a temporary name, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` (a sibling of `out`) to `out`.

    An existing `out` first moves aside, then `tmp` moves in: a reader sees the old directory or the
    new one, never a mix. If the second rename fails the old directory comes back, and the error
    propagates (the caller still owns `tmp`).
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)  # a unique free name for the old directory
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
