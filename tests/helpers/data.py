"""Small datasets the tests write: a prepared dataset with known id counts (report, prune controls) and
raw Avazu lines (prepare, serving)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pep_torchrec.data.schema import Schema, SparseFeature, SplitInfo

# Feature → (cardinality, multi_hot). Ids of `user` occur 0..29 times (id i: i times), so frequency
# rises with the id; `genre` bags hold 1..3 ids.
FEATURES = {"user": (30, False), "genre": (6, True)}


def write_dataset(root: Path) -> dict[str, np.ndarray]:
    """A prepared dataset whose train split has known id counts, in several row groups; returns them."""
    rng = np.random.default_rng(0)
    user = rng.permutation(np.repeat(np.arange(30), np.arange(30)))  # id i occurs i times
    rows = user.size
    genre = [list(rng.integers(0, 6, size=rng.integers(1, 4))) for _ in range(rows)]
    train = pa.table(
        {
            "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
            "user": pa.array(user, pa.int64()),
            "genre": pa.array(genre, pa.list_(pa.int64())),
        }
    )
    (root / "train").mkdir(parents=True)
    pq.write_table(train, root / "train" / "part-00000.parquet", row_group_size=100)  # 5 row groups
    Schema(
        dataset="synthetic",
        sparse_features=[SparseFeature(name, card, multi) for name, (card, multi) in FEATURES.items()],
        dense_features=[],
        splits={
            "train": SplitInfo(rows, ["train/part-00000.parquet"]),
            "valid": SplitInfo(0, []),
            "test": SplitInfo(0, []),
        },
        extra={"signal_fields": ["user"]},
    ).save(root)
    return {
        "user": np.bincount(user, minlength=30),
        "genre": np.bincount(np.concatenate(genre).astype(np.int64), minlength=6),
    }


AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)


def avazu_line(row_id: int, click: str = "0", hour: str = "14102100", site: str = "s1") -> str:
    rest = ["1005", "0", site, "d1", "c1", "a1", "ad1", "ac1", "dev", "ip", "m1", "1", "0"]
    rest += ["15706", "320", "50", "1722", "0", "35", "-1", "79"]
    return ",".join([str(row_id), click, hour, *rest])
