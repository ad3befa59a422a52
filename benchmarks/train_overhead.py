"""Train-step overhead of PEP inside sharded TorchRec, and how it scales with table size.

    OMP_NUM_THREADS=1 python -m benchmarks.train_overhead [--quick] [--json OUT.json] [--threads 1,2]

Variants (the same DLRM, 13 dense features, one 1-rank gloo DMP each, fused Adagrad tables + Adam
dense, synthetic Zipf ids generated here, one id per feature per example like Criteo):
  base             plain TorchRec EmbeddingBagCollection (fused TBE)
  pep_feature      PEPEmbeddingBagCollection, granularity feature (one s per row, rows [v|s|pad])
  pep_feature_dim  granularity feature_dim (rows [v|s], 2D wide)
  whole_table      the original PEP design: threshold the WHOLE [v|s] table every step and look up
                   the thresholded table (dense gradients of v and s, dense Adagrad), unsharded
  search           a whole search run as the shipped search configs run it: feature_dim with its own
                   s optimizer (pep.s_optimizer: sgd, s0 = -10), plus the per-eval work of a search
                   (the s optimizer's sync, gk_growth, the kept-element count over every table: the
                   only whole-table pass) amortised over --eval-every steps. Its ms/step is the
                   interleaved step time + (median per-eval work) / eval_every, so every scan is
                   inside the reported step time. Not included: the snapshot masks (one exact top-K
                   per budget per run: 4 in a run) and the validation evals (the base pays those too).
Steps of all variants are interleaved (variant order rotates every repeat), so machine noise (this
is a shared 2-core box) hits them alike; a variant's time is the median over repeats of the median
step time of a repeat. Ratios are paired: the ratio of two variants' times in the same repeat,
then the median over repeats (a burst of load that spans several repeats then moves both sides of
each ratio, where a ratio of two medians could pair a loaded repeat with a quiet one).

Sections:
  overhead  26 tables x 1e5 rows x dim 16, batch 4096, per thread count (acceptance: 1 thread).
  scaling   table sizes 1e4 ... 1e7 rows (base, both PEP variants, whole-table), all sizes built
            at once and interleaved in the same repeats (so the 1e7 / 1e4 ratio is paired too),
            FEWER TABLES (--scaling-tables, default 2) so that the 1e7-row [v|s] tables +
            element-wise Adagrad state (256 B/row for feature_dim) of every variant fit together in
            this machine's 24 GiB; the whole-table variant is skipped above --whole-table-max-rows.
Writes benchmarks/results/train_overhead.{json,md} (machine, versions, date, config) and, with
--json, the headline keys `pep_feature_over_base`, `pep_feature_dim_over_base`,
`scaling_1e7_over_1e4` (PEP feature_dim step at 1e7 rows / at 1e4) and
`scaling_1e7_over_1e4_relative_to_base` (that ratio / the same ratio of plain TorchRec) to OUT.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from benchmarks.common import machine_info, markdown_table, write_results
from pep_torchrec.data.batch import Batch
from pep_torchrec.distributed.pep_embeddingbag import pep_constraints, pep_modules, pep_sharders
from pep_torchrec.distributed.planning import plan_sharding, shard_model
from pep_torchrec.distributed.s_optimizer import SOptimizerSettings
from pep_torchrec.models import TrainModel, build_model
from pep_torchrec.modules import PEPEmbeddingBagCollection

NUM_DENSE = 13
DIM = 16
FUSED = {"optimizer": None, "learning_rate": 0.01, "eps": 1e-8}
VARIANTS = ("base", "pep_feature", "pep_feature_dim", "whole_table", "search")
EVAL_WORK_REPEATS = 3


def _tables(num_tables: int, rows: int, device: torch.device | None = None) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{i}"])
        for i in range(num_tables)
    ]


class WholeTablePEP(nn.Module):
    """The authors' PEP: every step thresholds the whole [R, D] table (v and s dense parameters),
    then looks up the thresholded table; gradients are dense [R, D] for v and s."""

    def __init__(self, tables: list[EmbeddingBagConfig], s0: float = -15.0) -> None:
        super().__init__()
        self._configs = tables
        self.v = nn.ParameterList([nn.Parameter(torch.randn(t.num_embeddings, DIM) * 0.01) for t in tables])
        self.s = nn.ParameterList([nn.Parameter(torch.full((t.num_embeddings, DIM), s0)) for t in tables])

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = []
        jts = features.to_dict()
        for config, v, s in zip(self._configs, self.v, self.s):
            table = torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))  # whole table, every step
            jt = jts[config.feature_names[0]]
            pooled.append(
                F.embedding_bag(jt.values(), table, jt.offsets(), mode="sum", include_last_offset=True)
            )
        names = [c.feature_names[0] for c in self._configs]
        return KeyedTensor(keys=names, length_per_key=[DIM] * len(names), values=torch.cat(pooled, dim=1))


def _zipf_batches(num_tables: int, rows: int, batch: int, count: int, seed: int, pooling: int) -> list[Batch]:
    """Synthetic batches: ids ~ Zipf(1.1) ranks, scattered over the table by a multiplicative hash
    (hot rows are not neighbours), `pooling` ids per bag."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = batch * pooling
        ranks = rng.zipf(1.1, size=(num_tables, n)) - 1
        ids = (ranks * 2654435761) % rows
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(num_tables)],
            values=torch.from_numpy(ids.reshape(-1).astype(np.int64)),
            lengths=torch.full((num_tables * batch,), pooling, dtype=torch.int32),
        )
        out.append(
            Batch(
                dense_features=torch.from_numpy(rng.standard_normal((batch, NUM_DENSE), dtype=np.float32)),
                sparse_features=kjt,
                labels=torch.from_numpy((rng.random(batch) < 0.25).astype(np.float32)),
                weights=torch.ones(batch),
            )
        )
    return out


class Runner:
    """One variant: model + optimizers + a step function."""

    def __init__(self, variant: str, num_tables: int, rows: int, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.variant = variant
        self.steps = 0
        tables = _tables(num_tables, rows)
        if variant == "whole_table":
            self.model = TrainModel(build_model("dlrm", ebc=WholeTablePEP(tables), num_dense=NUM_DENSE))
            self.opts = [
                torch.optim.Adagrad(self.model.model.ebc.parameters(), lr=0.01),
                torch.optim.Adam([p for n, p in self.model.named_parameters() if ".ebc." not in n], lr=1e-3),
            ]
            return
        meta = torch.device("meta")
        if variant == "base":
            ebc: nn.Module = EmbeddingBagCollection(tables=tables, device=meta)
        elif variant == "search":
            ebc = PEPEmbeddingBagCollection(tables, granularity="feature_dim", s0=-10.0, device=meta)
            ebc.s_optimizer = SOptimizerSettings(lr=0.01)
        else:
            granularity = variant.removeprefix("pep_")
            ebc = PEPEmbeddingBagCollection(tables, granularity=granularity, s0=-15.0, device=meta)
        model = TrainModel(build_model("dlrm", ebc=ebc, num_dense=NUM_DENSE))
        fused = dict(FUSED, optimizer=EmbOptimType.EXACT_ADAGRAD)
        sharders = pep_sharders(fused)
        report = plan_sharding(
            model, sharders=sharders, constraints=pep_constraints(model, {}), world_size=1, local_world_size=1,
            compute_device="cpu", batch_size=batch,
        )  # fmt: skip
        self.model = shard_model(model, plan=report.plan, sharders=sharders, device=torch.device("cpu"))
        dense = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        self.opts = [torch.optim.Adam(dense.values(), lr=1e-3)]

    def eval_work(self) -> float:
        """The search's work at one eval (search variant), in ms: sync the s optimizer, grow gk
        (what the shipped search configs do instead of a controller), count the kept elements."""
        (pep,) = pep_modules(self.model).values()
        t0 = time.perf_counter()
        pep.s_optimizer.sync(self.steps)
        pep.gk = float(pep.gk) * 1.024
        pep.kept_counts()
        return (time.perf_counter() - t0) * 1e3

    def step(self, batch: Batch) -> None:
        self.steps += 1
        loss, _ = self.model(batch)
        loss.backward()
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)


def _interleaved(runners: dict[str, Runner], batches: list[Batch] | dict[str, list[Batch]], repeats: int,
                 steps: int, warmup: int) -> dict:  # fmt: skip
    """Median ms/step per runner: `repeats` rounds, each runner `steps` timed steps per round
    (`batches`: shared, or per runner name); `rounds_ms` keeps every round's median for pairing."""
    batches_of = batches if isinstance(batches, dict) else {name: batches for name in runners}
    for name, runner in runners.items():
        for i in range(warmup):
            runner.step(batches_of[name][i % len(batches_of[name])])
        if runner.variant == "search":
            runner.eval_work()  # the s optimizer's first sync: its steps run at their real scale
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always first
        for name in order:
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                runners[name].step(batches_of[name][(r * steps + i) % len(batches_of[name])])
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times) * 1e3)
    return {name: {"ms_per_step": statistics.median(v), "rounds_ms": v} for name, v in per_round.items()}


def _amortise_eval_work(runners: dict[str, Runner], res: dict, eval_every: int) -> None:
    """Search runners: measure the per-eval work (median of a few) and add it / eval_every to the
    step times, so the reported step of a search run includes every whole-table pass."""
    for name, runner in runners.items():
        if runner.variant != "search":
            continue
        work = statistics.median(runner.eval_work() for _ in range(EVAL_WORK_REPEATS))
        extra = work / eval_every
        res[name] = {
            "ms_per_step": res[name]["ms_per_step"] + extra,
            "rounds_ms": [t + extra for t in res[name]["rounds_ms"]],
            "eval_work_ms": work,
        }


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of num's round time / den's round time (two `_interleaved` entries)."""
    return statistics.median(a / b for a, b in zip(num["rounds_ms"], den["rounds_ms"], strict=True))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced run (< 5 min): fewer repeats and sizes")
    parser.add_argument("--json", type=Path, help="also write the headline ratios here")
    parser.add_argument(
        "--threads", help="comma-separated thread counts (default: $OMP_NUM_THREADS, else 1,2)"
    )
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=1, help="ids per bag")
    parser.add_argument("--scaling-tables", type=int, default=2)
    parser.add_argument("--scaling-rows", default=None, help="default 1e4,1e5,1e6,1e7")
    parser.add_argument("--whole-table-max-rows", type=float, default=1e6,
                        help="skip whole_table above this many rows (at 1e7 it takes ~30 s a step)")  # fmt: skip
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=1000,
        help="search: steps between evals, over which the per-eval work is amortised",
    )
    parser.add_argument("--name", default="train_overhead")
    return parser.parse_args(argv)


def _thread_counts(args: argparse.Namespace) -> list[int]:
    """--threads, else $OMP_NUM_THREADS, else 1 and 2."""
    if args.threads:
        return [int(t) for t in args.threads.split(",")]
    if os.environ.get("OMP_NUM_THREADS"):
        return [int(os.environ["OMP_NUM_THREADS"])]
    return [1, 2]


def _config(
    args: argparse.Namespace,
    threads: list[int],
    scaling_rows: list[int],
    repeats: int,
    steps: int,
    warmup: int,
) -> dict:
    """The run's settings, as recorded in the results JSON."""
    return {
        "tables": args.tables, "rows": args.rows, "dim": DIM, "batch": args.batch, "pooling_factor": args.pooling,
        "num_dense": NUM_DENSE, "threads": threads, "repeats": repeats, "steps_per_repeat": steps, "warmup": warmup,
        "scaling_tables": args.scaling_tables, "scaling_rows": scaling_rows, "whole_table_max_rows": args.whole_table_max_rows,
        "quick": args.quick, "table_optimizer": "fused exact Adagrad (whole_table: dense torch Adagrad)",
        "dense_optimizer": "Adam", "ids": "Zipf(1.1) ranks, hashed over the table",
        "search_eval_every": args.eval_every,
    }  # fmt: skip


def _measure_overhead(
    args: argparse.Namespace, threads: list[int], repeats: int, steps: int, warmup: int, started: float
) -> list[dict]:
    """Every variant at the main shape, interleaved, once per thread count."""
    overhead = []
    batches = _zipf_batches(args.tables, args.rows, args.batch, 8, seed=1, pooling=args.pooling)
    runners = {v: Runner(v, args.tables, args.rows, args.batch) for v in VARIANTS}
    for n in threads:
        torch.set_num_threads(n)
        res = _interleaved(runners, batches, repeats, steps, warmup)
        _amortise_eval_work(runners, res, args.eval_every)
        for v in VARIANTS:
            overhead.append({"threads": n, "variant": v, "ms_per_step": res[v]["ms_per_step"],
                             "over_base": paired_ratio(res[v], res["base"]), "rounds_ms": res[v]["rounds_ms"],
                             "eval_work_ms": res[v].get("eval_work_ms")})  # fmt: skip
        print(f"[{time.perf_counter() - started:.0f}s] overhead threads={n}: "
              + ", ".join(f"{v} {res[v]['ms_per_step']:.1f} ms" for v in VARIANTS), flush=True)  # fmt: skip
    del runners
    gc.collect()
    return overhead


def _measure_scaling(
    args: argparse.Namespace,
    threads: list[int],
    scaling_rows: list[int],
    repeats: int,
    steps: int,
    warmup: int,
    started: float,
) -> tuple[list[dict], dict[str, dict]]:
    """Step time against rows per table (`--scaling-tables` tables), one thread count: the rows and the
    raw `_interleaved` results keyed `variant@rows`."""
    scaling = []
    torch.set_num_threads(threads[0])
    # base too: a lookup into a 1e7-row table misses cache and TLB for plain TorchRec as well,
    # so PEP's own growth with table size is its ratio divided by base's.
    runners, sbatches = {}, {}
    for rows in scaling_rows:
        batches_r = _zipf_batches(args.scaling_tables, rows, args.batch, 8, seed=2, pooling=args.pooling)
        variants = ["base", "pep_feature", "pep_feature_dim"] + (
            ["whole_table"] if rows <= args.whole_table_max_rows else []
        )
        if rows in (min(scaling_rows), max(scaling_rows)):
            variants.append("search")
        for v in variants:
            runners[f"{v}@{rows}"] = Runner(v, args.scaling_tables, rows, args.batch)
            sbatches[f"{v}@{rows}"] = batches_r
    scaling_res = _interleaved(runners, sbatches, repeats, steps, warmup)
    _amortise_eval_work(runners, scaling_res, args.eval_every)
    for key, res_v in scaling_res.items():
        v, rows = key.split("@")
        scaling.append({"rows": int(rows), "variant": v, "ms_per_step": res_v["ms_per_step"],
                        "rounds_ms": res_v["rounds_ms"], "eval_work_ms": res_v.get("eval_work_ms")})  # fmt: skip
    scaling.sort(key=lambda r: (r["rows"], VARIANTS.index(r["variant"])))
    print(f"[{time.perf_counter() - started:.0f}s] scaling: "
          + ", ".join(f"{k} {r['ms_per_step']:.1f} ms" for k, r in scaling_res.items()), flush=True)  # fmt: skip
    del runners
    gc.collect()
    return scaling, scaling_res


def _headline(
    overhead: list[dict], scaling_res: dict[str, dict], threads: list[int], scaling_rows: list[int]
) -> dict[str, Any]:
    """Each variant / base at the first thread count, and (with the scaling run) each variant's step growth
    from the smallest to the largest table."""
    headline: dict[str, Any] = {}
    first = [r for r in overhead if r["threads"] == threads[0]]
    for r in first:
        headline[f"{r['variant']}_over_base"] = r["over_base"]
    if scaling_res:
        lo, hi = min(scaling_rows), max(scaling_rows)

        def growth(v: str) -> float | None:
            both = f"{v}@{hi}" in scaling_res and f"{v}@{lo}" in scaling_res
            return paired_ratio(scaling_res[f"{v}@{hi}"], scaling_res[f"{v}@{lo}"]) if both else None

        for v in VARIANTS:
            if growth(v) is not None:
                headline[f"scaling_{v}_{hi:.0e}_over_{lo:.0e}".replace("+0", "")] = growth(v)
        if growth("pep_feature_dim") is not None:
            headline["scaling_1e7_over_1e4"] = growth("pep_feature_dim")
            if growth("base") is not None:
                # PEP's step growth beyond what the same table sizes cost plain TorchRec.
                headline["scaling_1e7_over_1e4_relative_to_base"] = growth("pep_feature_dim") / growth("base")
        if growth("search") is not None:
            headline["scaling_search_1e7_over_1e4"] = growth("search")
            headline["search_over_base_at_1e7"] = paired_ratio(
                scaling_res[f"search@{hi}"], scaling_res[f"base@{hi}"]
            )
    headline["threads"] = threads[0]
    return headline


def _markdown(
    info: dict, args: argparse.Namespace, threads: list[int], overhead: list[dict], scaling: list[dict],
    headline: dict[str, Any],
) -> str:  # fmt: skip
    return "\n".join([
        "# Train-step overhead of PEP in sharded TorchRec", "",
        f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores, shared), torch {info['versions']['torch']}, "
        f"torchrec {info['versions'].get('torchrec')}, commit {info['git_commit']}, `{info['command']}`.", "",
        f"DLRM, {args.tables} tables x {args.rows:.0e} rows x dim {DIM}, batch {args.batch}, {args.pooling} id/bag, "
        "1-rank gloo DMP, fused Adagrad; median of per-repeat medians, variants interleaved; `/ base` and the "
        "scaling ratios are medians of per-repeat (paired) ratios.", "",
        f"`search`: ms/step includes the per-eval work (column `eval ms`) / {args.eval_every} steps "
        "(`--eval-every`).", "",
        markdown_table(overhead, [("threads", "threads", "d"), ("variant", "variant", ""),
                                  ("ms_per_step", "ms/step", ".1f"), ("over_base", "/ base", ".2f"),
                                  ("eval_work_ms", "eval ms", ".0f")]), "",
        f"## Table scaling ({args.scaling_tables} tables, {threads[0]} thread(s))", "",
        markdown_table(scaling, [("rows", "rows", ".0e"), ("variant", "variant", ""), ("ms_per_step", "ms/step", ".1f"),
                                 ("eval_work_ms", "eval ms", ".0f")]),
        "", "Headline: " + ", ".join(f"{k} = {v:.3f}" for k, v in headline.items() if isinstance(v, float)), "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    repeats, steps, warmup = (3, 3, 2) if args.quick else (7, 5, 3)
    threads = _thread_counts(args)
    scaling_rows = [int(float(r)) for r in (args.scaling_rows or "1e4,1e5,1e6,1e7").split(",")]
    config = _config(args, threads, scaling_rows, repeats, steps, warmup)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    started = time.perf_counter()

    overhead = _measure_overhead(args, threads, repeats, steps, warmup, started)
    scaling: list[dict] = []
    scaling_res: dict[str, dict] = {}
    if not args.skip_scaling:
        scaling, scaling_res = _measure_scaling(args, threads, scaling_rows, repeats, steps, warmup, started)

    headline = _headline(overhead, scaling_res, threads, scaling_rows)
    headline["wall_s"] = time.perf_counter() - started

    info = machine_info()
    payload = {
        "machine": info,
        "config": config,
        "headline": headline,
        "overhead": overhead,
        "scaling": scaling,
    }
    md = _markdown(info, args, threads, overhead, scaling, headline)
    name = args.name + ("_quick" if args.quick else "")
    write_results(name, payload, md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(headline, indent=2) + "\n")
    print(md)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
