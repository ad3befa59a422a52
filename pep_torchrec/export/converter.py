"""Run directory → serving artifact: `pep-torchrec export`.

    pep-torchrec export --run-dir runs/search --budget 0.05 --out out/artifact [--dtype fp32|fp16|int8]
    pep-torchrec export --run-dir runs/retrain --out out/artifact          (its own mask and weights)
    pep-torchrec export --run-dir runs/search --mask runs/search/masks/budget_0.1 --out ...

What is exported (v̂ = what the trained model pools; everything else is zero and not stored):

- search run + budget/mask: the checkpoint saved at the mask's step (or, if it was pruned, the
  nearest later one, else the best), thresholds applied with that checkpoint's gk, restricted to the
  mask: v̂ = sign(v)·relu(|v| − gk·σ(s)) · mask. At most `budget` elements stay (exactly the budget
  where every masked element is still above its threshold; fewer where the threshold has passed some).
  An `aligned` mask (pep.mask_layout, made for retraining) has moved each row's kept elements to
  shared columns; the snapshot itself keeps each row's same count at its largest margins, which is
  what is exported (the same row sizes, so the same total).
- retrain run: its best checkpoint (selected on valid: summary.json's best_step, which must be
  complete; `RunDir.best_checkpoint`), v̂ = v · m (thresholds off), m its own mask.
- baseline run: its best checkpoint, v̂ = v (· the `--mask` if one is given, e.g. magnitude pruning).

The checkpoint is read whole in one process (`dcp.load(no_dist=True)`), so a run of any world size
and sharding plan exports the same artifact. One object, one entry point: `ArtifactConverter.convert`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp

from pep_torchrec.config import ConfigError, RunConfig
from pep_torchrec.data.schema import Schema
from pep_torchrec.data.spec_transform import serving_inputs
from pep_torchrec.data.vocab import VOCAB_FILE as DATASET_VOCAB_FILE
from pep_torchrec.export.format import (
    DENSE_FILE,
    DTYPES,
    EMBEDDINGS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUTS,
    VOCAB_FILE,
    ArtifactError,
    compress_table,
    encode_table,
    save_tensors,
    tensors_bytes,
    write_artifact,
)
from pep_torchrec.models.base import LINEAR_TABLE_PREFIX
from pep_torchrec.models.run_model import build_train_model
from pep_torchrec.ops import margins, threshold
from pep_torchrec.pep.masks import open_array, top_per_row
from pep_torchrec.training.run_dir import RunDir, read_meta

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 1 << 16
# Where the parts of the model live in a checkpoint's "model" state dict (TrainModel → CTRModel).
_MODEL_PREFIX = "model."
_EBC_PREFIX = "model.ebc."
_LINEAR_PREFIX = "model.linear_ebc."


# ---------------------------------------------------------------------------------------------------
# raw inputs: how a client's raw values become the model's features


_AVAZU_FROM_HOUR = {"hour_of_day": "avazu_hour_of_day", "weekday": "avazu_weekday"}


def input_spec(schema: Schema, *, has_vocab: bool = True, data_path: str | Path = ".") -> dict[str, Any]:
    """What a client sends per instance (raw values as the dataset has them) and how they map.

    Returns:
        {"fields": [{name, type, nullable}], "sparse": [{name, source, transform, multi_hot,
        vocab}], "dense": [{name, source, transform}]}. Types: "int", "string", "string_list",
        "number"; `vocab` false means the raw integer is the id itself (synthetic data). A spec'd
        dataset (`data prepare --spec`): its raw input columns ("raw", "raw_list") and what the service
        needs to compute the features as prepare did (`spec_transform.serving_inputs`).
    """
    if "spec" in schema.extra:
        try:
            return serving_inputs(schema, data_path)[0]
        except ValueError as e:
            raise ArtifactError(str(e)) from e
    sparse, dense, fields = [], [], []
    if schema.dataset == "criteo":
        source = schema.extra.get("dense_source", {})
        for f in schema.sparse_features:
            is_int = f.transform == "criteo_log_bucket"
            fields.append({"name": f.name, "type": "int" if is_int else "string", "nullable": True})
            sparse.append(
                {
                    "name": f.name,
                    "source": f.name,
                    "transform": f.transform,
                    "multi_hot": False,
                    "vocab": True,
                }
            )
        for name in schema.dense_features:
            dense.append(
                {
                    "name": name,
                    "source": source.get(name, name.removesuffix("_log")),
                    "transform": "log1p_relu",
                }
            )
        return {"fields": fields, "sparse": sparse, "dense": dense}
    int_fields = {"movielens": {"user_id", "item_id", "age"}}.get(schema.dataset, set())
    for f in schema.sparse_features:
        if schema.dataset == "avazu" and f.name in _AVAZU_FROM_HOUR:
            # Derived from the raw `hour` (YYMMDDHH) as the pipeline does; the client sends `hour`.
            if not any(field["name"] == "hour" for field in fields):
                fields.append({"name": "hour", "type": "int", "nullable": False})
            sparse.append(
                {
                    "name": f.name,
                    "source": "hour",
                    "transform": _AVAZU_FROM_HOUR[f.name],
                    "multi_hot": False,
                    "vocab": True,
                }
            )
            continue
        if schema.dataset == "synthetic" or not has_vocab:
            ftype, vocab = "int", False
        elif f.multi_hot:
            ftype, vocab = "string_list", True
        else:
            ftype, vocab = ("int" if f.name in int_fields else "string"), True
        fields.append(
            {"name": f.name, "type": "int_list" if (f.multi_hot and not vocab) else ftype, "nullable": False}
        )
        sparse.append(
            {
                "name": f.name,
                "source": f.name,
                "transform": f.transform,
                "multi_hot": f.multi_hot,
                "vocab": vocab,
            }
        )
    for name in schema.dense_features:
        fields.append({"name": name, "type": "number", "nullable": False})
        dense.append({"name": name, "source": name, "transform": "identity"})
    return {"fields": fields, "sparse": sparse, "dense": dense}


# ---------------------------------------------------------------------------------------------------
# the converter


@dataclass
class ExportSource:
    """What the converter read: recorded in the manifest's `source`."""

    run_dir: Path
    stage: str
    checkpoint: Path
    step: int
    gk: float | None
    mask_dir: Path | None
    mask_meta: dict[str, Any] | None


class ArtifactConverter:
    """Converts one training run (checkpoint + mask + dataset schema/vocab) into a serving artifact.

    Args:
        run_dir: a finished run directory (config.yaml, summary.json, checkpoints/).
        budget: a search's budget (uses RUN/masks/budget_<b>); exclusive with `mask`.
        mask: an explicit mask directory (any run); a retrain run defaults to its own.
        step: export this checkpoint step instead of the default choice (see the module docstring).
        data_path: the prepared dataset, when it moved since training (default: the run's).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        budget: float | None = None,
        mask: str | Path | None = None,
        step: int | None = None,
        data_path: str | Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run = RunDir(self.run_dir)
        if budget is not None and mask is not None:
            raise ConfigError("give --budget or --mask, not both")
        self.cfg: RunConfig = self.run.config()
        if data_path is not None:
            self.cfg.data.path = str(data_path)
        self.schema = Schema.load(self.cfg.data.path)
        self.stage = self.cfg.train.stage
        self.budget, self.mask, self.step = budget, mask, step

    # ---- what to read --------------------------------------------------------------------------

    def _mask_dir(self) -> Path | None:
        if self.mask is not None:
            return Path(self.mask)
        if self.budget is not None:
            if self.stage != "search":
                raise ConfigError(
                    f"--budget needs a search run ({self.run_dir} is a {self.stage} run); "
                    "use --mask for another run's mask"
                )
            return self.run.mask(self.budget)
        if self.stage == "retrain":
            return Path(self.cfg.pep.mask) if self.cfg.pep.mask else None
        if self.stage == "search":
            raise ConfigError("a search run exports at a budget: give --budget (or --mask)")
        return None

    def _checkpoint(self, mask_meta: dict[str, Any] | None) -> tuple[Path, int]:
        directory = self.run.checkpoints_dir
        checkpoints = self.run.checkpoints()
        steps = checkpoints.steps()  # complete ones only
        if not steps:
            raise ConfigError(f"{directory}: no complete checkpoint")
        if self.step is not None:
            chosen = self.step
        elif self.stage == "search" and mask_meta is not None and "step" in mask_meta:
            # The weights the mask was ranked on; pruned checkpoints → the nearest later one.
            later = [s for s in steps if s >= int(mask_meta["step"])]
            chosen = later[0] if later else self.run.best_step()
            if chosen != int(mask_meta["step"]):
                logger.warning(
                    "checkpoint of the mask's step %s is gone; exporting step %d", mask_meta["step"], chosen
                )
        else:
            best = self.run.best_checkpoint()  # the one rule: summary.json's best_step, complete
            return best, self.run.best_step()
        if chosen not in steps:
            raise ConfigError(f"{directory}: no complete checkpoint for step {chosen} (have {steps})")
        return checkpoints.path(chosen), chosen

    # ---- the entry point -----------------------------------------------------------------------

    def convert(self, out: str | Path, *, dtype: str = "fp32", layout: str = "compact") -> dict[str, Any]:
        """Write the artifact to `out` (atomically) and return its manifest.

        Args:
            out: the artifact directory (replaced if it is an artifact).
            dtype: values of the embedding tables: "fp32", "fp16" or "int8" (per-row scales).
            layout: "compact" (CSR, the point) or "dense" ([R, D] tables, for comparisons).
        """
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        if layout not in LAYOUTS:
            raise ConfigError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "dense" and dtype == "int8":
            raise ConfigError("the dense layout stores fp32 or fp16 tables")
        tables, source, model_state = self.pruned_tables()
        manifest_tables, emb_tensors, dense_fp32 = self._encode_tables(tables, dtype, layout)

        dense_tensors, linear_names = self._dense_tensors(model_state)
        files: dict[str, Any] = {
            EMBEDDINGS_FILE: save_tensors(emb_tensors),
            DENSE_FILE: save_tensors(dense_tensors),
        }
        inputs = input_spec(
            self.schema,
            has_vocab=(Path(self.cfg.data.path) / DATASET_VOCAB_FILE).is_file(),
            data_path=self.cfg.data.path,
        )
        if "spec" in self.schema.extra:  # the side tables' copies, joined at serving time
            files.update(serving_inputs(self.schema, self.cfg.data.path)[1])
        vocab_features = [s["name"] for s in inputs["sparse"] if s["vocab"]]
        if vocab_features:
            files[VOCAB_FILE] = self._vocab_bytes(vocab_features)
        total = sum(t["bytes"] for t in manifest_tables)
        kept = sum(t["kept_params"] for t in manifest_tables)
        params = sum(t["num_embeddings"] * t["embedding_dim"] for t in manifest_tables)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "layout": layout,
            "model": {
                "name": self.cfg.model.name,
                "options": dict(self.cfg.model.options),
                "embedding_dim": self.cfg.model.embedding_dim,
                "num_dense": len(self.schema.dense_features),
                "linear_tables": linear_names,
            },
            "dataset": self._dataset_manifest(VOCAB_FILE if vocab_features else None),
            "inputs": inputs,
            "tables": manifest_tables,
            "embedding_params": params,
            "kept_params": kept,
            "kept_share": kept / params if params else 0.0,
            "total_bytes": total,
            "dense_fp32_bytes": dense_fp32,
            "source": self._source_manifest(source),
        }
        write_artifact(out, manifest, files)
        return json.loads((Path(out) / "manifest.json").read_text())

    def _encode_tables(
        self, tables: dict[str, torch.Tensor], dtype: str, layout: str
    ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], int]:
        """Each pruned table in the artifact's form: its manifest entry, its tensors (`<table>.*`),
        and the bytes the tables would take as dense fp32 (summed over tables)."""
        manifest_tables, emb_tensors = [], {}
        dense_fp32 = 0
        for config in self.train_tables():
            name = config.name
            table_RD = tables[name]
            compact = compress_table(table_RD, dtype)
            if layout == "compact":
                tensors, encoding = encode_table(name, compact)
            else:
                weight = compact.to_dense()
                tensors = {f"{name}.weight": weight.to(torch.float16 if dtype == "fp16" else torch.float32)}
                encoding = {"layout": "dense"}
            emb_tensors.update(tensors)
            dense_fp32 += config.num_embeddings * config.embedding_dim * 4
            manifest_tables.append(
                {
                    "name": name,
                    "feature_names": list(config.feature_names),
                    "num_embeddings": config.num_embeddings,
                    "embedding_dim": config.embedding_dim,
                    "pooling": "mean" if config.pooling.name == "MEAN" else "sum",
                    "kept_rows": compact.kept_rows,
                    "kept_params": compact.kept_params,
                    "bytes": tensors_bytes(tensors, f"{name}."),
                    "encoding": encoding,
                }
            )
        return manifest_tables, emb_tensors, dense_fp32

    def _dataset_manifest(self, vocab_file: str | None) -> dict[str, Any]:
        """The manifest's `dataset`: the prepared dataset the model was trained on."""
        return {
            "name": self.schema.dataset,
            "path": str(Path(self.cfg.data.path).resolve()),
            "sparse_features": [f.name for f in self.schema.sparse_features],
            "dense_features": list(self.schema.dense_features),
            "cardinalities": self.schema.cardinalities,
            "min_count": self.schema.min_count,
            "vocab": vocab_file,
        }

    def _source_manifest(self, source: ExportSource) -> dict[str, Any]:
        """The manifest's `source`: the run, checkpoint and mask the tables come from."""
        return {
            "run_dir": str(source.run_dir.resolve()),
            "stage": source.stage,
            "checkpoint": str(source.checkpoint.resolve()),
            "step": source.step,
            "gk": source.gk,
            "granularity": self.cfg.pep.granularity if self.stage != "baseline" else None,
            "mask": str(source.mask_dir.resolve()) if source.mask_dir else None,
            "mask_budget": (source.mask_meta or {}).get("budget"),
            "mask_kept": (source.mask_meta or {}).get("kept"),
        }

    # ---- pieces (public for tests: the exactness test rebuilds the reference from them) ---------

    def train_tables(self):
        from pep_torchrec.models import embedding_tables

        return embedding_tables(
            self.schema.sparse_features, self.cfg.model.embedding_dim, init_std=self.cfg.model.init_std
        )

    def load_model(self) -> tuple[torch.nn.Module, ExportSource]:
        """The unsharded TrainModel with the chosen checkpoint loaded (gk set), and what was read."""
        mask_dir = self._mask_dir()
        mask_meta = read_meta(mask_dir) if mask_dir is not None else None
        if mask_meta is not None and mask_meta.get("kind") != "mask":
            raise ConfigError(f"{mask_dir}: not a mask directory (kind {mask_meta.get('kind')!r})")
        checkpoint, step = self._checkpoint(mask_meta)
        cpu = torch.device("cpu")
        train_model = build_train_model(self.cfg, self.schema, embedding_device=cpu, dense_device=cpu)
        state = {"model": train_model.state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        train_model.load_state_dict(state["model"])
        gk = None
        if self.stage == "search":
            trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
            gk = float(trainer_state.get("trainer", {}).get("gk", self.cfg.pep.gk))
            train_model.model.ebc.gk = gk
        train_model.eval()
        return train_model, ExportSource(self.run_dir, self.stage, checkpoint, step, gk, mask_dir, mask_meta)

    @torch.no_grad()
    def pruned_tables(self) -> tuple[dict[str, torch.Tensor], ExportSource, dict[str, torch.Tensor]]:
        """{table: [R, D] float32 v̂ (zeros = pruned)}, the source, and the model's state dict."""
        model, source = self.load_model()
        ebc = model.model.ebc
        out = {}
        for config in self.train_tables():
            name, dim = config.name, config.embedding_dim
            mask = None
            if source.mask_dir is not None:
                mask = open_array(source.mask_dir, name, (config.num_embeddings, dim))
            if hasattr(ebc, "mode"):  # PEP module: threshold (search), v·m (retrain)
                stored = ebc._embedding_bag_collection.embedding_bags[name].weight
            else:
                stored = ebc.embedding_bags[name].weight
            table = torch.empty(config.num_embeddings, dim)
            for start in range(0, config.num_embeddings, _CHUNK_ROWS):
                rows = stored[start : start + _CHUNK_ROWS]
                if hasattr(ebc, "mode"):
                    chunk = threshold(rows, dim=dim, mode=ebc.mode, gk=ebc.gk, coarse_s=ebc.coarse_s(name))
                else:
                    chunk = rows.float()
                if mask is not None:
                    chunk = chunk * self.export_mask(ebc, source, name, mask, start, rows).to(chunk.dtype)
                table[start : start + _CHUNK_ROWS] = chunk
            out[name] = table
        return out, source, model.state_dict()

    @staticmethod
    def export_mask(
        ebc: torch.nn.Module,
        source: ExportSource,
        name: str,
        mask: np.ndarray,
        start: int,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """bool [N, D]: which elements of stored rows [start, start + N) of `name` the artifact keeps.
        The mask's own, except for a search snapshot with an aligned mask (moved to shared columns
        for retraining): there each row keeps its same count at its largest margins."""
        keep = torch.from_numpy(np.array(mask[start : start + rows.shape[0]]))
        if source.stage == "search" and (source.mask_meta or {}).get("layout") == "aligned":
            score = margins(rows, dim=keep.shape[1], mode=ebc.mode, gk=ebc.gk, coarse_s=ebc.coarse_s(name))
            keep = top_per_row(score, keep.sum(1))
        return keep

    def _dense_tensors(
        self, model_state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Every non-embedding tensor of the CTR model (keys relative to it), fp32; FM's first-order
        tables as `linear.<table>` [R] (column 0, the only one the model reads)."""
        out, linear = {}, []
        for key, value in model_state.items():
            if key.startswith(_EBC_PREFIX):
                continue
            if key.startswith(_LINEAR_PREFIX):
                table = key.split(".")[-2]
                out[f"linear.{table.removeprefix(LINEAR_TABLE_PREFIX)}"] = value[:, 0].float().clone()
                linear.append(table.removeprefix(LINEAR_TABLE_PREFIX))
                continue
            if not key.startswith(_MODEL_PREFIX):
                raise ConfigError(f"unexpected model state key {key!r}")
            value = value.detach().clone()
            out["model." + key.removeprefix(_MODEL_PREFIX)] = (
                value.float() if value.is_floating_point() else value
            )
        return out, linear

    def _vocab_bytes(self, features: list[str]) -> bytes:
        path = Path(self.cfg.data.path) / DATASET_VOCAB_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing: the artifact needs the dataset's vocabulary")
        table = pq.read_table(path)
        table = table.filter(pc.is_in(table["feature"], pa.array(features))).select(
            ["feature", "value", "id"]
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue().to_pybytes()
