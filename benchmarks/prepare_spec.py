"""Throughput of `data prepare --spec criteo` against the built-in Criteo reader, side by side.

The two run alternately on the same file (spec, built-in, spec, built-in, ...) so that the machine's
noise hits both alike; each is timed end to end in-process (both passes, Parquet, vocabulary, report)
and the median of the repeats is reported, with the ratio of the medians (the target: spec within
1.2x of the built-in reader) and the median of the per-pair ratios. The first pair also checks that
both outputs are identical (vocabulary and every split).

Inputs: a generated Criteo-format file (licence-free; `--rows` lines, Zipf-distributed categories,
~3% missing values, written into a temporary directory and deleted after), and the real Criteo sample
`../shared/data/criteo_kaggle_head10k/train_10k.txt.gz` when it is there.

    python -m benchmarks.prepare_spec [--rows 200000] [--repeats 5]

Writes benchmarks/results/prepare_spec.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import SHARED_DATA, machine_info, markdown_table, write_results
from pep_torchrec.data.prepare import prepare_dataset, prepare_from_spec
from pep_torchrec.data.schema import SPLITS

REAL_CRITEO = SHARED_DATA / "criteo_kaggle_head10k" / "train_10k.txt.gz"


def generate_criteo(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` lines of Criteo's layout: label, 13 integers (some negative or missing), 26 hex categories."""
    rng = np.random.default_rng(seed)
    columns = [rng.integers(0, 2, rows).astype(str)]
    for _ in range(13):
        v = np.floor(rng.lognormal(1.5, 2.0, rows)).astype(np.int64) - (rng.random(rows) < 0.02)
        col = v.astype(str)
        col[rng.random(rows) < 0.03] = ""
        columns.append(col)
    for j in range(26):
        ids = rng.zipf(1.3 + 0.02 * j, rows) % 100_000
        col = np.char.mod("%08x", ids * 2654435761 % (1 << 32))
        col[rng.random(rows) < 0.03] = ""
        columns.append(col)
    with open(path, "w") as f:
        block = 50_000
        for start in range(0, rows, block):
            parts = [c[start : start + block] for c in columns]
            lines = parts[0]
            for c in parts[1:]:
                lines = np.char.add(np.char.add(lines, "\t"), c)
            f.write("\n".join(lines.tolist()) + "\n")


def same_output(a: Path, b: Path) -> bool:
    if not pq.read_table(a / "vocab.parquet").equals(pq.read_table(b / "vocab.parquet")):
        return False
    return all(pq.read_table(a / s).equals(pq.read_table(b / s)) for s in SPLITS)


def measure(raw: Path, work: Path, repeats: int) -> dict:
    times: dict[str, list[float]] = {"builtin": [], "spec": []}
    identical = None
    for r in range(repeats):
        order = ("spec", "builtin") if r % 2 == 0 else ("builtin", "spec")
        for kind in order:
            out = work / f"{kind}-{r}"
            t = time.perf_counter()
            if kind == "builtin":
                report = prepare_dataset("criteo", raw, out)
            else:
                report = prepare_from_spec("criteo", [raw], out)
            times[kind].append(time.perf_counter() - t)
        if identical is None:
            identical = same_output(work / "spec-0", work / "builtin-0")
        for kind in order:
            shutil.rmtree(work / f"{kind}-{r}")
    rows = report["rows_read"]
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratios = [s / b for s, b in zip(times["spec"], times["builtin"])]
    return {
        "input": str(raw),
        "bytes": raw.stat().st_size,
        "rows": rows,
        "repeats": repeats,
        "builtin_s": times["builtin"],
        "spec_s": times["spec"],
        "builtin_median_s": med["builtin"],
        "spec_median_s": med["spec"],
        "builtin_rows_per_s": rows / med["builtin"],
        "spec_rows_per_s": rows / med["spec"],
        "ratio_of_medians": med["spec"] / med["builtin"],
        "median_pair_ratio": statistics.median(pair_ratios),
        "identical_output": identical,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the generated Criteo file")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each reader per input")
    parser.add_argument("--name", default="prepare_spec", help="results file name")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="prepare_spec_") as tmp:
        work = Path(tmp)
        generated = work / "criteo_generated.txt"
        generate_criteo(generated, args.rows)
        inputs = [("generated", generated)]
        if REAL_CRITEO.is_file():
            inputs.append(("criteo_kaggle_head10k", REAL_CRITEO))
        for label, raw in inputs:
            result = {"name": label, **measure(raw, work, args.repeats)}
            results.append(result)
            print(
                f"{label}: {result['rows']:,} rows, built-in {result['builtin_median_s']:.3f} s, spec "
                f"{result['spec_median_s']:.3f} s, ratio {result['ratio_of_medians']:.3f} (median pair "
                f"{result['median_pair_ratio']:.3f}), identical output {result['identical_output']}"
            )
    payload = {"machine": machine_info(), "target_ratio": 1.2, "results": results}
    table = markdown_table(results, [
        ("name", "input", ""), ("rows", "rows", ","), ("builtin_median_s", "built-in s (median)", ".3f"),
        ("spec_median_s", "spec s (median)", ".3f"), ("spec_rows_per_s", "spec rows/s", ",.0f"),
        ("ratio_of_medians", "spec / built-in", ".3f"), ("median_pair_ratio", "median pair ratio", ".3f"),
        ("identical_output", "identical output", ""),
    ])  # fmt: skip
    m = payload["machine"]
    md = (f"# `data prepare --spec criteo` vs the built-in Criteo reader\n\n{table}\n\n"
          f"Target: spec within 1.2x of the built-in reader. Median of {args.repeats} alternating runs each, "
          f"end to end in-process (two passes, vocabulary, Parquet, report).\n\n"
          f"{m['date']}, {m['host_cpu']} ({m['cpu_count']} cores, OMP_NUM_THREADS={m['omp_num_threads']}), "
          f"commit {m['git_commit']}, pyarrow {m['versions'].get('pyarrow')}; `{m['command']}`\n")  # fmt: skip
    json_path, md_path = write_results(args.name, payload, md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
