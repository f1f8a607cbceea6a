"""Does compiling a bucket's Triton tactics in a thread pool pay? Measured without a GPU.

Compiles the Triton GEMM (``kernels/triton_gemm.py``) for a CUDA target (default sm_90, Hopper)
with ``triton.compile`` down to a cubin (Triton's own ptxas), once per tactic of a bucket,
sequentially and then in a thread pool, each in a fresh Triton cache, and prints both wall times
and their ratio. This is the work ``kernels/triton_launch.precompile`` spreads over threads when a
cold bucket is tuned on a GPU; its speedup says how much of Triton's compile runs outside the GIL.

Run: python benchmarks/bench_triton_compile.py [--tiles 8] [--threads 2] [--arch 90]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashtune_compile.kernels.triton_gemm import TILES, _gemm_kernel


def compile_tile(tile: tuple, arch: int) -> float:
    """Seconds to compile the bf16 GEMM kernel for one tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    bm, bn, bk, warps, stages = tile
    names = list(_gemm_kernel.arg_names)
    consts = dict(
        HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=1, PRECISION="ieee", UPCAST=False
    )
    signature = {n: "*bf16" if n.endswith("_ptr") else "fp32" if n in ("alpha", "beta") else "i32" for n in names}
    signature.update(dict.fromkeys(consts, "constexpr"))
    source = ASTSource(_gemm_kernel, signature, {(names.index(k),): v for k, v in consts.items()})
    start = time.perf_counter()
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return time.perf_counter() - start


def timed(tiles: list, arch: int, threads: int) -> float:
    """Wall seconds to compile every tile with ``threads`` threads, in a fresh Triton cache."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        triton.knobs.cache.dir = cache  # knobs read the variable once
        start = time.perf_counter()
        if threads == 1:
            for t in tiles:
                compile_tile(t, arch)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda t: compile_tile(t, arch), tiles))
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=8, help="how many of the GEMM's tiles to compile")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    tiles = list(TILES[: args.tiles])
    compile_tile(tiles[0], args.arch)  # imports and first-use costs out of the way
    machine = f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"{datetime.date.today()} {machine}, triton {triton.__version__}")
    print(f"{len(tiles)} tactics of the Triton GEMM for sm_{args.arch}, bf16; fresh Triton cache per run")
    rows = []
    for _ in range(args.repeats):  # interleaved: sequential, pooled, sequential, pooled
        rows.append((timed(tiles, args.arch, 1), timed(tiles, args.arch, args.threads)))
    print(f"| run | sequential s | {args.threads} threads s | speedup |")
    print("| ---: | ---: | ---: | ---: |")
    for i, (seq, par) in enumerate(rows, 1):
        print(f"| {i} | {seq:.2f} | {par:.2f} | {seq / par:.2f}x |")


if __name__ == "__main__":
    main()
