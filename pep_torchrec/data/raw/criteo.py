"""Criteo Display Advertising data (Kaggle DAC `train.txt`, Terabyte `day_0` .. `day_23`).

Raw format: one example per line, 40 tab-separated fields, no header:
``label, I1..I13 (integers, may be negative, e.g. -1), C1..C26 (hashed categories, 8 hex chars)``;
a missing value is an empty field. Files may be plain or gzip (detected from the content). `--raw` is
a file or a directory; in a directory the files named `day_<n>[.gz]` are read in day order, else every
`*.txt`/`*.tsv` file (plain or `.gz`) in natural order.

Prepared features (39 sparse + 13 dense):

- sparse `I1`..`I13`: the paper's bucketing, transform "criteo_log_bucket": an integer v > 2 becomes
  str(int(log(v)**2)), others str(v); a missing value is "" (just another value).
- sparse `C1`..`C26`: the raw string ("" for missing).
- dense `I1_log`..`I13_log`: log1p(max(v, 0)), missing → 0 (for DLRM-style models).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pep_torchrec.data.raw.readers import (
    DEFAULT_BLOCK_SIZE,
    INT_PATTERN,
    DatasetReader,
    DelimitedFile,
    FeatureSpec,
    ParsedBlock,
    RawBlock,
    RowChecks,
    SourceFile,
    list_input_files,
    matches,
    to_int64,
)
from pep_torchrec.data.vocab import criteo_log_bucket

LABEL = "label"
INT_FEATURES = [f"I{i}" for i in range(1, 14)]
CAT_FEATURES = [f"C{i}" for i in range(1, 27)]
COLUMNS = [LABEL, *INT_FEATURES, *CAT_FEATURES]
DENSE_FEATURES = [f"{name}_log" for name in INT_FEATURES]
FILE_PATTERNS = (("day_*",), ("*.txt", "*.txt.gz", "*.tsv", "*.tsv.gz"))
_OPTIONAL_INT = f"^$|{INT_PATTERN}"


class CriteoReader(DatasetReader):
    """Criteo TSV files → blocks of bucketed/raw sparse values, log1p dense values and labels.

    Args:
        raw: a file, or a directory of files (see the module docstring).
        block_size: decompressed bytes read per block.
    """

    name = "criteo"
    default_min_count = 10

    def __init__(self, raw: str | os.PathLike, block_size: int = DEFAULT_BLOCK_SIZE):
        super().__init__(block_size)
        self.files = list_input_files(raw, FILE_PATTERNS)

    @property
    def sparse_features(self) -> list[FeatureSpec]:
        return [FeatureSpec(n, transform="criteo_log_bucket") for n in INT_FEATURES] + [
            FeatureSpec(n) for n in CAT_FEATURES
        ]

    @property
    def dense_features(self) -> list[str]:
        return list(DENSE_FEATURES)

    def extra(self) -> dict:
        return {
            "dense_transform": "log1p(max(v, 0)), missing -> 0",
            "dense_source": dict(zip(DENSE_FEATURES, INT_FEATURES)),
        }

    def blocks(self, *, hash_files: bool = False) -> Iterator[ParsedBlock]:
        record_offset = 0
        sources = []
        for path in self.files:
            source = SourceFile(str(path.resolve()), "data") if hash_files else None
            reader = DelimitedFile(path, COLUMNS, delimiter=b"\t", block_size=self.block_size, source=source)
            for raw in reader.blocks():
                # No header: line L is data line L - 1 of this file.
                yield self._parse(raw, str(path), record_offset - 1)
            record_offset += reader.data_lines
            if source is not None:
                sources.append(source)
        self.rows_read = record_offset
        if hash_files:
            self.sources = sources

    @staticmethod
    def _parse(raw: RawBlock, path: str, record_base: int) -> ParsedBlock:
        table = raw.table
        checks = RowChecks(raw.lines)
        label = table.column(LABEL).combine_chunks()
        checks.check(
            "bad_label", matches(label, "^[01]$"), lambda i: f"label {label[i].as_py()!r} is not 0 or 1"
        )
        int_ok = {n: matches(table.column(n), _OPTIONAL_INT) for n in INT_FEATURES}

        def int_detail(i: int) -> str:
            name = next(n for n in INT_FEATURES if not int_ok[n][i])
            return f"field {name} = {table.column(name)[i].as_py()!r} is not an integer"

        checks.check("bad_integer", np.logical_and.reduce(list(int_ok.values())), int_detail)
        if not checks.alive.all():
            table = table.filter(pa.array(checks.alive))
        lines = raw.lines[checks.alive]

        sparse: dict[str, pa.Array] = {}
        dense: dict[str, np.ndarray] = {}
        for name, dense_name in zip(INT_FEATURES, DENSE_FEATURES):
            column = table.column(name).combine_chunks()
            missing = pc.equal(column, "")
            values = to_int64(column)  # "" → 0, masked below
            buckets = pc.cast(pa.array(criteo_log_bucket(values)), pa.string())
            sparse[name] = pc.if_else(missing, "", buckets)
            missing_np = missing.to_numpy(zero_copy_only=False)
            dense[dense_name] = np.where(missing_np, 0.0, np.log1p(np.maximum(values, 0))).astype(np.float32)
        for name in CAT_FEATURES:
            sparse[name] = table.column(name).combine_chunks()
        labels = pc.equal(table.column(LABEL), "1").to_numpy(zero_copy_only=False).astype(np.int8)
        return ParsedBlock(
            labels=labels,
            sparse=sparse,
            dense=dense,
            records=record_base + lines,
            path=path,
            rejects=raw.rejects + checks.rejects,
        )
