"""Fixtures shared across the test folders: the prepared datasets several modules train or export on,
each built once per session (they are only read)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pep_torchrec import cli

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PEP_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_ML100K = SHARED_DATA / "ml-100k"


@pytest.fixture(scope="session")
def debug_data(tmp_path_factory) -> Path:
    """The debug configs' synthetic dataset (configs/debug_cpu*.yaml), generated once through the CLI."""
    out = tmp_path_factory.mktemp("data") / "debug_synthetic"
    assert (
        cli.main(
            [
                "data",
                "prepare",
                "--dataset",
                "synthetic",
                "--out",
                str(out),
                "--rows",
                "20000",
                "--num-sparse",
                "8",
                "--num-dense",
                "4",
                "--cardinality",
                "1000",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    from pep_torchrec.data.prepare import PrepareOptions, prepare_dataset
    from pep_torchrec.data.synthetic import SyntheticConfig

    path = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_dataset(
        "synthetic",
        None,
        path,
        PrepareOptions(
            seed=0, synthetic=SyntheticConfig(rows=3000, num_sparse=4, num_dense=3, cardinality=300)
        ),
    )
    return path


@pytest.fixture(scope="session")
def ml100k_data(tmp_path_factory) -> Path:
    if not SHARED_ML100K.is_dir():
        pytest.skip(f"{SHARED_ML100K} not present")
    from pep_torchrec.data.prepare import prepare_dataset

    path = tmp_path_factory.mktemp("data") / "ml100k"
    prepare_dataset("movielens", SHARED_ML100K, path)
    return path
