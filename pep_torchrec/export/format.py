"""The serving artifact: a directory of a JSON manifest and pickle-free tensor files (docs/architecture.md, decision 7).

Legend: R = table rows (num_embeddings), D = embedding dim, R_k = kept rows (rows with at least one
kept element), K = kept elements of a table.

Layout::

    ARTIFACT/manifest.json          format version, model config, inputs, tables, sha256 of every file
    ARTIFACT/embeddings.safetensors the pruned embedding tables (compact or dense layout, below)
    ARTIFACT/dense.safetensors      every other parameter and buffer of the model (fp32), plus the
                                    first-order weights of FM/DeepFM as `linear.<table>` [R]
    ARTIFACT/vocab.parquet          the raw value → id map of every sparse feature that has one
                                    (a copy of the dataset's, so the artifact is self-contained)
    ARTIFACT/join_<i>.parquet       a spec'd dataset's side tables (copies of the dataset's), joined on
                                    the key a client sends (`inputs.joins`, `spec_transform.SpecInputs`)

Compact layout of table `t` (`encoding.layout == "compact"`), a row-compressed sparse matrix whose
pieces are stored in the smallest of two forms each (the choice is in `encoding`):

    kept rows     "bitmap": t.rows uint8 [ceil(R/8)], bit r (little-endian) set ⇔ row r is kept
                  "ids":    t.rows int32 [R_k], the kept row ids, ascending
    columns       "index":  t.lengths uint8/int16 [R_k] kept elements per kept row (row offsets are
                            their cumulative sum: int32 offsets would cost more than int8 values),
                            t.cols uint8/int16 [K] column of each kept element, ascending per row
                  "bitmap": t.colmask uint8 [R_k, ceil(D/8)], bit d set ⇔ column d is kept
                  "prefix": t.lengths as in "index", t.colorder uint8/int16 [D] a column order:
                            row r keeps the first lengths[r] columns of it (the masks of
                            `pep.mask_layout: aligned`), so no per-element column is stored
    values        t.values [K] float32 / float16 / int8, row-major over the kept elements
    exponents     t.exponents int8 [R_k] (int8 only): value = int8 · 2^exponent, a per-row power-of-two
                  scale (as OCP MX's E8M0 block scales): 1 byte per row instead of 2-4, and at the
                  ~4 kept elements per row PEP leaves, the scale is a third of the int8 bytes

Ids of rows that are not kept contribute zero to their bag. Dense layout (`"dense"`, for
comparisons): t.weight [R, D] in the artifact dtype.

`total_bytes` is the bytes of the embedding tables' tensors (what pruning shrinks), `dense_fp32_bytes`
the same tables unpruned at fp32 (R·D·4 each), `artifact_bytes` every file together (manifest, dense
weights and vocabulary included).

Writing is atomic (a temporary sibling directory renamed into place); reading checks the format
version, every file's size and sha256, and every tensor's shape, dtype and internal consistency, and
refuses anything else with an `ArtifactError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pep_torchrec.utils.atomic import replace_dir
from pep_torchrec.utils.errors import UserError

FORMAT_NAME = "pep-torchrec-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
DENSE_FILE = "dense.safetensors"
VOCAB_FILE = "vocab.parquet"
DTYPES = ("fp32", "fp16", "int8")
LAYOUTS = ("compact", "dense")
_VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
# int8: symmetric quantisation to [-127, 127] (−128 unused, so the range is symmetric).
INT8_MAX = 127


class ArtifactError(UserError):
    """An artifact directory is missing, incomplete, corrupted or of an unsupported format."""


# ---------------------------------------------------------------------------------------------------
# compact tables


@dataclass
class CompactTable:
    """One pruned table in CSR form, decoded (what the lookup module consumes).

    Attributes:
        num_embeddings: R.  embedding_dim: D.
        row_ids: int64 [R_k] kept row ids, ascending.
        lengths: int64 [R_k] kept elements per kept row (>= 1).
        cols: int64 [K] column of every kept element, ascending within a row.
        values: [K] float32 / float16 / int8, row-major.
        exponents: int8 [R_k] per-row power-of-two scales of int8 values, or None.
    """

    num_embeddings: int
    embedding_dim: int
    row_ids: torch.Tensor
    lengths: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    exponents: torch.Tensor | None = None

    @property
    def kept_rows(self) -> int:
        return int(self.row_ids.numel())

    @property
    def kept_params(self) -> int:
        return int(self.values.numel())

    def dequantized_values(self) -> torch.Tensor:
        """[K] float32 values (int8 · per-row scale)."""
        if self.exponents is None:
            return self.values.float()
        return torch.ldexp(self.values.float(), torch.repeat_interleave(self.exponents.float(), self.lengths))

    def to_dense(self) -> torch.Tensor:
        """[R, D] float32 (tests and the dense layout only: serving never does this)."""
        out = torch.zeros(self.num_embeddings, self.embedding_dim)
        rows = torch.repeat_interleave(self.row_ids, self.lengths)
        out[rows, self.cols] = self.dequantized_values()
        return out


def compress_table(table_RD: torch.Tensor, dtype: str) -> CompactTable:
    """The non-zero elements of a pruned [R, D] table in CSR form, values in `dtype`.

    Args:
        table_RD: [R, D] float32 pruned embedding (zeros = pruned).
        dtype: "fp32", "fp16" or "int8" (per-row symmetric scales).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    table_RD = table_RD.detach().float().cpu()
    num_rows, dim = table_RD.shape
    keep_RD = table_RD != 0
    lengths_R = keep_RD.sum(dim=1)
    row_ids = torch.nonzero(lengths_R, as_tuple=True)[0]
    kept_rows_KD = keep_RD[row_ids]
    values_K = table_RD[row_ids][kept_rows_KD]  # row-major
    cols = torch.nonzero(kept_rows_KD, as_tuple=True)[1]
    lengths = lengths_R[row_ids]
    exponents = None
    if dtype == "int8":
        row_max = table_RD[row_ids].abs().amax(dim=1).double()
        # The smallest power of two that maps the row's largest |v| into [-127, 127].
        exponents = torch.ceil(torch.log2(row_max / INT8_MAX)).clamp(-127, 127)
        exponent_K = torch.repeat_interleave(exponents, lengths)
        values_K = torch.round(torch.ldexp(values_K.double(), -exponent_K)).clamp(-INT8_MAX, INT8_MAX)
        values_K = values_K.to(torch.int8)
        exponents = exponents.to(torch.int8)
    else:
        values_K = values_K.to(_VALUE_DTYPES[dtype])
    return CompactTable(num_rows, dim, row_ids.long(), lengths.long(), cols.long(), values_K, exponents)


def _small_int(max_value: int) -> torch.dtype:
    return torch.uint8 if max_value <= 255 else torch.int16 if max_value <= 32767 else torch.int32


def _pack_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.astype(bool), axis=-1, bitorder="little")


def _prefix_order(table: CompactTable) -> torch.Tensor | None:
    """A column order of which every kept row keeps a prefix (most kept columns first, ties by
    index), or None. A row of k distinct columns all ranked < k keeps exactly the first k."""
    if table.kept_params == 0:
        return None
    order = torch.sort(
        torch.bincount(table.cols, minlength=table.embedding_dim), descending=True, stable=True
    ).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    owner_length = torch.repeat_interleave(table.lengths, table.lengths)
    return order if bool((rank.index_select(0, table.cols) < owner_length).all()) else None


def _prefix_cols(order: torch.Tensor, lengths: torch.Tensor, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """Columns (ascending per row) of rows keeping the first `lengths[r]` columns of `order`."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    parts = [
        torch.nonzero(rank.unsqueeze(0) < lengths[i : i + chunk_rows].unsqueeze(1))[:, 1]
        for i in range(0, lengths.numel(), chunk_rows)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def encode_table(name: str, table: CompactTable) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store for `table` under `name.*`, each piece in its smaller form, and the encoding."""
    num_rows, dim = table.num_embeddings, table.embedding_dim
    tensors: dict[str, torch.Tensor] = {}
    encoding = {"layout": "compact"}
    # Kept rows: a bitmap costs R/8 bytes, ids 4·R_k.
    if (num_rows + 7) // 8 <= 4 * table.kept_rows:
        keep_R = np.zeros(num_rows, dtype=bool)
        keep_R[table.row_ids.numpy()] = True
        tensors[f"{name}.rows"] = torch.from_numpy(_pack_bits(keep_R))
        encoding["rows"] = "bitmap"
    else:
        tensors[f"{name}.rows"] = table.row_ids.to(torch.int32)
        encoding["rows"] = "ids"
    # Columns: index costs K + R_k (uint8), a bitmap R_k·ceil(D/8), a prefix order R_k + D.
    small = _small_int(dim)
    width = torch.tensor([], dtype=small).element_size()
    index_bytes = (table.kept_params + table.kept_rows) * width
    bitmap_bytes = table.kept_rows * ((dim + 7) // 8)
    order = _prefix_order(table)
    if order is not None and (table.kept_rows + dim) * width <= min(index_bytes, bitmap_bytes):
        tensors[f"{name}.lengths"] = table.lengths.to(small)
        tensors[f"{name}.colorder"] = order.to(small)
        encoding["cols"] = "prefix"
    elif index_bytes <= bitmap_bytes:
        tensors[f"{name}.lengths"] = table.lengths.to(small)
        tensors[f"{name}.cols"] = table.cols.to(small)
        encoding["cols"] = "index"
    else:
        mask = np.zeros((table.kept_rows, dim), dtype=bool)
        mask[np.repeat(np.arange(table.kept_rows), table.lengths.numpy()), table.cols.numpy()] = True
        tensors[f"{name}.colmask"] = torch.from_numpy(_pack_bits(mask))
        encoding["cols"] = "bitmap"
    tensors[f"{name}.values"] = table.values
    if table.exponents is not None:
        tensors[f"{name}.exponents"] = table.exponents
    return tensors, encoding


def _need(tensors: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"{where}: tensor {key!r} missing")
    return tensors[key]


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ArtifactError(f"{where}: {message}")


def decode_table(
    name: str, tensors: dict[str, torch.Tensor], spec: dict[str, Any], dtype: str, where: str
) -> CompactTable:
    """Rebuild and validate the `CompactTable` of `name` from its stored tensors and manifest entry."""
    where = f"{where}: table {name!r}"
    num_rows, dim = int(spec["num_embeddings"]), int(spec["embedding_dim"])
    kept_rows, kept_params = int(spec["kept_rows"]), int(spec["kept_params"])
    encoding = spec["encoding"]
    row_ids = _decode_rows(name, tensors, encoding["rows"], num_rows, where)
    _check(
        row_ids.numel() == kept_rows, where, f"{row_ids.numel()} kept rows stored, manifest says {kept_rows}"
    )

    if encoding["cols"] == "index":
        lengths, cols = _decode_index_cols(name, tensors, kept_rows, kept_params, dim, where)
    elif encoding["cols"] == "prefix":
        lengths, cols = _decode_prefix_cols(name, tensors, kept_rows, kept_params, dim, where)
    elif encoding["cols"] == "bitmap":
        lengths, cols = _decode_bitmap_cols(name, tensors, kept_rows, kept_params, dim, where)
    else:
        raise ArtifactError(f"{where}: unknown cols encoding {encoding['cols']!r}")

    values = _need(tensors, f"{name}.values", where)
    _check(
        values.dtype == _VALUE_DTYPES[dtype] and tuple(values.shape) == (kept_params,),
        where,
        f"values have dtype {values.dtype} shape {tuple(values.shape)}, want {_VALUE_DTYPES[dtype]} ({kept_params},)",
    )
    exponents = None
    if dtype == "int8":
        exponents = _need(tensors, f"{name}.exponents", where)
        _check(
            exponents.dtype == torch.int8 and tuple(exponents.shape) == (kept_rows,),
            where,
            f"exponents have dtype {exponents.dtype} shape {tuple(exponents.shape)}",
        )
    else:
        _check(bool(torch.isfinite(values).all()), where, "non-finite values")
    return CompactTable(num_rows, dim, row_ids, lengths, cols, values, exponents)


def _decode_rows(
    name: str, tensors: dict[str, torch.Tensor], rows_encoding: str, num_rows: int, where: str
) -> torch.Tensor:
    """The kept rows' ids ([kept_rows] int64, ascending) from a bitmap or an id list."""
    rows = _need(tensors, f"{name}.rows", where)
    if rows_encoding == "bitmap":
        _check(
            rows.dtype == torch.uint8 and tuple(rows.shape) == ((num_rows + 7) // 8,),
            where,
            f"rows bitmap has dtype {rows.dtype} shape {tuple(rows.shape)}",
        )
        bits = np.unpackbits(rows.numpy(), bitorder="little")
        _check(not bits[num_rows:].any(), where, "rows bitmap has bits past num_embeddings")
        row_ids = torch.from_numpy(np.nonzero(bits[:num_rows])[0].astype(np.int64))
    elif rows_encoding == "ids":
        _check(rows.dtype == torch.int32 and rows.dim() == 1, where, f"row ids have dtype {rows.dtype}")
        row_ids = rows.long()
        _check(
            bool((row_ids[1:] > row_ids[:-1]).all()) if row_ids.numel() > 1 else True,
            where,
            "row ids are not strictly ascending",
        )
        _check(
            row_ids.numel() == 0 or (int(row_ids[0]) >= 0 and int(row_ids[-1]) < num_rows),
            where,
            f"row ids outside [0, {num_rows})",
        )
    else:
        raise ArtifactError(f"{where}: unknown rows encoding {rows_encoding!r}")
    return row_ids


def _decode_index_cols(
    name: str, tensors: dict[str, torch.Tensor], kept_rows: int, kept_params: int, dim: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row lengths and column ids stored as they are (ascending within a row)."""
    lengths = _need(tensors, f"{name}.lengths", where).long()
    cols = _need(tensors, f"{name}.cols", where).long()
    _check(
        tuple(lengths.shape) == (kept_rows,),
        where,
        f"lengths shape {tuple(lengths.shape)} != ({kept_rows},)",
    )
    _check(tuple(cols.shape) == (kept_params,), where, f"cols shape {tuple(cols.shape)} != ({kept_params},)")
    _check(
        kept_rows == 0 or bool(((lengths >= 1) & (lengths <= dim)).all()),
        where,
        "row lengths outside [1, D]",
    )
    _check(int(lengths.sum()) == kept_params, where, "row lengths do not sum to kept_params")
    _check(
        kept_params == 0 or bool(((cols >= 0) & (cols < dim)).all()),
        where,
        f"column index outside [0, {dim})",
    )
    if kept_params > 1:
        # Within a row, columns must ascend: a step down is allowed only at a row start.
        starts = torch.zeros(kept_params, dtype=torch.bool)
        starts[torch.cumsum(lengths, 0)[:-1]] = True
        _check(bool(((cols[1:] > cols[:-1]) | starts[1:]).all()), where, "columns not ascending within a row")
    return lengths, cols


def _decode_prefix_cols(
    name: str, tensors: dict[str, torch.Tensor], kept_rows: int, kept_params: int, dim: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row lengths over one column order shared by all rows: a row keeps a prefix of it."""
    lengths = _need(tensors, f"{name}.lengths", where).long()
    order = _need(tensors, f"{name}.colorder", where).long()
    _check(
        tuple(lengths.shape) == (kept_rows,),
        where,
        f"lengths shape {tuple(lengths.shape)} != ({kept_rows},)",
    )
    _check(
        tuple(order.shape) == (dim,) and torch.equal(torch.sort(order).values, torch.arange(dim)),
        where,
        f"colorder is not a permutation of the {dim} columns",
    )
    _check(
        kept_rows == 0 or bool(((lengths >= 1) & (lengths <= dim)).all()),
        where,
        "row lengths outside [1, D]",
    )
    _check(int(lengths.sum()) == kept_params, where, "row lengths do not sum to kept_params")
    return lengths, _prefix_cols(order, lengths)


def _decode_bitmap_cols(
    name: str, tensors: dict[str, torch.Tensor], kept_rows: int, kept_params: int, dim: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row lengths and column ids from a [kept_rows, ceil(D / 8)] column bitmask."""
    colmask = _need(tensors, f"{name}.colmask", where)
    _check(
        colmask.dtype == torch.uint8 and tuple(colmask.shape) == (kept_rows, (dim + 7) // 8),
        where,
        f"colmask has dtype {colmask.dtype} shape {tuple(colmask.shape)}",
    )
    bits = np.unpackbits(colmask.numpy(), axis=1, bitorder="little")
    _check(not bits[:, dim:].any(), where, "colmask has bits past embedding_dim")
    bits = bits[:, :dim]
    lengths = torch.from_numpy(bits.sum(axis=1).astype(np.int64))
    cols = torch.from_numpy(np.nonzero(bits)[1].astype(np.int64))
    _check(kept_rows == 0 or bool((lengths >= 1).all()), where, "a kept row has no kept column")
    _check(cols.numel() == kept_params, where, f"{cols.numel()} kept elements, manifest says {kept_params}")
    return lengths, cols


# ---------------------------------------------------------------------------------------------------
# files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_bytes(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))


def write_artifact(out: str | os.PathLike, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Write `files` (name → bytes) and the manifest into `out`, atomically.

    The manifest gets `files` (bytes + sha256 of each), `artifact_bytes` and `model_version` (a hash
    of the file hashes). A directory already at `out` is replaced only if it is an artifact (has a
    manifest.json) or empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ArtifactError(f"{out}: exists and is not an artifact directory; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {}
        for name, content in files.items():
            (tmp / name).write_bytes(content)
            entries[name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        manifest = dict(manifest)
        manifest["files"] = entries
        manifest["model_version"] = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[
            :16
        ]
        text = json.dumps(manifest, indent=2) + "\n"
        # The manifest counts itself: fix the point (its size changes by at most a digit or two).
        for _ in range(3):
            manifest["artifact_bytes"] = sum(e["bytes"] for e in entries.values()) + len(text.encode())
            text = json.dumps(manifest, indent=2) + "\n"
        (tmp / MANIFEST).write_text(text)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)  # a reader sees the old artifact or the new one, never a mix
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an artifact, its format checked (files are verified by `verify_files`)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory (expected an artifact from `pep-torchrec export`)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: not an artifact, or a partial one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    for key in ("files", "tables", "model", "inputs", "dtype", "layout"):
        if key not in manifest:
            raise ArtifactError(f"{path}: key {key!r} missing")
    return manifest


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Read every file the manifest lists, checking size and sha256; returns name → content."""
    directory = Path(directory)
    contents = {}
    for name, entry in manifest["files"].items():
        path = directory / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ArtifactError(f"{path}: missing (the artifact is incomplete)")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise ArtifactError(
                f"{path}: {len(data)} bytes, manifest says {entry['bytes']} (truncated or replaced)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 {digest[:12]}… does not match the manifest's "
                f"{entry['sha256'][:12]}… (corrupted)"
            )
        contents[name] = data
    return contents


def load_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{where}: not a readable safetensors file ({e})") from e


def save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})
