"""Which split a row goes to, and the writer of a split's Parquet files.

Splits (the same for the built-in readers, the synthetic generator and a spec):

- random: a row's split is a hash of (seed, record number), the record number being the 0-based
  index of its data line over all input files (rejected lines included), so the split is
  reproducible, independent of the block size and of which other lines were rejected;
- temporal: the kept rows ranked in time order (input order, or a timestamp / split column), the
  first 80% train, the next 10% valid, the rest test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pep_torchrec.data.prepare.options import DEFAULT_ROW_GROUP_SIZE, DEFAULT_ROWS_PER_FILE
from pep_torchrec.data.raw.rejections import PrepareError
from pep_torchrec.data.schema import SPLITS, SplitInfo
from pep_torchrec.data.synthetic import hash_uniform, mix_key

LABEL = "label"


def random_split_codes(records: np.ndarray, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """Seeded random split of rows by their record numbers.

    Args:
        records: [N] int64 global record numbers.
        seed: split seed.
        fractions: (train, valid, test) fractions summing to 1.

    Returns:
        [N] int8 split index into `schema.SPLITS` (0 train, 1 valid, 2 test).
    """
    u = hash_uniform(mix_key(seed, "split"), np.asarray(records, dtype=np.int64).astype(np.uint64))
    return ((u >= fractions[0]).astype(np.int8) + (u >= fractions[0] + fractions[1])).astype(np.int8)


def split_sizes(num_rows: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Rows of train/valid/test for a temporal split of `num_rows` rows."""
    num_train = round(fractions[0] * num_rows)
    num_valid = min(num_rows - num_train, round(fractions[1] * num_rows))
    return num_train, num_valid, num_rows - num_train - num_valid


def rank_split_codes(ranks: np.ndarray, num_rows: int, fractions: Sequence[float]) -> np.ndarray:
    """[N] int8 split index of rows given their 0-based rank in time order (temporal split)."""
    num_train, num_valid, _ = split_sizes(num_rows, fractions)
    ranks = np.asarray(ranks)
    return ((ranks >= num_train).astype(np.int8) + (ranks >= num_train + num_valid)).astype(np.int8)


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' → (0.8, 0.1, 0.1); three non-negative numbers summing to 1 (±1e-6)."""
    try:
        values = [float(x) for x in text.split(",")] if isinstance(text, str) else [float(x) for x in text]
    except ValueError:
        raise PrepareError(f"split fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise PrepareError(f"split fractions {text!r}: need three non-negative numbers summing to 1")
    return values[0], values[1], values[2]


class SplitWriter:
    """Appends rows of one split to DIR/<split>/part-NNNNN.parquet in row groups of a fixed size.

    Rows are buffered until a whole row group is there, so every row group but each file's last has
    exactly `row_group_size` rows whatever the block sizes upstream; a new file starts once the current
    one holds `rows_per_file` rows (rounded up to whole row groups; 0 = one file).

    Args:
        directory: the dataset directory (the split's folder is created inside).
        split: "train", "valid" or "test".
        schema: Arrow schema of the rows.
        row_group_size: rows per Parquet row group.
        rows_per_file: rows per file before starting the next one (0: no limit).
        compression: Parquet codec.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        schema: pa.Schema,
        *,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        rows_per_file: int = DEFAULT_ROWS_PER_FILE,
        compression: str = "snappy",
    ):
        self.root = Path(directory)
        self.split = split
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows_per_file = rows_per_file
        self.compression = compression
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self.rows = 0
        self.positives = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows (any number)."""
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        self.positives += int(np.asarray(table.column(LABEL).to_numpy()).sum())
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, num_rows: int) -> None:
        pending = pa.concat_tables(self._buffer)
        rest = pending.slice(num_rows)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        self._write_group(pending.slice(0, num_rows))

    def _open(self) -> None:
        if self._writer is not None:
            self._writer.close()
        relative = f"{self.split}/part-{len(self.files):05d}.parquet"
        codec = None if self.compression == "none" else self.compression
        self._writer = pq.ParquetWriter(self.root / relative, self.schema, compression=codec)
        self.files.append(relative)
        self._file_rows = 0

    def _write_group(self, table: pa.Table) -> None:
        if self._writer is None or (self.rows_per_file and self._file_rows >= self.rows_per_file):
            self._open()
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._file_rows += table.num_rows

    def close(self) -> SplitInfo:
        """Flush and close; an empty split still gets one (empty) file that carries the schema."""
        if self._buffered:
            self._flush(self._buffered)
        if self._writer is None:
            self._open()
            self._writer.write_table(self.schema.empty_table())
        self._writer.close()
        self._writer = None
        return SplitInfo(rows=self.rows, files=list(self.files))


def open_writers(tmp: Path, schema: pa.Schema, options: dict) -> dict[str, SplitWriter]:
    return {s: SplitWriter(tmp, s, schema, **options) for s in SPLITS}


def write_rows(writers: dict[str, SplitWriter], table: pa.Table, codes: np.ndarray) -> None:
    for index, split in enumerate(SPLITS):
        mask = codes == index
        if mask.all():
            writers[split].write(table)
        elif mask.any():
            writers[split].write(table.filter(pa.array(mask)))
