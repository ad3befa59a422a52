"""`pep-torchrec data prepare --spec`: every input format, label rule, field type, join and split on small
files the tests write, the errors a bad spec or bad rows give, the shipped specs against the built-in
readers on the real data in ../shared/data (skipped when absent), and a spec'd dataset trained."""

from __future__ import annotations

import gzip
import json
import math
import os
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pep_torchrec import cli
from pep_torchrec.data.prepare import PrepareOptions, prepare_dataset, prepare_from_spec
from pep_torchrec.data.prepare.splits import random_split_codes
from pep_torchrec.data.raw.rejections import MalformedRowError, PrepareError
from pep_torchrec.data.raw.spec_reader import fnv1a64
from pep_torchrec.data.schema import SPLITS, Schema
from pep_torchrec.data.vocab import load_vocab

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("PEP_SHARED_DATA", REPO.parent / "shared" / "data"))


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write(path: Path, text: str, *, gz: bool = False, encoding: str = "utf-8") -> Path:
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def rows(out: Path) -> pa.Table:
    """All splits' rows, in split order."""
    return pa.concat_tables([pq.read_table(out / s) for s in SPLITS])


def vocab(out: Path, name: str) -> dict[str, int]:
    v = load_vocab(out)[name]
    return {value: i + 1 for i, value in enumerate(v.values.to_pylist())}


def prepare(tmp_path: Path, spec: dict, raws, out: str = "out", **kw) -> tuple[dict, Path]:
    options = PrepareOptions(**kw)
    report = prepare_from_spec(write_spec(tmp_path, spec), [str(r) for r in raws], tmp_path / out, options)
    return report, tmp_path / out


ALL_TRAIN = {"method": "random", "fractions": [1, 0, 0]}


# ---------------------------------------------------------------------------------------------------
# formats


def test_delimited_header_quotes_encoding_gzip_and_folder_order(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    header = 'click,city,"note, quoted"\n'
    # day_10 must come after day_2 (natural order); day_2 is gzip and latin-1 like old exports.
    write(folder / "day_10.csv", header + '1,Zürich,"a, b"\n')
    write(folder / "day_2.csv.gz", header + '0,Köln,"x ""y"""\n1,Köln,plain\n', gz=True, encoding="latin-1")
    write(folder / ".hidden.csv", "junk\n")
    spec = {"name": "cities", "format": {"delimiter": ",", "quote": '"', "header": True, "encoding": "latin-1",
                                         "files": ["*.csv", "*.csv.gz"]},
            "label": {"column": "click", "positive": [1]},
            "fields": [{"name": "city"}, {"name": "note", "column": "note, quoted"}],
            "split": ALL_TRAIN}  # fmt: skip
    # day_10 is UTF-8 read as latin-1: "Zürich" comes out mojibake, but as one value, not a bad row.
    report, out = prepare(tmp_path, spec, [folder])
    assert report["rows_read"] == 3 and report["rows_kept"] == 3
    table = rows(out)
    assert table["label"].to_pylist() == [0, 1, 1]
    notes = vocab(out, "note")
    assert set(notes) == {'x "y"', "plain", "a, b"}  # the quoted delimiter stays inside the value
    assert vocab(out, "city")["Köln"] == 1
    assert [Path(f["path"]).name for f in report["files"]] == ["day_2.csv.gz", "day_10.csv"]


def test_libsvm_fields_by_position_and_map_label(tmp_path):
    raw = write(tmp_path / "train.libfm", "+1 3:1 10:1\n-1 4:1 10:1\n+1 3:1 11:1\n-1 3:1\n")
    spec = {"format": {"type": "libsvm", "fields": ["user", "item"]}, "label": {"column": "label", "map": {-1: 0, 1: 1}},
            "fields": [{"name": "user"}, {"name": "item"}], "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    table = rows(out)
    assert table["label"].to_pylist() == [1, 0, 1, 0]
    users, items = vocab(out, "user"), vocab(out, "item")
    assert table["user"].to_pylist() == [users["3"], users["4"], users["3"], users["3"]]
    assert table["item"].to_pylist() == [
        items["10"],
        items["10"],
        items["11"],
        items[""],
    ]  # missing field: ""


def test_libffm_field_index_value_and_bags(tmp_path):
    raw = write(tmp_path / "a.ffm", "1 0:7:1 1:5:1 1:6:1\n0 1:5:1 0:8:0.5\n")
    spec = {"format": {"type": "libffm", "fields": ["ad", "tags"]}, "label": {"column": "label", "positive": [1]},
            "fields": [{"name": "ad"}, {"name": "tags", "separator": " "},
                       {"name": "w", "column": "ad_value", "type": "numeric", "dense": "none"}],
            "split": ALL_TRAIN}  # fmt: skip
    _, out = prepare(tmp_path, spec, [raw])
    table = rows(out)
    tags = vocab(out, "tags")
    assert table["tags"].to_pylist() == [[tags["5"], tags["6"]], [tags["5"]]]
    assert table["w"].to_pylist() == [1.0, 0.5]


def test_parquet_input_with_a_list_column(tmp_path):
    raw = tmp_path / "part.parquet"
    pq.write_table(pa.table({"y": [1, 0, 1], "u": [10, 11, None], "g": [["a", "b"], None, ["b", None, ""]],
                             "x": [1.5, None, 3.0]}), raw)  # fmt: skip
    spec = {"format": {"type": "parquet"}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "u"}, {"name": "g"}, {"name": "x", "type": "numeric", "dense": "none"}],
            "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    table, g = rows(out), vocab(out, "g")
    assert report["rows_kept"] == 3
    assert table["g"].to_pylist() == [[g["a"], g["b"]], [], [g["b"]]]
    assert table["x"].to_pylist() == [1.5, 0.0, 3.0]  # null → missing → 0
    assert set(vocab(out, "u")) == {"10", "11", ""}


# ---------------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize(
    "rule, expected_labels, expected_filtered",
    [
        ({"threshold": "> 3", "drop": [3]}, [1, 0, 1, 0], 1),
        ({"threshold": ">= 3"}, [1, 1, 0, 1, 0], 0),
        ({"positive": [5, 4]}, [1, 0, 0, 1, 0], 0),
        ({"map": {1: 0, 2: 0, 3: 0, 4: 1, 5: 1}}, [1, 0, 0, 1, 0], 0),
    ],
)
def test_label_rules(tmp_path, rule, expected_labels, expected_filtered):
    raw = write(tmp_path / "r.tsv", "u1\t5\nu2\t3\nu3\t1\nu4\t4.0\nu5\t2\nu6\tfive\n")
    spec = {"format": {"delimiter": "\t", "columns": ["user", "rating"]}, "label": {"column": "rating", **rule},
            "fields": [{"name": "user"}], "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    assert rows(out)["label"].to_pylist() == expected_labels
    assert report["rows_filtered"].get("label_dropped", 0) == expected_filtered
    assert report["rows_rejected"] == {"bad_label": 1}
    assert report["rejected_examples"]["bad_label"].endswith("r.tsv:6: label 'five' is not a number")


def test_string_label_values(tmp_path):
    raw = write(tmp_path / "r.csv", "a,click\nb,view\nc,skip\nd,odd\n")
    spec = {"format": {"columns": ["k", "event"]}, "label": {"column": "event", "map": {"click": 1, "view": 0},
                                                          "drop": ["skip"]},
            "fields": [{"name": "k"}], "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    assert rows(out)["label"].to_pylist() == [1, 0]
    assert report["rows_filtered"] == {"label_dropped": 1} and report["rows_rejected"] == {"bad_label": 1}


# ---------------------------------------------------------------------------------------------------
# fields


def test_multi_valued_min_count_and_hashing(tmp_path):
    raw = write(tmp_path / "d.csv", "1,a|b,x\n0,b||c,y\n1,,x\n0,b,z\n")
    spec = {"format": {"columns": ["y", "tags", "site"]}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "tags", "separator": "|", "min_count": 2},
                       {"name": "site", "hash_buckets": 7}], "split": ALL_TRAIN}  # fmt: skip
    _, out = prepare(tmp_path, spec, [raw])
    table, tags = rows(out), vocab(out, "tags")
    assert tags == {"b": 1}  # a, c seen once: OOV
    assert table["tags"].to_pylist() == [[0, 1], [1, 0], [], [1]]  # empty items dropped, bags keep order
    expected = [int(np.uint64(h) % np.uint64(7)) for h in fnv1a64(pa.array(["x", "y", "x", "z"]))]
    assert table["site"].to_pylist() == expected
    schema = Schema.load(out)
    assert schema.feature("site").cardinality == 7 and schema.feature("tags").multi_hot
    assert "site" not in load_vocab(out)  # hashed: no vocabulary


def test_fnv1a64_known_values():
    # Reference values of the 64-bit FNV-1a hash (http://www.isthe.com/chongo/tech/comp/fnv/).
    got = fnv1a64(pa.array(["", "a", "foobar"]))
    assert got.tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_numeric_dense_standardize_log2_and_quantile(tmp_path):
    values = [str(v) for v in range(1, 21)] + [""]
    text = "".join(f"{i % 2},{v},{v}\n" for i, v in enumerate(values)) + "1,abc,1\n"
    raw = write(tmp_path / "n.csv", text)
    spec = {"format": {"columns": ["y", "a", "b"]}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "a", "type": "numeric", "integer": True, "bucketize": "log2", "dense": "log1p",
                        "dense_name": "a_log"},
                       {"name": "b", "type": "numeric", "bucketize": "quantile", "num_buckets": 4,
                        "dense": "standardize"}],
            "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    assert report["rows_rejected"] == {"bad_number": 1}
    assert "n.csv:22: field a = 'abc' is not an integer" in report["rejected_examples"]["bad_number"]
    table, a = rows(out), vocab(out, "a")
    bucket = [str(int(math.log(v) ** 2)) if v > 2 else str(v) for v in range(1, 21)] + [""]
    assert table["a"].to_pylist() == [a[k] for k in bucket]
    assert np.allclose(table["a_log"].to_numpy(), [math.log1p(v) for v in range(1, 21)] + [0.0], atol=1e-6)
    x = np.arange(1, 21, dtype=np.float64)
    assert np.allclose(table["b_dense"].to_numpy(), list((x - x.mean()) / x.std()) + [0.0], atol=1e-6)
    assert table["b"].to_pylist() == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5 + [0]  # 0: missing
    facts = Schema.load(out).extra["fields"]["b"]
    assert facts["edges"] == [5.75, 10.5, 15.25] and math.isclose(facts["mean"], 10.5)


def test_train_statistics_come_from_train_rows_only(tmp_path):
    raw = write(tmp_path / "t.csv", "".join(f"{i % 2},{i},{i}\n" for i in range(100)))
    spec = {"format": {"columns": ["y", "x", "ts"]}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "x", "type": "numeric", "dense": "standardize", "bucketize": "quantile"}],
            "split": {"method": "temporal", "column": "ts", "fractions": [0.5, 0.25, 0.25]}}  # fmt: skip
    _, out = prepare(tmp_path, spec, [raw])
    facts = Schema.load(out).extra["fields"]["x"]
    assert math.isclose(facts["mean"], 24.5) and facts["train_values"] == 50  # rows 0..49 only
    assert pq.read_table(out / "test")["x"].to_pylist() == [10] * 25  # beyond every train edge


def test_derived_hour_weekday_regex_and_cross(tmp_path):
    t1 = int(datetime(2024, 3, 4, 23, 30, tzinfo=ZoneInfo("UTC")).timestamp())  # Monday 23:30 UTC
    raw = write(
        tmp_path / "d.csv", f"1,{t1},Heat (1995),24030423\n0,{t1 + 3600},Up,24030500\n1,soon,X (2001),x\n"
    )
    spec = {"format": {"columns": ["y", "ts", "title", "local"]}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "hour", "type": "hour", "column": "ts", "timezone": "Asia/Tokyo"},
                       {"name": "wd", "type": "weekday", "column": "ts", "timezone": "UTC"},
                       {"name": "year", "type": "regex", "column": "title", "pattern": r"\((\d{4})\)$",
                        "default": "none"},
                       {"name": "lwd", "type": "weekday", "column": "local", "time_format": "%y%m%d%H"},
                       {"name": "hour_x_year", "type": "cross", "fields": ["hour", "year"]}],
            "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    assert report["rows_rejected"] == {"bad_timestamp": 1}
    table = rows(out)
    inv = {
        name: {i: v for v, i in vocab(out, name).items()}
        for name in ("hour", "wd", "year", "lwd", "hour_x_year")
    }
    assert [inv["hour"][i] for i in table["hour"].to_pylist()] == ["08", "09"]  # Tokyo = UTC+9
    assert [inv["wd"][i] for i in table["wd"].to_pylist()] == ["0", "1"]  # Monday, then Tuesday 00:30
    assert [inv["year"][i] for i in table["year"].to_pylist()] == ["1995", "none"]
    assert [inv["lwd"][i] for i in table["lwd"].to_pylist()] == ["0", "1"]
    assert [inv["hour_x_year"][i] for i in table["hour_x_year"].to_pylist()] == ["08\x1f1995", "09\x1fnone"]


# ---------------------------------------------------------------------------------------------------
# joins and splits


def test_side_table_join_counts_unknown_keys_and_bad_side_rows(tmp_path):
    write(tmp_path / "ratings.csv", "user,item,r\n1,10,5\n2,10,1\n9,11,4\n1,11,2\n")
    write(tmp_path / "items.csv", "item,genres\n10,Drama|War\n11,Comedy\n11,Dup\nbroken\n", gz=True)
    (tmp_path / "items.csv").rename(tmp_path / "items.csv.gz")
    write(tmp_path / "users.csv", "user,age\n1,30\n2,40\n")
    spec = {"format": {"header": True, "files": ["ratings.csv"]}, "label": {"column": "r", "threshold": "> 3"},
            "joins": [{"name": "user", "path": "users.csv", "key": "user", "format": {"header": True}},
                      {"name": "item", "path": "items.csv", "key": "item", "format": {"header": True}}],
            "fields": [{"name": "user"}, {"name": "age"}, {"name": "genres", "separator": "|"}],
            "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [tmp_path])
    assert report["rows_rejected"] == {"bad_side_row": 2, "unknown_user": 1}
    assert report["rows_rejected_total"] == 1  # side-table lines are not rows of the input
    assert "ratings.csv:4: user '9' is not in users.csv" in report["rejected_examples"]["unknown_user"]
    assert "duplicate key '11'" in report["rejected_examples"]["bad_side_row"]
    table, g, age = rows(out), vocab(out, "genres"), vocab(out, "age")
    assert table["age"].to_pylist() == [age["30"], age["40"], age["30"]]
    assert table["genres"].to_pylist() == [[g["Drama"], g["War"]]] * 2 + [[g["Comedy"]]]  # first key wins


def test_given_split_files(tmp_path):
    for name, n in (("train.csv", 6), ("valid.csv", 2), ("test.csv", 3)):
        write(tmp_path / name, "".join(f"{i % 2},{name[:2]}{i}\n" for i in range(n)))
    spec = {"format": {"columns": ["y", "k"]}, "label": {"column": "y", "positive": [1]}, "fields": [{"name": "k"}],
            "split": {"method": "files", "train": ["train*"], "valid": ["valid*"], "test": ["test*"]}}  # fmt: skip
    report, _ = prepare(
        tmp_path, spec, [tmp_path / "train.csv", tmp_path / "valid.csv", tmp_path / "test.csv"]
    )
    assert report["rows_per_split"] == {"train": 6, "valid": 2, "test": 3}
    with pytest.raises(PrepareError, match="matches none of split.train/valid/test"):
        prepare(tmp_path, spec, [tmp_path / "train.csv", write(tmp_path / "extra.csv", "1,a\n")], out="o2")


# ---------------------------------------------------------------------------------------------------
# bad rows and bad specs


def test_bad_rows_per_reason_first_file_line_and_strict(tmp_path):
    raw = write(
        tmp_path / "b.csv",
        '1,a,"q"\n1,b\n0,"open,3\nx,c,1\n1,d,2.5\n\n0,e,7\n1,f,2\xff\n'.replace("\xff", ""),
    )
    raw.write_bytes(raw.read_bytes() + b"1,g,\xff\xfe\n")
    spec = {"format": {"columns": ["y", "k", "n"], "quote": '"'}, "label": {"column": "y", "positive": [1]},
            "fields": [{"name": "k"}, {"name": "n", "type": "numeric", "integer": True, "dense": "none"}],
            "split": ALL_TRAIN}  # fmt: skip
    report, _ = prepare(tmp_path, spec, [raw])
    assert report["rows_rejected"] == {"bad_encoding": 1, "bad_label": 1, "bad_number": 2, "unbalanced_quote": 1,
                                       "wrong_field_count": 2}  # fmt: skip
    assert report["rows_read"] == report["rows_kept"] + report["rows_rejected_total"] == 9
    examples = report["rejected_examples"]
    assert examples["wrong_field_count"].endswith("b.csv:2: expected 3 fields, found 2")
    assert examples["unbalanced_quote"].startswith(f"{raw}:3:")
    assert examples["bad_number"].startswith(f"{raw}:1: field n = 'q'")
    with pytest.raises(MalformedRowError, match=r"b.csv:1: bad_number"):
        prepare(tmp_path, spec, [raw], out="strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_libsvm_bad_items(tmp_path):
    raw = write(tmp_path / "b.svm", "1 1:1 2:1\n0 1:1 2:1 3:1\n1 1:1 oops\n")
    spec = {"format": {"type": "libsvm", "fields": ["a", "b"]}, "label": {"column": "label", "positive": [1]},
            "fields": [{"name": "a"}], "split": ALL_TRAIN}  # fmt: skip
    report, _ = prepare(tmp_path, spec, [raw])
    assert report["rows_rejected"] == {"bad_pair": 1, "wrong_field_count": 1}
    assert report["rejected_examples"]["bad_pair"].endswith("b.svm:3: item 'oops' is not idx:val")


def test_unknown_spec_key_names_file_and_key(tmp_path, capsys):
    spec = write_spec(tmp_path, {"format": {"columns": ["y", "k"]}, "label": {"column": "y", "positive": [1]},
                                 "fields": [{"name": "k", "min_cont": 2}]})  # fmt: skip
    raw = write(tmp_path / "r.csv", "1,a\n")
    with pytest.raises(PrepareError, match=rf"^{spec}: unknown key fields\[0\].min_cont "):
        prepare_from_spec(spec, [raw], tmp_path / "out")
    code = cli.main(
        ["data", "prepare", "--spec", str(spec), "--raw", str(raw), "--out", str(tmp_path / "out")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key fields[0].min_cont" in err[0] and str(spec) in err[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"min_count": "ten"}, r"min_count: expected an integer, got 'ten'"),
        ({"label": {"column": "y"}}, r"label: give exactly one of threshold, positive, map"),
        ({"label": {"column": "y", "threshold": "about 3"}}, r"label.threshold: 'about 3' is not like"),
        ({"fields": [{"name": "k", "type": "hour"}]}, r"fields\[0\] \(k\).timezone: required"),
        (
            {"fields": [{"name": "k", "type": "cross", "fields": ["k", "z"]}]},
            r"fields\[0\] \(k\).fields: 'k' is not an earlier",
        ),
        ({"split": {"method": "shuffle"}}, r"split.method: 'shuffle' is not one of"),
        ({"split": {"seed": -1}}, r"split.seed: must be >= 0, got -1"),
    ],
)
def test_bad_spec_values_name_the_key(tmp_path, change, message):
    base = {
        "format": {"columns": ["y", "k"]},
        "label": {"column": "y", "positive": [1]},
        "fields": [{"name": "k"}],
    }
    spec = write_spec(tmp_path, {**base, **change})
    with pytest.raises(PrepareError, match=rf"^{spec}: {message}"):
        prepare_from_spec(spec, [write(tmp_path / "r.csv", "1,a\n")], tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# the shipped specs equal the built-in readers on the real data


def assert_same_prepared(a: Path, b: Path) -> None:
    assert pq.read_table(a / "vocab.parquet").equals(pq.read_table(b / "vocab.parquet"))
    for split in SPLITS:
        assert pq.read_table(a / split).equals(pq.read_table(b / split)), split
    sa, sb = Schema.load(a), Schema.load(b)
    assert sa.sparse_features == sb.sparse_features and sa.dense_features == sb.dense_features


CRITEO = SHARED_DATA / "criteo_kaggle_head10k" / "train_10k.txt.gz"
ML100K = SHARED_DATA / "ml-100k"


@pytest.mark.skipif(not CRITEO.is_file(), reason=f"real Criteo sample not found at {CRITEO}")
def test_criteo_spec_equals_builtin_reader(tmp_path):
    prepare_dataset("criteo", CRITEO, tmp_path / "builtin")
    assert (
        cli.main(
            ["data", "prepare", "--spec", "criteo", "--raw", str(CRITEO), "--out", str(tmp_path / "spec")]
        )
        == 0
    )
    assert_same_prepared(tmp_path / "spec", tmp_path / "builtin")


@pytest.mark.skipif(not ML100K.is_dir(), reason=f"real MovieLens 100K not found at {ML100K}")
@pytest.mark.parametrize("split", ["random", "temporal"])
def test_movielens_100k_spec_equals_builtin_reader(tmp_path, split):
    prepare_dataset("movielens", ML100K, tmp_path / "builtin", PrepareOptions(split=split, seed=3))
    report = prepare_from_spec(
        "movielens_100k", [ML100K], tmp_path / "spec", PrepareOptions(split=split, seed=3)
    )
    assert_same_prepared(tmp_path / "spec", tmp_path / "builtin")
    builtin = json.loads((tmp_path / "builtin" / "report.json").read_text())
    assert report["rows_per_split"] == builtin["rows_per_split"] and report["rows_kept"] == 72_855


# ---------------------------------------------------------------------------------------------------
# a spec'd dataset trains


def test_spec_to_served_predictions_with_the_tabular_configs(tmp_path):
    """Spec → prepare → configs/tabular_deepfm.yaml baseline, tabular_fm_search.yaml → tabular_fm_retrain.yaml
    from the 10 % mask → export → the framework-free Predictor on raw values: no dataset-specific config
    or code anywhere, and the served test AUC is the retrain run's."""
    from pep_torchrec.serving.predictor import Predictor
    from pep_torchrec.train import main as train_main
    from pep_torchrec.training.metrics import roc_auc

    rng = np.random.default_rng(0)
    n = 6000
    users, items = rng.integers(0, 50, n), rng.integers(0, 40, n)
    label = ((users + items) % 3 == 0).astype(int)
    lines = [
        f"{u},{i},g{i % 4}|g{i % 7},{rng.random() * 100:.2f},{y}\n" for u, i, y in zip(users, items, label)
    ]
    raw = write(tmp_path / "log.csv", "user,item,tags,price,clicked\n" + "".join(lines))
    spec = {"name": "toy", "format": {"header": True}, "label": {"column": "clicked", "positive": [1]},
            "fields": [{"name": "user"}, {"name": "item"}, {"name": "tags", "separator": "|"},
                       {"name": "price", "type": "numeric", "dense": "log1p_standardize"}]}  # fmt: skip
    _, data = prepare(tmp_path, spec, [raw])
    runs = tmp_path / "runs"
    common = ["--data", str(data), "--set", "train.progress=false", "--set", "train.epochs=3"]

    def train(config: str, run: str, *extra: str) -> dict:
        argv = ["--config", str(REPO / "configs" / config), "--run-dir", str(runs / run), *common, *extra]
        assert train_main(argv) == 0
        return json.loads((runs / run / "summary.json").read_text())

    base = train("tabular_deepfm.yaml", "base")
    assert base["dataset"] == "toy" and base["steps"] >= 4 and base["model"] == "deepfm"
    train("tabular_fm_search.yaml", "search", "--set", "train.eval_every=5", "--set", "pep.gk_growth=3.0")
    retrain = train(
        "tabular_fm_retrain.yaml", "retrain", "--mask", str(runs / "search" / "masks" / "budget_0.1")
    )
    assert retrain["embedding_params_kept"] <= 0.1 * retrain["embedding_params_total"] + 1
    assert retrain["valid_auc"] > 0.7  # the label is a function of (user, item): learnable from 10 %
    assert cli.main(["export", "--run-dir", str(runs / "retrain"), "--out", str(tmp_path / "artifact")]) == 0
    predictor = Predictor.from_path(tmp_path / "artifact")
    # The test split as a client would send it: the raw lines' values (the service standardises price).
    test = pq.read_table(data / "test")
    codes = random_split_codes(np.arange(n), 0, Schema.load(data).extra["split_fractions"])
    instances = [{"user": int(u), "item": int(i), "tags": line.split(",")[2], "price": float(line.split(",")[3])}
                 for u, i, line, c in zip(users, items, lines, codes) if c == 2]  # fmt: skip
    assert len(instances) == test.num_rows
    scores = np.asarray(predictor.predict(instances))
    assert abs(roc_auc(test["label"].to_numpy(), scores) - retrain["test_auc"]) < 1e-4


AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)


def test_avazu_spec_equals_builtin_reader(tmp_path):
    rng = np.random.default_rng(1)
    lines = [AVAZU_HEADER]
    for i in range(600):
        hour = f"1410{rng.integers(21, 31):02d}{rng.integers(0, 24):02d}"
        cats = [f"v{rng.integers(0, 12)}" for _ in range(21)]
        lines.append(",".join([str(i), str(rng.integers(0, 2)), hour, *cats]))
    raw = write(tmp_path / "train.csv", "\n".join(lines) + "\n", gz=True)
    prepare_dataset("avazu", raw, tmp_path / "builtin", PrepareOptions(seed=5))
    prepare_from_spec("avazu", [raw], tmp_path / "spec", PrepareOptions(seed=5))
    assert_same_prepared(tmp_path / "spec", tmp_path / "builtin")


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_movielens_1m_spec_equals_builtin_reader(tmp_path, split):
    rng = np.random.default_rng(2)
    genres = ["Action", "Comedy", "Drama", "Children's"]
    users = [f"{u}::{'MF'[u % 2]}::{[1, 18, 25][u % 3]}::{u % 5}::{10000 + u}" for u in range(1, 21)]
    movies = [f"{m}::Tïtle {m} (199{m % 10})::{'|'.join(genres[: m % 4])}" for m in range(1, 31)]
    ratings = [f"{rng.integers(1, 21)}::{rng.integers(1, 31)}::{rng.integers(1, 6)}::{rng.integers(9e8, 1e9)}"
               for _ in range(500)]  # fmt: skip
    ml = tmp_path / "ml-1m"
    ml.mkdir()
    write(ml / "users.dat", "\n".join(users) + "\n")
    write(ml / "movies.dat", "\n".join(movies) + "\n", encoding="latin-1")
    write(ml / "ratings.dat.gz", "\n".join(ratings) + "\n", gz=True)
    prepare_dataset("movielens", ml, tmp_path / "builtin", PrepareOptions(split=split))
    prepare_from_spec("movielens_1m", [ml], tmp_path / "spec", PrepareOptions(split=split))
    assert_same_prepared(tmp_path / "spec", tmp_path / "builtin")


def test_output_is_independent_of_block_size_and_counts_break_and_order_key(tmp_path):
    rng = np.random.default_rng(4)
    lines = [f'{rng.integers(0, 2)},"k{rng.integers(0, 30)}, x",{rng.integers(0, 1000)}' for _ in range(3000)]
    lines[1200] = '1,"k1, x",soon'  # line 1202 of the file (after the header)
    text = "y,key,ts\n" + "\n".join(lines) + "\n"
    write(tmp_path / "a.csv", text)
    broken = gzip.compress(text.encode())
    (tmp_path / "b.csv.gz").write_bytes(broken[: len(broken) // 2])  # cut: the rows before the break stay
    spec = {"format": {"header": True, "quote": '"', "files": ["*.csv", "*.csv.gz"]},
            "label": {"column": "y", "positive": [1]}, "fields": [{"name": "key"}],
            "split": {"method": "temporal", "column": "ts"}}  # fmt: skip
    big, out_big = prepare(tmp_path, spec, [tmp_path], out="big")
    small, out_small = prepare(tmp_path, spec, [tmp_path], out="small", block_size=1024)
    for split in SPLITS:
        assert pq.read_table(out_big / split).equals(pq.read_table(out_small / split)), split
    assert big["rows_rejected"] == small["rows_rejected"]
    assert big["rows_rejected"]["bad_order_key"] == 2 and big["rows_rejected"]["broken_gzip"] == 1
    assert big["rejected_examples"]["bad_order_key"].endswith(
        "a.csv:1202: split column ts = 'soon' is not a number"
    )
    assert 3000 < big["rows_read"] < 6000


def test_libsvm_with_a_feature_index_map(tmp_path):
    # libFM one-hot rows whose items are in no fixed order: the map file says which field each index is.
    write(tmp_path / "fields.txt", "0 user\n1 user\n2 item\n3 item\n4 tag\n5 tag\n")
    raw = write(tmp_path / "d.libfm", "1 2:1 0:1 4:1 5:1\n0 1:1 3:1\n1 0:1 9:1\n")
    spec = {"format": {"type": "libsvm", "fields": ["user", "item", "tag"], "field_map": "fields.txt"},
            "label": {"column": "label", "positive": [1]},
            "fields": [{"name": "user"}, {"name": "item"}, {"name": "tag", "separator": " "}], "split": ALL_TRAIN}  # fmt: skip
    report, out = prepare(tmp_path, spec, [raw])
    assert report["rows_rejected"] == {"bad_pair": 1}
    assert report["rejected_examples"]["bad_pair"].endswith(
        "d.libfm:3: item '9:1' is not idx:val with idx in fields.txt"
    )
    table, users, items, tags = rows(out), vocab(out, "user"), vocab(out, "item"), vocab(out, "tag")
    assert table["user"].to_pylist() == [users["0"], users["1"]]
    assert table["item"].to_pylist() == [items["2"], items["3"]]
    assert table["tag"].to_pylist() == [[tags["4"], tags["5"]], []]
