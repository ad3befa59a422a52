"""Run directories fabricated without training (random weights and thresholds saved as the trainer saves
them) and the reference scores an exported artifact must reproduce (export and serving tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml

from pep_torchrec.config import load_config, to_dict
from pep_torchrec.data.loader import ParquetBatchLoader
from pep_torchrec.export.converter import ArtifactConverter
from pep_torchrec.pep.masks import write_arrays


def make_run(
    root: Path,
    data: Path,
    *,
    stage: str,
    granularity: str = "feature_dim",
    model: str = "deepfm",
    dim: int = 8,
    keep: float = 0.3,
    seed: int = 0,
    step: int = 10,
) -> Path:
    """A finished-looking run directory with random weights, thresholds and a mask."""
    from pep_torchrec.models.run_model import build_train_model

    torch.manual_seed(seed)
    options = {"mlp_dims": [16], "dropout": 0.0} if model == "deepfm" else {}
    cfg = load_config(
        overrides=[
            f"data.path={data}",
            f"model.name={model}",
            f"model.embedding_dim={dim}",
            f"train.stage={stage}",
            f"pep.granularity={granularity}",
            "pep.gk=0.05",
        ]
    )
    cfg.model.options = options
    run = root / f"run_{stage}_{granularity}_{model}_{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    from pep_torchrec.data.schema import Schema

    schema = Schema.load(data)
    train_model = build_train_model(
        cfg, schema, embedding_device=torch.device("cpu"), dense_device=torch.device("cpu")
    )
    rng = np.random.default_rng(seed)
    shapes = {c.name: (c.num_embeddings, dim) for c in train_model.model.ebc.embedding_bag_configs()}
    masks = {t: rng.random(s) < keep for t, s in shapes.items()}
    with torch.no_grad():
        for name, param in train_model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.3)
            if "._embedding_bag_collection." in name and stage == "search":
                param[:, dim:] = torch.randn_like(param[:, dim:]) * 2 - 2  # s: a spread of thresholds
            if "._embedding_bag_collection." in name and stage == "retrain":
                table = name.split(".")[-2]
                m = torch.from_numpy(masks[table]).float()
                param[:, :dim] *= m
                param[:, dim:] = m
            if name.endswith("threshold") or ".thresholds." in name:
                param.copy_(torch.randn_like(param) - 3)
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    dcp.save({"model": train_model.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"trainer": {"step": step, "gk": 0.05, "best_step": step}})
    )
    (run / "summary.json").write_text(json.dumps({"stage": stage, "best_step": step, "gk": 0.05}))
    if stage != "baseline":
        mask_dir = run / "masks" / "budget_0.3"
        pieces = {t: [(0, 0, torch.from_numpy(m))] for t, m in masks.items()}
        write_arrays(
            mask_dir,
            shapes,
            np.bool_,
            pieces,
            {
                "kind": "mask",
                "budget": 0.3,
                "kept": int(sum(m.sum() for m in masks.values())),
                "step": step,
                "dim": dim,
                "tables": {t: {"rows": s[0]} for t, s in shapes.items()},
            },
            rank=0,
        )
        if stage == "retrain":
            cfg.pep.mask = str(mask_dir)
            (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run


def reference_scores(converter: ArtifactConverter, artifact, split: str = "test"):
    """(reference probabilities, artifact probabilities, labels) over a split's real rows (the loader
    pads its last batch with weight-0 rows; they are dropped): the reference is the trained module's
    own forward (thresholds applied by the training op), with the mask zeroing v."""
    model, source = converter.load_model()
    ebc = model.model.ebc
    with torch.no_grad():
        if source.mask_dir is not None:
            for c in converter.train_tables():
                stored = (
                    ebc._embedding_bag_collection.embedding_bags[c.name].weight
                    if hasattr(ebc, "mode")
                    else ebc.embedding_bags[c.name].weight
                )
                mask = np.load(source.mask_dir / f"{c.name}.npy")
                stored[:, : c.embedding_dim] *= converter.export_mask(
                    ebc, source, c.name, mask, 0, stored
                ).float()
    loader = ParquetBatchLoader(converter.cfg.data.path, split, batch_size=1024, prefetch=0)
    ref, got, labels, real = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            ref.append(torch.sigmoid(model.model(batch.dense_features, batch.sparse_features)))
            got.append(torch.sigmoid(artifact.logits(batch.dense_features, batch.sparse_features)))
            labels.append(batch.labels)
            real.append(batch.weights > 0)
    real = torch.cat(real)
    return torch.cat(ref)[real], torch.cat(got)[real], torch.cat(labels)[real].numpy()
