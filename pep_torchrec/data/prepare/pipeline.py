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

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pep_torchrec.data.prepare.options import (
    COMPRESSIONS,
    DATASETS,
    DEFAULT_SPLIT_FRACTIONS,
    SPLIT_METHODS,
    PrepareOptions,
)
from pep_torchrec.data.prepare.output import atomic_output_dir, finish_report, rows_report, write_report
from pep_torchrec.data.prepare.progress import Progress
from pep_torchrec.data.prepare.splits import (
    LABEL,
    SplitWriter,
    open_writers,
    parse_fractions,
    random_split_codes,
    rank_split_codes,
    write_rows,
)
from pep_torchrec.data.raw.readers import DEFAULT_BLOCK_SIZE, DatasetReader, ParsedBlock
from pep_torchrec.data.raw.rejections import PrepareError, RejectionLog
from pep_torchrec.data.schema import SPLITS, Schema, SparseFeature, SplitInfo, arrow_schema
from pep_torchrec.data.synthetic import SyntheticConfig, SyntheticGenerator
from pep_torchrec.data.vocab import ValueCounter, Vocabulary, write_vocab

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# pipelines


def make_reader(dataset: str, raw: str | os.PathLike, block_size: int = DEFAULT_BLOCK_SIZE) -> DatasetReader:
    """The `DatasetReader` of a raw dataset ("criteo", "avazu" or "movielens")."""
    if dataset == "criteo":
        from pep_torchrec.data.raw.criteo import CriteoReader

        return CriteoReader(raw, block_size)
    if dataset == "avazu":
        from pep_torchrec.data.raw.avazu import AvazuReader

        return AvazuReader(raw, block_size)
    if dataset == "movielens":
        from pep_torchrec.data.raw.movielens import MovieLensReader

        return MovieLensReader(raw, block_size)
    raise PrepareError(f"unknown dataset {dataset!r}; have {DATASETS}")


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
    return finish_report(rows_report(reader, num_kept, log), schema, writers, timings)


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
    progress = Progress("pass 1/2 (count)", reader)
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
    table_schema = arrow_schema(features, reader.dense_features)
    writers = open_writers(tmp, table_schema, writer_options)
    position = 0  # rank of the block's first kept row in input order
    total_rows = reader.rows_read
    progress = Progress("pass 2/2 (write)", reader, total_rows=total_rows)
    for block in reader.blocks():
        progress.update(block)
        n = block.num_rows
        if not n:
            continue
        table = _block_table(block, features, vocabs, reader.dense_features, table_schema)
        if split == "random":
            codes = random_split_codes(block.records, seed, fractions)
        elif temporal_codes is not None:
            codes = temporal_codes[position : position + n]
        else:
            codes = rank_split_codes(np.arange(position, position + n), num_kept, fractions)
        position += n
        write_rows(writers, table, codes)
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
    table_schema: pa.Schema,
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
    return pa.Table.from_arrays(columns, schema=table_schema)


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
    writers = open_writers(tmp, arrow_schema(features, gen.dense_names), writer_options)
    for start, table in gen.chunks():
        records = np.arange(start, start + table.num_rows)
        if split == "random":
            codes = random_split_codes(records, config.seed, fractions)
        else:
            codes = rank_split_codes(records, config.rows, fractions)
        write_rows(writers, table, codes)
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
    return finish_report(report, schema, writers, {"generate_s": time.perf_counter() - t})


# ---------------------------------------------------------------------------------------------------
# public API


def prepare_dataset(
    dataset: str,
    raw: str | os.PathLike | None,
    out: str | os.PathLike,
    options: PrepareOptions | None = None,
) -> dict[str, Any]:
    """Prepare a dataset directory from raw files or from the synthetic generator.

    Args:
        dataset: "synthetic", "criteo", "avazu" or "movielens".
        raw: the raw input: a file or directory (criteo, avazu), the dataset directory (movielens),
            None for synthetic.
        out: the directory to create (must not exist unless `options.overwrite`).
        options: min_count, split, seed, output layout, ... (see `PrepareOptions`; None: defaults);
            `options.synthetic` is the generator's parameters (synthetic only).

    Returns:
        The report (also written to `out/report.json`): rows read/kept/rejected per reason/filtered,
        rows and label mean per split, cardinalities, timings, input files.

    Raises:
        PrepareError: bad options, unreadable or wholly invalid input, an existing `out`, or (strict)
            a malformed row. `MalformedRowError` (a subclass) carries path, line and reason.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    options = options or PrepareOptions()
    split = options.split or "random"
    fractions = check_options(dataset, raw, options)
    writer_options = options.writer_options()
    source, min_count, seed = _open_source(dataset, raw, options)
    with atomic_output_dir(out, options.overwrite) as tmp:
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
                strict=options.strict,
                writer_options=writer_options,
            )
        run_info = _run_info(
            dataset, raw, out, started, started_at, min_count, split, fractions, seed, options.strict
        )
        report = {**run_info, **report}
        write_report(tmp, report)
    return report


def check_options(
    dataset: str, raw: str | os.PathLike | None, options: PrepareOptions
) -> tuple[float, float, float]:
    """The checks of `prepare_dataset` that need no input: the dataset, the split and output options,
    whether `raw` (and `min_count`) apply. Returns the split fractions.

    Raises:
        PrepareError: the first option that is wrong.
    """
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; have {list(DATASETS)}")
    split = options.split or "random"
    if split not in SPLIT_METHODS:
        raise PrepareError(f"unknown split method {split!r}; have {list(SPLIT_METHODS)}")
    fractions = parse_fractions(options.split_fractions or DEFAULT_SPLIT_FRACTIONS)
    if options.compression not in COMPRESSIONS:
        raise PrepareError(f"unknown compression {options.compression!r}; have {list(COMPRESSIONS)}")
    for name, low in (("block_size", 1 << 10), ("row_group_size", 1)):
        value = getattr(options, name)
        if value < low:
            raise PrepareError(f"{name} must be >= {low}, got {value}")
    if options.rows_per_file < 0:
        raise PrepareError(f"rows_per_file must be >= 0, got {options.rows_per_file}")
    if options.seed is not None and options.seed < 0:
        raise PrepareError(f"--seed must be >= 0, got {options.seed}")
    if dataset == "synthetic":
        if raw is not None:
            raise PrepareError("--raw does not apply to the synthetic dataset")
        if options.min_count is not None:
            raise PrepareError("--min-count does not apply to the synthetic dataset (its values are ids)")
    elif raw is None:
        raise PrepareError(f"--raw is required for the {dataset} dataset")
    return fractions


def _open_source(
    dataset: str, raw: str | os.PathLike | None, options: PrepareOptions
) -> tuple[SyntheticConfig | DatasetReader, int, int]:
    """The synthetic generator's config or the raw input's reader, the min_count and the seed that apply."""
    if dataset == "synthetic":  # `check_options` has checked raw and min_count
        config = options.synthetic or SyntheticConfig()
        if options.seed is not None:  # `seed` seeds the generator too (`check_options`: it is >= 0)
            config = dataclasses.replace(config, seed=options.seed)
        return config, 1, config.seed
    assert raw is not None, "check_options requires it"
    if options.synthetic is not None:
        raise PrepareError(
            f"options {_synthetic_given(options.synthetic)} apply to the synthetic dataset only"
        )
    reader = make_reader(dataset, raw, options.block_size)
    min_count = reader.default_min_count if options.min_count is None else options.min_count
    if min_count < 1:
        raise PrepareError(f"min_count must be >= 1, got {min_count}")
    return reader, min_count, options.seed or 0


def _synthetic_given(config: SyntheticConfig) -> list[str]:
    """The generator options set away from their defaults (what a refusal names)."""
    default = SyntheticConfig()
    changed = [
        f.name
        for f in dataclasses.fields(config)
        if f.init and getattr(config, f.name) != getattr(default, f.name)
    ]
    return sorted(changed) or ["synthetic"]


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
