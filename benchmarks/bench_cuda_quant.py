"""Timings of the quantized mul_mat kernels (ggml_py/cuda/quant_ops.py) on a CUDA device.

    python benchmarks/bench_cuda_quant.py [--types Q4_0,Q4_K] [--sweep] [--json out.json]

For each main type, n in {1, 4, 8, 64, 512} and (K, M) in {(576, 1536), (1536, 576),
(4096, 4096), (4096, 14336), (14336, 4096)} (K-quants only where K % 256 == 0): the median
time of one ``mul_mat`` (CUDA events around replays of a CUDA graph holding one call per
weight buffer; enough buffers rotate that they overflow the 50 MB L2), the weight bytes
read per second, and for comparison on the same shapes: cuBLAS GemmEx on f16 weights in a
graph (rotating weights), and ``cupy.matmul`` on f16 (plain launches: CuPy refuses cuBLAS
calls during a capture, so small shapes measure its Python launch cost). Weights are random valid blocks (random bytes, small
f16 scales): speed only. ``--sweep`` also times the GEMV variants (N, R) x warps for n = 1
and 8 on the large shapes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MAIN = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]
NS = [1, 4, 8, 64, 512]
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)]   # (K, M)
ROTATE_BYTES = 160 << 20          # weight buffers rotated per timing: > 3x the 50 MB L2


def random_weight(cp, tid: int, M: int, K: int, seed: int):
    """A DeviceWeight of random valid blocks, made on the GPU."""
    from ggml_py.cuda.quant_ops import DeviceWeight
    from quant_formats import get_format, tensor_nbytes
    fmt = get_format(tid)
    nbytes = tensor_nbytes(tid, (M, K))
    rs = cp.random.RandomState(seed)
    if tid == 0:
        data = rs.standard_normal((M, K), dtype=cp.float32)
        return DeviceWeight(tid, (M, K), data, nbytes)
    raw = rs.randint(0, 256, nbytes, dtype=cp.int32).astype(cp.uint8)
    if fmt.block_elems > 1:
        blocks = raw.reshape(-1, fmt.block_bytes)
        for f in fmt.fields:
            if f.dtype == "float16":
                off = fmt.field_offset(f.name)
                val = rs.uniform(1e-3, 1e-2, blocks.shape[0]).astype(cp.float16)
                blocks[:, off:off + 2] = val.view(cp.uint8).reshape(-1, 2)
    else:
        raw = rs.uniform(-1, 1, M * K).astype(cp.float16).view(cp.uint8)
    return DeviceWeight(tid, (M, K), raw, nbytes)


def time_graph(cp, calls, stream, reps: int = 15, quiet: bool = False) -> tuple[float, bool]:
    """(median seconds per call, graph?): ``calls`` (zero-argument callables) captured once
    into a CUDA graph and replayed; if the capture fails, timed as plain launches."""
    cp.cuda.Device().synchronize()                    # inputs may have been set on the null stream
    for c in calls[: min(3, len(calls))]:
        c()                                           # warm-up outside the capture
    stream.synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    graph = None
    try:
        stream.begin_capture()
        try:
            for c in calls:
                c()
        finally:
            graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    except Exception as e:                            # capture refused: plain launches
        if not quiet:
            print(f"#   (no graph: {type(e).__name__}: {str(e)[:120]})", flush=True)
        graph = None
        stream.synchronize()
    ts = []
    for _ in range(reps):
        start.record(stream)
        if graph is not None:
            graph.launch(stream)
        else:
            for c in calls:
                c()
        end.record(stream)
        end.synchronize()
        ts.append(cp.cuda.get_elapsed_time(start, end) * 1e-3 / len(calls))
    return float(np.median(ts)), graph is not None


def bench_mul_mat(cp, qo, tid, M, K, n, stream, variant=None, warps=None):
    from quant_formats import tensor_nbytes
    wbytes = tensor_nbytes(tid, (M, K))
    nbuf = max(3, min(64, math.ceil(ROTATE_BYTES / wbytes)))
    w0 = random_weight(cp, tid, M, K, 1)
    ws = [w0] + [type(w0)(tid, w0.shape, w0.data.copy(), w0.nbytes) for _ in range(nbuf - 1)]
    x = cp.random.standard_normal((n, K), dtype=cp.float32)
    out = cp.empty((n, M), cp.float32)
    need = qo.mul_mat_scratch_bytes(w0, n)
    scratch = cp.empty(need, cp.uint8) if need else None
    calls = [qo.plan_mul_mat(w, n, scratch, variant=variant, warps=warps).bind(x, out, stream) for w in ws]
    t, _ = time_graph(cp, calls, stream)
    del ws, calls
    return t, wbytes


def bench_cupy_f16(cp, M, K, n, stream):
    nbuf = max(2, min(64, math.ceil(ROTATE_BYTES / (M * K * 2))))
    w0 = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
    ws = [w0] + [w0.copy() for _ in range(nbuf - 1)]
    x = cp.random.standard_normal((n, K), dtype=cp.float32).astype(cp.float16)
    out = cp.empty((n, M), cp.float16)

    def mk(w):
        def f():
            with stream:
                cp.matmul(x, w.T, out=out)
        return f
    return time_graph(cp, [mk(w) for w in ws], stream)[0]


def bench_cublas_f16(cp, qo, M, K, n, stream):
    """cuBLAS GemmEx on f16 weights and f16 x with f32 accumulation and output (the prefill
    path's GEMM alone), captured in a graph, rotating weights."""
    nbuf = max(2, min(64, math.ceil(ROTATE_BYTES / (M * K * 2))))
    w0 = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
    ws = [w0] + [w0.copy() for _ in range(nbuf - 1)]
    x = cp.random.standard_normal((n, K), dtype=cp.float32).astype(cp.float16)
    out = cp.empty((n, M), cp.float32)
    gemms = [qo._Gemm(w, qo._CUDA_R_16F, x, qo._CUDA_R_16F, out, M, n, K, 0, M, stream) for w in ws]

    def mk(g):
        def f():
            with stream:
                g()
        return f
    return time_graph(cp, [mk(g) for g in gemms], stream)[0]


# the reference models' matrices (type, K, M): SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M
MODEL_SHAPES = [("Q4_1", 576, 192), ("Q4_1", 576, 576), ("Q4_1", 576, 1536), ("Q4_1", 1536, 576),
                ("Q8_0", 576, 49152), ("Q5_0", 640, 1024), ("Q5_0", 640, 2048), ("Q4_K", 1024, 640),
                ("Q4_K", 2048, 640), ("Q6_K", 2048, 640), ("Q8_0", 640, 262144)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(MAIN))
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-types", default="Q4_0,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--sweep-warps", default="1,2,4,8")
    ap.add_argument("--sweep-shapes", default="4096x14336,14336x4096,1536x576")
    ap.add_argument("--no-cublas", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import cupy as cp
    from ggml_py.cuda import quant_ops as qo
    from quant_formats import get_format, tensor_nbytes
    name_to_id = {get_format(t).name: t for t in qo.SUPPORTED_TYPES}
    t0 = time.time()
    qo._module()
    print(f"# compiled quant.cu in {time.time() - t0:.1f} s", flush=True)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"# device: {props['name'].decode()}, {props['multiProcessorCount']} SMs, "
          f"L2 {props['l2CacheSize'] >> 20} MB", flush=True)
    stream = cp.cuda.Stream(non_blocking=True)

    # device-to-device copy rate (read + write), the bandwidth ceiling
    a = cp.empty(1 << 30, cp.uint8)
    b = cp.empty_like(a)
    b.data.copy_from_device_async(a.data, a.nbytes, stream)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(5):
        b.data.copy_from_device_async(a.data, a.nbytes, stream)
    end.record(stream)
    end.synchronize()
    copy_gbs = 2 * 5 * a.nbytes / (cp.cuda.get_elapsed_time(start, end) * 1e-3) / 1e9
    print(f"# D2D copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    del a, b

    rows = []
    ns = [int(v) for v in args.ns.split(",")]
    for tname in args.types.split(","):
        tid = name_to_id[tname]
        qk = get_format(tid).block_elems
        for (K, M) in SHAPES:
            if K % max(qk, 1):
                continue
            for n in ns:
                try:
                    t, wb = bench_mul_mat(cp, qo, tid, M, K, n, stream)
                except Exception as e:
                    print(f"{tname} K={K} M={M} n={n}: FAILED {type(e).__name__}: {e}", flush=True)
                    stream = cp.cuda.Stream(non_blocking=True)
                    continue
                rows.append(dict(type=tname, K=K, M=M, n=n, us=t * 1e6, gbs=wb / t / 1e9,
                                 path=qo._choose(tid, M, K, n).kind))
                print(f"{tname:5s} K={K:5d} M={M:5d} n={n:3d} {t * 1e6:9.2f} us  {wb / t / 1e9:7.0f} GB/s "
                      f"({rows[-1]['path']})", flush=True)

    # cuBLAS f16 reference, once per shape and n
    f16, blas = {}, {}
    if not args.no_cublas:
        for (K, M) in SHAPES:
            for n in ns:
                try:
                    blas[(K, M, n)] = bench_cublas_f16(cp, qo, M, K, n, stream)
                    f16[(K, M, n)] = bench_cupy_f16(cp, M, K, n, stream)
                except Exception as e:
                    print(f"cupy f16 K={K} M={M} n={n}: FAILED {type(e).__name__}: {e}", flush=True)
                    stream = cp.cuda.Stream(non_blocking=True)
                    continue
                print(f"cupy f16 K={K:5d} M={M:5d} n={n:3d} {f16[(K, M, n)] * 1e6:9.2f} us", flush=True)

    model = []
    for (tname, K, M) in MODEL_SHAPES:
        for n in (1, 512):
            try:
                t, wb = bench_mul_mat(cp, qo, name_to_id[tname], M, K, n, stream)
            except Exception as e:
                print(f"model {tname} K={K} M={M} n={n}: FAILED {type(e).__name__}: {e}", flush=True)
                stream = cp.cuda.Stream(non_blocking=True)
                continue
            model.append((tname, K, M, n, t))

    sweep = []
    if args.sweep:
        for tname in args.types.split(","):
            tid = name_to_id[tname]
            variants = qo._MAIN_VARIANTS if tid in qo._MAIN_TYPES else qo._VARIANTS
            if tname not in args.sweep_types.split(","):
                continue
            for (K, M) in [tuple(int(v) for v in sh.split("x")) for sh in args.sweep_shapes.split(",")]:
                if K % get_format(tid).block_elems:
                    continue
                for n in (1, 8):
                    for (N, R) in variants:
                        if N < n or (n == 1 and N != 1) or (n == 8 and N != 8):
                            continue
                        for warps in [int(v) for v in args.sweep_warps.split(",")]:
                            try:
                                t, wb = bench_mul_mat(cp, qo, tid, M, K, n, stream, (N, R), warps)
                            except Exception as e:
                                print(f"sweep {tname} {N},{R} w{warps}: FAILED {e}", flush=True)
                                stream = cp.cuda.Stream(non_blocking=True)
                                continue
                            sweep.append(dict(type=tname, K=K, M=M, n=n, N=N, R=R, warps=warps, us=t * 1e6,
                                              gbs=wb / t / 1e9))
        print("\n## GEMV variant sweep (best per type/shape/n marked *)")
        print("| type | K | M | n | N,R | warps | us | GB/s |")
        print("|---|---:|---:|---:|---|---:|---:|---:|")
        for r in sweep:
            grp = [s for s in sweep if (s["type"], s["K"], s["M"], s["n"]) == (r["type"], r["K"], r["M"], r["n"])]
            best = min(grp, key=lambda s: s["us"]) is r
            print(f"| {r['type']} | {r['K']} | {r['M']} | {r['n']} | {r['N']},{r['R']} | {r['warps']} | "
                  f"{r['us']:.2f}{' *' if best else ''} | {r['gbs']:.0f} |")

    print("\n## reference models' matrices, median us per call (GB/s)")
    print("| type | K | M | n=1 | n=512 |")
    print("|---|---:|---:|---:|---:|")
    for (tname, K, M) in MODEL_SHAPES:
        cells = {m[3]: m[4] for m in model if m[:3] == (tname, K, M)}
        wb = tensor_nbytes(name_to_id[tname], (M, K))
        print(f"| {tname} | {K} | {M} | " + " | ".join(
            f"{cells[n] * 1e6:.1f} ({wb / cells[n] / 1e9:.0f})" if n in cells else "-" for n in (1, 512)) + " |")
    print(f"\n## mul_mat, median us per call (GB/s of weight bytes); D2D copy {copy_gbs:.0f} GB/s")
    print("| type | K | M | " + " | ".join(f"n={n}" for n in ns) + " |")
    print("|---|---:|---:|" + "---:|" * len(ns))
    for tname in args.types.split(","):
        for (K, M) in SHAPES:
            cells = [r for r in rows if r["type"] == tname and (r["K"], r["M"]) == (K, M)]
            if not cells:
                continue
            print(f"| {tname} | {K} | {M} | " + " | ".join(
                f"{r['us']:.1f} ({r['gbs']:.0f})" for r in cells) + " |")
    if blas:
        for (K, M) in SHAPES:
            print(f"| cuBLAS f16 (graph) | {K} | {M} | " + " | ".join(
                f"{blas[(K, M, n)] * 1e6:.1f} ({M * K * 2 / blas[(K, M, n)] / 1e9:.0f})" if (K, M, n) in blas else "-"
                for n in ns) + " |")
    if f16:
        for (K, M) in SHAPES:
            print(f"| cupy.matmul f16 (launches) | {K} | {M} | " + " | ".join(
                f"{f16[(K, M, n)] * 1e6:.1f} ({M * K * 2 / f16[(K, M, n)] / 1e9:.0f})" if (K, M, n) in f16 else "-"
                for n in ns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gbs=copy_gbs, rows=rows, sweep=sweep, model=model,
                                                   blas={f"{k[0]}x{k[1]}n{k[2]}": v for k, v in blas.items()},
                                                   f16={f"{k[0]}x{k[1]}n{k[2]}": v for k, v in f16.items()})))


if __name__ == "__main__":
    main()
