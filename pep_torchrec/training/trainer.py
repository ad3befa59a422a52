"""The Trainer: DistributedModelParallel + fused TBE optimizer + TrainPipelineSparseDist, honest
evaluation (all ranks' predictions gathered; model selection on valid only) and exact resume.

The training loop runs in *segments*: runs of steps that end at an eval, a checkpoint, an epoch end or
the last step. TrainPipelineSparseDist reads two batches ahead; ending each segment drains it, so at
every segment boundary the model, optimizer and data position are consistent and can be checkpointed
and restored exactly.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from pep_torchrec.config import ConfigError, RunConfig, save_config
from pep_torchrec.data.loader import ParquetBatchLoader
from pep_torchrec.data.schema import Schema
from pep_torchrec.data.synthetic import SyntheticConfig
from pep_torchrec.distributed.env import DistEnv, configure_threads
from pep_torchrec.distributed.pep_embeddingbag import pep_constraints, pep_sharders
from pep_torchrec.distributed.planning import (
    fused_params,
    make_constraints,
    make_sharders,
    plan_sharding,
    shard_model,
)
from pep_torchrec.distributed.s_optimizer import SOptimizerSync
from pep_torchrec.models.run_model import PEP_STAGES, build_train_model
from pep_torchrec.modules import PEPEmbeddingBagCollection
from pep_torchrec.pep.stage import PEPStage
from pep_torchrec.training.checkpoint import CheckpointManager
from pep_torchrec.training.metrics import log_loss, roc_auc
from pep_torchrec.training.run_dir import RunDir, read_meta

logger = logging.getLogger(__name__)

_DENSE_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


STAGES = ("baseline", "search", "retrain")


def all_table_names(model: nn.Module) -> list[str]:
    """Every embedding table of the (unsharded) model: plain EBCs and PEP modules."""
    names = []
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, PEPEmbeddingBagCollection)):
            names += [c.name for c in module.embedding_bag_configs()]
    return list(dict.fromkeys(names))


def plan_inputs(cfg: RunConfig, model: nn.Module, device_type: str):
    """(sharders, constraints) for `model`: PEP tables restricted to the sharding types they support."""
    fused = fused_params(cfg.optim.embedding, device_type)
    constraints = make_constraints(all_table_names(model), cfg.sharding)
    if cfg.train.stage in PEP_STAGES:
        try:
            constraints = pep_constraints(model, constraints)
        except ValueError as e:
            raise ConfigError(f"sharding.types: {e}") from e
        return pep_sharders(fused), constraints
    return make_sharders(cfg.optim.embedding, device_type), constraints


def ensure_dataset(path: str, synthetic: SyntheticConfig | None, env: DistEnv) -> None:
    """Generate the configured synthetic dataset (`data.synthetic`) at `path` if it is not there
    yet (rank 0 writes, atomically; the others wait at a barrier)."""
    if synthetic is not None and not (Path(path) / "schema.json").is_file():
        if env.is_main:
            from pep_torchrec.data.prepare import PrepareOptions, prepare_dataset

            prepare_dataset("synthetic", None, path, PrepareOptions(synthetic=synthetic))
        dist.barrier()


def embedding_params_total(schema: Schema, embedding_dim: int) -> int:
    return sum(f.cardinality for f in schema.sparse_features) * embedding_dim


@dataclass
class EvalResult:
    auc: float
    logloss: float
    examples: int


class Trainer:
    """Builds the sharded model, optimizers, loaders and pipeline from a RunConfig and trains it.

    Args:
        cfg: the resolved config (cfg.data.path must point at a prepared dataset).
        env: the process group / device this rank runs in.
        run_dir: output directory (config.yaml, metrics.jsonl, summary.json, checkpoints/).
        resume: continue from the latest checkpoint in run_dir (an error if there is none).
    """

    def __init__(
        self, cfg: RunConfig, env: DistEnv, run_dir: str | os.PathLike, *, resume: bool = False
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(run_dir)
        self.run = RunDir(self.run_dir)
        ensure_dataset(cfg.data.path, cfg.data.synthetic, env)
        self.schema = Schema.load(cfg.data.path)
        self._check_config()

        configure_threads(cfg.train.num_threads, env.local_world_size)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        device = env.device
        pep_tables = self._build_model(device)
        self._build_optimizers(device)
        self._build_loaders()

        self.checkpoints = CheckpointManager(
            self.run.checkpoints_dir, rank=env.rank, keep=cfg.train.keep_checkpoints
        )
        self.state: dict[str, Any] = {
            "step": 0,
            "best_valid_auc": None,
            "best_step": None,
            "best_valid_logloss": None,
            "evals_since_best": 0,
            "train_seconds": 0.0,
            "examples": 0,
            "stopped_early": False,
            "stop_reason": None,
            "snapshots": [],
            "gk": cfg.pep.gk,
            "kept": None,
        }
        self._control_eval_seconds = 0.0  # of the last search control: its snapshot eval
        self._kept_by_table: dict[str, int] = {}  # of the last search control (at an eval)
        self.pep: PEPStage | None = None
        if cfg.train.stage in PEP_STAGES:
            self.pep = PEPStage(
                cfg.pep,
                cfg.train.stage,
                self.model,
                tables=pep_tables,
                dim=cfg.model.embedding_dim,
                rank=env.rank,
                run_dir=self.run_dir,
                steps_per_epoch=self.steps_per_epoch,
            )
        self._start_run_dir(resume)

    def _build_model(self, device: torch.device) -> dict[str, int]:
        """Build, plan and shard the model (`train_model`, `sharders`, `plan_report`, `model`).

        Returns each table's num_embeddings, as the unsharded collection declares them.
        """
        cfg, env = self.cfg, self.env
        # Tables are materialised shard by shard by DMP (which runs each table's init_fn).
        self.train_model = build_train_model(
            cfg, self.schema, embedding_device=torch.device("meta"), dense_device=device
        )
        self.sharders, constraints = plan_inputs(cfg, self.train_model, device.type)
        pep_tables = {c.name: c.num_embeddings for c in self.train_model.model.ebc.embedding_bag_configs()}
        self.plan_report = plan_sharding(
            self.train_model,
            sharders=self.sharders,
            constraints=constraints,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            compute_device=device.type,
            batch_size=self.per_rank_batch,
            pg=dist.group.WORLD,
        )
        self.model = shard_model(
            self.train_model,
            plan=self.plan_report.plan,
            sharders=self.sharders,
            device=device,
            pg=dist.group.WORLD,
        )
        return pep_tables

    def _build_optimizers(self, device: torch.device) -> None:
        """The dense optimizer, the combined one (with the fused embedding optimizer), the pipeline."""
        cfg = self.cfg
        dense_cls = _DENSE_OPTIMIZERS[cfg.optim.dense.name]
        dense_params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        self.dense_optimizer = KeyedOptimizerWrapper(
            dense_params,
            lambda params: dense_cls(
                params, lr=cfg.optim.dense.lr, weight_decay=cfg.optim.dense.weight_decay
            ),
        )
        self.optimizer = CombinedOptimizer(
            [("embedding", self.model.fused_optimizer), ("dense", self.dense_optimizer)]
        )
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, device, execute_all_batches=True)

    def _build_loaders(self) -> None:
        """This rank's train and eval loaders; `steps_per_epoch` and `total_steps`."""
        cfg, env = self.cfg, self.env
        loader_kwargs = dict(
            rank=env.rank, world_size=env.world_size, seed=cfg.train.seed, prefetch=cfg.data.prefetch
        )
        self.train_loader = ParquetBatchLoader(
            cfg.data.path,
            "train",
            batch_size=self.per_rank_batch,
            shuffle_buffer_row_groups=cfg.data.shuffle_buffer_row_groups,
            max_rows=cfg.data.max_train_rows,
            **loader_kwargs,
        )
        eval_batch = max(1, cfg.data.eval_batch_size // env.world_size)
        self.eval_loaders = {
            split: ParquetBatchLoader(cfg.data.path, split, batch_size=eval_batch, **loader_kwargs)
            for split in ("valid", "test")
        }
        self.steps_per_epoch = self.train_loader.num_batches()
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{cfg.data.path}: the train split has fewer rows than one global batch "
                f"({cfg.data.batch_size}); lower data.batch_size"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def _start_run_dir(self, resume: bool) -> None:
        """Create the run directory, then resume from its latest checkpoint, or start it: the config,
        an empty metrics.jsonl, and the search's rewind point or the retrain's ticket."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        if resume:
            self._resume()
        else:
            if env.is_main:
                save_config(cfg, self.run.config_path)
                self.run.start_metrics()
            if cfg.train.stage == "search":
                self.pep.save_init()  # the lottery ticket's rewind point
            elif cfg.train.stage == "retrain":
                self.pep.load_ticket()
        self._barrier()

    # ------------------------------------------------------------------------------------------------
    @property
    def per_rank_batch(self) -> int:
        return self.cfg.data.batch_size // self.env.world_size

    def _check_config(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.train.stage not in STAGES:
            raise ConfigError(f"train.stage: {cfg.train.stage!r} is not one of {list(STAGES)}")
        if cfg.train.stage == "retrain" and not cfg.pep.mask:
            raise ConfigError("train.stage=retrain needs a mask: pass --mask DIR (a search's masks/budget_*)")
        if cfg.train.stage == "retrain" and cfg.optim.embedding.weight_decay:
            # The fused optimizer would decay the mask columns m of the stored [v | m] rows too.
            raise ConfigError(
                "optim.embedding.weight_decay must be 0 for retrain (it would decay the stored mask)"
            )
        if cfg.data.batch_size % env.world_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} is not divisible by world size {env.world_size}"
            )
        if cfg.optim.dense.name not in _DENSE_OPTIMIZERS:
            raise ConfigError(
                f"optim.dense.name: {cfg.optim.dense.name!r} is not one of {sorted(_DENSE_OPTIMIZERS)}"
            )
        if cfg.train.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")

    def _barrier(self) -> None:
        dist.barrier()

    def _checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def _resume(self) -> None:
        step = self.checkpoints.latest()
        if step is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.checkpoints.directory}")
        # Adam & co. create their state lazily at the first step; DCP loads in place, so the state
        # must exist first (a zero-gradient step; the weights are overwritten by the load anyway).
        self.dense_optimizer.init_state()
        self.dense_optimizer.zero_grad(set_to_none=True)
        state = self._checkpoint_state()
        saved = self.checkpoints.load(step, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.state = saved["trainer"]
        s_opt = self._s_optimizer()
        if s_opt is not None and "s_optimizer" in self.state:
            s_opt.load_state(self.state["s_optimizer"], carry=self.env.is_main)
        if self.pep is not None:
            self.pep.module.gk = self.state["gk"]
            if self.cfg.train.stage == "retrain":
                self.pep.mask_meta = read_meta(self.cfg.pep.mask, "mask")
        if self.env.is_main:
            # metrics.jsonl continues from the checkpoint: drop lines written after it.
            self.run.truncate_metrics(step)
        logger.info("resumed from %s (step %d)", self.checkpoints.path(step), step)

    @torch.no_grad()
    def _average_batchnorm_stats(self) -> None:
        """Make every rank's BatchNorm running statistics the average over ranks.

        They are buffers: each rank updates its own from its own batches (TorchRec's DDP wrapper
        does not broadcast buffers), and only eval reads them. Unsynchronised, a gathered eval mixes
        one model per rank, and a checkpoint (DCP saves one copy of a replicated tensor) resumes
        every rank from one rank's statistics, so evals after a multi-rank resume drifted from the
        uninterrupted run's (issue 13). Averaged before every eval and checkpoint, the evaluated
        model is one model and what is saved is what every rank holds. One rank: a no-op."""
        if self.env.world_size == 1:
            return
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                for stat in (module.running_mean, module.running_var):
                    dist.all_reduce(stat)
                    stat.div_(self.env.world_size)

    def _save_checkpoint(self) -> None:
        self._average_batchnorm_stats()
        # Never pruned: the best-on-valid checkpoint (tested at the end) and every search snapshot's
        # (the converter exports a snapshot from its own step's weights and gk).
        protect = tuple(snap["step"] for snap in self.state["snapshots"])
        if self.state["best_step"] is not None:
            protect += (self.state["best_step"],)
        s_opt = self._s_optimizer()
        if s_opt is not None:
            self.state["s_optimizer"] = s_opt.state(self._all_reduce)
        self.checkpoints.save(
            self.state["step"], self._checkpoint_state(), {"trainer": self.state}, protect=protect
        )

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            self.run.append_metrics(record)

    # ------------------------------------------------------------------------------------------------
    def _next_boundary(self, step: int) -> int:
        """The first step after `step` at which the loop must stop to eval / checkpoint / end an epoch."""
        cfg = self.cfg.train
        candidates = [self.total_steps, (step // self.steps_per_epoch + 1) * self.steps_per_epoch]
        for every in (cfg.eval_every, cfg.checkpoint_every, self._control_every()):
            if every > 0:
                candidates.append((step // every + 1) * every)
        if self._s_optimizer() is not None and step == 0:
            candidates.append(1)
        return min(candidates)

    def _s_optimizer(self) -> SOptimizerSync | None:
        """The search's own s optimizer (`pep.s_optimizer: sgd`), if any."""
        return getattr(self.pep.module, "s_optimizer", None) if self.pep is not None else None

    def _sync_s_optimizer(self, step: int) -> None:
        """Fold every rank's s-gradient statistics into the step scale (two numbers per table)."""
        s_opt = self._s_optimizer()
        if s_opt is None:
            return
        s_opt.sync(step, self._all_reduce)

    @property
    def _all_reduce(self):
        """Sum a tensor over ranks in place (None on one rank)."""
        return dist.all_reduce if self.env.world_size > 1 else None

    def _control_every(self) -> int:
        """Steps between search-controller updates beyond the evals (0: at evals only). Besides
        them, a search with its own s optimizer stops after step 1 for the optimizer's first sync."""
        if self.cfg.train.stage != "search" or (
            self.cfg.pep.target_epochs <= 0 and self.cfg.pep.gk_growth <= 0
        ):
            return 0
        return self.cfg.pep.control_every

    def _is_eval_step(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        at_epoch_end = step % self.steps_per_epoch == 0
        return step == self.total_steps or (every > 0 and step % every == 0) or (every == 0 and at_epoch_end)

    def train(self) -> dict[str, Any]:
        """Train to the end (or early stop), then evaluate the best-on-valid model on test."""
        cfg = self.cfg.train
        progress = None
        if self.env.is_main and cfg.progress:
            from tqdm import tqdm

            progress = tqdm(
                total=self.total_steps,
                initial=self.state["step"],
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )
        # Train losses since the last eval (the eval's train_loss): checkpointed, so a run resumed
        # between two evals reports the same train_loss as an uninterrupted one.
        segment_losses = self.state.setdefault("losses_since_eval", [])
        while self.state["step"] < self.total_steps and not self.state["stopped_early"]:
            step = self.state["step"]
            epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
            end = self._next_boundary(step)
            self.model.train()
            t0 = time.perf_counter()
            with self.train_loader.iter_epoch(epoch, start_batch=batch_in_epoch) as epoch_batches:
                batches = itertools.islice(epoch_batches, end - step)
                while True:
                    try:
                        loss, _, _, _ = self.pipeline.progress(batches)
                    except StopIteration:
                        break
                    segment_losses.append(float(loss))
                    self.state["step"] += 1
                    if progress is not None:
                        progress.update(1)
                        if self.state["step"] % max(1, cfg.log_every) == 0:
                            progress.set_postfix(loss=f"{np.mean(segment_losses[-cfg.log_every :]):.4f}")
            self.state["train_seconds"] += time.perf_counter() - t0
            self.state["examples"] += (self.state["step"] - step) * self.cfg.data.batch_size
            if self.state["step"] != end:
                raise RuntimeError(f"train loader ended at step {self.state['step']}, expected {end}")

            step = self.state["step"]
            at_eval = self._is_eval_step(step)
            train_loss = float(np.mean(segment_losses)) if segment_losses else float("nan")
            if at_eval:
                segment_losses.clear()  # before any checkpoint of this step
            if self.cfg.train.stage == "search" and (
                at_eval or step == 1 or (self._control_every() and step % self._control_every() == 0)
            ):
                # Search work between steps (s optimizer sync, controller, kept counts, snapshot
                # masks) is training time: counted in train_seconds, the validation AUC is not.
                t0 = time.perf_counter()
                self._sync_s_optimizer(step)
                if step != 1 or at_eval:
                    self._search_control(step)
                self.state["train_seconds"] += time.perf_counter() - t0 - self._control_eval_seconds
            if at_eval:
                self._eval_and_select(train_loss)
            elif cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0:
                self._save_checkpoint()
        if progress is not None:
            progress.close()
        return self._finish()

    def _eval_and_select(self, train_loss: float) -> None:
        step = self.state["step"]
        valid = self.evaluate("valid")
        best_auc = self.state["best_valid_auc"]
        improved = best_auc is None or valid.auc > best_auc
        if improved:
            self.state.update(
                best_valid_auc=valid.auc, best_valid_logloss=valid.logloss, best_step=step, evals_since_best=0
            )
        else:
            self.state["evals_since_best"] += 1
        patience = self.cfg.train.patience
        # A search is driven by its budgets, not by valid AUC (which falls as it prunes).
        if patience > 0 and self.cfg.train.stage != "search" and self.state["evals_since_best"] >= patience:
            self.state.update(stopped_early=True, stop_reason="patience")
        seconds = self.state["train_seconds"]
        record = {
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "train_loss": train_loss,
            "valid_auc": valid.auc,
            "valid_logloss": valid.logloss,
            "best_valid_auc": self.state["best_valid_auc"],
            "examples_per_sec": self.state["examples"] / seconds if seconds > 0 else None,
            "train_seconds": seconds,
        }
        if self.cfg.train.stage == "search":
            record.update(self._search_record())
        self._log_metrics(record)
        # Checkpoint every improvement (the model we will test) and on the checkpoint schedule.
        every = self.cfg.train.checkpoint_every
        if improved or (every > 0 and step % every == 0) or self.state["stopped_early"]:
            self._save_checkpoint()

    def _search_control(self, step: int) -> None:
        """Put the kept share on schedule (controller, or gk_growth), count the kept elements, then
        snapshot every budget just reached. The only whole-table work of a search: at evals."""
        assert self.pep is not None
        self._control_eval_seconds = 0.0
        target = self.pep.target_share(step)
        if target is not None:
            self.state["gk"] = self.pep.set_kept_share(target)
        elif self.cfg.pep.gk_growth > 0:
            since = step - self.state.get("gk_step", 0)
            self.pep.module.gk = float(self.pep.module.gk) * self.cfg.pep.gk_growth**since
            self.state.update(gk=self.pep.module.gk, gk_step=step)
        self._kept_by_table = self.pep.kept_by_table()
        kept = sum(self._kept_by_table.values())
        self.state["kept"] = kept
        done = {snap["budget"] for snap in self.state["snapshots"]}
        reached = [
            (count, budget) for count, budget in self.pep.budgets if budget not in done and kept <= count
        ]
        if reached:
            t0 = time.perf_counter()
            valid_auc = self.evaluate("valid").auc
            self._control_eval_seconds = time.perf_counter() - t0
            for count, budget in reached:
                self.state["snapshots"].append(
                    self.pep.snapshot(budget, count, step=step, valid_auc=valid_auc, kept_now=kept)
                )
            self._save_checkpoint()  # the weights and gk the snapshot's masks were ranked with
        if self.cfg.pep.stop_after_budgets and len(self.state["snapshots"]) == len(self.pep.budgets):
            self.state.update(stopped_early=True, stop_reason="budgets_reached")

    def _search_record(self) -> dict[str, Any]:
        """What a search eval adds to metrics.jsonl (the kept counts `_search_control` took at this
        eval: no second scan)."""
        assert self.pep is not None
        by_table = self._kept_by_table
        kept = sum(by_table.values())
        return {
            "kept": kept,
            "kept_share": kept / self.pep.total,
            "kept_by_table": by_table,
            "gk": self.state["gk"],
            "snapshots": len(self.state["snapshots"]),
        }

    @torch.no_grad()
    def evaluate(self, split: str) -> EvalResult:
        """AUC / logloss on `split` over every rank's examples (gathered, so exact for any world size)."""
        self._average_batchnorm_stats()
        model = self.pipeline.detach()  # plain (non-pipelined) forward for eval
        model.eval()
        logits, labels, weights = [], [], []
        for batch in self.eval_loaders[split]:
            batch = batch.to(self.env.device)
            _, (_, batch_logits, batch_labels, batch_weights) = model(batch)
            logits.append(batch_logits.float().cpu())
            labels.append(batch_labels.float().cpu())
            weights.append(batch_weights.float().cpu())
        model.train()
        local = torch.stack([torch.cat(logits), torch.cat(labels), torch.cat(weights)])
        gathered = _all_gather_ragged(local, self.env)
        z, y, w = (gathered[i].double().numpy() for i in range(3))
        return EvalResult(auc=roc_auc(y, z, w), logloss=log_loss(y, z, w), examples=int(w.sum()))

    def _kept_params(self, total: int) -> int:
        if self.cfg.train.stage == "search":
            return self.state["kept"] if self.state["kept"] is not None else total
        if self.cfg.train.stage == "retrain":
            return int(self.pep.mask_meta["kept"])
        return total

    def _finish(self) -> dict[str, Any]:
        best = self.state["best_step"]
        if best is None:
            raise RuntimeError("no evaluation ran; nothing to select")
        if self.cfg.train.stage == "search":
            best = self.state["step"]  # a search's product is its masks; report the final model
            if best not in self.checkpoints.steps():
                self._save_checkpoint()
        if best != self.state["step"]:
            # Model selection on valid: test the best-on-valid checkpoint, not the last weights.
            state = self._checkpoint_state()
            self.checkpoints.load(best, state)
            self.model.load_state_dict(state["model"])
        test = self.evaluate("test")
        valid = self.evaluate("valid")
        total = embedding_params_total(self.schema, self.cfg.model.embedding_dim)
        seconds = self.state["train_seconds"]
        summary = {
            "stage": self.cfg.train.stage,
            "dataset": self.schema.dataset,
            "model": self.cfg.model.name,
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "steps": self.state["step"],
            "steps_per_epoch": self.steps_per_epoch,
            "best_step": best,
            "stopped_early": self.state["stopped_early"],
            "examples_per_sec": self.state["examples"] / seconds if seconds > 0 else None,
            "train_seconds": seconds,
            "valid_auc": valid.auc,
            "valid_logloss": valid.logloss,
            "test_auc": test.auc,
            "test_logloss": test.logloss,
            "test_examples": test.examples,
            "embedding_params_total": total,
            "embedding_params_kept": self._kept_params(total),
            "stop_reason": self.state["stop_reason"],
            "sharding": self.plan_report.tables(),
            "versions": _versions(),
        }
        if (
            self.cfg.train.stage != "search"
            and best == self.state["step"]
            and not self.state["stopped_early"]
        ):
            # The last eval was the best: valid was still improving when the epochs ran out.
            summary["still_improving"] = True
            logger.warning(
                "valid AUC was still improving at the last eval (step %d, %.4g epochs): the model may "
                "be undertrained; raise train.epochs or the learning rate",
                best,
                best / self.steps_per_epoch,
            )
        if self.cfg.train.stage == "search":
            summary["snapshots"] = self.state["snapshots"]
            summary["gk"] = self.state["gk"]
        elif self.cfg.train.stage == "retrain":
            summary["mask"] = str(self.cfg.pep.mask)
            summary["reinit"] = self.cfg.pep.reinit
            summary["nonzero_embedding_params"] = self.pep.nonzero_v()
        if self.env.is_main:
            self.run.write_summary(summary)
        self._barrier()
        return summary


def _all_gather_ragged(local: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate [C, n_r] tensors from every rank along dim 1 (n_r may differ)."""
    if env.world_size == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([local.shape[1]], dtype=torch.int64))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(local.shape[0], longest, dtype=local.dtype)
    padded[:, : local.shape[1]] = local
    chunks = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:, : int(s.item())] for c, s in zip(chunks, sizes)], dim=1)


def _versions() -> dict[str, str]:
    import torchrec

    import pep_torchrec

    out = {
        "pep_torchrec": pep_torchrec.__version__,
        "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", "unknown"),
    }
    try:
        import fbgemm_gpu

        out["fbgemm_gpu"] = getattr(fbgemm_gpu, "__version__", "unknown")
    except ImportError:
        pass
    return out
