"""The output directory of a preparation: written aside and renamed when complete, and its report.json."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pep_torchrec.data.prepare.splits import SplitWriter
from pep_torchrec.data.raw.rejections import PrepareError, RejectionLog
from pep_torchrec.data.schema import SPLITS, Schema
from pep_torchrec.utils.atomic import replace_dir


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


def write_report(directory: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write DIR/report.json (pretty, key order kept)."""
    path = Path(directory) / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def rows_report(reader: Any, num_kept: int, log: RejectionLog) -> dict:
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


def finish_report(report: dict, schema: Schema, writers: dict[str, SplitWriter], timings: dict) -> dict:
    report["rows_per_split"] = {s: schema.splits[s].rows for s in SPLITS}
    report["label_mean"] = {s: (w.positives / w.rows if w.rows else None) for s, w in writers.items()}
    report["cardinalities"] = {f.name: f.cardinality for f in schema.sparse_features}
    report["dense_features"] = list(schema.dense_features)
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return report
