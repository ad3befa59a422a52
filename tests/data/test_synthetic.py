"""The synthetic dataset: deterministic, chunking-independent, Zipf-skewed, with a planted signal."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pep_torchrec.commands.data_prepare_command import main
from pep_torchrec.config import ConfigError
from pep_torchrec.data.prepare import PrepareOptions, prepare_dataset, synthetic_config
from pep_torchrec.data.raw.rejections import PrepareError
from pep_torchrec.data.schema import SPLITS, Schema
from pep_torchrec.data.synthetic import SyntheticConfig, SyntheticGenerator, hash_uniform, mix_key, zipf_ids


def read_split(out, split: str) -> pa.Table:
    schema = Schema.load(out)
    return pa.concat_tables([pq.read_table(out / f) for f in schema.splits[split].files])


def read_all(out) -> pa.Table:
    return pa.concat_tables([read_split(out, s) for s in SPLITS])


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank AUC with ties averaged (Mann–Whitney U)."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks of tied scores
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for s, c in zip(start, counts):
        if c > 1:
            ranks[order[s : s + c]] = s + (c + 1) / 2
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    report = prepare_dataset(
        "synthetic",
        None,
        out,
        PrepareOptions(seed=3, synthetic=SyntheticConfig(rows=100_000, cardinality=2_000)),
    )
    return out, report


def test_same_seed_same_bytes_any_chunking(tmp_path):
    a = prepare_dataset(
        "synthetic",
        None,
        tmp_path / "a",
        PrepareOptions(seed=1, synthetic=SyntheticConfig(rows=5000, num_sparse=6, num_dense=3)),
    )
    prepare_dataset(
        "synthetic",
        None,
        tmp_path / "b",
        PrepareOptions(
            seed=1, synthetic=SyntheticConfig(rows=5000, num_sparse=6, num_dense=3, chunk_rows=777)
        ),
    )
    prepare_dataset(
        "synthetic",
        None,
        tmp_path / "c",
        PrepareOptions(seed=2, synthetic=SyntheticConfig(rows=5000, num_sparse=6, num_dense=3)),
    )
    for s in SPLITS:
        assert read_split(tmp_path / "a", s).equals(read_split(tmp_path / "b", s))
    assert not read_all(tmp_path / "a").equals(read_all(tmp_path / "c"))
    assert a["rows_per_split"] == {s: Schema.load(tmp_path / "b").splits[s].rows for s in SPLITS}
    # the generator alone: any row range is the same rows
    gen = SyntheticGenerator(SyntheticConfig(rows=100, num_sparse=4, num_dense=2, seed=5))
    whole = gen.generate(0, 100)
    parts = pa.concat_tables([gen.generate(0, 33), gen.generate(33, 34), gen.generate(34, 100)])
    assert whole.equals(parts)


def test_schema_format_and_report(small_dataset):
    out, report = small_dataset
    schema = Schema.load(out)
    assert schema.dataset == "synthetic"
    assert schema.feature_names == [f"C{i}" for i in range(1, 27)]
    assert schema.dense_features == [f"D{i}" for i in range(1, 14)]
    assert schema.cardinalities == [2000] * 26
    assert not (out / "vocab.parquet").exists()
    assert schema.source["generator"] == "pep_torchrec.data.synthetic"
    assert schema.source["params"]["rows"] == 100_000 and schema.source["params"]["seed"] == 3
    signal = schema.extra["signal_fields"]
    assert len(signal) == 13 and set(signal) | set(schema.extra["noise_fields"]) == set(schema.feature_names)
    table = read_split(out, "train")
    assert table.schema.field("label").type == pa.int8()
    assert table.schema.field("C1").type == pa.int64()
    assert table.schema.field("D1").type == pa.float32()
    for name in schema.feature_names:
        ids = table.column(name).to_numpy()
        assert ids.min() >= 0 and ids.max() < 2000
    rows = report["rows_per_split"]
    assert sum(rows.values()) == 100_000
    assert abs(rows["train"] / 100_000 - 0.8) < 0.01 and abs(rows["test"] / 100_000 - 0.1) < 0.01
    assert 0.1 < report["label_mean"]["train"] < 0.5
    dense = table.column("D1").to_numpy()
    assert dense.min() >= 0 and np.isfinite(dense).all()


def test_ids_are_zipf_skewed(small_dataset):
    out, _ = small_dataset
    ids = read_all(out).column("C1").to_numpy()
    counts = np.bincount(ids, minlength=2000)
    assert counts[1] > counts[2] > counts[10] > counts[100]
    # the top 1% of ids hold a large share of the rows; the tail is long but populated
    top = np.sort(counts[1:])[::-1]
    assert top[:20].sum() / counts.sum() > 0.3
    assert (counts[1000:] > 0).sum() > 500
    # id 0 (OOV) at about oov_rate
    assert 0.005 < counts[0] / counts.sum() < 0.02
    # P(k) ∝ k^-s: the slope of log count vs log rank over the head is near -1.1
    k = np.arange(2, 50)
    slope = np.polyfit(np.log(k), np.log(counts[k]), 1)[0]
    assert -1.4 < slope < -0.8


def test_signal_fields_are_predictive_and_noise_fields_are_not(small_dataset):
    out, _ = small_dataset
    schema = Schema.load(out)
    train, test = read_split(out, "train"), read_split(out, "test")
    y_train, y_test = train.column("label").to_numpy(), test.column("label").to_numpy()
    prior = y_train.mean()

    def target_encoding_auc(name: str) -> float:
        # per-id click rate on train (smoothed towards the prior), scored on test
        ids_train, ids_test = train.column(name).to_numpy(), test.column(name).to_numpy()
        clicks = np.bincount(ids_train, weights=y_train, minlength=2000)
        shows = np.bincount(ids_train, minlength=2000)
        rate = (clicks + 20 * prior) / (shows + 20)
        return auc(y_test, rate[ids_test])

    signal = [target_encoding_auc(n) for n in schema.extra["signal_fields"]]
    noise = [target_encoding_auc(n) for n in schema.extra["noise_fields"]]
    assert min(signal) > 0.525, signal
    assert max(noise) < 0.52, noise
    assert np.mean(signal) > np.mean(noise) + 0.03
    # dense features: the planted weights score well, the noise features do not
    weights = schema.extra["dense_weights"]
    assert set(weights) == set(schema.extra["signal_dense"])

    def standardised(name: str) -> np.ndarray:
        x = test.column(name).to_numpy().astype(np.float64)
        return (x - x.mean()) / x.std()

    dense_score = sum(w * standardised(name) for name, w in weights.items())
    assert auc(y_test, dense_score) > 0.55
    for name in set(schema.dense_features) - set(weights):
        assert abs(auc(y_test, standardised(name)) - 0.5) < 0.02, name


def test_ten_million_row_tables_are_cheap(tmp_path):
    started = time.perf_counter()
    report = prepare_dataset(
        "synthetic",
        None,
        tmp_path / "big",
        PrepareOptions(synthetic=SyntheticConfig(rows=20_000, cardinality=10_000_000)),
    )
    elapsed = time.perf_counter() - started
    assert elapsed < 10, elapsed
    schema = Schema.load(tmp_path / "big")
    assert schema.cardinalities == [10_000_000] * 26
    ids = read_all(tmp_path / "big").column("C5").to_numpy()
    assert ids.max() < 10_000_000
    assert ids.max() > 1_000_000  # the Zipf tail does reach far into the table
    assert report["rows_kept"] == 20_000


def test_per_table_cardinalities_and_cli(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "--dataset", "synthetic", "--out", str(out), "--rows", "3000", "--num-sparse", "3",
            "--num-dense", "0", "--cardinality", "10,1000,1", "--split", "temporal", "--seed", "4",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "prepared synthetic" in printed and "C2 1,000" in printed
    schema = Schema.load(out)
    assert schema.cardinalities == [10, 1000, 1]
    assert schema.dense_features == [] and schema.split_method == "temporal"
    assert {s: schema.splits[s].rows for s in SPLITS} == {"train": 2400, "valid": 300, "test": 300}
    table = read_all(out)
    assert table.column("C1").to_numpy().max() < 10
    assert (table.column("C3").to_numpy() == 0).all()  # a one-row table holds only the OOV id


def test_bad_synthetic_options(tmp_path, capsys):
    # The generator's options go through the typed machinery: every error names synthetic.<key>.
    with pytest.raises(ConfigError, match="^synthetic: cardinality: 2 values for 26 tables"):
        synthetic_config({"cardinality": (5, 6)})
    with pytest.raises(ConfigError, match=r"^unknown key synthetic.cardinalty \(known keys of synthetic: "):
        synthetic_config({"cardinalty": 5})
    with pytest.raises(ConfigError, match="^synthetic.rows: expected an integer, got 'many'"):
        synthetic_config({"rows": "many"})
    with pytest.raises(ConfigError, match="^synthetic.cardinality: expected an integer, got 'big' or"):
        synthetic_config({"cardinality": "big"})
    with pytest.raises(ConfigError, match="^synthetic: seed must be >= 0, got -1"):
        synthetic_config({"seed": -1})
    assert synthetic_config({"cardinality": [5] * 26}).cardinality == (5,) * 26
    with pytest.raises(PrepareError, match="--min-count does not apply"):
        prepare_dataset("synthetic", None, tmp_path / "o", PrepareOptions(min_count=3))
    assert main(["--dataset", "synthetic", "--out", str(tmp_path / "o"), "--zipf-exponent", "-1"]) == 2
    assert "zipf_exponent must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hash_helpers():
    u = hash_uniform(mix_key(0, "x"), np.arange(200_000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(u, hash_uniform(mix_key(1, "x"), np.arange(200_000)))
    ids = zipf_ids(u, 100, 1.0)
    assert ids.min() == 1 and ids.max() == 100
