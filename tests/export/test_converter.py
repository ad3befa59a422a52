"""Converter (`pep_torchrec.export`): round trip per granularity and dtype, exactness against the
trained model, refusal of corrupted / partial artifacts.

The run directories are fabricated without training (random weights and thresholds saved as the
trainer saves them: DCP of {"model": TrainModel.state_dict()}, trainer_state.json, summary.json, a
mask directory), which exercises the same files a real run has in a second per case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pep_torchrec.config import GRANULARITIES
from pep_torchrec.data.loader import ParquetBatchLoader
from pep_torchrec.export.compact import CompactEmbeddingBag
from pep_torchrec.export.converter import ArtifactConverter
from pep_torchrec.export.format import ArtifactError, compress_table, decode_table, encode_table
from pep_torchrec.export.serving_model import load_artifact
from pep_torchrec.ops import margins
from pep_torchrec.pep.masks import select_mask, write_arrays
from pep_torchrec.training.metrics import roc_auc
from tests.helpers.export import make_run, reference_scores


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_round_trip_and_exactness_per_granularity(tmp_path, synthetic_data, granularity):
    run = make_run(tmp_path, synthetic_data, stage="search", granularity=granularity)
    converter = ArtifactConverter(run, budget=0.3)
    tables, _, _ = converter.pruned_tables()
    manifest = converter.convert(tmp_path / "art")
    artifact = load_artifact(tmp_path / "art")
    for spec in manifest["tables"]:
        bag = artifact.model.ebc.embedding_bags[spec["name"]]
        assert bag.kept_params == spec["kept_params"] == int((tables[spec["name"]] != 0).sum())
    # Lossless: decoding the stored table gives v̂ · mask bit for bit.
    from pep_torchrec.export.format import load_tensors

    emb = load_tensors((tmp_path / "art" / "embeddings.safetensors").read_bytes(), "emb")
    for spec in manifest["tables"]:
        decoded = decode_table(spec["name"], emb, spec, "fp32", "test").to_dense()
        assert torch.equal(decoded, tables[spec["name"]])
    ref, got, _ = reference_scores(converter, artifact)
    assert (ref - got).abs().max().item() <= 1e-6


def test_search_export_of_an_aligned_mask_keeps_each_rows_best_elements(tmp_path, synthetic_data):
    """An aligned mask moves a row's kept elements to shared columns (for retraining); exporting the
    search snapshot keeps the same count per row at the row's largest margins, i.e. exactly what the
    element-wise mask of the same selection keeps."""
    run = make_run(tmp_path, synthetic_data, stage="search", granularity="feature_dim")
    model, _ = ArtifactConverter(run, budget=0.3).load_model()
    ebc, dim = model.model.ebc, 8
    scores = {
        name: [(0, 0, margins(bag.weight.detach(), dim=dim, mode=ebc.mode, gk=ebc.gk))]
        for name, bag in ebc._embedding_bag_collection.embedding_bags.items()
    }
    order = list(scores)
    k = sum(s.numel() for ((_, _, s),) in scores.values()) // 5
    shapes = {t: tuple(s.shape) for t, ((_, _, s),) in scores.items()}
    tables = {}
    for layout in ("elementwise", "aligned"):
        keep = select_mask(scores, k, order, dim=dim, min_row=1, layout=layout)
        mask_dir = tmp_path / layout
        write_arrays(
            mask_dir,
            shapes,
            np.bool_,
            keep,
            {
                "kind": "mask",
                "layout": layout,
                "kept": k,
                "step": 10,
                "dim": dim,
                "tables": {t: {"rows": s[0]} for t, s in shapes.items()},
            },
            rank=0,
        )
        tables[layout], _, _ = ArtifactConverter(run, mask=mask_dir).pruned_tables()
    for name in order:
        assert torch.equal(tables["aligned"][name], tables["elementwise"][name]), name
    aligned_rows = sum(int((np.load(tmp_path / "aligned" / f"{t}.npy").sum(1) > 0).sum()) for t in order)
    assert aligned_rows == sum(int((t != 0).any(1).sum()) for t in tables["aligned"].values())


@pytest.mark.parametrize("stage,model", [("retrain", "fm"), ("baseline", "dlrm")])
def test_retrain_and_baseline_exactness(tmp_path, synthetic_data, stage, model):
    run = make_run(tmp_path, synthetic_data, stage=stage, model=model)
    converter = ArtifactConverter(run)
    manifest = converter.convert(tmp_path / "art")
    artifact = load_artifact(tmp_path / "art")
    ref, got, _ = reference_scores(converter, artifact)
    assert (ref - got).abs().max().item() <= 1e-6
    if stage == "retrain":  # v · m: exactly the mask's elements (random v is never 0)
        masks = sum(int(np.load(p).sum()) for p in (run / "masks" / "budget_0.3").glob("*.npy"))
        assert manifest["kept_params"] == masks


def test_dtypes_auc_and_sizes(tmp_path, ml100k_data):
    run = make_run(tmp_path, ml100k_data, stage="search", model="fm", dim=16, keep=0.05)
    converter = ArtifactConverter(run, budget=0.3)
    aucs, sizes = {}, {}
    for dtype in ("fp32", "fp16", "int8"):
        manifest = converter.convert(tmp_path / dtype, dtype=dtype)
        _, got, labels = reference_scores(converter, load_artifact(tmp_path / dtype))
        aucs[dtype] = roc_auc(labels, got.numpy())
        sizes[dtype] = manifest["total_bytes"] / manifest["dense_fp32_bytes"]
    assert abs(aucs["fp16"] - aucs["fp32"]) <= 1e-3 and abs(aucs["int8"] - aucs["fp32"]) <= 1e-3
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"] < 0.08


@pytest.mark.parametrize("dim", [64, 300])  # 300: int16 columns
def test_prefix_columns_store_aligned_rows_without_column_indices(dim):
    """Rows that keep a prefix of one column order (aligned masks) store lengths + the order only."""
    gen = torch.Generator().manual_seed(dim)
    order = torch.randperm(dim, generator=gen)
    lengths = torch.randint(0, 4, (500,), generator=gen)
    keep = torch.zeros(500, dim, dtype=torch.bool)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(dim)
    keep[:] = rank.unsqueeze(0) < lengths.unsqueeze(1)
    table = torch.randn(500, dim, generator=gen) * keep
    compact = compress_table(table, "fp32")
    tensors, encoding = encode_table("t", compact)
    assert encoding["cols"] == "prefix" and "t.cols" not in tensors
    spec = {
        "num_embeddings": 500,
        "embedding_dim": dim,
        "kept_rows": compact.kept_rows,
        "kept_params": compact.kept_params,
        "encoding": encoding,
    }
    decoded = decode_table("t", tensors, spec, "fp32", "test")
    assert torch.equal(decoded.to_dense(), table) and torch.equal(decoded.cols, compact.cols)
    # One row off the common order: back to per-element columns.
    off = table.clone()
    off[0] = 0
    off[0, order[-1]] = 1.0
    assert encode_table("t", compress_table(off, "fp32"))[1]["cols"] != "prefix"
    bad = dict(tensors, **{"t.colorder": torch.zeros_like(tensors["t.colorder"])})
    with pytest.raises(ArtifactError, match="permutation"):
        decode_table("t", bad, spec, "fp32", "test")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("dim", [3, 8, 40])
def test_compact_lookup_matches_dense(dtype, dim):
    """Pooling from CSR == F.embedding_bag over the decoded table, odd shapes, empty bags, mean."""
    torch.manual_seed(dim)
    table = torch.randn(57, dim) * (torch.rand(57, dim) < 0.2)
    table[5] = 0  # a pruned row
    compact = compress_table(table, dtype)
    tensors, encoding = encode_table("t", compact)
    spec = {
        "num_embeddings": 57,
        "embedding_dim": dim,
        "kept_rows": compact.kept_rows,
        "kept_params": compact.kept_params,
        "encoding": encoding,
    }
    decoded = decode_table("t", tensors, spec, dtype, "test")
    dense = decoded.to_dense()
    if dtype == "fp32":
        assert torch.equal(dense, table)
    ids = torch.tensor([5, 1, 2, 56, 5, 0, 0, 3, 9])
    offsets = torch.tensor([0, 2, 2, 6, 9])  # an empty bag included
    for pooling in ("sum", "mean"):
        got = CompactEmbeddingBag(decoded, pooling=pooling)(ids, offsets)
        want = torch.nn.functional.embedding_bag(ids, dense, offsets, mode=pooling, include_last_offset=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _corrupt_cases(art: Path):
    def flip(name):
        data = bytearray((art / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (art / name).write_bytes(bytes(data))

    yield "flipped byte", lambda: flip("embeddings.safetensors"), "sha256"
    yield (
        "truncated",
        lambda: (art / "dense.safetensors").write_bytes((art / "dense.safetensors").read_bytes()[:100]),
        "bytes",
    )
    yield "missing file", lambda: (art / "vocab.parquet").unlink(), "missing"
    yield "missing manifest", lambda: (art / "manifest.json").unlink(), "manifest.json"
    yield "broken manifest", lambda: (art / "manifest.json").write_text('{"format": '), "invalid JSON"
    yield (
        "future version",
        lambda: (art / "manifest.json").write_text(
            (art / "manifest.json").read_text().replace('"format_version": 1', '"format_version": 99')
        ),
        "format_version",
    )


@pytest.mark.parametrize("case", range(6))
def test_corrupted_artifact_is_refused(tmp_path, ml100k_data, case):
    run = make_run(tmp_path, ml100k_data, stage="retrain", model="fm")
    good = tmp_path / "good"
    ArtifactConverter(run).convert(good)
    load_artifact(good)
    art = tmp_path / "bad"
    shutil.copytree(good, art)
    label, corrupt, message = list(_corrupt_cases(art))[case]
    corrupt()
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


def test_inconsistent_tensors_are_refused(tmp_path, synthetic_data):
    """A file whose sha256 matches the manifest but whose content is inconsistent is still refused."""
    import hashlib

    from pep_torchrec.export.format import load_tensors, save_tensors

    run = make_run(tmp_path, synthetic_data, stage="retrain", model="fm")
    art = tmp_path / "art"
    ArtifactConverter(run).convert(art)
    emb = load_tensors((art / "embeddings.safetensors").read_bytes(), "emb")
    key = next(k for k in emb if k.endswith(".values"))
    emb[key] = emb[key][:-1]
    data = save_tensors(emb)
    (art / "embeddings.safetensors").write_bytes(data)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["embeddings.safetensors"] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="values"):
        load_artifact(art)


def test_export_replaces_only_artifacts(tmp_path, synthetic_data):
    run = make_run(tmp_path, synthetic_data, stage="retrain", model="fm")
    other = tmp_path / "not_an_artifact"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(ArtifactError, match="refusing"):
        ArtifactConverter(run).convert(other)
    first = ArtifactConverter(run).convert(tmp_path / "art")
    second = ArtifactConverter(run).convert(tmp_path / "art", dtype="fp16")
    assert first["model_version"] != second["model_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]  # no temporary left


@pytest.mark.parametrize("dtype,layout", [("fp32", "compact"), ("int8", "compact"), ("fp16", "dense")])
def test_grouped_lookup_is_the_per_table_lookup(tmp_path, synthetic_data, dtype, layout):
    """The serving model stacks its tables into one lookup (one call per request, not one per table):
    every feature's pooled rows are bit for bit those of a module holding that table alone, the first-
    order weights too, and an id outside its own table is refused, not read from the next one."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from pep_torchrec.export.compact import DenseEmbeddingBag, TableSlice
    from pep_torchrec.export.format import load_tensors

    run = make_run(tmp_path, synthetic_data, stage="retrain", model="fm")
    manifest = ArtifactConverter(run).convert(tmp_path / "art", dtype=dtype, layout=layout)
    model = load_artifact(tmp_path / "art").model
    assert model.ebc._grouped is not None and model.linear_ebc._grouped is not None
    if layout == "compact":  # the masks layout: the kernel's several-features call is the one taken
        assert model.ebc._grouped.group.layout == "masks"
    emb = load_tensors((tmp_path / "art" / "embeddings.safetensors").read_bytes(), "emb")
    batch = next(iter(ParquetBatchLoader(synthetic_data, "test", batch_size=64, prefetch=0)))
    kjt = batch.sparse_features
    assert kjt.keys() == model.feature_names  # so the grouped path is the one taken
    pooled = model.ebc(kjt).to_dict()
    linear = model.linear_ebc(kjt).to_dict()
    features = kjt.to_dict()
    for spec in manifest["tables"]:
        bag = model.ebc.embedding_bags[spec["name"]]
        assert isinstance(bag, TableSlice) and bag.num_embeddings == spec["num_embeddings"]
        if layout == "compact":
            alone = CompactEmbeddingBag(
                decode_table(spec["name"], emb, spec, dtype, "test"), pooling=spec["pooling"]
            )
        else:
            alone = DenseEmbeddingBag(emb[f"{spec['name']}.weight"], pooling=spec["pooling"])
        for name in spec["feature_names"]:
            jt = features[name]
            assert torch.equal(pooled[name], alone(jt.values(), jt.offsets())), name
            assert torch.equal(pooled[name], bag(jt.values(), jt.offsets())), name
            weights = model.linear_ebc.bags[spec["name"]].group.weight
            base = model.linear_ebc.bags[spec["name"]].row_base
            own = DenseEmbeddingBag(
                weights[base : base + spec["num_embeddings"]].clone(), pooling=spec["pooling"]
            )
            assert torch.equal(linear[name], own(jt.values(), jt.offsets())), name
    first = manifest["tables"][0]
    too_far = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(),
        values=torch.full_like(kjt.values(), first["num_embeddings"]),  # one past the first table
        lengths=kjt.lengths(),
    )
    with pytest.raises(IndexError, match=f"outside \\[0, {first['num_embeddings']}\\)"):
        model.ebc(too_far)
    with pytest.raises(IndexError):
        model.linear_ebc(too_far)
