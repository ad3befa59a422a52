"""Planning and sharding: TorchRec's planner, sharders and DistributedModelParallel, configured from
our config tree.

On CPU TorchRec's default EBC sharder refuses row-wise and table-row-wise sharding by policy (its
`sharding_types` lists them for CUDA only); the fused CPU kernel handles them exactly (docs/architecture.md,
F1), so `EBCSharder` lifts that policy instead of patching TorchRec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from pep_torchrec.config import ConfigError, EmbeddingOptimizerConfig, ShardingConfig

SHARDING_TYPES = {t.value for t in ShardingType}
COMPUTE_KERNELS = {"fused", "dense"}
_MODEL_PARALLEL_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")

# Fused TBE optimizers by config name. Adam and LAMB have no CPU implementation in fbgemm.
_FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "lamb": EmbOptimType.LAMB,
}
_GPU_ONLY_OPTIMIZERS = {"adam", "lamb"}


class EBCSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, with row-wise and table-row-wise allowed on CPU as well."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types


def fused_params(cfg: EmbeddingOptimizerConfig, device_type: str) -> dict:
    """The fused TBE optimizer's parameters for `cfg`; refuses GPU-only optimizers on CPU."""
    if cfg.name not in _FUSED_OPTIMIZERS:
        raise ConfigError(
            f"optim.embedding.name: unknown fused optimizer {cfg.name!r}; "
            f"choose from {sorted(_FUSED_OPTIMIZERS)}"
        )
    if cfg.name in _GPU_ONLY_OPTIMIZERS and device_type != "cuda":
        raise ConfigError(
            f"optim.embedding.name: {cfg.name!r} has no CPU kernel in fbgemm (use adagrad or sgd on CPU)"
        )
    params = {"optimizer": _FUSED_OPTIMIZERS[cfg.name], "learning_rate": cfg.lr, "eps": cfg.eps}
    if cfg.weight_decay:
        params["weight_decay"] = cfg.weight_decay
    return params


def make_sharders(cfg: EmbeddingOptimizerConfig, device_type: str) -> list[ModuleSharder[nn.Module]]:
    return [EBCSharder(fused_params=fused_params(cfg, device_type))]


def make_constraints(table_names: list[str], cfg: ShardingConfig) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints: the allowed sharding types and the compute kernel."""
    bad = [t for t in cfg.types if t not in SHARDING_TYPES]
    if bad:
        raise ConfigError(
            f"sharding.types: unknown sharding type {bad[0]!r}; choose from {sorted(SHARDING_TYPES)}"
        )
    if cfg.compute_kernel not in COMPUTE_KERNELS:
        raise ConfigError(
            f"sharding.compute_kernel: {cfg.compute_kernel!r} is not one of {sorted(COMPUTE_KERNELS)}"
        )
    kernels = [cfg.compute_kernel]
    if ShardingType.DATA_PARALLEL.value in cfg.types:
        # Replicated tables are ordinary DDP parameters: dense kernel, stepped by the dense optimizer.
        kernels.append("dense")
    # Without an explicit choice, every model-parallel type is open to the planner; data-parallel
    # is left out because replicated tables cannot use the fused kernel.
    types = list(cfg.types) or [t for t in _MODEL_PARALLEL_TYPES]
    constraints = {}
    for name in table_names:
        kwargs: dict = {"compute_kernels": kernels, "sharding_types": types}
        if cfg.min_partition is not None:
            kwargs["min_partition"] = cfg.min_partition
        constraints[name] = ParameterConstraints(**kwargs)
    return constraints


@dataclass
class PlanReport:
    """What the planner chose, and the memory it costs per rank."""

    plan: ShardingPlan
    options: list[ShardingOption]
    world_size: int

    def per_rank_bytes(self) -> dict[int, dict[str, int]]:
        """rank → {"hbm": bytes, "ddr": bytes} as estimated by the planner (weights, optimizer state,
        input/output buffers)."""
        out: dict[int, dict[str, int]] = {r: {"hbm": 0, "ddr": 0} for r in range(self.world_size)}
        for option in self.options:
            for shard in option.shards:
                if shard.rank is None or shard.storage is None:
                    continue
                out[shard.rank]["hbm"] += int(shard.storage.hbm)
                out[shard.rank]["ddr"] += int(shard.storage.ddr)
        return out

    def tables(self) -> list[dict]:
        rows = []
        for option in self.options:
            ranks = sorted({s.rank for s in option.shards if s.rank is not None})
            rows.append(
                {
                    "table": option.name,
                    "sharding_type": option.sharding_type,
                    "compute_kernel": option.compute_kernel,
                    "shards": len(option.shards),
                    "ranks": ranks,
                    "rows": option.tensor.shape[0],
                    "dim": option.tensor.shape[1],
                }
            )
        return rows

    def format(self) -> str:
        mib = 1024**2
        lines = [
            f"sharding plan for world_size={self.world_size}",
            f"{'table':<28} {'sharding':<16} {'kernel':<8} {'rows':>12} {'dim':>5}  ranks",
        ]
        for row in self.tables():
            ranks = (
                ",".join(map(str, row["ranks"])) if len(row["ranks"]) <= 8 else f"{len(row['ranks'])} ranks"
            )
            lines.append(
                f"{row['table']:<28} {row['sharding_type']:<16} {row['compute_kernel']:<8} "
                f"{row['rows']:>12,} {row['dim']:>5}  {ranks}"
            )
        lines.append("")
        lines.append(
            f"{'rank':>4} {'hbm MiB':>10} {'ddr MiB':>10}   (planner estimate: weights + optimizer + buffers)"
        )
        for rank, mem in self.per_rank_bytes().items():
            lines.append(f"{rank:>4} {mem['hbm'] / mib:>10.2f} {mem['ddr'] / mib:>10.2f}")
        return "\n".join(lines)


def plan_sharding(
    module: nn.Module,
    *,
    sharders: list[ModuleSharder[nn.Module]],
    constraints: dict[str, ParameterConstraints],
    world_size: int,
    local_world_size: int,
    compute_device: str,
    batch_size: int,
    hbm_cap: int | None = None,
    pg: dist.ProcessGroup | None = None,
) -> PlanReport:
    """Run TorchRec's planner. With `pg` the plan is computed on rank 0 and broadcast (every rank
    gets the same plan); without it (dry run) it is computed locally for any `world_size`."""
    captured: list[list[ShardingOption]] = []

    def capture(best: list[ShardingOption]) -> list[ShardingOption]:
        captured.append(best)
        return best

    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        hbm_cap=hbm_cap,
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, callbacks=[capture], debug=False
    )
    if pg is not None:
        plan = planner.collective_plan(module, sharders, pg)
    else:
        plan = planner.plan(module, sharders)
    return PlanReport(plan=plan, options=captured[-1] if captured else [], world_size=world_size)


def shard_model(
    module: nn.Module,
    *,
    plan: ShardingPlan,
    sharders: list[ModuleSharder[nn.Module]],
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
) -> DistributedModelParallel:
    """Wrap `module` in DMP with `plan`; embedding tables are materialised (and initialised by their
    `init_fn`) on the shards that own them."""
    return DistributedModelParallel(
        module, env=None if pg is None else _env(pg), device=device, plan=plan, sharders=sharders
    )


def _env(pg: dist.ProcessGroup):
    from torchrec.distributed.types import ShardingEnv

    return ShardingEnv.from_process_group(pg)
