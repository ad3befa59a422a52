"""Export of REALLY trained runs (not fabricated checkpoints): exactness of a short PEP search, and a
2-rank run's artifact == its checkpoint's tables, independent of the world size that wrote it.

Both are `slow` (a training run each: ~25 s for the search, ~60 s for the 2-rank run on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pep_torchrec.export.converter import ArtifactConverter
from pep_torchrec.export.format import decode_table, load_tensors
from pep_torchrec.export.serving_model import load_artifact
from pep_torchrec.pep.controls import load_full_tables
from pep_torchrec.training.metrics import roc_auc
from tests.helpers.export import reference_scores
from tests.helpers.launch import REPO, launch_torchx_ddp, needs_torchx, run_command


def _train(config: str, run: Path, data: Path, *overrides: str) -> None:
    run_command(
        [
            sys.executable,
            "-m",
            "pep_torchrec.train",
            "--config",
            str(REPO / "configs" / config),
            "--run-dir",
            str(run),
            "--set",
            f"data.path={data}",
            "train.progress=false",
            *overrides,
        ]
    )


def _decoded_tables(art: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((art / "manifest.json").read_text())
    emb = load_tensors((art / "embeddings.safetensors").read_bytes(), "emb")
    return {
        spec["name"]: decode_table(spec["name"], emb, spec, manifest["dtype"], str(art)).to_dense()
        for spec in manifest["tables"]
    }


def _tensor_digests(art: Path) -> dict[str, str]:
    """sha256 of every artifact file but the manifest (which names its source run)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(art.iterdir())
        if p.name != "manifest.json"
    }


@pytest.mark.slow
def test_trained_search_export_is_exact(tmp_path):
    run, data = tmp_path / "search", tmp_path / "data"
    _train("debug_cpu_search.yaml", run, data, "data.synthetic.rows=6000")
    converter = ArtifactConverter(run, budget=0.2)
    _, source, _ = converter.pruned_tables()
    mask_meta = json.loads((run / "masks" / "budget_0.2" / "meta.json").read_text())
    assert source.step == mask_meta["step"]  # the mask step's own checkpoint was kept and used
    aucs = {}
    for dtype in ("fp32", "fp16", "int8"):
        manifest = converter.convert(tmp_path / dtype, dtype=dtype)
        ref, got, labels = reference_scores(converter, load_artifact(tmp_path / dtype))
        if dtype == "fp32":
            assert (ref - got).abs().max().item() <= 1e-6
            assert 0 < manifest["kept_params"] <= 0.2 * manifest["embedding_params"] + 1e-9
        aucs[dtype] = roc_auc(labels, got.numpy())
    # The exported search model is the scorer training evaluated (summary test AUC, same checkpoint).
    summary = json.loads((run / "summary.json").read_text())
    assert aucs["fp32"] > 0.6, (aucs, summary["test_auc"])
    assert abs(aucs["fp16"] - aucs["fp32"]) <= 1e-3, aucs
    assert abs(aucs["int8"] - aucs["fp32"]) <= 1e-3, aucs
    # The earlier (0.5) snapshot: its own, non-final checkpoint, exported exactly as well.
    early = ArtifactConverter(run, budget=0.5)
    _, source, _ = early.pruned_tables()
    assert source.step == json.loads((run / "masks" / "budget_0.5" / "meta.json").read_text())["step"]
    early.convert(tmp_path / "early")
    ref, got, _ = reference_scores(early, load_artifact(tmp_path / "early"))
    assert (ref - got).abs().max().item() <= 1e-6


def _reshard_to_one_rank(run: Path, step: int, out: Path) -> None:
    """A copy of `run` whose checkpoint `step` is rewritten by ONE process (full tensors, no shards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints"))
    src = run / "checkpoints" / f"step_{step:08d}"
    dst = out / "checkpoints" / f"step_{step:08d}"
    dcp_to_torch_save(src, out / "full.pt")
    state = torch.load(out / "full.pt", weights_only=False)
    (out / "full.pt").unlink()
    dcp.save(state, checkpoint_id=str(dst), no_dist=True)
    for extra in src.iterdir():
        if extra.suffix == ".json":
            shutil.copy(extra, dst / extra.name)


@pytest.mark.slow
@needs_torchx
def test_two_rank_export_equals_checkpoint_and_not_world_size(tmp_path):
    run, data = tmp_path / "run2", tmp_path / "data"
    launch_torchx_ddp(
        "--config",
        str(REPO / "configs" / "debug_cpu.yaml"),
        "--run-dir",
        str(run),
        "--set",
        f"data.path={data}",
        "train.progress=false",
        "train.max_steps=20",
        "train.checkpoint_every=20",
        "data.synthetic.rows=6000",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    converter = ArtifactConverter(run)
    manifest = converter.convert(tmp_path / "art2")
    step = manifest["source"]["step"]
    checkpoint = run / "checkpoints" / f"step_{step:08d}"
    decoded = _decoded_tables(tmp_path / "art2")
    whole = load_full_tables(checkpoint, {name: tuple(t.shape) for name, t in decoded.items()})
    for name, table in decoded.items():  # baseline: v̂ = v, bit for bit
        assert torch.equal(table, whole[name]), name
    # The same weights written by one process: the same artifact tensors, byte for byte.
    _reshard_to_one_rank(run, step, tmp_path / "run1")
    ArtifactConverter(tmp_path / "run1").convert(tmp_path / "art1")
    digests = _tensor_digests(tmp_path / "art2")
    assert {"embeddings.safetensors", "dense.safetensors"} <= set(digests)
    assert _tensor_digests(tmp_path / "art1") == digests
    m1 = json.loads((tmp_path / "art1" / "manifest.json").read_text())
    ignored = ("source", "model_version")  # where it came from, and a version derived from that
    assert {k: v for k, v in m1.items() if k not in ignored} == {
        k: v for k, v in manifest.items() if k not in ignored
    }
    np.testing.assert_array_equal(
        load_artifact(tmp_path / "art1").logits(*_example(converter)).numpy(),
        load_artifact(tmp_path / "art2").logits(*_example(converter)).numpy(),
    )


def _example(converter: ArtifactConverter):
    from pep_torchrec.data.loader import ParquetBatchLoader

    batch = next(iter(ParquetBatchLoader(converter.cfg.data.path, "test", batch_size=256, prefetch=0)))
    return batch.dense_features, batch.sparse_features
