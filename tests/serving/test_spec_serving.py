"""Serving a spec'd dataset from raw values: for every field kind a spec can declare, the ids and dense
values the service computes from a raw record equal the prepared Parquet row's, and the served score is
the training model's; unknown keys, unknown values, missing values and bad raw input as prepare treats
them (a bad row is a 422 naming the field). All on small files the tests write."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pep_torchrec import cli
from pep_torchrec.data.prepare import prepare_from_spec
from pep_torchrec.data.prepare.splits import random_split_codes
from pep_torchrec.data.schema import SPLITS, Schema
from pep_torchrec.data.spec_transform import SpecInputError, SpecInputs, serving_inputs
from pep_torchrec.data.vocab import load_vocab

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["y", "user", "site", "tags", "price", "clicks", "ts", "title", "item", "f1", "f2", "day", "model"]
SPEC = {
    "name": "every_kind",
    "format": {"header": True, "files": ["log.csv"]},
    "label": {"column": "y", "positive": [1]},
    "joins": [{"name": "items", "path": "items.csv", "key": "item", "format": {"header": True},
               "columns": ["genre", "brand", "unused"], "prefix": "i_"}],
    "fields": [
        {"name": "user", "min_count": 2},                                          # vocabulary, OOV
        {"name": "site", "hash_buckets": 13},                                      # hashed
        {"name": "tags", "separator": "|"},                                        # multi-valued
        {"name": "price", "type": "numeric", "dense": "log1p_standardize", "bucketize": "quantile",
         "num_buckets": 4},                                                        # dense + quantile
        {"name": "clicks", "type": "numeric", "integer": True, "bucketize": "log2", "dense": "log1p"},
        {"name": "hour", "type": "hour", "column": "ts", "timezone": "Asia/Tokyo"},
        {"name": "wd", "type": "weekday", "column": "ts", "timezone": "UTC"},
        {"name": "lwd", "type": "weekday", "column": "day", "time_format": "%y%m%d%H"},
        {"name": "year", "type": "regex", "column": "title", "pattern": r"\((\d{4})\)$", "default": "none"},
        {"name": "flags", "type": "flags", "columns": ["f1", "f2"]},
        {"name": "genre", "column": "i_genre"},                                    # joined, vocabulary
        {"name": "brand", "column": "i_brand", "hash_buckets": 7},                 # joined, hashed
        {"name": "user_x_hour", "type": "cross", "fields": ["user", "hour"]},
        {"name": "model", "min_count": 3},
    ],
    "split": {"method": "random", "fractions": [0.6, 0.2, 0.2], "seed": 3},
}  # fmt: skip


def raw_records(n: int = 400, seed: int = 0) -> list[dict]:
    """Raw rows as the file holds them (strings), with missing values and rare (OOV) values."""
    rng = np.random.default_rng(seed)
    t0 = int(datetime(2024, 3, 4, tzinfo=ZoneInfo("UTC")).timestamp())
    out = []
    for i in range(n):
        user = f"u{rng.integers(0, 30)}" if i % 17 else f"rare{i}"  # seen once: OOV under min_count 2
        out.append({
            "y": str(int(rng.integers(0, 2))),
            "user": user if i % 23 else "",                               # missing: its own key ""
            "site": f"s{rng.integers(0, 50)}",
            "tags": "|".join(f"t{rng.integers(0, 9)}" for _ in range(rng.integers(0, 4))),
            "price": "" if i % 11 == 0 else f"{rng.random() * 200:.2f}",  # missing: dense 0, bucket 0
            "clicks": "" if i % 13 == 0 else str(int(rng.integers(0, 500))),
            "ts": str(t0 + int(rng.integers(0, 14 * 86400))),
            "title": f"Film {i} ({1950 + rng.integers(0, 70)})" if i % 5 else f"Show {i}",
            "item": str(rng.integers(0, 12)),
            "f1": str(int(rng.integers(0, 2))), "f2": str(int(rng.integers(0, 2))),
            "day": f"2403{rng.integers(1, 29):02d}{rng.integers(0, 24):02d}",
            "model": ["a", "b", "c", "d"][int(rng.integers(0, 4))] if i % 9 else f"m{i}",
        })  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    raw = tmp_path_factory.mktemp("raw")
    records = raw_records()
    (raw / "log.csv").write_text(
        ",".join(COLUMNS) + "\n" + "".join(",".join(r[c] for c in COLUMNS) + "\n" for r in records)
    )
    # Item 11 twice (the first line wins, as in prepare); item 3 has no brand (missing → hashed "").
    items = ["item,genre,brand,unused"] + [f"{k},g{k % 4},b{k % 5},x" for k in range(12) if k != 3]
    (raw / "items.csv").write_text("\n".join(items + ["3,g3,,x", "11,dup,dup,x"]) + "\n")
    (raw / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    out = raw.parent / "prepared"
    report = prepare_from_spec(raw / "spec.yaml", [raw], out)
    assert report["rows_kept"] == len(records) and report["rows_rejected"] == {"bad_side_row": 1}
    return out, records


def prepared_rows(data: Path, n: int) -> list[dict]:
    """The prepared rows in record order (the random split's codes put them back)."""
    schema = Schema.load(data)
    codes = random_split_codes(np.arange(n), schema.seed, schema.extra["split_fractions"])
    per_split = {s: iter(pq.read_table(data / s).to_pylist()) for s in SPLITS}
    return [next(per_split[SPLITS[c]]) for c in codes]


def spec_inputs(data: Path) -> SpecInputs:
    inputs, files = serving_inputs(Schema.load(data), data)
    return SpecInputs(inputs, load_vocab(data), files, data)


def instance(record: dict, fields) -> dict:
    """A client's instance: the raw columns the artifact asks for, numbers as JSON numbers."""
    out = {}
    for name in fields:
        v = record[name]
        if name in ("clicks", "f1", "f2", "ts") and v != "":
            v = int(v)
        elif name == "price" and v != "":
            v = float(v)
        out[name] = None if v == "" else v
    return out


def test_client_sends_the_raw_columns_only(dataset):
    data, _ = dataset
    inputs, files = serving_inputs(Schema.load(data), data)
    names = [f["name"] for f in inputs["fields"]]
    # Every column a field reads, the join key instead of the joined attributes; never the label.
    assert names == [
        "user",
        "site",
        "tags",
        "price",
        "clicks",
        "ts",
        "day",
        "title",
        "f1",
        "f2",
        "model",
        "item",
    ]
    assert {f["type"] for f in inputs["fields"]} == {"raw"}
    side = pq.read_table(io.BytesIO(files["join_0.parquet"]))
    assert side.column_names == ["item", "genre", "brand"]  # the columns the fields read, not `unused`
    assert side["item"].to_pylist().count("11") == 1


def test_served_features_equal_prepared_rows_for_every_field_kind(dataset):
    data, records = dataset
    served = spec_inputs(data)
    fields = [f for f in served.fields]
    dense_BN, columns = served.features([instance(r, fields) for r in records])
    schema = Schema.load(data)
    expected = prepared_rows(data, len(records))
    assert len(columns) == len(schema.sparse_features) == 14 and dense_BN.shape == (len(records), 2)
    for sf, col in zip(schema.sparse_features, columns):
        assert col.to_pylist() == [row[sf.name] for row in expected], sf.name
    for j, name in enumerate(schema.dense_features):
        want = np.asarray([row[name] for row in expected], dtype=np.float32)
        assert np.array_equal(dense_BN[:, j], want), name
    # The cases the data holds, by construction: OOV (rare users), missing values, a missing joined value.
    user = {v: i + 1 for i, v in enumerate(load_vocab(data)["user"].values.to_pylist())}
    assert any(row["user"] == 0 for row in expected) and "" in user
    assert any(row["price"] == 0 and row["price_dense"] == 0.0 for row in expected)
    stats = schema.extra["fields"]["price"]
    assert stats["train_values"] < len(records)  # standardised with the train split's moments only


def test_unknown_values_keys_and_bad_input(dataset):
    data, records = dataset
    served = spec_inputs(data)
    base = instance(records[1], served.fields)
    schema = Schema.load(data)
    names = [sf.name for sf in schema.sparse_features]
    _, columns = served.features([dict(base, user="never-seen", model="zzz", tags=["t1", "new"])])
    got = {n: c.to_pylist()[0] for n, c in zip(names, columns)}
    tags = {v: i + 1 for i, v in enumerate(load_vocab(data)["tags"].values.to_pylist())}
    assert got["user"] == 0 and got["model"] == 0 and got["tags"] == [tags["t1"], 0]  # OOV, as prepare
    dense, columns = served.features([dict(base, price=None, clicks=None, tags=None, site=None)])
    got = {n: c.to_pylist()[0] for n, c in zip(names, columns)}
    assert (
        got["price"] == 0 and got["tags"] == [] and dense[0, schema.dense_features.index("price_dense")] == 0
    )
    cases = [
        (dict(base, item="999"), "item", "item '999' is not in items.csv"),  # prepare rejects it too
        (dict(base, price="cheap"), "price", "field price = 'cheap' is not a number"),
        (dict(base, clicks=2.5), "clicks", "is not an integer"),
        (dict(base, ts="soon"), "ts", "is not a unix time"),
        (dict(base, ts=None), "ts", "is not a unix time"),  # a missing time: prepare's bad_timestamp
        (dict(base, day="2024-03-01"), "day", "is not a %y%m%d%H time"),
        (dict(base, site=["a"]), "site", "expected one value"),
    ]
    for bad, column, message in cases:
        with pytest.raises(SpecInputError) as e:
            served.features([base, bad])
        assert (e.value.index, e.value.column) == (1, column) and message in e.value.message, e.value


def test_export_serves_raw_values_with_the_training_models_scores(dataset, tmp_path):
    """Prepare → train (tabular_fm.yaml) → export → Predictor / HTTP on raw records: the KJT and dense
    inputs are the prepared rows', the scores the trained model's, bad input a 422 naming the field."""
    from fastapi.testclient import TestClient

    from pep_torchrec.export.converter import ArtifactConverter
    from pep_torchrec.export.format import read_manifest
    from pep_torchrec.serving.app import Settings, create_app
    from pep_torchrec.serving.predictor import Predictor, RequestError
    from pep_torchrec.train import main as train_main

    data, records = dataset
    run = tmp_path / "run"
    argv = ["--config", str(REPO / "configs" / "tabular_fm.yaml"), "--run-dir", str(run), "--data", str(data),
            "--set", "train.progress=false", "--set", "train.epochs=2", "--set", "data.batch_size=64"]  # fmt: skip
    assert train_main(argv) == 0
    assert cli.main(["export", "--run-dir", str(run), "--out", str(tmp_path / "art")]) == 0
    manifest = read_manifest(tmp_path / "art")
    assert "join_0.parquet" in manifest["files"] and manifest["files"]["join_0.parquet"]["sha256"]
    predictor = Predictor.from_path(tmp_path / "art")
    fields = list(predictor.fields)
    instances = [instance(r, fields) for r in records]
    predictor.validate(instances[:100])
    dense, kjt = predictor.features(instances[:100])
    expected = prepared_rows(data, len(records))[:100]
    schema = Schema.load(data)
    for sf in schema.sparse_features:
        want = [row[sf.name] for row in expected]
        flat = [v for w in want for v in (w if sf.multi_hot else [w])]
        lengths = [len(w) if sf.multi_hot else 1 for w in want]
        assert kjt[sf.name].values().tolist() == flat and kjt[sf.name].lengths().tolist() == lengths, sf.name
    want_dense = torch.tensor(
        [[row[n] for n in schema.dense_features] for row in expected], dtype=torch.float32
    )
    assert torch.equal(dense, want_dense)
    model, _ = ArtifactConverter(run).load_model()
    with torch.no_grad():
        reference = torch.sigmoid(model.model(want_dense, kjt)).tolist()
    assert np.allclose(predictor.predict(instances[:100]), reference, atol=1e-6, rtol=0)
    with pytest.raises(RequestError) as e:
        predictor.predict([instances[0], dict(instances[1], price="cheap")])
    assert e.value.loc == ["instances", 1, "price"]
    # A separator field takes a list too: its items joined with the separator, as the file holds them.
    as_lists = [
        dict(inst, tags=(inst["tags"] or "").split("|") if inst["tags"] else []) for inst in instances[:20]
    ]
    predictor.validate(as_lists)
    assert predictor.predict(as_lists) == predictor.predict(instances[:20])

    with TestClient(create_app(Settings(artifact=str(tmp_path / "art")))) as client:
        r = client.post("/v1/predict", json={"instances": instances[:3]})
        assert r.status_code == 200 and np.allclose(r.json()["scores"], reference[:3], atol=1e-6)
        for bad, column in ((dict(instances[0], item="999"), "item"), (dict(instances[0], ts="x"), "ts"),
                            (dict(instances[0], user=True), "user"), ({**instances[0], "i_genre": "g1"}, "i_genre"),
                            (dict(instances[0], site=["s1"]), "site")):  # fmt: skip
            r = client.post("/v1/predict", json={"instances": [bad]})
            assert r.status_code == 422, r.text
            assert any(column in [str(p) for p in d["loc"]] for d in r.json()["detail"]), r.json()
    json.dumps(predictor.example_instance())
    assert 0 < predictor.predict([predictor.example_instance()])[0] < 1


def test_parquet_input_list_and_float_columns(tmp_path):
    """A Parquet input: a list column is a bag (null and empty items dropped), numbers are read as Arrow
    prints them (2.0 → "2"), so a client's JSON numbers give the prepared ids."""
    table = pa.table({
        "y": [1, 0, 1, 0, 1, 0],
        "genres": [["a", "b"], ["b", "", None], None, ["c"], ["a"], []],
        "code": [2.0, 2.5, 2.0, 3.0, None, 2.5],
        "amount": [1.5, 2.0, None, 4.0, 8.0, 3.0],
    })  # fmt: skip
    raw = tmp_path / "in.parquet"
    pq.write_table(table, raw)
    spec = {"format": {"type": "parquet"}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "genres"}, {"name": "code"},
                       {"name": "amount", "type": "numeric", "dense": "standardize", "bucketize": "quantile",
                        "num_buckets": 3}],
            "split": {"method": "random", "fractions": [1, 0, 0]}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    prepare_from_spec(tmp_path / "spec.yaml", [raw], tmp_path / "out")
    served = spec_inputs(tmp_path / "out")
    inputs, _ = serving_inputs(Schema.load(tmp_path / "out"), tmp_path / "out")
    assert {f["name"]: f["type"] for f in inputs["fields"]} == {
        "genres": "raw_list",
        "code": "raw",
        "amount": "raw",
    }
    dense, columns = served.features(table.drop_columns(["y"]).to_pylist())
    expected = pq.read_table(tmp_path / "out" / "train")
    assert [c.to_pylist() for c in columns] == [expected[n].to_pylist() for n in ("genres", "code", "amount")]
    assert np.array_equal(dense[:, 0], expected["amount_dense"].to_numpy())
    assert columns[1].to_pylist()[0] == columns[1].to_pylist()[2] != 0  # 2.0 is the file's "2"


def test_a_dataset_prepared_without_side_table_copies_is_refused_by_export(dataset):
    from pep_torchrec.export.converter import input_spec
    from pep_torchrec.export.format import ArtifactError

    data, _ = dataset
    schema = Schema.load(data)
    del schema.extra["joins"]  # as an older `data prepare --spec` wrote it
    with pytest.raises(ArtifactError, match=r"without a copy of its side tables.*data prepare --spec` again"):
        input_spec(schema, data_path=data)


def test_chained_joins_temporal_split_column_and_raw_dense(tmp_path):
    """A join on a joined column (item → maker → country): the client sends only the first key; the
    temporal split's column is not an input; a `dense: none` field is the raw number."""
    rows = [(i % 2, f"{i % 5}", i * 10, "" if i % 4 == 0 else f"{i / 8}") for i in range(40)]
    (tmp_path / "log.csv").write_text("y,item,t,w\n" + "".join(f"{y},{k},{t},{w}\n" for y, k, t, w in rows))
    (tmp_path / "items.csv").write_text("item,maker\n" + "".join(f"{k},m{k % 2}\n" for k in range(5)))
    (tmp_path / "makers.csv").write_text("maker,country\nm0,fr\nm1,jp\n")
    spec = {"format": {"header": True, "files": ["log.csv"]}, "label": {"column": "y", "positive": [1]},
            "joins": [{"name": "items", "path": "items.csv", "key": "item", "format": {"header": True},
                       "prefix": "i_"},
                      {"name": "makers", "path": "makers.csv", "key": "maker", "on": "i_maker",
                       "format": {"header": True}}],
            "fields": [{"name": "item"}, {"name": "country"},
                       {"name": "w", "type": "numeric", "dense": "none"}],
            "split": {"method": "temporal", "column": "t", "fractions": [1, 0, 0]}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    prepare_from_spec(tmp_path / "spec.yaml", [tmp_path], tmp_path / "out")
    inputs, files = serving_inputs(Schema.load(tmp_path / "out"), tmp_path / "out")
    assert [f["name"] for f in inputs["fields"]] == ["item", "w"]  # not t, not the joined i_maker
    assert pq.read_table(io.BytesIO(files["join_0.parquet"])).column_names == ["item", "maker"]
    served = spec_inputs(tmp_path / "out")
    dense, columns = served.features([{"item": int(k), "w": float(w) if w else None} for _, k, _, w in rows])
    expected = pq.read_table(tmp_path / "out" / "train")  # temporal on t = record order
    assert [c.to_pylist() for c in columns] == [expected[n].to_pylist() for n in ("item", "country")]
    assert np.array_equal(dense[:, 0], expected["w"].to_numpy()) and dense[1, 0] == np.float32(1 / 8)


def test_libsvm_input(tmp_path):
    """A libSVM input: a field's index and its `<field>_value` are the client's raw columns."""
    lines = [f"{i % 2} {i % 7}:1 {100 + i % 3}:{i / 4}\n" for i in range(30)]
    (tmp_path / "d.svm").write_text("".join(lines))
    spec = {"format": {"type": "libsvm", "fields": ["a", "b"]}, "label": {"column": "label", "positive": [1]},
            "fields": [{"name": "a"}, {"name": "b", "hash_buckets": 5},
                       {"name": "bv", "type": "numeric", "column": "b_value", "dense": "log1p"}],
            "split": {"method": "random", "fractions": [1, 0, 0]}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    prepare_from_spec(tmp_path / "spec.yaml", [tmp_path / "d.svm"], tmp_path / "out")
    served = spec_inputs(tmp_path / "out")
    assert served.fields == ["a", "b", "b_value"]
    instances = []
    for line in lines:
        (a, _), (b, value) = (item.split(":") for item in line.split()[1:])
        instances.append({"a": a, "b": int(b), "b_value": float(value)})
    dense, columns = served.features(instances)
    expected = pq.read_table(tmp_path / "out" / "train")
    assert [c.to_pylist() for c in columns] == [expected[n].to_pylist() for n in ("a", "b")]
    assert np.array_equal(dense[:, 0], expected["bv"].to_numpy())
