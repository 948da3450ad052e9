"""The Marlin W4A16 GEMM (ggml_py/cuda/marlin_ops.py) against cuBLAS f16 on the same shapes.

    python benchmarks/bench_marlin.py [--types Q4_0,Q4_1,Q4_K] [--ms 1,4,16,32,64,128,512]
                                      [--sweep] [--json out.json]

For M in --ms and (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096)}: the median time of
``C[M, N] = A[M, K] (f16) x W[K, N] (4-bit)`` -- one Marlin launch, CUDA events around
replays of a CUDA graph that holds one launch per weight buffer, enough buffers rotating to
overflow the 50 MB L2 -- the weight bytes read per second, and cuBLAS on f16 weights
(GemmEx: f16 A and W, f32 accumulation, the call cupy.matmul makes, reached
through ctypes so it can be captured) timed the same way; the speedup is cuBLAS / Marlin.
Also the engine's path (f32 A, the kernel the decode graph runs) and the old GGUF GEMV for
M <= 8. Weights are random valid blocks (speed only). ``--sweep`` times several k-splits
(slabs) and tile heights, to check the defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_cuda_quant import random_weight, time_graph  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]      # (K, N)
MS = [1, 4, 16, 32, 64, 128, 512]
ROTATE_BYTES = 160 << 20
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K": 12}


def marlin_weights(cp, mo, tid, N, K):
    w0 = random_weight(cp, tid, N, K, 1)
    m0 = mo.repack(w0)
    cp.cuda.get_current_stream().synchronize()
    del w0
    nbuf = max(3, min(64, math.ceil(ROTATE_BYTES / m0.nbytes)))
    return [m0] + [mo.MarlinWeight(tid, m0.shape, m0.data.copy(), m0.nbytes) for _ in range(nbuf - 1)]


def bench_marlin(cp, mo, ws, M, K, stream, a_dtype="f16", slabs=None, config=None):
    N = ws[0].rows
    a = cp.random.standard_normal((M, K), dtype=cp.float32)
    if a_dtype == "f16":
        a = a.astype(cp.float16)
    out = cp.empty((M, N), cp.float32)
    plans = [mo.MarlinPlan([w], M, a_dtype=a_dtype, slabs=slabs, config=config) for w in ws]
    calls = [p.bind(a, [out], stream) for p in plans]
    t, _ = time_graph(cp, calls, stream)
    return t, plans[0]


def bench_cublas(cp, qo, N, K, M, stream):
    """cuBLAS GemmEx, f16 A and W, f32 accumulation and output, captured in a graph like ours."""
    from benchmarks.bench_cuda_quant import bench_cublas_f16
    return bench_cublas_f16(cp, qo, N, K, M, stream)


def bench_gguf(cp, qo, tid, N, K, M, stream):
    from benchmarks.bench_cuda_quant import bench_mul_mat
    return bench_mul_mat(cp, qo, tid, N, K, M, stream)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_0,Q4_1,Q4_K")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--pdl", action="store_true",
                    help="launch with programmatic dependent launch, as the engine does: back-to-back "
                         "launches then overlap, so the times are not single-kernel times")
    args = ap.parse_args(argv)
    import os
    if not args.pdl:
        os.environ["GGFLAT_PDL"] = "0"
    import cupy as cp
    from ggml_py.cuda import marlin_ops as mo
    from ggml_py.cuda import quant_ops as qo
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# {dev}, {mo.sm_count()} SMs; times in us (median of graph replays, rotating weights); "
          f"PDL {'on (launches overlap)' if args.pdl else 'off'}")
    stream = cp.cuda.Stream(non_blocking=True)
    ms = [int(m) for m in args.ms.split(",")]
    rows = []
    cublas = {}
    for tname in args.types.split(","):
        tid = TYPES[tname]
        print(f"\n## {tname}\n")
        print("| M | K | N | marlin f16 A (us) | GB/s | slabs | cuBLAS f16 (us) | speedup | engine f32 A (us) | GGUF GEMV (us) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for K, N in SHAPES:
            ws = marlin_weights(cp, mo, tid, N, K)
            wbytes = ws[0].nbytes
            for M in ms:
                t, p = bench_marlin(cp, mo, ws, M, K, stream)
                key = (M, K, N)
                if key not in cublas:
                    cublas[key] = bench_cublas(cp, qo, N, K, M, stream)
                tc = cublas[key]
                te = bench_marlin(cp, mo, ws, M, K, stream, a_dtype="f32")[0] if M <= 64 else float("nan")
                tg = bench_gguf(cp, qo, tid, N, K, M, stream) if M <= 8 else float("nan")
                gbs = wbytes / t / 1e9
                print(f"| {M} | {K} | {N} | {t * 1e6:.1f} | {gbs:.0f} | {p.slabs} | {tc * 1e6:.1f} | "
                      f"{tc / t:.2f}x | {te * 1e6:.1f} | {tg * 1e6:.1f} |", flush=True)
                rows.append({"type": tname, "M": M, "K": K, "N": N, "marlin_us": t * 1e6, "gbps": gbs,
                             "slabs": p.slabs, "kernel": p.kernel_name, "cublas_f16_us": tc * 1e6,
                             "engine_f32_us": te * 1e6, "gguf_gemv_us": tg * 1e6})
            if args.sweep:
                for M in (1, 16, 64):
                    res = []
                    for s in (1, 2, 4, 8, 12, 16, 24, 32):
                        if s <= K // 32:
                            try:
                                res.append((bench_marlin(cp, mo, ws, M, K, stream, slabs=s)[0] * 1e6, s))
                            except ValueError:
                                pass
                    print(f"#   sweep {tname} M={M} K={K} N={N}: " +
                          " ".join(f"s{s}={t:.1f}" for t, s in res) + f"  (default {bench_marlin(cp, mo, ws, M, K, stream)[1].slabs})")
                    for cfg in [v for v in mo._VARIANTS if not v.endswith("glu") and
                                mo._VARIANTS[v][0] == mo._config(M) and (tid == 2 or "_s" not in v)]:
                        res = []
                        for s in (None, 4, 8, 16, 32):
                            try:
                                tt, p = bench_marlin(cp, mo, ws, M, K, stream, slabs=s, config=cfg)
                                res.append(f"s{p.slabs}{'*' if s is None else ''}={tt * 1e6:.1f}")
                            except ValueError:
                                pass
                        print(f"#     variant {cfg}: " + " ".join(res))
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    if args.sweep:                                   # an lm head: the steady-state streaming rate
        for tname in args.types.split(","):
            tid = TYPES[tname]
            ws = marlin_weights(cp, mo, tid, 128256, 4096)
            t, p = bench_marlin(cp, mo, ws, 1, 4096, stream)
            tc = bench_cublas(cp, qo, 128256, 4096, 1, stream)
            print(f"# lm head {tname} M=1 K=4096 N=128256: {t * 1e6:.1f} us, {ws[0].nbytes / t / 1e9:.0f} GB/s "
                  f"(slabs {p.slabs}); cuBLAS f16 {tc * 1e6:.1f} us")
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
