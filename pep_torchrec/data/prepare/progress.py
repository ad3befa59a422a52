"""The progress line of a preparation pass: the one `print` of a library module (to stderr, on a terminal).

Full Criteo Kaggle is ~9 minutes of reading: it must not be silent.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pep_torchrec.data.raw.readers import DatasetReader, ParsedBlock, bytes_read, reset_bytes_read
from pep_torchrec.data.raw.rejections import FILE_REASONS, SIDE_TABLE_REASONS

logger = logging.getLogger(__name__)


class Progress:
    """Where a pass is: rows read, rows/s, input files begun (and share of the rows in pass 2).

    On a terminal one status line on stderr, rewritten at most twice a second; otherwise (logs, CI)
    one INFO line every 30 s. Full Criteo Kaggle is ~9 minutes of reading: it must not be silent.
    """

    def __init__(self, name: str, reader: DatasetReader, total_rows: int | None = None) -> None:
        self.name, self.total_rows = name, total_rows
        self.files = [str(p) for p in getattr(reader, "files", None) or []]
        self.num_files = len(self.files)
        self.total_bytes = sum(os.path.getsize(p) for p in self.files if os.path.isfile(p))
        reset_bytes_read(self.files)
        self.tty = sys.stderr.isatty()
        self.interval = 0.5 if self.tty else 30.0
        self.start = self.last = time.perf_counter()
        self.rows = 0
        self.paths: set[str] = set()
        self.shown = False

    def _line(self, now: float) -> str:
        text = f"{self.name}: {self.rows:,} rows ({self.rows / max(now - self.start, 1e-9):,.0f} rows/s)"
        if self.total_rows:
            text += f", {100 * self.rows / self.total_rows:.0f} % of {self.total_rows:,}"
        if self.num_files:
            text += f", file {len(self.paths)} of {self.num_files}"
        done = sum(bytes_read(p) for p in self.files)
        if self.total_bytes and done:  # text and gzip inputs (stored bytes: compressed for gzip)
            text += f", {done / 2**20:,.1f} of {self.total_bytes / 2**20:,.1f} MiB read"
        return text

    def update(self, block: ParsedBlock) -> None:
        self.rows += block.num_rows + sum(block.filtered.values())
        self.rows += sum(r.count for r in block.rejects if r.reason not in FILE_REASONS + SIDE_TABLE_REASONS)
        self.paths.add(block.path)
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        if self.tty:
            print(f"\r{self._line(now)}\033[K", end="", file=sys.stderr, flush=True)
            self.shown = True
        else:
            logger.info("%s", self._line(now))

    def close(self) -> None:
        if self.shown:
            print(f"\r{self._line(time.perf_counter())}\033[K", file=sys.stderr, flush=True)
