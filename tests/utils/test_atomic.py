"""`atomic.replace_dir`: a reader sees the old directory or the new one, never a mix, never nothing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pep_torchrec.utils import atomic


def _build(parent: Path, name: str, version: int) -> Path:
    tmp = parent / f".{name}.tmp-{version}"
    tmp.mkdir()
    for part in ("a", "b"):
        (tmp / part).write_text(str(version))
    return tmp


def test_existing_directory_is_exchanged_in_one_step(tmp_path, monkeypatch):
    """Replacing an existing directory renames nothing away first (the window in which `out` did
    not exist): one RENAME_EXCHANGE swaps the two, and the old version is removed."""
    probe_a, probe_b = tmp_path / "probe_a", tmp_path / "probe_b"
    probe_a.mkdir(), probe_b.mkdir()
    if not atomic._exchange(probe_a, probe_b):
        pytest.skip("this kernel / file system has no renameat2(RENAME_EXCHANGE)")
    probe_a.rmdir(), probe_b.rmdir()
    out = tmp_path / "artifact"
    atomic.replace_dir(_build(tmp_path, "artifact", 1), out)
    renames = []
    real = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (renames.append(a), real(*a))[1])
    atomic.replace_dir(_build(tmp_path, "artifact", 2), out)
    assert renames == []
    assert (out / "a").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_readers_see_one_whole_version(tmp_path):
    """100 swaps under a reader that opens the directory once per read: always present, one version."""
    out = tmp_path / "artifact"
    atomic.replace_dir(_build(tmp_path, "artifact", 0), out)
    stop, problems = threading.Event(), []

    def read(dir_fd: int, name: str) -> str:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        try:
            return os.read(fd, 16).decode()
        finally:
            os.close(fd)

    def reader() -> None:
        # Opened once, the directory is one version throughout (a reader by path could mix two).
        while not stop.is_set():
            try:
                dir_fd = os.open(out, os.O_RDONLY)
            except FileNotFoundError:
                problems.append("missing")
                continue
            try:
                seen = {read(dir_fd, p) for p in ("a", "b")}
            except FileNotFoundError:  # this reader held the old version, removed after the swap
                continue
            finally:
                os.close(dir_fd)
            if len(seen) != 1:
                problems.append(f"mixed: {seen}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 101):
            atomic.replace_dir(_build(tmp_path, "artifact", version), out)
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:3]
    assert (out / "a").read_text() == "100"


def test_falls_back_where_exchange_is_unsupported(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "d"
    atomic.replace_dir(_build(tmp_path, "d", 1), out)
    atomic.replace_dir(_build(tmp_path, "d", 2), out)
    assert (out / "b").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_second_rename_failure_restores_the_old_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "d"
    atomic.replace_dir(_build(tmp_path, "d", 1), out)
    new = _build(tmp_path, "d", 2)
    real = atomic.os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        atomic.replace_dir(new, out)
    assert (out / "a").read_text() == "1" and new.is_dir()
