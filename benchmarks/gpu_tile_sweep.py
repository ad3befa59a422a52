"""Tile-size sweep of the Triton threshold_pool kernels on a TBE group (CUDA only): the evidence
behind `threshold_pool_triton.TILE` and its 4 warps.

    python -m benchmarks.gpu_tile_sweep [--out DIR]   → DIR/gpu_tile_sweep.{json,md} (default benchmarks/results)

For each group shape (F = 26 features, float32) and each (elements per tile, warps), the forward and
backward launches alone (no autograd, no allocation: the launchers' kernels on preallocated
buffers), timed with `triton.testing.do_bench` (median, CUDA events), in GB/s of the bytes
`benchmarks.kernel.time_group` counts, against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from pep_torchrec.ops import ThresholdMode, library, row_width
from pep_torchrec.ops import threshold_pool_triton as T

SHAPES = [  # (mode, D, B, P)
    (ThresholdMode.ROW_DIM, 16, 65536, 1), (ThresholdMode.ROW, 16, 65536, 1),
    (ThresholdMode.ROW_DIM, 64, 65536, 1), (ThresholdMode.ROW_DIM, 16, 16384, 20),
    (ThresholdMode.ROW_DIM, 128, 16384, 20),
]  # fmt: skip
TILES = (256, 512, 1024, 2048)
WARPS = (4, 8)


def _with_tile(launch: T.Launch, tile: int, num_bags: int, num_features: int) -> T.Launch:
    block_d = launch.constexprs["BLOCK_D"]
    block_b = max(1, tile // block_d)
    return launch._replace(grid=(triton.cdiv(num_bags, block_b) * num_features,),
                           constexprs={**launch.constexprs, "BLOCK_B": block_b})  # fmt: skip


def sweep(device: torch.device) -> tuple[float, list[dict]]:
    src = torch.empty(2**28, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3) / 1e9
    src = dst = None  # noqa: F841  (free 2 GiB)
    rows_out = []
    features = 26
    for mode, dim, bags, pooling in SHAPES:
        code = library.MODE_CODES[mode]
        width = row_width(dim, mode)
        num_rows = bags * pooling
        rows = torch.randn(num_rows, features * width, device=device) * 0.5
        offsets = torch.arange(0, features * num_rows + 1, pooling, device=device)
        out = torch.empty(bags, features * dim, device=device)
        grad = torch.randn_like(out)
        grad_rows = torch.empty_like(rows)
        nbytes = 4 * (3 * num_rows * features * width + 2 * bags * features * dim)
        fwd = T.forward_launch(rows, offsets, None, None, out, dim, code, 1.0, False, features)
        bwd = T.backward_launch(grad, rows, offsets, None, None, grad_rows, None, None, dim, code, 1.0, False,
                                1e-5, 0.0, features)  # fmt: skip
        for tile in TILES:
            for warps in WARPS:
                f, b = (_with_tile(x, tile, bags, features) for x in (fwd, bwd))

                def run(f=f, b=b, warps=warps) -> None:
                    f.kernel[f.grid](*f.args, **f.constexprs, num_warps=warps)
                    b.kernel[b.grid](*b.args, **b.constexprs, num_warps=warps)

                ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows_out.append({"mode": mode.value, "dim": dim, "bags": bags, "pooling": pooling, "tile": tile,
                                 "block_b": f.constexprs["BLOCK_B"], "warps": warps, "fwd_bwd_ms": ms, "gbs": gbs,
                                 "of_copy": gbs / copy_gbs, "default": tile == T.TILE and warps == 4})  # fmt: skip
                print(f"{mode.value} D={dim} B={bags} P={pooling} tile={tile} warps={warps}: {ms:.3f} ms "
                      f"{gbs:.0f} GB/s ({gbs / copy_gbs:.2f} of copy)", flush=True)  # fmt: skip
        del rows, grad_rows, out, grad
        torch.cuda.empty_cache()
    return copy_gbs, rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_tile_sweep: no CUDA device", file=sys.stderr)
        return 2
    copy_gbs, rows = sweep(torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbs": copy_gbs}  # fmt: skip
    (args.out / "gpu_tile_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Triton threshold_pool tile sweep (TBE group, F = 26, float32, kernels only)", "",
             f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, copy {copy_gbs:.0f} GB/s; "
             "`do_bench` medians of forward + backward launches; * = the shipped default.", "",
             "| mode | D | B | P | tile | BLOCK_B | warps | f+b ms | GB/s | of copy |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['mode']} | {r['dim']} | {r['bags']} | {r['pooling']} | {r['tile']}{'*' if r['default'] else ''} "
                     f"| {r['block_b']} | {r['warps']} | {r['fwd_bwd_ms']:.3f} | {r['gbs']:.0f} | {r['of_copy']:.2f} |")  # fmt: skip
    (args.out / "gpu_tile_sweep.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
