"""Train-step overhead of PEP on one device without TorchRec: the GPU side of `train_overhead`.

    python -m benchmarks.gpu_train_step [--device cuda|cpu] [--rows 10000] [--repeats 7]
        → benchmarks/results/gpu_train_step.{json,md}

Legend: F = sparse features (one table each), R = rows per table, D = embedding dim, W = stored row
width (2D for `feature_dim`, D + 4 for `feature`), B = batch (one id per feature per sample).

The GPU machine's image has torch + Triton but neither TorchRec nor FBGEMM, so this is the
DLRM-style model of `benchmarks/train_overhead.py` (26 tables, dim 16, batch 4096, 13 dense
features) rebuilt from torch alone, with the F tables stacked in one [F·R, W] parameter as a TBE
stores them:

    base          F.embedding_bag over the [F·R, D] table (one id per bag, sum)
    pep_feature   gather [F·R, D + 4] rows into the TBE output layout [B, F·W], then one
                  `GroupedThresholdPool` call (Triton on CUDA, C++ on CPU), ROW thresholds
    pep_feature_dim  the same with [v | s] rows (W = 2D), ROW_DIM thresholds

then the same MLPs, BCE loss and backward. The table's gradient is sparse (`sparse=True` on the
lookup: only the looked-up rows, as TBE's fused optimizer updates only those) and goes to
`torch.optim.SparseAdam`; the MLPs use `torch.optim.Adam(fused=True)` on CUDA (foreach on CPU).
Steps are timed interleaved (the order rotates every repeat), synchronised, median of repeats; the
ratios are paired: PEP step time / base step time within a repeat, median over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pep_torchrec.ops import ThresholdMode, library, row_width

MODELS = {"base": None, "pep_feature": ThresholdMode.ROW, "pep_feature_dim": ThresholdMode.ROW_DIM}


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StackedTablesModel(nn.Module):
    """F one-id-per-sample sparse features over stacked tables + 13 dense features → one logit."""

    def __init__(self, num_features: int, rows: int, dim: int, mode: ThresholdMode | None,
                 s_init: float = -15.0, device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__()
        self.num_features, self.rows, self.dim, self.mode = num_features, rows, dim, mode
        width = dim if mode is None else row_width(dim, mode)
        # Made on the device: 26 × 10^6 rows × 2D floats is gigabytes, slow to draw on a CPU.
        table = torch.randn(num_features * rows, width, device=device) * 0.01
        if mode is not None:
            table[:, dim:] = s_init  # the s columns (ROW: s and three pads), as PEP initialises them
        self.table = nn.Parameter(table)
        self.bottom = _mlp([13, 64, dim])
        self.top = _mlp([(num_features + 1) * dim, 256, 64, 1])

    def pooled(self, ids_BF: Tensor) -> Tensor:
        """[B, F·D] pooled embeddings of ids [B, F] (row ids within each feature's table)."""
        batch = ids_BF.shape[0]
        global_BF = ids_BF + torch.arange(self.num_features, device=ids_BF.device) * self.rows
        if self.mode is None:
            flat = global_BF.t().reshape(-1)  # feature-major bags, one id each
            offsets = torch.arange(flat.numel(), device=flat.device)
            out_FB_D = F.embedding_bag(flat, self.table, offsets, mode="sum", sparse=True)
            return out_FB_D.view(self.num_features, batch, self.dim).transpose(0, 1).reshape(batch, -1)
        # The TBE output layout the sharded lookup sees: row n holds every feature's n-th id.
        rows_all = F.embedding(global_BF.reshape(-1), self.table, sparse=True).view(batch, -1)  # [B, F·W]
        kjt_offsets = torch.arange(self.num_features * batch + 1, device=ids_BF.device)
        return library.GroupedThresholdPool.apply(
            rows_all, kjt_offsets, None, self.num_features, self.dim, library.MODE_CODES[self.mode],
            1.0, False, 1e-5, 0.0,
        )  # fmt: skip

    def forward(self, dense: Tensor, ids_BF: Tensor) -> Tensor:
        x = torch.cat([self.bottom(dense), self.pooled(ids_BF).to(dense.dtype)], dim=1)
        return self.top(x).squeeze(1)


def time_models(device: torch.device, num_features: int = 26, rows: int = 10_000, dim: int = 16,
                batch: int = 4096, repeats: int = 7, steps: int = 10, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Median ms per train step of each model in `MODELS` (interleaved), and the PEP / base ratios."""
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(batch, 13, generator=gen).to(device),
         torch.randint(0, rows, (batch, num_features), generator=gen).to(device),
         torch.randint(0, 2, (batch,), generator=gen).float().to(device))
        for _ in range(4)
    ]  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {}
    for name, mode in MODELS.items():
        if mode is not None and not library.group_kernel_available(
            device, torch.float32, dim, library.MODE_CODES[mode]
        ):
            raise RuntimeError(f"no grouped threshold_pool kernel on {device}")
        torch.manual_seed(seed)
        model = StackedTablesModel(num_features, rows, dim, mode, device=device).to(device)
        dense_params = [p for n, p in model.named_parameters() if n != "table"]
        optims = (torch.optim.SparseAdam([model.table], lr=1e-3),
                  torch.optim.Adam(dense_params, lr=1e-3, fused=device.type == "cuda"))  # fmt: skip

        def step(i: int, model: nn.Module = model, optims: tuple = optims) -> None:
            dense, ids, labels = batches[i % len(batches)]
            loss = F.binary_cross_entropy_with_logits(model(dense, ids), labels)
            loss.backward()
            for optim in optims:
                optim.step()
                optim.zero_grad(set_to_none=True)

        runs[name] = step
    for fn in runs.values():  # warm-up: Triton compilation, allocator, Adam state
        for i in range(3):
            fn(i)
    sync()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                runs[name](i)
            sync()
            samples[name].append((time.perf_counter() - t0) / steps * 1e3)
    ms = {name: statistics.median(ts) for name, ts in samples.items()}

    def over_base(name: str) -> float:  # paired: the two models' times in the same repeat
        return statistics.median(a / b for a, b in zip(samples[name], samples["base"], strict=True))

    return {
        "device": str(device), "features": num_features, "rows_per_table": rows, "dim": dim,
        "batch": batch, "repeats": repeats, "steps": steps,
        **{f"{name}_step_ms": v for name, v in ms.items()},
        **{f"{name}_over_base": over_base(name) for name in MODELS},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--name", default="gpu_train_step", help="results file stem in benchmarks/results/")
    args = parser.parse_args(argv)
    from benchmarks.common import machine_info, write_results

    result = time_models(torch.device(args.device), rows=args.rows, dim=args.dim, batch=args.batch,
                         repeats=args.repeats, steps=args.steps)  # fmt: skip
    info = machine_info()
    md = "\n".join([
        "# Train-step overhead of PEP without TorchRec (stacked tables, grouped threshold_pool)", "",
        f"{info['date']}, {info['cuda'] or info['host_cpu']}, torch {info['versions']['torch']}, "
        f"threads {info['torch_threads']}, `{info['command']}`.", "",
        f"26 tables x {args.rows} rows x dim {args.dim}, batch {args.batch}, SparseAdam tables + "
        f"{'fused ' if result['device'].startswith('cuda') else ''}Adam MLPs; median of {args.repeats} interleaved "
        f"repeats of {args.steps} steps.", "",
        "| variant | ms/step | / base |", "|---|---|---|",
        *(f"| {name} | {result[name + '_step_ms']:.2f} | {result[name + '_over_base']:.3f} |" for name in MODELS),
        "",
    ])  # fmt: skip
    write_results(args.name, {"machine": info, "result": result}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
