"""`pep-torchrec data prepare` on small inline raw files (Criteo, Avazu, MovieLens 100K/1M), plus the real
shared samples when they are present."""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pep_torchrec.commands.data_prepare_command import main
from pep_torchrec.data.prepare import PrepareOptions, format_summary, prepare_dataset, progress, splits
from pep_torchrec.data.raw.rejections import MalformedRowError, PrepareError
from pep_torchrec.data.schema import SPLITS, Schema
from pep_torchrec.data.synthetic import SyntheticConfig
from pep_torchrec.data.vocab import apply_transform, criteo_log_bucket, load_vocab
from tests.helpers.data import AVAZU_HEADER, avazu_line

# ---------------------------------------------------------------------------------------------------
# helpers


def write(path: Path, text: str | bytes, *, gz: bool = False) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def criteo_line(label: str = "0", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats])


def criteo_text(num_rows: int, seed: int = 0, *, row_index_in_i1: bool = False) -> str:
    """Criteo-like rows: ~25% clicks, 20% missing integers, Zipf-ish categories."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(num_rows) < 0.25).astype(int)
    ints = rng.integers(-1, 2000, size=(num_rows, 13))
    missing = rng.random((num_rows, 13)) < 0.2
    cats = np.minimum(rng.zipf(1.6, size=(num_rows, 26)), 5000)
    lines = []
    for r in range(num_rows):
        row_ints = ["" if missing[r, j] else str(ints[r, j]) for j in range(13)]
        if row_index_in_i1:
            row_ints[0] = str(r)
        lines.append(criteo_line(str(labels[r]), row_ints, [f"{c:08x}" for c in cats[r]]))
    return "\n".join(lines) + "\n"


def read_split(out: Path, split: str) -> pa.Table:
    schema = Schema.load(out)
    return pa.concat_tables([pq.read_table(out / f) for f in schema.splits[split].files])


def read_all(out: Path) -> dict[str, pa.Table]:
    return {s: read_split(out, s) for s in SPLITS}


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_rows_add_up(report: dict) -> None:
    filtered = sum(report["rows_filtered"].values())
    assert report["rows_read"] == report["rows_kept"] + report["rows_rejected_total"] + filtered
    assert sum(report["rows_per_split"].values()) == report["rows_kept"]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


# ---------------------------------------------------------------------------------------------------
# Criteo


def test_criteo_plain_gzip_and_block_size_give_identical_output(tmp_path):
    text = criteo_text(3000)
    plain = write(tmp_path / "plain.txt", text)
    packed = write(tmp_path / "packed.txt.gz", text, gz=True)
    a = prepare_dataset("criteo", plain, tmp_path / "a", PrepareOptions(min_count=3))
    b = prepare_dataset("criteo", packed, tmp_path / "b", PrepareOptions(min_count=3, block_size=4096))
    assert a["rows_read"] == b["rows_read"] == a["rows_kept"] == 3000
    assert a["cardinalities"] == b["cardinalities"]
    for split in SPLITS:
        assert read_split(tmp_path / "a", split).equals(read_split(tmp_path / "b", split))
    schema = Schema.load(tmp_path / "b")
    assert schema.source["files"][0]["compressed"] is True
    assert schema.source["files"][0]["bytes"] == packed.stat().st_size


def test_criteo_features_buckets_dense_and_oov(tmp_path):
    # C1: "aa" x3, "bb" x3, "cc" x2, "dd" x1 → with min_count 2: aa=1, bb=2 (tie broken by value), cc=3, dd→0.
    c1 = ["bb", "aa", "cc", "aa", "bb", "dd", "cc", "bb", "aa"]
    i1 = ["1382", "", "-1", "2", "3", "0", "1382", "", "7"]
    lines = [criteo_line("1" if i % 2 else "0", [i1[i]] + ["5"] * 12, [c1[i]] + ["x"] * 25) for i in range(9)]
    raw = write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    prepare_dataset("criteo", raw, out, PrepareOptions(min_count=2, split_fractions="1,0,0"))
    table = read_split(out, "train")
    vocab = load_vocab(out)
    assert vocab["C1"].values.to_pylist() == ["aa", "bb", "cc"]
    assert vocab["C1"].counts.tolist() == [3, 3, 2]
    expected_c1 = {"aa": 1, "bb": 2, "cc": 3, "dd": 0}
    assert table.column("C1").to_pylist() == [expected_c1[v] for v in c1]
    # I1 categorical: the paper's log² bucket of the raw value; kept values: "" x2, "52" x2 ("1382").
    assert apply_transform("criteo_log_bucket", "1382") == str(int(math.log(1382) ** 2)) == "52"
    i1_ids = {v: vocab["I1"].id_of(apply_transform("criteo_log_bucket", v)) for v in i1}
    assert i1_ids["1382"] > 0 and i1_ids[""] > 0 and i1_ids["-1"] == 0
    assert table.column("I1").to_pylist() == [i1_ids[v] for v in i1]
    # Dense: log1p(max(v, 0)), missing → 0.
    expected = [math.log1p(max(int(v), 0)) if v else 0.0 for v in i1]
    np.testing.assert_allclose(table.column("I1_log").to_numpy(), expected, rtol=1e-6)
    schema = Schema.load(out)
    assert schema.feature("I1").transform == "criteo_log_bucket"
    assert schema.feature("C1").transform == "none"
    assert schema.dense_features == [f"I{i}_log" for i in range(1, 14)]
    assert schema.feature_names[:13] == [f"I{i}" for i in range(1, 14)]
    assert schema.min_count == 2
    assert table.schema.field("label").type == pa.int8()
    assert table.schema.field("C1").type == pa.int64()
    assert table.schema.field("I1_log").type == pa.float32()
    for f in schema.sparse_features:
        ids = table.column(f.name).to_numpy()
        assert ids.min() >= 0 and ids.max() < f.cardinality


def test_criteo_log_bucket_matches_math_log():
    values = np.concatenate([np.arange(-3, 20000), np.unique(np.logspace(0, 18.5, 5000).astype(np.int64))])
    expected = [int(math.log(v) ** 2) if v > 2 else v for v in values.tolist()]
    assert criteo_log_bucket(values).tolist() == expected


MALFORMED_COUNTS = {"wrong_field_count": 3, "bad_label": 2, "bad_integer": 2, "bad_encoding": 1}


def write_malformed_criteo(path: Path, *, gz: bool = False) -> Path:
    """11 lines: 3 good, and every row-level problem (see MALFORMED_COUNTS) at known lines."""
    good = criteo_line()
    lines = [
        good,  # 1
        criteo_line(ints=["-1"] * 13),  # 2: -1 is valid
        "\t".join(good.split("\t")[:39]),  # 3: 39 fields
        "",  # 4: empty line → 1 field
        criteo_line(label="2"),  # 5: bad label
        criteo_line(ints=["12", "abc"] + ["1"] * 11),  # 6: bad integer (I2)
        criteo_line(ints=["1.5"] + ["1"] * 12),  # 7: bad integer (I1)
        criteo_line(label=""),  # 8: bad label
        good + "\tEXTRA",  # 9: 41 fields
        criteo_line(cats=["caf_E9"] * 26),  # 10: a raw latin-1 byte, not UTF-8
        good,  # 11
    ]
    data = ("\n".join(lines) + "\n").encode().replace(b"caf_E9", b"caf\xe9")
    return write(path, data, gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_criteo_malformed_rows_are_counted_per_reason(tmp_path, gz):
    raw = write_malformed_criteo(tmp_path / "day_0", gz=gz)
    report = prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(min_count=1))
    assert report["rows_rejected"] == MALFORMED_COUNTS
    assert report["rows_read"] == 11
    assert report["rows_kept"] == 3
    assert report["rows_rejected_total"] == 8
    assert_rows_add_up(report)
    assert sum(report["rows_per_split"].values()) == 3
    examples = report["rejected_examples"]
    assert examples["wrong_field_count"].startswith(f"{raw}:3: ")
    assert examples["bad_label"].startswith(f"{raw}:5: ")
    assert examples["bad_integer"] == f"{raw}:6: field I2 = 'abc' is not an integer"
    assert examples["bad_encoding"].startswith(f"{raw}:10: ")
    assert report_of(tmp_path / "out") == report


@pytest.mark.parametrize("gz", [False, True])
def test_overlong_lines_nul_bytes_and_long_values_are_counted(tmp_path, gz):
    """A 3 MiB line (past MAX_LINE_BYTES and the block: skipped unread), a 1.5 MiB one (inside a
    block), a NUL byte and a 2,000-character value are rejected with their reasons; line numbers
    after them stay exact. (A 40 MB line used to crash both modes with ArrowInvalid.)"""
    from pep_torchrec.data.raw.readers import MAX_LINE_BYTES

    lines = [criteo_line() for _ in range(20)]
    lines[3] = criteo_line(cats=["x" * (3 << 20)] + ["a"] * 25)
    lines[7] = criteo_line(cats=["y" * (MAX_LINE_BYTES + (1 << 19))] + ["a"] * 25)
    lines[9] = criteo_line(cats=["a\0b"] + ["a"] * 25)
    lines[12] = criteo_line(cats=["z" * 2000] + ["a"] * 25)
    lines[15] = criteo_line(label="x")
    raw = write(tmp_path / "day_0", "\n".join(lines) + "\n", gz=gz)
    report = prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(min_count=1, block_size=2 << 20))
    assert report["rows_rejected"] == {"line_too_long": 2, "nul_byte": 1, "value_too_long": 1, "bad_label": 1}
    assert report["rows_read"] == 20 and report["rows_kept"] == 15
    assert_rows_add_up(report)
    examples = report["rejected_examples"]
    assert examples["line_too_long"].startswith(f"{raw}:4: ")
    assert examples["nul_byte"].startswith(f"{raw}:10: ")
    assert examples["value_too_long"].startswith(f"{raw}:13: ")
    assert examples["bad_label"].startswith(f"{raw}:16: ")
    with pytest.raises(MalformedRowError) as info:
        prepare_dataset("criteo", raw, tmp_path / "strict", PrepareOptions(strict=True, block_size=2 << 20))
    assert (info.value.line, info.value.reason) == (4, "line_too_long")


def test_line_numbers_stay_exact_across_small_blocks(tmp_path):
    lines = [criteo_line() for _ in range(500)]
    lines[137] = criteo_line(label="x")
    lines[401] = "\t".join(lines[401].split("\t")[:10])
    raw = write(tmp_path / "train.txt.gz", "\r\n".join(lines) + "\r\n", gz=True)  # CRLF is fine
    report = prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(min_count=1, block_size=1024))
    assert report["rows_kept"] == 498
    assert report["rejected_examples"]["bad_label"].startswith(f"{raw}:138: ")
    assert report["rejected_examples"]["wrong_field_count"] == f"{raw}:402: expected 40 fields, found 10"
    with pytest.raises(MalformedRowError) as info:
        prepare_dataset("criteo", raw, tmp_path / "strict", PrepareOptions(strict=True, block_size=1024))
    assert (info.value.line, info.value.reason) == (138, "bad_label")


def test_strict_stops_at_first_malformed_row_and_leaves_nothing(tmp_path, capsys):
    raw = write_malformed_criteo(tmp_path / "train.txt")
    out = tmp_path / "out"
    code = main(["--dataset", "criteo", "--raw", str(raw), "--out", str(out), "--strict"])
    assert code != 0
    err = capsys.readouterr().err
    # Line 3 (field count) comes before line 5 (label) and 6 (integer), all in the same block.
    assert f"{raw}:3: wrong_field_count: expected 40 fields, found 39" in err
    assert leftovers(tmp_path, "out") == []


def test_strict_reports_the_earliest_reason_within_a_block(tmp_path):
    lines = [criteo_line() for _ in range(6)]
    lines[1] = criteo_line(ints=["x"] * 13)  # line 2: bad integer
    lines[4] = "short"  # line 5: field count
    raw = write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    with pytest.raises(
        MalformedRowError, match=r"train\.txt:2: bad_integer: field I1 = 'x' is not an integer"
    ):
        prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(strict=True))
    assert leftovers(tmp_path, "out") == []


def test_truncated_gzip_keeps_rows_before_the_break(tmp_path):
    data = criteo_text(4000).encode()
    packed = gzip.compress(data, mtime=0)
    cut = packed[: len(packed) * 3 // 5]
    raw = write(tmp_path / "day_0.gz", cut)
    decoder = zlib.decompressobj(wbits=31)
    readable_lines = decoder.decompress(cut).count(b"\n")
    assert 0 < readable_lines < 4000
    report = prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(min_count=1))
    assert report["rows_rejected"] == {"broken_gzip": 1}
    assert report["rows_kept"] == report["rows_read"] == readable_lines
    assert "DATA LOST: 1 gzip stream(s) break" in format_summary(report)
    with pytest.raises(MalformedRowError, match="broken_gzip: truncated gzip"):
        prepare_dataset("criteo", raw, tmp_path / "strict", PrepareOptions(min_count=1, strict=True))
    assert_rows_add_up(report)
    assert report["rejected_examples"]["broken_gzip"].startswith(
        f"{raw}:{readable_lines + 1}: truncated gzip"
    )
    # sha256 covers the whole stored file even though reading stopped early
    import hashlib

    assert report["files"][0]["sha256"] == hashlib.sha256(cut).hexdigest()
    with pytest.raises(MalformedRowError, match=rf"day_0\.gz:{readable_lines + 1}: broken_gzip"):
        prepare_dataset("criteo", raw, tmp_path / "strict", PrepareOptions(strict=True))
    assert leftovers(tmp_path, "strict") == []


def test_corrupt_gzip_is_counted_and_multi_member_gzip_is_read(tmp_path):
    data = criteo_text(3000).encode()
    packed = bytearray(gzip.compress(data, mtime=0))
    for i in range(len(packed) // 2, len(packed) // 2 + 64):
        packed[i] ^= 0x5A
    raw = write(tmp_path / "day_0.gz", bytes(packed))
    report = prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(min_count=1))
    assert report["rows_rejected"]["broken_gzip"] == 1
    assert report["rows_kept"] < 3000
    # --strict names the break, not the garbage lines zlib put out before it noticed (it named
    # `wrong_field_count ... found 14` at one of those).
    with pytest.raises(MalformedRowError, match="broken_gzip: corrupt gzip stream"):
        prepare_dataset("criteo", raw, tmp_path / "strict", PrepareOptions(min_count=1, strict=True))
    # two concatenated gzip members (as `cat a.gz b.gz` makes) are one stream of lines
    half = data.index(b"\n", len(data) // 2) + 1
    members = gzip.compress(data[:half], mtime=0) + gzip.compress(data[half:], mtime=0)
    raw2 = write(tmp_path / "multi" / "day_0.gz", members)
    report2 = prepare_dataset("criteo", raw2, tmp_path / "out2", PrepareOptions(min_count=1))
    assert report2["rows_kept"] == 3000 and report2["rows_rejected"] == {}


def test_empty_files_are_counted_and_all_empty_input_fails(tmp_path):
    days = tmp_path / "days"
    write(days / "day_0", "")
    write(days / "day_1.gz", "", gz=True)
    write(days / "day_2", criteo_text(50))
    write(days / "notes.md", "not an input")
    report = prepare_dataset("criteo", days, tmp_path / "out", PrepareOptions(min_count=1))
    assert report["rows_rejected"] == {"empty_file": 2}
    assert report["rows_kept"] == 50
    assert [Path(f["path"]).name for f in report["files"]] == ["day_0", "day_1.gz", "day_2"]
    only_empty = tmp_path / "empty"
    write(only_empty / "day_0", "")
    with pytest.raises(PrepareError, match="no valid row"):
        prepare_dataset("criteo", only_empty, tmp_path / "out2")
    assert leftovers(tmp_path, "out2") == []
    with pytest.raises(MalformedRowError, match=r"day_0:1: empty_file"):
        prepare_dataset("criteo", days, tmp_path / "out3", PrepareOptions(strict=True))


def test_day_files_are_read_in_day_order(tmp_path):
    days = tmp_path / "days"
    for d in (10, 2, 1):
        write(days / f"day_{d}", criteo_line(ints=[str(d)] * 13) + "\n")
    report = prepare_dataset("criteo", days, tmp_path / "out", PrepareOptions(min_count=1, split="temporal"))
    assert [Path(f["path"]).name for f in report["files"]] == ["day_1", "day_2", "day_10"]


def test_random_split_is_deterministic_proportional_and_block_independent(tmp_path):
    raw = write(tmp_path / "train.txt", criteo_text(10000, seed=1))
    a = prepare_dataset("criteo", raw, tmp_path / "a", PrepareOptions(seed=7))
    prepare_dataset(
        "criteo", raw, tmp_path / "b", PrepareOptions(seed=7, block_size=128 << 10, row_group_size=1000)
    )
    prepare_dataset("criteo", raw, tmp_path / "c", PrepareOptions(seed=8))
    ta, tb, tc = read_all(tmp_path / "a"), read_all(tmp_path / "b"), read_all(tmp_path / "c")
    for s in SPLITS:
        assert ta[s].equals(tb[s])
    assert not ta["test"].equals(tc["test"])
    rows = a["rows_per_split"]
    assert abs(rows["train"] / 10000 - 0.8) < 0.02
    assert abs(rows["valid"] / 10000 - 0.1) < 0.015
    assert abs(rows["test"] / 10000 - 0.1) < 0.015
    # fixed-size row groups whatever the block size
    meta = pq.ParquetFile(tmp_path / "b" / "train" / "part-00000.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert set(sizes[:-1]) == {1000} and sizes[-1] <= 1000
    custom = prepare_dataset("criteo", raw, tmp_path / "d", PrepareOptions(split_fractions="0.5,0.25,0.25"))
    assert abs(custom["rows_per_split"]["valid"] / 10000 - 0.25) < 0.02


def test_rows_per_file_rolls_files(tmp_path):
    raw = write(tmp_path / "train.txt", criteo_text(2000))
    prepare_dataset(
        "criteo",
        raw,
        tmp_path / "out",
        PrepareOptions(split_fractions="1,0,0", row_group_size=300, rows_per_file=600),
    )
    schema = Schema.load(tmp_path / "out")
    assert schema.splits["train"].files == [f"train/part-{i:05d}.parquet" for i in range(4)]
    assert [pq.ParquetFile(tmp_path / "out" / f).metadata.num_rows for f in schema.splits["train"].files] == [
        600,
        600,
        600,
        200,
    ]
    # empty splits still have one file carrying the column schema
    assert schema.splits["valid"].rows == 0
    assert pq.read_table(tmp_path / "out" / schema.splits["valid"].files[0]).schema.names[0] == "label"


def test_temporal_split_keeps_file_order(tmp_path):
    raw = write(tmp_path / "train.txt", criteo_text(1000, row_index_in_i1=True))
    report = prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(split="temporal"))
    assert report["rows_per_split"] == {"train": 800, "valid": 100, "test": 100}
    order = {
        s: np.rint(np.expm1(read_split(tmp_path / "out", s).column("I1_log").to_numpy())) for s in SPLITS
    }
    assert order["train"].tolist() == list(range(800))
    assert order["valid"].tolist() == list(range(800, 900))
    assert order["test"].tolist() == list(range(900, 1000))
    assert Schema.load(tmp_path / "out").split_method == "temporal"


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    raw = write(tmp_path / "train.txt", criteo_text(500))
    calls = {"n": 0}
    original = splits.SplitWriter.write

    def failing_write(self, table):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk full (simulated)")
        original(self, table)

    monkeypatch.setattr(splits.SplitWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        prepare_dataset("criteo", raw, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    raw = write(tmp_path / "train.txt", criteo_text(200))
    out = tmp_path / "out"
    prepare_dataset("criteo", raw, out, PrepareOptions(seed=1))
    args = ["--dataset", "criteo", "--raw", str(raw), "--out", str(out), "--seed", "2"]
    assert main(args) == 2  # a user error (pep_torchrec/utils/errors.py)
    assert "already exists" in capsys.readouterr().err
    assert Schema.load(out).seed == 1
    assert main([*args, "--overwrite"]) == 0
    assert "prepared criteo" in capsys.readouterr().out
    assert Schema.load(out).seed == 2
    assert leftovers(tmp_path, "out") == ["out"]
    precious = tmp_path / "precious"
    write(precious / "thesis.tex", "do not delete")
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare_dataset("criteo", raw, precious, PrepareOptions(overwrite=True))
    assert (precious / "thesis.tex").exists()


def test_schema_round_trip_and_report(tmp_path):
    raw = write(tmp_path / "train.txt.gz", criteo_text(300), gz=True)
    out = tmp_path / "out"
    report = prepare_dataset("criteo", raw, out, PrepareOptions(min_count=2, seed=3))
    schema = Schema.load(out)
    assert Schema.from_json(json.loads((out / "schema.json").read_text())) == schema
    assert schema.dataset == "criteo" and schema.seed == 3 and schema.min_count == 2
    assert len(schema.sparse_features) == 39
    assert sum(schema.splits[s].rows for s in SPLITS) == 300
    for s in SPLITS:
        for f in schema.splits[s].files:
            assert (out / f).is_file()
    source = schema.source["files"][0]
    assert source["path"] == str(raw.resolve()) and len(source["sha256"]) == 64
    assert "compressed" in schema.source["sha256_of"]
    for key in ("rows_read", "rows_kept", "rows_rejected", "rows_per_split", "duration_s", "cardinalities"):
        assert key in report
    assert report["cardinalities"] == dict(zip(schema.feature_names, schema.cardinalities))
    vocab = pq.read_table(out / "vocab.parquet")
    assert vocab.column_names[:3] == ["feature", "value", "id"]
    assert vocab.schema.field("id").type == pa.int64()


def test_bad_options_are_clear_errors(tmp_path):
    raw = write(tmp_path / "train.txt", criteo_text(10))
    with pytest.raises(PrepareError, match="split fractions"):
        prepare_dataset("criteo", raw, tmp_path / "o", PrepareOptions(split_fractions="0.8,0.3,0.1"))
    with pytest.raises(PrepareError, match="--raw is required"):
        prepare_dataset("criteo", None, tmp_path / "o")
    with pytest.raises(PrepareError, match="no such file"):
        prepare_dataset("criteo", tmp_path / "missing.txt", tmp_path / "o")
    with pytest.raises(PrepareError, match="synthetic dataset only"):
        prepare_dataset("criteo", raw, tmp_path / "o", PrepareOptions(synthetic=SyntheticConfig(rows=5)))
    # A negative seed was a numpy traceback from inside the hash (synthetic) or the split.
    with pytest.raises(PrepareError, match="^--seed must be >= 0, got -1$"):
        prepare_dataset("criteo", raw, tmp_path / "o", PrepareOptions(seed=-1))
    with pytest.raises(PrepareError, match="^--seed must be >= 0, got -2$"):
        prepare_dataset("synthetic", None, tmp_path / "o", PrepareOptions(seed=-2))
    assert leftovers(tmp_path, "o") == []


# ---------------------------------------------------------------------------------------------------
# Avazu


@pytest.mark.parametrize("gz", [False, True])
def test_avazu_hour_features_label_and_rejects(tmp_path, gz):
    lines = [
        AVAZU_HEADER,
        avazu_line(1, "1", "14102100"),  # Tuesday 2014-10-21, 00h
        avazu_line(2, "0", "14102623", site="s2"),  # Sunday, 23h
        avazu_line(3, "2"),  # line 4: bad click
        avazu_line(4, "0", "14023112"),  # line 5: 31 February
        avazu_line(5, "0", "1410210"),  # line 6: 7 digits
        avazu_line(6, "0", "14102124"),  # line 7: hour 24
        avazu_line(7, "1", "14102712"),  # Monday, 12h
        "1,0,14102100",  # line 9: field count
    ]
    raw = write(tmp_path / ("train.gz" if gz else "train.csv"), "\n".join(lines) + "\n", gz=gz)
    out = tmp_path / "out"
    report = prepare_dataset("avazu", raw, out, PrepareOptions(min_count=1, split_fractions="1,0,0"))
    assert report["rows_rejected"] == {"bad_label": 1, "bad_hour": 3, "wrong_field_count": 1}
    assert report["rejected_examples"]["bad_hour"] == f"{raw}:5: hour '14023112' is not a valid YYMMDDHH"
    assert report["rows_read"] == 8 and report["rows_kept"] == 3
    assert_rows_add_up(report)
    schema = Schema.load(out)
    assert "id" not in schema.feature_names and "click" not in schema.feature_names
    assert schema.feature_names[:3] == ["hour_of_day", "weekday", "C1"]
    assert len(schema.feature_names) == 23 and schema.dense_features == []
    vocab = load_vocab(out)
    table = read_split(out, "train")
    inverse = {name: dict(enumerate(["<oov>", *v.values.to_pylist()])) for name, v in vocab.items()}
    assert [inverse["weekday"][i] for i in table.column("weekday").to_pylist()] == ["1", "6", "0"]
    assert [inverse["hour_of_day"][i] for i in table.column("hour_of_day").to_pylist()] == ["00", "23", "12"]
    assert [inverse["site_id"][i] for i in table.column("site_id").to_pylist()] == ["s1", "s2", "s1"]
    assert table.column("label").to_pylist() == [1, 0, 1]


def test_avazu_header_is_checked(tmp_path):
    raw = write(tmp_path / "test.csv", "id,hour,C1\n1,14102100,5\n")
    with pytest.raises(PrepareError, match="no 'click' column"):
        prepare_dataset("avazu", raw, tmp_path / "out")
    parts = tmp_path / "parts"
    write(parts / "a.csv", AVAZU_HEADER + "\n" + avazu_line(1) + "\n")
    write(parts / "b.csv", AVAZU_HEADER.replace("C21", "C22") + "\n" + avazu_line(2) + "\n")
    with pytest.raises(PrepareError, match=r"b\.csv:1: header"):
        prepare_dataset("avazu", parts, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_avazu_empty_and_header_only_files_are_counted(tmp_path):
    parts = tmp_path / "parts"
    write(parts / "part_0.csv", "")
    write(parts / "part_1.csv.gz", AVAZU_HEADER + "\n", gz=True)
    write(parts / "part_2.csv", AVAZU_HEADER + "\n" + avazu_line(1) + "\n" + avazu_line(2) + "\n")
    report = prepare_dataset("avazu", parts, tmp_path / "out", PrepareOptions(min_count=1))
    assert report["rows_rejected"] == {"empty_file": 2}
    assert report["rows_kept"] == 2
    assert_rows_add_up(report)


def test_avazu_default_min_count_is_10(tmp_path):
    lines = [AVAZU_HEADER] + [avazu_line(i, site="common" if i < 12 else f"rare{i}") for i in range(20)]
    raw = write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    report = prepare_dataset("avazu", raw, tmp_path / "out", PrepareOptions(split_fractions="1,0,0"))
    assert report["min_count"] == 10
    assert report["cardinalities"]["site_id"] == 2  # OOV + "common"
    ids = read_split(tmp_path / "out", "train").column("site_id").to_pylist()
    assert ids == [1] * 12 + [0] * 8


# ---------------------------------------------------------------------------------------------------
# MovieLens


def flags(*genres: int) -> str:
    return "|".join("1" if g in genres else "0" for g in range(19))


def write_ml100k(directory: Path, ratings: list[str], *, gz: bool = False) -> Path:
    users = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|T8H1N"]
    items = [
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags(3, 4, 5)}",
        f"2|GoldenEye (1995)|01-Jan-1995||http://x|{flags(1, 2, 16)}",
        f"3|Caf\u00e9 (1995)|01-Jan-1995||http://x|{flags()}",
    ]
    write(directory / ("u.data.gz" if gz else "u.data"), "\n".join(ratings) + "\n", gz=gz)
    write(directory / "u.user", "\n".join(users) + "\n")
    write(directory / "u.item.gz", ("\n".join(items) + "\n").encode("latin-1"), gz=True)
    return directory


@pytest.mark.parametrize("gz", [False, True])
def test_movielens_100k_labels_side_features_and_multi_hot_genres(tmp_path, gz):
    ratings = [
        "1\t1\t5\t100",  # positive
        "2\t2\t1\t200",  # negative
        "1\t2\t3\t300",  # rating 3: filtered
        "3\t3\t4\t400",  # positive, item without genre
        "1\t3\t6\t500",  # line 5: rating out of range
        "1\t3\t4.5\t600",  # line 6: non-integer rating
        "9\t1\t5\t700",  # line 7: unknown user
        "2\t99\t2\t800",  # line 8: unknown item
        "x\t1\t5\t900",  # line 9: bad id
        "2\t1\t2\tnow",  # line 10: bad timestamp
        "3\t1\t2\t1000",  # negative
    ]
    raw = write_ml100k(tmp_path / "ml-100k", ratings, gz=gz)
    out = tmp_path / "out"
    report = prepare_dataset("movielens", raw, out, PrepareOptions(split_fractions="1,0,0"))
    assert report["min_count"] == 1
    assert report["rows_rejected"] == {
        "bad_label": 2,
        "unknown_user": 1,
        "unknown_item": 1,
        "bad_id": 1,
        "bad_timestamp": 1,
    }
    assert report["rows_filtered"] == {"neutral_rating": 1}
    assert report["rows_read"] == 11 and report["rows_kept"] == 4
    assert_rows_add_up(report)
    assert report["rejected_examples"]["bad_label"].endswith(":5: rating '6' is not an integer in 1..5")
    schema = Schema.load(out)
    assert schema.feature_names == ["user_id", "item_id", "age", "gender", "occupation", "zip", "genres"]
    assert schema.feature("genres").multi_hot and not schema.feature("user_id").multi_hot
    assert schema.dense_features == []
    assert schema.extra["variant"] == "ml-100k"
    table = read_split(out, "train")
    assert table.schema.field("genres").type == pa.list_(pa.int64())
    vocab = load_vocab(out)
    names = ["<oov>", *vocab["genres"].values.to_pylist()]
    genres = [[names[i] for i in bag] for bag in table.column("genres").to_pylist()]
    assert genres == [
        ["Animation", "Children's", "Comedy"],
        ["Action", "Adventure", "Thriller"],
        [],
        ["Animation", "Children's", "Comedy"],
    ]
    assert table.column("label").to_pylist() == [1, 0, 1, 0]
    zips = ["<oov>", *vocab["zip"].values.to_pylist()]
    assert [zips[i] for i in table.column("zip").to_pylist()] == ["85711", "94043", "T8H1N", "T8H1N"]
    users = ["<oov>", *vocab["user_id"].values.to_pylist()]
    assert [users[i] for i in table.column("user_id").to_pylist()] == ["1", "2", "3", "3"]
    roles = [f["role"] for f in schema.source["files"]]
    assert roles == ["ratings", "users", "items"]


def test_movielens_strict_and_split_proportions(tmp_path):
    ratings = [f"{1 + i % 3}\t{1 + i % 2}\t{[1, 2, 4, 5][i % 4]}\t{10_000 + i}" for i in range(1000)]
    raw = write_ml100k(tmp_path / "ml", ratings)
    report = prepare_dataset("movielens", raw, tmp_path / "out", PrepareOptions(split="temporal"))
    assert report["rows_per_split"] == {"train": 800, "valid": 100, "test": 100}
    bad = [*ratings[:10], "1\t1\t0\t5", *ratings[10:]]
    raw2 = write_ml100k(tmp_path / "ml2", bad)
    with pytest.raises(MalformedRowError, match=r"u\.data:11: bad_label: rating '0'"):
        prepare_dataset("movielens", raw2, tmp_path / "out2", PrepareOptions(strict=True))
    assert leftovers(tmp_path, "out2") == []


def test_movielens_temporal_split_orders_by_timestamp(tmp_path):
    # One user per rating so user_id reveals the row; timestamps reversed w.r.t. file order.
    n = 50
    users = [f"{u}|30|M|other|00000" for u in range(1, n + 1)]
    items = [f"1|Film|01-Jan-1995||http://x|{flags(1)}"]
    ml = tmp_path / "ml"
    write(ml / "u.user", "\n".join(users) + "\n")
    write(ml / "u.item", "\n".join(items) + "\n")
    write(ml / "u.data", "\n".join(f"{u}\t1\t5\t{1000 - u}" for u in range(1, n + 1)) + "\n")
    prepare_dataset("movielens", ml, tmp_path / "out", PrepareOptions(split="temporal"))
    vocab = ["<oov>", *load_vocab(tmp_path / "out")["user_id"].values.to_pylist()]
    got = {
        s: [int(vocab[i]) for i in read_split(tmp_path / "out", s).column("user_id").to_pylist()]
        for s in SPLITS
    }
    # latest timestamps (smallest user ids) are the test split
    assert sorted(got["test"]) == list(range(1, 6))
    assert sorted(got["valid"]) == list(range(6, 11))
    assert sorted(got["train"]) == list(range(11, n + 1))


def test_movielens_bad_side_table_lines_are_counted(tmp_path):
    ml = write_ml100k(tmp_path / "ml", ["1\t1\t5\t1", "2\t1\t5\t2", "3\t2\t1\t3"])
    write(ml / "u.user", "1|24|M|technician|85711\n2|53|F\nx|1|M|a|b\n3|23|M|writer|T8H1N\n4|abc|F|a|b\n")
    report = prepare_dataset("movielens", ml, tmp_path / "out")
    assert report["rows_rejected"] == {"bad_user_row": 3, "unknown_user": 1}  # age 'abc' is no category
    assert report["rejected_examples"]["bad_user_row"] == f"{ml / 'u.user'}:2: expected 5 fields, found 3"
    assert report["rows_kept"] == 2
    assert_rows_add_up(report)
    with pytest.raises(MalformedRowError, match=r"u\.user:2: bad_user_row"):
        prepare_dataset("movielens", ml, tmp_path / "strict", PrepareOptions(strict=True))


def test_movielens_1m_format(tmp_path):
    ml = tmp_path / "ml-1m"
    write(ml / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Am\u00e9lie (2001)::Comedy|Romance\n3::Nothing::\n"
    write(ml / "movies.dat.gz", movies.encode("latin-1"), gz=True)
    write(
        ml / "ratings.dat", "1::1::5::978300760\n2::2::1::978302109\n1::2::3::978301968\n2::3::4::1\n1::1\n"
    )
    out = tmp_path / "out"
    report = prepare_dataset("movielens", ml, out, PrepareOptions(split_fractions="1,0,0"))
    assert report["rows_kept"] == 3
    assert report["rows_filtered"] == {"neutral_rating": 1}
    assert report["rows_rejected"] == {"wrong_field_count": 1}
    schema = Schema.load(out)
    assert schema.extra["variant"] == "ml-1m"
    assert schema.extra["genres"] == ["Animation", "Children's", "Comedy", "Romance"]
    vocab = load_vocab(out)
    table = read_split(out, "train")
    names = ["<oov>", *vocab["genres"].values.to_pylist()]
    genres = [[names[i] for i in bag] for bag in table.column("genres").to_pylist()]
    assert genres == [["Animation", "Children's", "Comedy"], ["Comedy", "Romance"], []]
    ages = ["<oov>", *vocab["age"].values.to_pylist()]
    assert [ages[i] for i in table.column("age").to_pylist()] == ["1", "56", "56"]
    zips = ["<oov>", *vocab["zip"].values.to_pylist()]
    assert [zips[i] for i in table.column("zip").to_pylist()] == ["48067", "70072-1234", "70072-1234"]


def test_movielens_variant_detection_errors(tmp_path):
    with pytest.raises(PrepareError, match="neither"):
        prepare_dataset("movielens", tmp_path, tmp_path / "out")
    write(tmp_path / "ml" / "u.data", "1\t1\t5\t1\n")
    write(tmp_path / "ml" / "u.data.gz", "1\t1\t5\t1\n", gz=True)
    with pytest.raises(PrepareError, match="both u.data and u.data.gz"):
        prepare_dataset("movielens", tmp_path / "ml", tmp_path / "out")
    with pytest.raises(PrepareError, match="not a directory"):
        prepare_dataset("movielens", tmp_path / "ml" / "u.data", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------
# real shared data (never copied into the repo)


def shared_data() -> Path:
    override = os.environ.get("PEP_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "data"


def test_real_movielens_100k(tmp_path):
    ml = shared_data() / "ml-100k"
    if not (ml / "u.data.gz").is_file():
        pytest.skip("../shared/data/ml-100k absent (set PEP_SHARED_DATA)")
    report = prepare_dataset("movielens", ml, tmp_path / "out")
    assert report["rows_read"] == 100_000
    assert report["rows_filtered"] == {"neutral_rating": 27_145}
    assert report["rows_kept"] == 72_855
    assert report["rows_rejected"] == {}
    assert report["cardinalities"]["user_id"] == 943 + 1
    # 40 of the 1,682 movies have only rating-3 ratings, so they are not in the data after filtering.
    assert report["cardinalities"]["item_id"] == 1642 + 1
    assert report["cardinalities"]["genres"] == 19 + 1
    assert sum(report["rows_per_split"].values()) == 72_855


def test_real_criteo_10k(tmp_path):
    raw = shared_data() / "criteo_kaggle_head10k" / "train_10k.txt.gz"
    if not raw.is_file():
        pytest.skip("../shared/data/criteo_kaggle_head10k absent (set PEP_SHARED_DATA)")
    report = prepare_dataset("criteo", raw, tmp_path / "out")
    assert report["rows_read"] == report["rows_kept"] == 10_000
    assert report["rows_rejected"] == {}
    tables = read_all(tmp_path / "out")
    labels = np.concatenate([tables[s].column("label").to_numpy() for s in SPLITS])
    assert labels.mean() == pytest.approx(0.2182)
    assert report["duration_s"] < 10


def test_progress_is_logged_per_interval(tmp_path, monkeypatch, caplog):
    """Not a terminal (logs, CI): one INFO line per interval with rows, rows/s and files."""
    import logging

    monkeypatch.setattr(progress.Progress, "__init__", _fast_progress(progress.Progress.__init__))
    raw = write(tmp_path / "day_0", criteo_text(3000))
    with caplog.at_level(logging.INFO, logger="pep_torchrec.data.prepare"):
        prepare_dataset("criteo", raw, tmp_path / "out", PrepareOptions(min_count=1, block_size=4096))
    lines = [r.getMessage() for r in caplog.records if "rows/s" in r.getMessage()]
    assert any(m.startswith("pass 1/2 (count): ") and "file 1 of 1" in m for m in lines), lines
    assert any(m.startswith("pass 2/2 (write): ") and "% of 3,000" in m for m in lines), lines
    # Stored bytes read of the total, per pass: rising within a pass, never beyond the file.
    size = (tmp_path / "day_0").stat().st_size / 2**20
    read = [float(m.split(", ")[-1].split(" of ")[0]) for m in lines if "MiB read" in m]
    assert read and all(f"of {size:,.1f} MiB read" in m for m in lines if "MiB read" in m), lines
    assert max(read) <= size + 0.05 and read[0] < max(read), read


def _fast_progress(init):
    def fast(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.interval = 0.0  # every block, for the test

    return fast
