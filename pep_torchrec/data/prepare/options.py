"""The options of `pep-torchrec data prepare` as one typed config, `PrepareOptions`.

`prepare_dataset` and `prepare_from_spec` take it; the command builds it with `prepare_options` from
its flags (`pep_torchrec.config.from_dict`, the project's one typed machinery: a value of the wrong
type is a `ConfigError` naming the key). The checks of the values (ranges, choices, split fractions)
stay with the pipelines, which raise `PrepareError` as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pep_torchrec.config import from_dict
from pep_torchrec.data.raw.readers import DEFAULT_BLOCK_SIZE
from pep_torchrec.data.synthetic import SyntheticConfig

DATASETS = ("synthetic", "criteo", "avazu", "movielens")
SPLIT_METHODS = ("random", "temporal")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_ROW_GROUP_SIZE = 262_144
DEFAULT_ROWS_PER_FILE = 4_194_304
COMPRESSIONS = ("snappy", "zstd", "lz4", "gzip", "none")

SYNTHETIC_OPTIONS = tuple(f.name for f in dataclasses.fields(SyntheticConfig) if f.init)
"""The generator's options: the init fields of `SyntheticConfig` (rows, num_sparse, ..., seed)."""


@dataclass(frozen=True)
class PrepareOptions:
    """How to prepare a dataset: everything `data prepare` takes besides what (dataset or spec,
    --raw) and where (--out).

    For a spec, the options left None keep the spec's values; for a built-in dataset they take the
    defaults named below.
    """

    min_count: int | None = None
    """Values seen fewer times map to the OOV id 0 (default: 10 criteo/avazu, 1 movielens; not for
    synthetic, whose values are ids)."""
    split: str | None = None
    """Split method: random (a seeded hash of the record number; the default) or temporal."""
    split_fractions: str | None = None
    """Train, valid, test fractions as "0.8,0.1,0.1" (the default)."""
    seed: int | None = None
    """Split seed (default 0); for synthetic also the generator's (then it replaces synthetic.seed)."""
    strict: bool = False
    """Stop at the first malformed row (`MalformedRowError`: file:line: reason)."""
    overwrite: bool = False
    """Replace an existing prepared dataset at the output directory."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Decompressed bytes read per block (the readers' memory bound; >= 1024)."""
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    """Rows per Parquet row group (>= 1)."""
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    """Rows per Parquet file of a split (0: one file)."""
    compression: str = "snappy"
    """Parquet codec: snappy, zstd, lz4, gzip or none."""
    synthetic: SyntheticConfig | None = None
    """The generator's parameters (the synthetic dataset only; None: `SyntheticConfig`'s defaults)."""

    def writer_options(self) -> dict[str, Any]:
        """The `SplitWriter` keyword arguments: row group size, rows per file, compression."""
        return {
            "row_group_size": self.row_group_size,
            "rows_per_file": self.rows_per_file,
            "compression": self.compression,
        }


def prepare_options(obj: Mapping[str, Any]) -> PrepareOptions:
    """`PrepareOptions` from plain data (the command's flags, a YAML mapping), by `config.from_dict`:
    a value of the wrong type, an unknown key or a bad `synthetic.<key>` is a `ConfigError` naming it."""
    return from_dict(PrepareOptions, dict(obj))


def synthetic_config(options: Mapping[str, Any] | SyntheticConfig) -> SyntheticConfig:
    """A `SyntheticConfig` from generator options ({rows: 20000, cardinality: 1000, ...}), by the
    typed machinery (`config.from_dict`).

    Raises:
        ConfigError: naming `synthetic.<key>`: an unknown option, a value of the wrong type, or one
            the generator refuses (its own message).
    """
    if isinstance(options, SyntheticConfig):
        return options
    return from_dict(SyntheticConfig, dict(options), "synthetic")
