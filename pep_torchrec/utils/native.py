"""Small C++ kernels compiled on first use and loaded with ctypes (no torch headers, so a build takes
seconds, not the minutes of torch.utils.cpp_extension here).

Objects are cached in $PEP_TORCHREC_CACHE (default ~/.cache/pep_torchrec) under a hash of the source,
compiler, flags and CPU (the flags include -march=native). A library that cannot be built warns once
and `load()` returns None, so callers fall back to their pure-PyTorch path;
`PEP_TORCHREC_DISABLE_CPU_KERNEL=1` forces that fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PEP_TORCHREC_CACHE", Path.home() / ".cache" / "pep_torchrec"))


def _cpu_id() -> str:
    # -march=native: a cached object is only valid on the same CPU model / flags.
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


class NativeLibrary:
    """One C++ source compiled into a shared object on first `load()`.

    Args:
        source: the .cpp file.
        flags: compiler flags (the output and source paths are added).
        abi_symbol: an exported `int name()` returning the source's ABI version.
        abi_version: the version the Python side was written for (a stale object is refused).
        configure: sets argtypes/restypes on the loaded library.
        what: how warnings name the kernel.
        fallback: what the caller does without it (for the warning).
    """

    def __init__(
        self,
        source: Path,
        flags: Sequence[str],
        *,
        abi_symbol: str,
        abi_version: int,
        configure: Callable[[ctypes.CDLL], None],
        what: str,
        fallback: str,
    ) -> None:
        self.source, self.flags = Path(source), list(flags)
        self.abi_symbol, self.abi_version = abi_symbol, abi_version
        self.configure, self.what, self.fallback = configure, what, fallback
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def _build(self, compiler: str) -> Path:
        key = hashlib.sha256(
            b"\0".join(
                [
                    self.source.read_bytes(),
                    compiler.encode(),
                    " ".join(self.flags).encode(),
                    _cpu_id().encode(),
                ]
            )
        ).hexdigest()[:16]
        target = cache_dir() / f"{self.source.stem}_{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name, then rename: concurrent processes (several ranks, parallel
        # tests) never load a half-written object.
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            subprocess.run(
                [compiler, *self.flags, "-o", str(tmp_path), str(self.source)],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)
        return target

    def load(self) -> ctypes.CDLL | None:
        """The library (built on first use), or None (after one warning) if it cannot be built."""
        if self._tried:
            return self._lib
        with self._lock:
            if self._tried:
                return self._lib
            self._tried = True
            if os.environ.get("PEP_TORCHREC_DISABLE_CPU_KERNEL"):
                return None
            compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
            try:
                if compiler is None:
                    raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) on PATH")
                lib = ctypes.CDLL(str(self._build(compiler)))
                if getattr(lib, self.abi_symbol)() != self.abi_version:
                    raise RuntimeError("stale kernel object (ABI version mismatch)")
                self.configure(lib)
                self._lib = lib
            except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
                detail = getattr(err, "stderr", "") or ""
                warnings.warn(
                    f"pep_torchrec: the {self.what} could not be built ({err}) {detail[-2000:]}; "
                    f"falling back to {self.fallback}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self._lib
