"""Every Triton kernel `threshold_pool` can launch, compiled for real GPUs on this CPU machine.

`TRITON_INTERPRET=1` (tests/ops/test_threshold_pool_fused.py) runs the kernels as Python and cannot see
compile errors: a module-level int read inside `@triton.jit` passed every interpreted test and
failed all 126 cases on an H200 (issue 11). Here Triton's whole pipeline (TTIR → TTGIR → LLVM →
PTX → cubin, ptxas included) runs for sm_90 (H100/H200) and sm_80 (A100) on the launches the
launchers build: `threshold_pool_triton.forward_launch` / `backward_launch` are given CPU tensors of
every shape class the code can meet, and Triton's own binder turns each launch into the signature,
constexprs and divisibility attributes a GPU launch would compile. Enumerated:

    mode (5) × rows dtype (fp32, bf16, fp16) × BLOCK_D class (16..128; ROW: 16..1024) × D aligned
    to 16 or not × F ∈ {1, 4, 26} (which changes the divisibility of the row strides)

deduplicated by Triton's cache key (pooling, weights, NEED_* flags, F and the counts are runtime
scalars and do not add kernels). Each arch compiles in a subprocess with a fresh TRITON_CACHE_DIR
(a cached build would hide a broken kernel) and without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from concurrent.futures import ProcessPoolExecutor
    assert "TRITON_INTERPRET" not in os.environ
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from pep_torchrec.ops import row_width
    from pep_torchrec.ops.library import MODE_CODES
    from pep_torchrec.ops import threshold_pool_triton as T

    ARCH = int(sys.argv[1])

    def source(launch, backend):
        # Exactly what JITFunction.run does before compiling (runtime/jit.py: binder, _pack_args).
        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.constexprs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, launch.constexprs, bound,
                                                                  specialization, options)
        return ASTSource(kernel, signature, constexprs, attrs), options

    def launches():
        for threshold_mode, mode in MODE_CODES.items():
            top = T.MAX_ROW_DIM if mode == T.ROW.value else T.MAX_BLOCK_D
            classes = [16 << i for i in range(top.bit_length()) if 16 << i <= top]
            for block_d in classes:
                for dim in (block_d, block_d // 2 + 1):  # D aligned to 16, and not
                    for dtype in (torch.float32, torch.bfloat16, torch.float16):
                        for features in (1, 4, 26):
                            width = row_width(dim, threshold_mode)
                            rows = torch.zeros(2, features * width, dtype=dtype)
                            offsets = torch.arange(2 * features + 1)
                            out = torch.zeros(2, features * dim)
                            coarse = torch.zeros(dim) if mode == T.COARSE.value else None
                            psw = torch.zeros(2 * features)
                            yield T.forward_launch(rows, offsets, coarse, psw, out, dim, mode, 0.5, False, features)
                            yield T.backward_launch(out, rows, offsets, coarse, psw, torch.empty_like(rows),
                                                    None, None, dim, mode, 0.5, True, 0.1, 0.2, features)

    def compile_one(i):
        backend = make_backend(TARGET)
        src, options = source(LAUNCHES[i], backend)
        compiled = triton.compile(src, target=TARGET, options=options.__dict__)
        assert compiled.asm.get("cubin"), f"no cubin for {src.name}"
        return src.name, len(compiled.asm["cubin"])

    TARGET = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(TARGET)
    LAUNCHES, keys = [], set()
    for launch in launches():
        src, options = source(launch, backend)
        key = (src.hash(), str(options.__dict__))
        if key not in keys:
            keys.add(key)
            LAUNCHES.append(launch)

    # A kernel that reads a plain module-level int fails to compile (the H200 failure of issue 11):
    # proof that this pipeline sees what the interpreter cannot.
    import triton.language as tl
    PLAIN_INT = 3
    @triton.jit
    def bad(x_ptr):
        tl.store(x_ptr, PLAIN_INT)
    try:
        triton.compile(ASTSource(bad, {"x_ptr": "*i32"}), target=TARGET)
        raise AssertionError("a kernel reading a non-constexpr global compiled")
    except triton.compiler.errors.CompilationError as err:
        assert "PLAIN_INT" in str(err), err

    if __name__ == "__main__":
        with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            built = list(pool.map(compile_one, range(len(LAUNCHES)), chunksize=4))
        names = sorted({name for name, _ in built})
        print("COMPILED", json.dumps({"arch": ARCH, "kernels": len(built), "names": names}))
    """
)


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_triton_kernels_compile_for_gpu(arch: int, tmp_path: Path) -> None:
    """Every kernel the launchers can build compiles to cubin for `arch` (fresh cache)."""
    script = tmp_path / "compile_kernels.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton_cache"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("COMPILED "))
    report = json.loads(line.removeprefix("COMPILED "))
    assert report["names"] == ["_bwd_kernel", "_fwd_kernel"]
    # 5 modes × 3 dtypes × ≥ 4 block classes × 2 kernels, at the least.
    assert report["kernels"] >= 120, report
