"""`pep-torchrec data prepare --spec SPEC.yaml --raw PATH... --out DIR`: any tabular CTR data, declared
in a spec (pep_torchrec/data/spec.py), → the same prepared format as the built-in readers
(pep_torchrec/data/schema.py), so training, export and the loader need nothing new.

The passes are those of `pipeline.py` (streaming, one block at a time, bounded memory):

1. count: validate every row (bad rows counted per reason with the first file:line, or `--strict`
   stops), count the values of each vocabulary field over all splits (as the built-in readers do),
   hash the inputs; with a random or given-files split, also the train statistics (mean and standard
   deviation of `standardize` fields, a bounded seeded sample of `quantile` fields);
1b. (temporal split with train statistics only) the statistics, once the row order is known;
2. write: ids (vocabulary with OOV id 0, or FNV-1a hashing, or quantile buckets), dense values,
   the split, Parquet.

Ids: a vocabulary field's kept values get ids 1.. (most frequent first), everything else 0, as in
schema.py; a hashed field's id is FNV-1a-64(value) mod `hash_buckets` (no vocabulary rows); a quantile
field's id is 0 for a missing value, else 1 + its bucket among `num_buckets` (edges in schema.json).
The random split hashes (seed, record number) exactly as the built-in readers, so the same rows of the
same file land in the same splits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pep_torchrec.data.prepare.options import COMPRESSIONS, PrepareOptions
from pep_torchrec.data.prepare.output import atomic_output_dir, finish_report, rows_report, write_report
from pep_torchrec.data.prepare.splits import (
    LABEL,
    open_writers,
    parse_fractions,
    random_split_codes,
    rank_split_codes,
    write_rows,
)
from pep_torchrec.data.raw.readers import DEFAULT_BLOCK_SIZE, SourceFile
from pep_torchrec.data.raw.rejections import PrepareError, RejectionLog
from pep_torchrec.data.raw.spec_reader import (
    FieldMap,
    InputFile,
    SideTable,
    SpecBlock,
    SpecRows,
    resolve_inputs,
    side_table_path,
    split_of_file,
)
from pep_torchrec.data.schema import Schema, SparseFeature, arrow_schema
from pep_torchrec.data.spec import DatasetSpec, load_spec, resolve_spec_path, spec_to_dict
from pep_torchrec.data.spec_transform import (
    JOIN_FILE,
    SpecTransform,
    dense_base,
    joined_columns,
    side_table_bytes,
    sparse_kind,
)
from pep_torchrec.data.synthetic import hash_uniform, mix_key
from pep_torchrec.data.vocab import ValueCounter, Vocabulary, write_vocab

logger = logging.getLogger(__name__)

QUANTILE_SAMPLE = 200_000
"""Train values kept (a seeded sample by record) to place a quantile field's edges: bounded memory."""


class SpecReader:
    """The spec's input files (and side tables) as a stream of `SpecBlock`s, one call per pass.

    Args:
        spec: the checked spec.
        raws: the `--raw` paths (files, directories, globs).
        block_size: decompressed bytes per block.
    """

    def __init__(
        self, spec: DatasetSpec, raws: Sequence[str | os.PathLike], block_size: int = DEFAULT_BLOCK_SIZE
    ):
        self.spec = spec
        self.raws = [str(r) for r in raws]
        self.block_size = block_size
        self.files = resolve_inputs(self.raws, spec.format.files)
        self.side_paths = [side_table_path(self.raws, j.path, f"joins {j.name}") for j in spec.joins]
        self.field_map = None
        if spec.format.field_map:
            path = side_table_path(self.raws, spec.format.field_map, "format.field_map")
            self.field_map = FieldMap.load(path, spec.format.fields)
        self.split_codes = (
            [split_of_file(p, spec) for p in self.files] if spec.split.method == "files" else None
        )
        self.sources: list[SourceFile] = []
        self.side_tables: list[SideTable] = []
        self.rows_read = 0

    def blocks(self, *, hash_files: bool = False) -> Iterator[SpecBlock]:
        sides = [
            SideTable.load(j, p, self.block_size, hash_files)
            for j, p in zip(self.spec.joins, self.side_paths)
        ]
        self.side_tables = sides  # the last pass's: prepare persists what serving joins
        rows = SpecRows(self.spec, sides)
        sources = []
        for side in sides:
            if side.rejects:
                yield _empty_block(self.spec, str(side.path), side.rejects)
            if side.source is not None:
                sources.append(side.source)
        record_offset = 0
        data_sources = []
        for k, path in enumerate(self.files):
            source = SourceFile(str(path.resolve()), "data") if hash_files else None
            reader = InputFile(path, self.spec.format, self.block_size, source, self.field_map)
            code = None if self.split_codes is None else self.split_codes[k]
            checked = False
            for raw in reader.blocks():
                if not checked and raw.table.num_rows:
                    self._check_columns(rows, reader.columns or [], path)
                    checked = True
                if raw.table.num_rows == 0:
                    yield _empty_block(self.spec, str(path), raw.rejects)
                    continue
                yield rows.parse(raw, str(path), record_offset - reader.first_data_line, code)
            record_offset += reader.data_lines
            if source is not None:
                data_sources.append(source)
        self.rows_read = record_offset
        if hash_files:
            self.sources = data_sources + sources

    @staticmethod
    def _check_columns(rows: SpecRows, columns: list[str], path: Path) -> None:
        """Every column the spec reads is in the input or joined, and no joined column hides one."""
        joined = {s.spec.prefix + c for s in rows.side_tables for c in s.columns}
        clash = sorted(joined & set(columns))
        if clash:
            raise PrepareError(
                f"{path}: joined columns {clash} are also input columns; set the join's prefix"
            )
        missing = sorted(rows.required_columns() - set(columns) - joined)
        if missing:
            raise PrepareError(
                f"{path}: columns {missing} that the spec reads are neither in the input {columns} nor joined"
            )

    def check_unchanged(self) -> None:
        for s in self.sources:
            st = os.stat(s.path)
            if (st.st_size, st.st_mtime_ns) != (s.bytes, s.mtime_ns):
                raise PrepareError(f"{s.path}: changed while the dataset was being prepared; run again")


def _empty_block(spec: DatasetSpec, path: str, rejects) -> SpecBlock:
    return SpecBlock(np.empty(0, np.int8), {}, {}, np.empty(0, np.int64), path, rejects=list(rejects))


# ---------------------------------------------------------------------------------------------------
# train statistics


class _TrainStats:
    """Mean/std of `standardize` fields and a bounded sample of `quantile` fields, over train rows."""

    def __init__(self, spec: DatasetSpec, seed: int):
        self.std_fields = [f for f in spec.fields if f.type == "numeric" and "standardize" in f.dense]
        self.q_fields = [f for f in spec.fields if f.type == "numeric" and f.bucketize == "quantile"]
        self.sums = {f.name: np.zeros(3) for f in self.std_fields}  # count, sum, sum of squares
        self.samples: dict[str, tuple[np.ndarray, np.ndarray]] = {
            f.name: (np.empty(0), np.empty(0)) for f in self.q_fields
        }
        self.seed = seed

    @property
    def needed(self) -> bool:
        return bool(self.std_fields or self.q_fields)

    def add(self, block: SpecBlock, train: np.ndarray) -> None:
        for f in self.std_fields:
            values, missing = block.numbers[f.name]
            v = dense_base(f, values)[train & ~missing]
            self.sums[f.name] += (len(v), v.sum(), np.square(v).sum())
        for f in self.q_fields:
            values, missing = block.numbers[f.name]
            sel = train & ~missing
            # Priority = a hash of the record: the sample does not depend on block sizes or order.
            prio = hash_uniform(
                mix_key(self.seed, f"quantile:{f.name}"), block.records[sel].astype(np.uint64)
            )
            old_p, old_v = self.samples[f.name]
            p, v = np.concatenate([old_p, prio]), np.concatenate([old_v, values[sel]])
            if len(p) > QUANTILE_SAMPLE:
                keep = np.argpartition(p, QUANTILE_SAMPLE)[:QUANTILE_SAMPLE]
                p, v = p[keep], v[keep]
            self.samples[f.name] = (p, v)

    def result(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in self.std_fields:
            count, total, squares = self.sums[f.name]
            mean = total / count if count else 0.0
            var = max(squares / count - mean * mean, 0.0) if count else 0.0
            std = float(np.sqrt(var)) or 1.0  # a constant field stays 0 rather than dividing by 0
            out.setdefault(f.name, {}).update(mean=float(mean), std=std, train_values=int(count))
        for f in self.q_fields:
            _, v = self.samples[f.name]
            qs = np.arange(1, f.num_buckets) / f.num_buckets
            edges = np.unique(np.quantile(v, qs)) if len(v) else np.empty(0)
            out.setdefault(f.name, {}).update(edges=[float(e) for e in edges], sampled_values=int(len(v)))
        return out


# ---------------------------------------------------------------------------------------------------
# the preparation


def prepare_from_spec(
    spec_path: str | os.PathLike,
    raws: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    options: PrepareOptions | None = None,
) -> dict[str, Any]:
    """Prepare a dataset directory from raw files as a spec declares.

    Args:
        spec_path: the spec YAML, or a shipped spec's name (`criteo`, `movielens_100k`).
        raws: the raw inputs: files, directories (files matching `format.files`) or globs.
        out: the directory to create (atomically; an existing one only with `options.overwrite`).
        options: as for `prepare_dataset` (None: defaults); `min_count`, `split`, `split_fractions`
            and `seed`, when set, override the spec's `min_count` and `split.method`,
            `split.fractions`, `split.seed`; `synthetic` does not apply.

    Returns:
        The report, also written to `out/report.json`.

    Raises:
        PrepareError: a bad spec (naming file and key), unreadable or wholly invalid input, an
            existing `out`, or (strict) a malformed row.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    options = options or PrepareOptions()
    if options.synthetic is not None:
        raise PrepareError("options ['synthetic'] apply to the synthetic dataset only")
    spec_file = resolve_spec_path(str(spec_path))
    spec = load_spec(spec_file)
    _override(spec, options.min_count, options.split, options.split_fractions, options.seed)
    fractions = parse_fractions(spec.split.fractions)
    if options.compression not in COMPRESSIONS:
        raise PrepareError(f"unknown compression {options.compression!r}; have {list(COMPRESSIONS)}")
    if options.block_size < 1 << 10 or options.row_group_size < 1 or options.rows_per_file < 0:
        raise PrepareError("block_size must be >= 1024, row_group_size >= 1, rows_per_file >= 0")
    if not raws:
        raise PrepareError("--raw is required with --spec")
    reader = SpecReader(spec, raws, options.block_size)
    strict = options.strict
    with atomic_output_dir(out, options.overwrite) as tmp:
        report = _prepare(
            spec, reader, tmp, fractions=fractions, strict=strict, writer_options=options.writer_options()
        )
        report = {
            "dataset": spec.name,
            "spec": str(spec_file.resolve()),
            "raw": [str(Path(r).resolve()) for r in raws],
            "out": str(Path(out).resolve()),
            "started_at": started_at,
            "duration_s": round(time.perf_counter() - started, 3),
            "min_count": spec.min_count,
            "split_method": spec.split.method,
            "split_fractions": list(fractions),
            "seed": spec.split.seed,
            "strict": strict,
            **report,
        }
        write_report(tmp, report)
    return report


def _override(
    spec: DatasetSpec,
    min_count: int | None,
    split: str | None,
    split_fractions: str | Sequence[float] | None,
    seed: int | None,
) -> None:
    """Set the spec's `min_count` and `split.method`, `split.fractions`, `split.seed` to those given."""
    if min_count is not None:
        if min_count < 1:
            raise PrepareError(f"min_count must be >= 1, got {min_count}")
        spec.min_count = min_count
    if split is not None:
        if split not in ("random", "temporal"):
            raise PrepareError(
                f"--split {split!r}: random or temporal (given-files splits are set in the spec)"
            )
        spec.split.method = split
    if split_fractions is not None:
        spec.split.fractions = list(parse_fractions(split_fractions))
    if seed is not None:
        if seed < 0:
            raise PrepareError(f"--seed must be >= 0, got {seed}")
        spec.split.seed = seed


def _prepare(spec: DatasetSpec, reader: SpecReader, tmp: Path, *, fractions, strict: bool,
             writer_options: dict) -> dict[str, Any]:  # fmt: skip
    timings: dict[str, float] = {}
    t = time.perf_counter()
    method, seed = spec.split.method, spec.split.seed
    sparse = [f for f in spec.fields if f.type != "numeric" or f.bucketize]
    dense = [f for f in spec.fields if f.type == "numeric" and f.dense]
    vocab_fields = [f for f in sparse if sparse_kind(f) == "vocab"]
    log = RejectionLog(strict)
    counters = {f.name: ValueCounter() for f in vocab_fields}
    stats = _TrainStats(spec, seed)
    by_column = method == "temporal" and bool(spec.split.column)

    # Pass 1: validate, count, (random / files split) train statistics.
    num_kept, multi_names, order_keys, order_records = _count_pass(
        spec, reader, fractions, log, counters, stats, by_column
    )
    timings["count_s"] = time.perf_counter() - t
    if num_kept == 0:
        raise PrepareError(
            f"no valid row in {[str(p) for p in reader.files]}: {reader.rows_read} rows read, rejected "
            f"{dict(log.rejected)}, filtered {dict(log.filtered)}"
        )
    ranks = _order_ranks(order_keys, order_records, num_kept) if by_column else None
    if stats.needed and method == "temporal":  # pass 1b: the train rows are known only now
        t1 = time.perf_counter()
        _add_train_stats(spec, reader, stats, fractions, num_kept, ranks)
        timings["train_stats_s"] = time.perf_counter() - t1
    train_stats = stats.result()

    t = time.perf_counter()
    vocabs = _vocabularies(spec, vocab_fields, counters)
    features = _sparse_features(sparse, vocabs, multi_names)
    timings["vocab_s"] = time.perf_counter() - t

    # Pass 2: ids, dense values, split, Parquet.
    t = time.perf_counter()
    splits, writers = _write_pass(
        spec,
        reader,
        tmp,
        features,
        dense,
        vocabs,
        train_stats,
        fractions=fractions,
        num_kept=num_kept,
        ranks=ranks,
        writer_options=writer_options,
    )
    write_vocab(tmp, [vocabs[f.name] for f in vocab_fields])
    joins = _write_joins(spec, reader, tmp)
    timings["write_s"] = time.perf_counter() - t

    schema = _spec_schema(spec, reader, features, dense, splits, fractions, train_stats, joins)
    schema.save(tmp)
    return finish_report(rows_report(reader, num_kept, log), schema, writers, timings)


def _split_codes(
    spec: DatasetSpec,
    block: SpecBlock,
    fractions: tuple[float, float, float],
    position: int,
    num_kept: int,
    ranks: np.ndarray | None,
) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) of a block's rows, its first being kept row `position`.

    `num_kept` and `position` matter to the temporal split only (a random or given-files split needs
    neither); `ranks`: each kept row's rank by the split column, in input order (None: input order).
    """
    n = block.num_rows
    if spec.split.method == "random":
        return random_split_codes(block.records, spec.split.seed, fractions)
    if spec.split.method == "files":
        return np.full(n, block.split_code, dtype=np.int8)
    if ranks is not None:
        return rank_split_codes(ranks[position : position + n], num_kept, fractions)
    return rank_split_codes(np.arange(position, position + n), num_kept, fractions)


def _count_pass(
    spec: DatasetSpec,
    reader: SpecReader,
    fractions: tuple[float, float, float],
    log: RejectionLog,
    counters: dict[str, ValueCounter],
    stats: _TrainStats,
    by_column: bool,
) -> tuple[int, set[str], list[np.ndarray], list[np.ndarray]]:
    """Pass 1: record rejections in `log`, count values into `counters`, and (random / files split)
    add the train rows to `stats`.

    Returns the number of kept rows, the names of the fields with a bag per row, and (`by_column`)
    the per-block split-column keys and record numbers of the kept rows.
    """
    num_kept = 0
    multi_names: set[str] = set()
    order_keys: list[np.ndarray] = []
    order_records: list[np.ndarray] = []
    for block in reader.blocks(hash_files=True):
        log.record(block.path, block.rejects)
        for reason, count in block.filtered.items():
            log.filter(reason, count)
        if not block.num_rows:
            continue
        for name, counter in counters.items():
            counter.add(block.keys[name])
        # A bag per row: a separator, a flags field, or a list column of a Parquet input.
        multi_names.update(k for k, v in block.keys.items() if pa.types.is_list(v.type))
        if by_column:
            order_keys.append(block.order_keys)
            order_records.append(block.records)
        if stats.needed and spec.split.method != "temporal":
            stats.add(block, _split_codes(spec, block, fractions, 0, num_kept, None) == 0)
        num_kept += block.num_rows
    return num_kept, multi_names, order_keys, order_records


def _order_ranks(order_keys: list[np.ndarray], order_records: list[np.ndarray], num_kept: int) -> np.ndarray:
    """Each kept row's rank by (split column, record number), in input order; empties the lists."""
    keys, records = np.concatenate(order_keys), np.concatenate(order_records)
    order_keys.clear()
    order_records.clear()
    ranks = np.empty(num_kept, dtype=np.int64)
    ranks[np.lexsort((records, keys))] = np.arange(num_kept)
    return ranks


def _add_train_stats(
    spec: DatasetSpec,
    reader: SpecReader,
    stats: _TrainStats,
    fractions: tuple[float, float, float],
    num_kept: int,
    ranks: np.ndarray | None,
) -> None:
    """Pass 1b (temporal split): add the train rows to `stats`, known once pass 1 has counted them."""
    reader.check_unchanged()
    position = 0
    for block in reader.blocks():
        if block.num_rows:
            stats.add(block, _split_codes(spec, block, fractions, position, num_kept, ranks) == 0)
            position += block.num_rows


def _vocabularies(
    spec: DatasetSpec, vocab_fields: list, counters: dict[str, ValueCounter]
) -> dict[str, Vocabulary]:
    """The vocabulary of each vocabulary field (its `min_count`, else the spec's); empties `counters`."""
    vocabs: dict[str, Vocabulary] = {}
    for f in vocab_fields:
        threshold = f.min_count if f.min_count is not None else spec.min_count
        vocabs[f.name] = Vocabulary.from_counts(f.name, counters.pop(f.name).result(), threshold)
    return vocabs


def _sparse_features(
    sparse: list, vocabs: dict[str, Vocabulary], multi_names: set[str]
) -> list[SparseFeature]:
    """The schema's sparse features: cardinality by id kind, multi-hot when a row holds a bag."""
    features = []
    for f in sparse:
        kind = sparse_kind(f)
        if kind == "vocab":
            card = vocabs[f.name].cardinality
        else:
            card = f.hash_buckets if kind == "hash" else f.num_buckets + 1
        multi = f.name in multi_names or f.type == "flags" or (f.type == "categorical" and bool(f.separator))
        transform = "criteo_log_bucket" if f.bucketize == "log2" else "none"
        features.append(SparseFeature(f.name, card, multi, transform))
    return features


def _write_pass(
    spec: DatasetSpec,
    reader: SpecReader,
    tmp: Path,
    features: list[SparseFeature],
    dense: list,
    vocabs: dict[str, Vocabulary],
    train_stats: dict[str, dict[str, Any]],
    *,
    fractions: tuple[float, float, float],
    num_kept: int,
    ranks: np.ndarray | None,
    writer_options: dict,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pass 2: ids, dense values, split, Parquet. Returns the closed splits' info and the writers."""
    reader.check_unchanged()
    multi_names = {sf.name for sf in features if sf.multi_hot}
    table_schema = arrow_schema(features, [f.dense_name for f in dense])
    writers = open_writers(tmp, table_schema, writer_options)
    transform = SpecTransform(spec, vocabs, train_stats, multi_names)
    position = 0
    for block in reader.blocks():
        n = block.num_rows
        if not n:
            continue
        columns: list[pa.Array] = [pa.array(block.labels, pa.int8())]
        columns += transform.sparse_columns(block)
        columns += [pa.array(v, pa.float32()) for v in transform.dense_columns(block)]
        table = pa.Table.from_arrays(columns, schema=table_schema)
        write_rows(writers, table, _split_codes(spec, block, fractions, position, num_kept, ranks))
        position += n
    if position != num_kept:
        raise PrepareError(f"pass 2 read {position} rows, pass 1 {num_kept}: the input changed; run again")
    splits = {s: w.close() for s, w in writers.items()}
    return splits, writers


def _write_joins(spec: DatasetSpec, reader: SpecReader, tmp: Path) -> list[dict[str, Any]]:
    """Write each side table as joined (duplicates and bad lines out), for serving to join the same way."""
    joins = []
    for i, (j, side) in enumerate(zip(spec.joins, reader.side_tables)):
        columns = joined_columns(spec, j, list(side.columns))
        (tmp / JOIN_FILE.format(i)).write_bytes(side_table_bytes(side, columns))
        joins.append(
            {"name": j.name, "file": JOIN_FILE.format(i), "columns": columns, "rows": len(side.keys)}
        )
    return joins


def _spec_schema(
    spec: DatasetSpec,
    reader: SpecReader,
    features: list[SparseFeature],
    dense: list,
    splits: dict[str, Any],
    fractions: tuple[float, float, float],
    train_stats: dict[str, dict[str, Any]],
    joins: list[dict[str, Any]],
) -> Schema:
    """The prepared dataset's schema: features, splits, provenance, the spec and each field's facts."""
    field_facts = _field_facts(spec, train_stats)
    return Schema(
        dataset=spec.name,
        sparse_features=features,
        dense_features=[f.dense_name for f in dense],
        splits=splits,
        label=LABEL,
        min_count=spec.min_count,
        split_method=spec.split.method,
        seed=spec.split.seed,
        source={
            "files": [s.to_json() for s in reader.sources],
            "sha256_of": "the file's bytes as stored (compressed bytes for gzip files)",
        },
        extra={
            "spec": spec_to_dict(spec),
            "fields": field_facts,
            "split_fractions": list(fractions),
            "joins": joins,
        },  # fmt: skip
    )


def _field_facts(spec: DatasetSpec, train_stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """schema.json's `extra.fields`: each field's type, id kind, vocabulary threshold, train statistics."""
    field_facts = {}
    for f in spec.fields:
        facts: dict[str, Any] = {"type": f.type}
        if f.type != "numeric" or f.bucketize:
            facts["ids"] = sparse_kind(f)
            if sparse_kind(f) == "vocab":
                facts["min_count"] = f.min_count if f.min_count is not None else spec.min_count
            if f.hash_buckets:
                facts["hash"] = "fnv1a64(utf-8 value) mod hash_buckets"
        facts.update(train_stats.get(f.name, {}))
        field_facts[f.name] = facts
    return field_facts
