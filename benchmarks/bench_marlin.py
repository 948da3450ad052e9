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


def bench_marlin(cp, mo, ws, M, K, stream, a_dtype="f16", slabs=None, config=None, kws=None):
    N = ws[0].rows
    a = cp.random.standard_normal((M, K), dtype=cp.float32)
    if a_dtype == "f16":
        a = a.astype(cp.float16)
    out = cp.empty((M, N), cp.float32)
    plans = [mo.MarlinPlan([w], M, a_dtype=a_dtype, slabs=slabs, config=config, kws=kws) for w in ws]
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


def bench_layer(cp, mo, qo, stream, tid: int = 2) -> None:
    """The four weight launches of a Llama-3-8B decode layer (n = 1) as the engine groups them:
    q/k/v in one launch, gate/up + swiglu, o + residual, down + residual; Marlin against the GGUF
    GEMV kernels, each with enough copies rotating to overflow the L2."""
    from quant_formats import tensor_nbytes
    K, F = 4096, 14336
    groups = {"qkv": [(4096, K), (1024, K), (1024, K)], "gate/up+swiglu": [(F, K), (F, K)],
              "o+residual": [(4096, K)], "down+residual": [(4096, F)]}
    print("\n## One Llama-3-8B decode layer, n = 1 (Q4_0; us per launch)\n")
    print("| launch | weight MB | Marlin | GB/s | GGUF GEMV group | GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    tot_m = tot_g = 0.0
    for name, shapes in groups.items():
        nbytes = sum(tensor_nbytes(tid, s) for s in shapes)
        ncopy = max(3, math.ceil(ROTATE_BYTES / nbytes))
        kw = {"glu": "swiglu"} if "glu" in name else ({"residual": True} if "residual" in name else {})
        x = cp.random.standard_normal((1, shapes[0][1]), dtype=cp.float32)
        outs = [cp.empty((1, s[0]), cp.float32) for s in (shapes[:1] if "glu" in name else shapes)]
        times = []
        for marlin in (True, False):
            calls = []
            for c in range(ncopy):
                gw = [random_weight(cp, tid, s[0], s[1], 7 + c) for s in shapes]
                if marlin:
                    ws = [mo.repack(w) for w in gw]
                    del gw
                    p = mo.plan_gemm(ws, 1, **kw)
                    calls.append(p.bind(x, outs, stream, resid=outs[0] if "residual" in name else None))
                else:
                    gp = qo.plan_mul_mat_group(gw, 1, glu=kw.get("glu"), residual=bool(kw.get("residual")),
                                               max_weight_bytes=None)
                    if gp is None:
                        calls = None
                        break
                    calls.append(gp.bind(x, outs, stream, resid=outs[0] if "residual" in name else None))
            times.append(time_graph(cp, calls, stream)[0] if calls else float("nan"))
            cp.get_default_memory_pool().free_all_blocks()
        tm, tg = times
        tot_m += tm
        tot_g += tg
        print(f"| {name} | {nbytes / 1e6:.1f} | {tm * 1e6:.1f} | {nbytes / tm / 1e9:.0f} | {tg * 1e6:.1f} | "
              f"{nbytes / tg / 1e9:.0f} |", flush=True)
    print(f"| total | | {tot_m * 1e6:.1f} | | {tot_g * 1e6:.1f} | |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_0,Q4_1,Q4_K")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--config", help="force one kernel variant (marlin_ops._VARIANTS, e.g. m1 or d1) for every "
                    "Marlin row, instead of the default choice")
    ap.add_argument("--layer", action="store_true",
                    help="also time one Llama-3-8B decode layer's grouped launches (n = 1), Marlin vs GGUF GEMV")
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
        print("| M | K | N | marlin f16 A (us) | GB/s | split | cuBLAS f16 (us) | speedup | engine f32 A (us) | GGUF GEMV (us) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for K, N in SHAPES:
            ws = marlin_weights(cp, mo, tid, N, K)
            wbytes = ws[0].nbytes
            for M in ms:
                t, p = bench_marlin(cp, mo, ws, M, K, stream, config=args.config)
                key = (M, K, N)
                if key not in cublas:
                    cublas[key] = bench_cublas(cp, qo, N, K, M, stream)
                tc = cublas[key]
                te = (bench_marlin(cp, mo, ws, M, K, stream, a_dtype="f32", config=args.config)[0]
                      if M <= 64 else float("nan"))
                tg = bench_gguf(cp, qo, tid, N, K, M, stream) if M <= 8 else float("nan")
                gbs = wbytes / t / 1e9
                split = f"t{p.tpc}s{p.slabs}" if p.wg else f"{p.kws}x{p.slabs}"     # (warpgroup: tiles a CTA)
                print(f"| {M} | {K} | {N} | {t * 1e6:.1f} | {gbs:.0f} | {p.variant} {split} | {tc * 1e6:.1f} | "
                      f"{tc / t:.2f}x | {te * 1e6:.1f} | {tg * 1e6:.1f} |", flush=True)
                rows.append({"type": tname, "M": M, "K": K, "N": N, "marlin_us": t * 1e6, "gbps": gbs,
                             "slabs": p.slabs, "kernel": p.kernel_name, "cublas_f16_us": tc * 1e6,
                             "engine_f32_us": te * 1e6, "gguf_gemv_us": tg * 1e6})
            if args.sweep:
                for M in (1, 16, 64):
                    res = []
                    for kws in ((1, 2, 4, 8) if M <= 16 else (1,)):
                        for s in (1, 2, 4, 8, 12, 16, 32):
                            if s * kws <= K // 32:
                                try:
                                    res.append((bench_marlin(cp, mo, ws, M, K, stream, slabs=s, kws=kws,
                                                             config=args.config)[0] * 1e6, f"k{kws}s{s}"))
                                except ValueError:
                                    pass
                    res.sort()
                    if M <= 16 and args.config is None:  # slabs reduced in a cluster also for few rows
                        keep = mo.CLUSTER_MIN_ROWS
                        mo.CLUSTER_MIN_ROWS = 0
                        for s in (2, 4, 8, 16):
                            try:
                                res.append((bench_marlin(cp, mo, ws, M, K, stream, slabs=s, kws=1)[0] * 1e6, f"c{s}"))
                            except ValueError:
                                pass
                        mo.CLUSTER_MIN_ROWS = keep
                        res.sort()
                    if M == 1 and tname == "Q4_0" and args.config is None:
                        for v in mo.SWEEP_VARIANTS:
                            if v.startswith(mo._config(1)):
                                res.append((bench_marlin(cp, mo, ws, M, K, stream, config=v)[0] * 1e6, v))
                        res.sort()
                        best = res[0][1]
                        kb, sb = (int(best[1]), int(best[3:])) if best[0] == "k" else (None, None)
                        probes = [f"{v}={bench_marlin(cp, mo, ws, M, K, stream, config=v, slabs=sb, kws=kb)[0] * 1e6:.1f}"
                                  for v in mo.PROBE_VARIANTS]
                        print(f"#   probes at {best} (wrong results; time without the arithmetic / the A window): "
                              + " ".join(probes))
                    p = bench_marlin(cp, mo, ws, M, K, stream, config=args.config)[1]
                    print(f"#   sweep {tname} M={M} K={K} N={N} (best first): " +
                          " ".join(f"{c}={t:.1f}" for t, c in res[:8]) + f"  (default k{p.kws}s{p.slabs})")
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    if args.layer:
        bench_layer(cp, mo, qo, stream)
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
