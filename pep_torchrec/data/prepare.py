"""`pep-torchrec data prepare`: raw Criteo / Avazu / MovieLens files (or the synthetic generator) → a
prepared dataset directory (see `pep_torchrec.data.schema` for the format).

Two streaming passes over the raw input, in bounded memory (one block of lines at a time):

1. count: validate every row (bad rows are skipped and counted per reason, or stop the run with
   `--strict`), count each sparse feature's values, hash the input files;
2. write: map values to ids (values seen fewer than `--min-count` times → OOV id 0), assign each row
   to train/valid/test and append it to that split's Parquet files in fixed-size row groups.

Splits:

- random (the paper's 80/10/10): a row's split is a hash of (seed, record number), the record number
  being the 0-based index of its data line over all input files (rejected lines included), so the split
  is reproducible, independent of the block size and of which other lines were rejected;
- temporal: Criteo/Avazu/synthetic in input order (the first 80% of the kept rows train, the next 10%
  valid, the rest test, using pass 1's row count); MovieLens by timestamp (ties by record number).

The output is written into a sibling temporary directory `DIR.tmp-<pid>` and renamed to DIR only when
complete: a failed run leaves neither. An existing DIR is refused unless `--overwrite` (which only
replaces a directory that is empty or holds a schema.json).

The vocabulary counts the whole input (all splits), as the paper's preprocessing does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pep_torchrec.data.readers import (
    DEFAULT_BLOCK_SIZE,
    DatasetReader,
    ParsedBlock,
    bytes_read,
    reset_bytes_read,
)
from pep_torchrec.data.rejections import (
    FILE_REASONS,
    SIDE_TABLE_REASONS,
    PrepareError,
    RejectionLog,
    write_report,
)
from pep_torchrec.data.schema import SPLITS, Schema, SparseFeature, SplitInfo
from pep_torchrec.data.synthetic import SyntheticConfig, SyntheticGenerator, hash_uniform, mix_key
from pep_torchrec.data.vocab import ValueCounter, Vocabulary, write_vocab
from pep_torchrec.utils.atomic import replace_dir

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "criteo", "avazu", "movielens")
SPLIT_METHODS = ("random", "temporal")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_ROW_GROUP_SIZE = 262_144
DEFAULT_ROWS_PER_FILE = 4_194_304
COMPRESSIONS = ("snappy", "zstd", "lz4", "gzip", "none")
LABEL = "label"


# ---------------------------------------------------------------------------------------------------
# splits


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


# ---------------------------------------------------------------------------------------------------
# output


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


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Give a temporary sibling directory; rename it to `out` if the block succeeds, delete it if not.

    Args:
        out: the final directory.
        overwrite: replace an existing `out` (only if it is empty or a prepared dataset).

    Raises:
        PrepareError: `out` exists (without `overwrite`), or is not a directory we may replace.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise PrepareError(f"{out}: already exists; choose another --out or pass --overwrite")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "schema.json").is_file()):
            raise PrepareError(
                f"{out}: refusing to replace it: not a prepared dataset directory (no schema.json)"
            )
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------
# pipelines


def make_reader(dataset: str, raw: str | os.PathLike, block_size: int = DEFAULT_BLOCK_SIZE) -> DatasetReader:
    """The `DatasetReader` of a raw dataset ("criteo", "avazu" or "movielens")."""
    if dataset == "criteo":
        from pep_torchrec.data.criteo import CriteoReader

        return CriteoReader(raw, block_size)
    if dataset == "avazu":
        from pep_torchrec.data.avazu import AvazuReader

        return AvazuReader(raw, block_size)
    if dataset == "movielens":
        from pep_torchrec.data.movielens import MovieLensReader

        return MovieLensReader(raw, block_size)
    raise PrepareError(f"unknown dataset {dataset!r}; have {DATASETS}")


def _arrow_schema(features: list[SparseFeature], dense: list[str]) -> pa.Schema:
    fields = [pa.field(LABEL, pa.int8())]
    for f in features:
        fields.append(pa.field(f.name, pa.list_(pa.int64()) if f.multi_hot else pa.int64()))
    fields += [pa.field(n, pa.float32()) for n in dense]
    return pa.schema(fields)


def _open_writers(tmp: Path, schema: pa.Schema, options: dict) -> dict[str, SplitWriter]:
    return {s: SplitWriter(tmp, s, schema, **options) for s in SPLITS}


def _write_rows(writers: dict[str, SplitWriter], table: pa.Table, codes: np.ndarray) -> None:
    for index, split in enumerate(SPLITS):
        mask = codes == index
        if mask.all():
            writers[split].write(table)
        elif mask.any():
            writers[split].write(table.filter(pa.array(mask)))


def _prepare_raw(
    reader: DatasetReader,
    tmp: Path,
    *,
    min_count: int,
    split: str,
    fractions: tuple[float, float, float],
    seed: int,
    strict: bool,
    writer_options: dict,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    specs = reader.sparse_features
    log = RejectionLog(strict)

    # Pass 1: validate, count values, hash the inputs.
    counters = {f.name: ValueCounter() for f in specs}
    by_timestamp = split == "temporal" and reader.temporal_key == "timestamp"
    num_kept, order_keys, order_records = _count_pass(reader, counters, log, by_timestamp)
    timings["count_s"] = time.perf_counter() - started
    files = [s.path for s in reader.sources]
    if num_kept == 0:
        raise PrepareError(
            f"no valid row in {files}: {reader.rows_read} rows read, rejected {dict(log.rejected)}, "
            f"filtered {dict(log.filtered)}"
        )
    logger.info("pass 1: %d rows read, %d kept", reader.rows_read, num_kept)

    t = time.perf_counter()
    vocabs = {f.name: Vocabulary.from_counts(f.name, counters.pop(f.name).result(), min_count) for f in specs}
    features = [SparseFeature(f.name, vocabs[f.name].cardinality, f.multi_hot, f.transform) for f in specs]
    temporal_codes = None
    if by_timestamp:
        temporal_codes = _timestamp_split_codes(order_keys, order_records, num_kept, fractions)
    timings["vocab_s"] = time.perf_counter() - t

    # Pass 2: ids, split, Parquet.
    t = time.perf_counter()
    splits, writers = _write_pass(
        reader,
        tmp,
        vocabs,
        features,
        split=split,
        fractions=fractions,
        seed=seed,
        num_kept=num_kept,
        temporal_codes=temporal_codes,
        writer_options=writer_options,
        files=files,
    )
    timings["write_s"] = time.perf_counter() - t

    schema = _raw_schema(
        reader, features, splits, min_count=min_count, split=split, seed=seed, fractions=fractions
    )
    schema.save(tmp)
    return _finish_report(_rows_report(reader, num_kept, log), schema, writers, timings)


def _raw_schema(
    reader: DatasetReader,
    features: list[SparseFeature],
    splits: dict[str, SplitInfo],
    *,
    min_count: int,
    split: str,
    seed: int,
    fractions: tuple[float, float, float],
) -> Schema:
    """The prepared dataset's schema: features, splits, split method and the input files' provenance."""
    return Schema(
        dataset=reader.name,
        sparse_features=features,
        dense_features=list(reader.dense_features),
        splits=splits,
        label=LABEL,
        min_count=min_count,
        split_method=split,
        seed=seed,
        source={
            "files": [s.to_json() for s in reader.sources],
            "sha256_of": "the file's bytes as stored (compressed bytes for gzip files)",
        },
        extra={**reader.extra(), "split_fractions": list(fractions)},
    )


def _count_pass(
    reader: DatasetReader, counters: dict[str, ValueCounter], log: RejectionLog, by_timestamp: bool
) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    """Pass 1: record rejections in `log`, count each sparse feature's values into `counters`.

    Returns the number of kept rows and (`by_timestamp`) the per-block order keys and record numbers
    of the kept rows.
    """
    num_kept = 0
    order_keys: list[np.ndarray] = []
    order_records: list[np.ndarray] = []
    progress = _Progress("pass 1/2 (count)", reader)
    for block in reader.blocks(hash_files=True):
        progress.update(block)
        log.record(block.path, block.rejects)
        for reason, count in block.filtered.items():
            log.filter(reason, count)
        if not block.num_rows:
            continue
        for name, counter in counters.items():
            counter.add(block.sparse[name])
        num_kept += block.num_rows
        if by_timestamp:
            order_keys.append(block.order_keys)
            order_records.append(block.records)
    progress.close()
    return num_kept, order_keys, order_records


def _timestamp_split_codes(
    order_keys: list[np.ndarray],
    order_records: list[np.ndarray],
    num_kept: int,
    fractions: tuple[float, float, float],
) -> np.ndarray:
    """Split codes of the kept rows (input order) ranked by (timestamp, record number); empties the lists."""
    keys, records = np.concatenate(order_keys), np.concatenate(order_records)
    order_keys.clear()
    order_records.clear()
    ranks = np.empty(num_kept, dtype=np.int64)
    ranks[np.lexsort((records, keys))] = np.arange(num_kept)
    return rank_split_codes(ranks, num_kept, fractions)


def _write_pass(
    reader: DatasetReader,
    tmp: Path,
    vocabs: dict[str, Vocabulary],
    features: list[SparseFeature],
    *,
    split: str,
    fractions: tuple[float, float, float],
    seed: int,
    num_kept: int,
    temporal_codes: np.ndarray | None,
    writer_options: dict,
    files: list[str],
) -> tuple[dict[str, SplitInfo], dict[str, SplitWriter]]:
    """Pass 2: map values to ids, assign each row its split, write the Parquet files and the vocabulary.

    Returns the closed splits' info and the writers (for the label means).
    """
    reader.check_unchanged()
    arrow_schema = _arrow_schema(features, reader.dense_features)
    writers = _open_writers(tmp, arrow_schema, writer_options)
    position = 0  # rank of the block's first kept row in input order
    total_rows = reader.rows_read
    progress = _Progress("pass 2/2 (write)", reader, total_rows=total_rows)
    for block in reader.blocks():
        progress.update(block)
        n = block.num_rows
        if not n:
            continue
        table = _block_table(block, features, vocabs, reader.dense_features, arrow_schema)
        if split == "random":
            codes = random_split_codes(block.records, seed, fractions)
        elif temporal_codes is not None:
            codes = temporal_codes[position : position + n]
        else:
            codes = rank_split_codes(np.arange(position, position + n), num_kept, fractions)
        position += n
        _write_rows(writers, table, codes)
    if position != num_kept:
        raise PrepareError(
            f"{files}: pass 2 read {position} rows, pass 1 {num_kept}: the input changed; run again"
        )
    splits = {s: w.close() for s, w in writers.items()}
    write_vocab(tmp, [vocabs[f.name] for f in features])
    progress.close()
    return splits, writers


def _block_table(
    block: ParsedBlock,
    features: list[SparseFeature],
    vocabs: dict[str, Vocabulary],
    dense_features: Sequence[str],
    arrow_schema: pa.Schema,
) -> pa.Table:
    """A parsed block's kept rows as a prepared table: label, ids per sparse feature, dense values."""
    columns: list[pa.Array] = [pa.array(block.labels, pa.int8())]
    for f in features:
        values = block.sparse[f.name]
        if f.multi_hot:
            columns.append(vocabs[f.name].lookup_lists(values))
        else:
            columns.append(pa.array(vocabs[f.name].lookup(values), pa.int64()))
    columns += [pa.array(block.dense[d], pa.float32()) for d in dense_features]
    return pa.Table.from_arrays(columns, schema=arrow_schema)


def _prepare_synthetic(
    config: SyntheticConfig,
    tmp: Path,
    *,
    split: str,
    fractions: tuple[float, float, float],
    writer_options: dict,
) -> dict[str, Any]:
    t = time.perf_counter()
    gen = SyntheticGenerator(config)
    features = [SparseFeature(n, card) for n, card in zip(gen.sparse_names, config.cardinalities)]
    writers = _open_writers(tmp, gen.arrow_schema, writer_options)
    for start, table in gen.chunks():
        records = np.arange(start, start + table.num_rows)
        if split == "random":
            codes = random_split_codes(records, config.seed, fractions)
        else:
            codes = rank_split_codes(records, config.rows, fractions)
        _write_rows(writers, table, codes)
    splits = {s: w.close() for s, w in writers.items()}
    schema = Schema(
        dataset="synthetic",
        sparse_features=features,
        dense_features=list(gen.dense_names),
        splits=splits,
        label=LABEL,
        min_count=1,
        split_method=split,
        seed=config.seed,
        source={"generator": "pep_torchrec.data.synthetic", "params": config.params()},
        extra={**gen.extra(), "split_fractions": list(fractions)},
    )
    schema.save(tmp)
    report = {
        "rows_read": config.rows,
        "rows_kept": config.rows,
        "rows_rejected": {},
        "rows_rejected_total": 0,
        "rows_filtered": {},
        "rejected_examples": {},
        "files": [],
    }
    return _finish_report(report, schema, writers, {"generate_s": time.perf_counter() - t})


def _rows_report(reader: Any, num_kept: int, log: RejectionLog) -> dict:
    """The rows part of report.json for a read of raw files (`reader`: a DatasetReader or a spec's
    SpecRows, anything with `rows_read` and `sources`): read, kept, rejected and filtered per reason
    (with examples), and the files."""
    return {
        "rows_read": reader.rows_read,
        "rows_kept": num_kept,
        "rows_rejected": dict(sorted(log.rejected.items())),
        "rows_rejected_total": log.rejected_rows,
        "rows_filtered": dict(sorted(log.filtered.items())),
        "rejected_examples": dict(sorted(log.examples.items())),
        "files": [s.to_json() for s in reader.sources],
    }


def _finish_report(report: dict, schema: Schema, writers: dict[str, SplitWriter], timings: dict) -> dict:
    report["rows_per_split"] = {s: schema.splits[s].rows for s in SPLITS}
    report["label_mean"] = {s: (w.positives / w.rows if w.rows else None) for s, w in writers.items()}
    report["cardinalities"] = {f.name: f.cardinality for f in schema.sparse_features}
    report["dense_features"] = list(schema.dense_features)
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return report


# ---------------------------------------------------------------------------------------------------
# public API


_SYNTHETIC_OPTIONS = set(SyntheticConfig.__dataclass_fields__) - {"seed", "cardinalities"}


def prepare_dataset(
    dataset: str,
    raw: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    min_count: int | None = None,
    split: str = "random",
    seed: int = 0,
    strict: bool = False,
    split_fractions: str | Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    compression: str = "snappy",
    **dataset_options: Any,
) -> dict[str, Any]:
    """Prepare a dataset directory from raw files or from the synthetic generator.

    Args:
        dataset: "synthetic", "criteo", "avazu" or "movielens".
        raw: the raw input: a file or directory (criteo, avazu), the dataset directory (movielens),
            None for synthetic.
        out: the directory to create (must not exist unless `overwrite`).
        min_count: values seen fewer times map to the OOV id 0; default 10 for criteo/avazu, 1 for
            movielens (not applicable to synthetic).
        split: "random" (seeded hash of the record number) or "temporal".
        seed: split seed (and the generator's seed for synthetic).
        strict: stop at the first malformed row with a `PrepareError` naming `file:line: reason`.
        split_fractions: train/valid/test fractions, a sequence or "0.8,0.1,0.1".
        overwrite: replace an existing prepared dataset at `out`.
        block_size: decompressed bytes read per block (memory bound of the readers).
        row_group_size: rows per Parquet row group.
        rows_per_file: rows per Parquet file of a split (0: a single file).
        compression: Parquet codec: snappy, zstd, lz4, gzip or none.
        **dataset_options: synthetic only: the fields of `SyntheticConfig` except seed (rows,
            num_sparse, num_dense, cardinality, zipf_exponent, ...).

    Returns:
        The report (also written to `out/report.json`): rows read/kept/rejected per reason/filtered,
        rows and label mean per split, cardinalities, timings, input files.

    Raises:
        PrepareError: bad options, unreadable or wholly invalid input, an existing `out`, or (strict)
            a malformed row. `MalformedRowError` (a subclass) carries path, line and reason.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; have {list(DATASETS)}")
    fractions, writer_options = _check_options(
        split, split_fractions, compression, block_size, row_group_size, rows_per_file
    )
    source, min_count = _open_source(dataset, raw, min_count, seed, block_size, dataset_options)
    with atomic_output_dir(out, overwrite) as tmp:
        if isinstance(source, SyntheticConfig):
            report = _prepare_synthetic(
                source, tmp, split=split, fractions=fractions, writer_options=writer_options
            )
        else:
            report = _prepare_raw(
                source,
                tmp,
                min_count=min_count,
                split=split,
                fractions=fractions,
                seed=seed,
                strict=strict,
                writer_options=writer_options,
            )
        run_info = _run_info(
            dataset, raw, out, started, started_at, min_count, split, fractions, seed, strict
        )
        report = {**run_info, **report}
        write_report(tmp, report)
    return report


def _check_options(
    split: str,
    split_fractions: str | Sequence[float],
    compression: str,
    block_size: int,
    row_group_size: int,
    rows_per_file: int,
) -> tuple[tuple[float, float, float], dict]:
    """Validate the split and output options; returns the split fractions and the `SplitWriter` options."""
    if split not in SPLIT_METHODS:
        raise PrepareError(f"unknown split method {split!r}; have {list(SPLIT_METHODS)}")
    fractions = parse_fractions(split_fractions)
    if compression not in COMPRESSIONS:
        raise PrepareError(f"unknown compression {compression!r}; have {list(COMPRESSIONS)}")
    for name, value, low in (("block_size", block_size, 1 << 10), ("row_group_size", row_group_size, 1)):
        if value < low:
            raise PrepareError(f"{name} must be >= {low}, got {value}")
    if rows_per_file < 0:
        raise PrepareError(f"rows_per_file must be >= 0, got {rows_per_file}")
    writer_options = {
        "row_group_size": row_group_size,
        "rows_per_file": rows_per_file,
        "compression": compression,
    }
    return fractions, writer_options


def _open_source(
    dataset: str,
    raw: str | os.PathLike | None,
    min_count: int | None,
    seed: int,
    block_size: int,
    dataset_options: dict[str, Any],
) -> tuple[SyntheticConfig | DatasetReader, int]:
    """The synthetic generator's config or the raw input's reader, and the min_count that applies."""
    if dataset == "synthetic":
        if raw is not None:
            raise PrepareError("--raw does not apply to the synthetic dataset")
        if min_count is not None:
            raise PrepareError("--min-count does not apply to the synthetic dataset (its values are ids)")
        unknown = set(dataset_options) - _SYNTHETIC_OPTIONS
        if unknown:
            raise PrepareError(
                f"unknown synthetic options {sorted(unknown)}; have {sorted(_SYNTHETIC_OPTIONS)}"
            )
        try:
            config = SyntheticConfig(seed=seed, **dataset_options)
        except ValueError as e:
            raise PrepareError(str(e)) from None
        return config, 1
    if raw is None:
        raise PrepareError(f"--raw is required for the {dataset} dataset")
    if dataset_options:
        raise PrepareError(f"options {sorted(dataset_options)} apply to the synthetic dataset only")
    reader = make_reader(dataset, raw, block_size)
    min_count = reader.default_min_count if min_count is None else min_count
    if min_count < 1:
        raise PrepareError(f"min_count must be >= 1, got {min_count}")
    return reader, min_count


def _run_info(
    dataset: str,
    raw: str | os.PathLike | None,
    out: str | os.PathLike,
    started: float,
    started_at: str,
    min_count: int,
    split: str,
    fractions: tuple[float, float, float],
    seed: int,
    strict: bool,
) -> dict[str, Any]:
    """The report's first fields: what was prepared, from where, when, how long, with which options."""
    return {
        "dataset": dataset,
        "raw": None if raw is None else str(Path(raw).resolve()),
        "out": str(Path(out).resolve()),
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 3),
        "min_count": min_count,
        "split_method": split,
        "split_fractions": list(fractions),
        "seed": seed,
        "strict": strict,
    }


class _Progress:
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


def format_summary(report: dict[str, Any]) -> str:
    """A human summary of a report (what `pep-torchrec data prepare` prints)."""
    splits = report["rows_per_split"]
    lines = [
        f"prepared {report['dataset']} -> {report['out']} in {report['duration_s']:.2f} s",
        f"  rows: read {report['rows_read']:,}, kept {report['rows_kept']:,}, "
        f"rejected {report['rows_rejected_total']:,}, filtered {sum(report['rows_filtered'].values()):,}",
        "  splits: " + ", ".join(f"{s} {splits[s]:,}" for s in SPLITS),
        "  label mean: "
        + ", ".join(f"{s} {m:.4f}" if m is not None else f"{s} -" for s, m in report["label_mean"].items()),
    ]
    broken = report["rows_rejected"].get("broken_gzip", 0)
    if broken:  # rows_rejected_total cannot count what was never read: say it in words
        lines.append(
            f"  DATA LOST: {broken} gzip stream(s) break before their end; the rows after each break "
            f"were not read (first: {report['rejected_examples']['broken_gzip']}); --strict refuses this"
        )
    if report["rows_rejected"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v:,}" for k, v in report["rows_rejected"].items()))
        for reason, example in report["rejected_examples"].items():
            lines.append(f"    first {reason}: {example}")
    if report["rows_filtered"]:
        lines.append("  filtered: " + ", ".join(f"{k} {v:,}" for k, v in report["rows_filtered"].items()))
    cards = report["cardinalities"]
    lines.append(f"  sparse features ({len(cards)}): " + ", ".join(f"{k} {v:,}" for k, v in cards.items()))
    lines.append(
        f"  dense features ({len(report['dense_features'])}): " + ", ".join(report["dense_features"])
    )
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m pep_torchrec.data.prepare`: the same as `pep-torchrec data prepare`
    from pep_torchrec.commands.data_prepare_command import main

    sys.exit(main())
