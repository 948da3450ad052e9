"""Timings of the CuPy attention kernels (ggml_py/cuda/attention.cu) on the GPU.

    python benchmarks/bench_cuda_attention.py [--quick]

Decode (n = 1) at kv_len 128 / 1024 / 8192 and prefill (n = 512 over kv 512, causal) for the
SmolLM2-135M, Gemma-3-1B and Llama-3-8B attention shapes, f16 pages of 16 slots, block tables
sized for an 8192-token context (the grids stay those of the captured decode graph, only
kv_len changes). Each timing replays a CUDA graph of NL calls, each over its own layer's pages
(more bytes than the L2 cache holds, as in a real model), and reports the median per call
(CUDA events, after warm-up). Decode GB/s counts the K, V and position bytes below kv_len
once; prefill TFLOP/s counts 2 FLOPs per multiply-add of q.k and p.v over the visible
(causal) pairs only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ggml_py.cuda import attention_ops as ao  # noqa: E402

SHAPES = {"smollm2-135m": (9, 3, 64), "gemma3-1b": (4, 1, 256), "llama3-8b": (32, 8, 128)}
PAGE = 16
MAX_CTX = 8192


def time_graph(cp, stream, fn, reps: int) -> float:
    """Median ms of one replay of a graph capturing fn() (after warm-up)."""
    fn()
    stream.synchronize()
    with stream:
        stream.begin_capture()
        fn()
        g = stream.end_capture()
    for _ in range(3):
        g.launch(stream)
    stream.synchronize()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        g.launch(stream)
        b.record(stream)
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(ts))


class Layers:
    """NL layers of paged K/V (random f16/f32) sharing one scrambled block table."""

    def __init__(self, cp, nl, hkv, dk, dv, dtype, n_ctx, rng):
        self.max_pages = n_ctx // PAGE
        dt = cp.float16 if dtype == "f16" else cp.float32
        shape = (self.max_pages, PAGE, hkv)
        self.k = [cp.random.standard_normal(shape + (dk,), dtype=cp.float32).astype(dt) for _ in range(nl)]
        self.v = [cp.random.standard_normal(shape + (dv,), dtype=cp.float32).astype(dt) for _ in range(nl)]
        bt = rng.permutation(self.max_pages).astype(np.int32)                      # scrambled pages
        j = np.arange(self.max_pages * PAGE)
        pos = np.empty(self.max_pages * PAGE, np.int32)
        pos[bt[j // PAGE] * PAGE + j % PAGE] = j                                     # logical slot j: position j
        self.pos = [cp.asarray(pos.reshape(self.max_pages, PAGE)) for _ in range(nl)]
        self.bt = cp.asarray(bt)


def bench_decode(cp, name, H, hkv, dk, dtype, kv_lens, reps, rng, blocks_per_sm=(2.0,), kernels=(None,),
                 parts=False):
    dv = dk
    per_layer = MAX_CTX * hkv * (dk + dv) * (2 if dtype == "f16" else 4)
    nl = int(max(4, min(32, -(-400_000_000 // per_layer))))
    lay = Layers(cp, nl, hkv, dk, dv, dtype, MAX_CTX, rng)
    stream = cp.cuda.Stream(non_blocking=True)
    q = cp.asarray(rng.standard_normal((1, H, dk), np.float32))
    out = cp.empty((1, H * dv), cp.float32)
    kv_len = cp.zeros(1, cp.int32)
    q_pos = cp.full(1, MAX_CTX, cp.int32)
    rows = []
    for kern in kernels:
        for bps in blocks_per_sm:
            splits = ao.num_splits(hkv, lay.max_pages, blocks_per_sm=bps)
            scratch = cp.empty(ao.attention_scratch_bytes(1, H, dv, MAX_CTX, hkv, PAGE, blocks_per_sm=bps),
                               cp.uint8)
            steps = [ao.plan_attention(q, lay.k[i], lay.v[i], lay.pos[i], lay.bt, kv_len, q_pos, out, dk ** -0.5,
                                       0, 0.0, stream, scratch, splits=splits, decode_kernel=kern)
                     for i in range(nl)]
            variants = [("", steps)]
            if parts:                      # the split kernel alone / the reduce alone
                variants += [(" [split kernel]", [s.parts[0] for s in steps]), (" [reduce]", [s.parts[1] for s in steps])]
            for tag, sts in variants:
                def run(sts=sts):
                    for s in sts:
                        s()
                for L in kv_lens:
                    kv_len.fill(L)
                    cp.cuda.runtime.deviceSynchronize()
                    ms = time_graph(cp, stream, run, reps) / nl
                    nbytes = L * hkv * (dk + dv) * (2 if dtype == "f16" else 4) + L * 4
                    rows.append((f"decode {name} {dtype} {kern or 'auto'} splits={splits}{tag}", L, ms * 1e3,
                                 nbytes / (ms * 1e-3) / 1e9, "GB/s"))
    del lay
    return rows


def bench_prefill(cp, name, H, hkv, dk, dtype, n, reps, rng, variants=((None, None),)):
    dv = dk
    nl = 4
    lay = Layers(cp, nl, hkv, dk, dv, dtype, max(n, 512), rng)
    stream = cp.cuda.Stream(non_blocking=True)
    q = cp.asarray(rng.standard_normal((n, H, dk), np.float32))
    out = cp.empty((n, H * dv), cp.float32)
    kv_len = cp.full(1, n, cp.int32)
    q_pos = cp.arange(n, dtype=cp.int32)                       # causal: query i sees keys 0..i
    scratch = cp.empty(1, cp.uint8)
    rows = []
    for kind, rows_ in variants:
        steps = [ao.plan_attention(q, lay.k[i], lay.v[i], lay.pos[i], lay.bt, kv_len, q_pos, out, dk ** -0.5,
                                   0, 0.0, stream, scratch, prefill_kernel=kind, prefill_rows=rows_)
                 for i in range(nl)]

        def run():
            for s in steps:
                s()
        ms = time_graph(cp, stream, run, reps) / nl
        flops = ao.reference_flops(n * (n + 1) // 2, H, dk, dv)
        rows.append((f"prefill {name} {dtype} {kind or 'auto'} rows={rows_ or 'auto'}", n, ms * 1e3,
                     flops / (ms * 1e-3) / 1e12, "TFLOP/s"))
    return rows


def bench_copy(cp, reps):
    a = cp.ones(1 << 28, cp.uint8)                             # 256 MiB
    b = cp.empty_like(a)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(3):
            cp.copyto(b, a)
        ts = []
        for _ in range(reps):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            cp.copyto(b, a)
            e1.record(stream)
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1))
    ms = float(np.median(ts))
    return ("device copy 256 MiB (read + write)", 0, ms * 1e3, 2 * a.nbytes / (ms * 1e-3) / 1e9, "GB/s")


def bench_kv_store(cp, H, hkv, dk, n, reps, rng):
    """kv_store of n tokens (f16 pages, Llama geometry): GB/s over the f32 read + f16 write."""
    lay = Layers(cp, 1, hkv, dk, dk, "f16", MAX_CTX, rng)
    stream = cp.cuda.Stream(non_blocking=True)
    k = cp.random.standard_normal((n, hkv, dk), dtype=cp.float32)
    v = cp.random.standard_normal((n, hkv, dk), dtype=cp.float32)
    slots = cp.asarray(rng.choice(MAX_CTX, n, replace=False).astype(np.int32))
    pos = cp.arange(n, dtype=cp.int32)
    step = ao.plan_kv_store(k, v, slots, pos, lay.k[0], lay.v[0], lay.pos[0], stream)
    ms = time_graph(cp, stream, step, reps)
    nbytes = n * hkv * dk * 2 * (4 + 2) + n * 12
    return (f"kv_store llama3-8b f16 n={n}", n, ms * 1e3, nbytes / (ms * 1e-3) / 1e9, "GB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no sweeps")
    ap.add_argument("--sweep", action="store_true", help="decode splits and prefill tile sweeps")
    args = ap.parse_args()
    import cupy as cp

    reps = 20 if args.quick else 50
    rng = np.random.default_rng(0)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}  SMs: {ao.num_sms()}", flush=True)
    rows = [bench_copy(cp, reps)]
    for name, (H, hkv, dk) in SHAPES.items():
        k0 = len(rows)
        rows += bench_decode(cp, name, H, hkv, dk, "f16", (128, 1024, 8192), reps, rng)
        if args.sweep:
            rows += bench_decode(cp, name, H, hkv, dk, "f16", (8192,), reps, rng, (1.0, 2.0, 3.0), ("tc", "fma"),
                                 parts=(name == "llama3-8b"))
        for r in rows[k0:]:
            print(r, flush=True)
    if args.sweep:                         # pipeline depth of the tensor-core decode (stages of 64 keys)
        saved = ao._DEC_TC_STAGE_BUDGET
        for budget in (70 * 1024, 145 * 1024):
            ao._DEC_TC_STAGE_BUDGET = budget
            tag = f"stages={ao.decode_tc_stages(128, 128)}"
            for r in bench_decode(cp, "llama3-8b", 32, 8, 128, "f16", (1024, 8192), reps, rng, (1.0, 2.0), ("tc",),
                                  parts=True):
                rows.append((r[0] + " " + tag,) + r[1:])
                print(rows[-1], flush=True)
        ao._DEC_TC_STAGE_BUDGET = saved
    rows += bench_decode(cp, "llama3-8b", 32, 8, 128, "f32", (8192,), reps, rng)
    for name, (H, hkv, dk) in SHAPES.items():
        variants = [(None, None)]
        if args.sweep:
            variants += [("tc", 32), ("fma", None)]
        rows += bench_prefill(cp, name, H, hkv, dk, "f16", 512, reps, rng, variants)
        for r in rows[-len(variants):]:
            print(r, flush=True)
    rows += bench_prefill(cp, "llama3-8b", 32, 8, 128, "f32", 512, reps, rng)
    rows += [bench_kv_store(cp, 32, 8, 128, n, reps, rng) for n in (1, 512)]

    print()
    print(f"| {'case':<44} | {'n / kv':>6} | {'median us':>10} | {'rate':>14} |")
    print(f"|{'-' * 46}|{'-' * 8}|{'-' * 12}|{'-' * 16}|")
    for what, L, us, rate, unit in rows:
        print(f"| {what:<44} | {L:>6} | {us:>10.2f} | {rate:>8.1f} {unit:<7}|")


if __name__ == "__main__":
    main()
