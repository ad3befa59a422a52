"""Atomic replacement of a directory: build it under a temporary name, then swap it into place."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` (a sibling of `out`) to `out`, durably.

    Every file of `tmp` and the directory itself are fsynced first, so a crash after the swap
    cannot leave a renamed directory whose files are empty. An existing `out` is exchanged with
    `tmp` in one step (Linux `renameat2(RENAME_EXCHANGE)`): a reader sees the old directory or the
    new one, never a mix and never nothing. Where the exchange is unsupported, `out` first moves
    aside and `tmp` moves in (a moment without `out`); if that second rename fails the old
    directory comes back, and the error propagates (the caller still owns `tmp`).
    """
    _fsync_tree(tmp)
    if not out.exists():
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        return
    if _exchange(tmp, out):  # `tmp` now names the old directory
        _fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)  # a unique free name for the old directory
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the platform or file system cannot."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, other libcs)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
