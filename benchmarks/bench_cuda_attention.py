"""Timings of the CuPy attention kernels (ggml_py/cuda/attention.cu) on the GPU.

    python benchmarks/bench_cuda_attention.py [--quick] [--sweep] [--old DIR] [--precompile]

Decode (n = 1) at kv_len 128 / 1024 / 8192 and prefill (n = 512 over kv 512, causal) for the
SmolLM2-135M, Gemma-3-1B and Llama-3-8B attention shapes, f16 pages of 16 slots, block tables
sized for an 8192-token context (the grids stay those of the captured decode graph, only
kv_len changes). Each timing replays a CUDA graph of NL calls, each over its own layer's pages
(more bytes than the L2 cache holds, as in a real model), and reports the median per call
(CUDA events, after warm-up). Decode GB/s counts the K, V and position bytes below kv_len
once; prefill TFLOP/s counts 2 FLOPs per multiply-add of q.k and p.v over the visible
(causal) pairs only.

--sweep: decode variants around the defaults: split_keys (fewest keys per split), one-level
combine / flat_max, the cp.async kernel ("tc") instead of bulk copies ("tcb"), grid sizes.
--old DIR: also time the attention_ops.py / attention.cu found in DIR (e.g. the previous
version, `git show <rev>:ggml_py/cuda/attention.cu > DIR/attention.cu`, same for
attention_ops.py) on the same pages, for a before/after table.
--precompile: compile every module variant the benchmark and the tests use, in parallel
processes (fills CuPy's on-disk cache), and exit.

Measured on an H100 80GB HBM3 (SM clock 1977 MHz under load, device copy 2708 GB/s), 2026-11-24,
`--old <split+reduce version> --sweep --no-prefill`; decode, us per call, f16 pages:

| shape (H/Hkv/d)        | kv 128 before / after | kv 1024 before / after | kv 8192 before / after |
|------------------------|-----------------------|------------------------|------------------------|
| SmolLM2 (9/3/64)       |  7.20 /  6.63         |  7.33 /  8.61          | 10.86 / 13.20          |
| Gemma-3 (4/1/256)      | 12.85 /  7.58         | 13.31 / 12.52          | 14.16 / 19.09          |
| Llama-8B (32/8/128)    |  9.84 /  7.60         | 10.59 / 11.12          | 22.80 / 23.47          |

What bounds it: one block streams K/V at only ~10-25 GB/s (a 64-key tile round trip is ~5 us
with 1-3 tiles in flight per block; sequential pages change nothing), so time goes with the
keys per block and with the partials one block has to read back. Bulk copies (tcb) beat
cp.async (tc) by up to 2x (Gemma kv 128: 15.6 -> 7.6 us); the two-level combine beats one
level at 8192 (Gemma 39.4 -> 19.1 us). An empty block costs too: at kv 128 Llama's 264-block
grid runs 0.8 us slower than a 128-block one (both use one split): the working blocks (split
0 of each kv head) are dispatched last in a (splits, Hkv) grid.
"""
from __future__ import annotations

import argparse
import importlib.util
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


def load_old(path: str):
    """attention_ops.py of another version (DIR/attention_ops.py + DIR/attention.cu), compiled apart."""
    import cupy

    from ggml_py.cuda import compile as comp
    src = (Path(path) / "attention.cu").read_text()
    if comp.COMMON in src:                      # a version that includes common.cuh: splice it, as load_module does
        common = Path(path) / "common.cuh"
        src = src.replace(comp.COMMON, (common if common.exists() else comp.HERE / "common.cuh").read_text(), 1)
    spec = importlib.util.spec_from_file_location("ggml_py.cuda._attention_old", Path(path) / "attention_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cache: dict = {}
    real = comp.load_module

    def load(name, options=()):
        if name != "attention":
            return real(name, options)
        opts = comp.DEFAULT_OPTIONS + tuple(options)
        m = cache.get(opts)
        if m is None:
            m = cache[opts] = cupy.RawModule(code=src, options=opts, backend="nvrtc")
            m.compile()
        return m

    class Old:                                  # plan_attention with the old sources swapped in
        module = mod

        @staticmethod
        def plan_attention(*a, **k):
            comp.load_module = load
            try:
                return mod.plan_attention(*a, **k)
            finally:
                comp.load_module = real

        attention_scratch_bytes = staticmethod(mod.attention_scratch_bytes)
        num_splits = staticmethod(mod.num_splits)
    return Old


def decode_setup(cp, H, hkv, dk, dtype, rng):
    dv = dk
    per_layer = MAX_CTX * hkv * (dk + dv) * (2 if dtype == "f16" else 4)
    nl = int(max(4, min(32, -(-400_000_000 // per_layer))))
    lay = Layers(cp, nl, hkv, dk, dv, dtype, MAX_CTX, rng)
    stream = cp.cuda.Stream(non_blocking=True)
    q = cp.asarray(rng.standard_normal((1, H, dk), np.float32))
    out = cp.empty((1, H * dv), cp.float32)
    kv_len = cp.zeros(1, cp.int32)
    q_pos = cp.full(1, MAX_CTX, cp.int32)
    return dict(nl=nl, lay=lay, stream=stream, q=q, out=out, kv_len=kv_len, q_pos=q_pos, H=H, hkv=hkv, dk=dk,
                dtype=dtype)


def decode_steps(cp, S, mod=None, **knobs):
    """NL planned decode steps (one per layer) of module ``mod`` (default: the current attention_ops)."""
    mod = mod or ao
    lay, H, hkv, dk = S["lay"], S["H"], S["hkv"], S["dk"]
    splits = knobs.get("splits")
    nb = mod.attention_scratch_bytes(1, H, dk, MAX_CTX, hkv, PAGE)
    if splits is not None:
        nb = max(nb, ao._partials_bytes(splits, H, dk) + 4096)
    scratch = cp.empty(nb, cp.uint8)
    S.setdefault("keep", []).append(scratch)
    return [mod.plan_attention(S["q"], lay.k[i], lay.v[i], lay.pos[i], lay.bt, S["kv_len"], S["q_pos"], S["out"],
                               dk ** -0.5, 0, 0.0, S["stream"], scratch, **knobs) for i in range(S["nl"])]


def time_decode(cp, S, steps, L, reps, between=None):
    """Median us per call of the NL steps at kv_len L (``between``: a step launched before each)."""
    def run():
        for s in steps:
            if between is not None:
                between()
            s()
    S["kv_len"].fill(L)
    cp.cuda.runtime.deviceSynchronize()
    return time_graph(cp, S["stream"], run, reps) / S["nl"] * 1e3


def decode_row(S, name, tag, L, us):
    nbytes = L * S["hkv"] * 2 * S["dk"] * (2 if S["dtype"] == "f16" else 4) + L * 4
    return (f"decode {name} {S['dtype']} {tag}", L, us, nbytes / (us * 1e-6) / 1e9, "GB/s")


def bench_decode(cp, name, H, hkv, dk, dtype, kv_lens, reps, rng, old=None, sweep=False, summary=None):
    S = decode_setup(cp, H, hkv, dk, dtype, rng)
    rows = []
    new = decode_steps(cp, S)
    kvb = 2 if dtype == "f16" else 4
    kind = ("tcb" if ao.bulk_copies_ok(PAGE) else "tc") if kvb == 2 else "fma"
    grid = ao.default_splits(hkv, S["lay"].max_pages, ao.decode_kernel_smem(kind, kvb, dk, dk, H // hkv)[1])
    sk = ao.default_split_keys(hkv, H // hkv, dk, dk, kvb)
    olds = decode_steps(cp, S, old) if old is not None else None
    for L in kv_lens:
        us = time_decode(cp, S, new, L, reps)
        rows.append(decode_row(S, name, f"fused default grid={grid} sk={sk}", L, us))
        if summary is not None:
            summary.setdefault((name, dtype, L), {})["after"] = us
        if olds is not None:
            us_old = time_decode(cp, S, olds, L, reps)
            rows.append(decode_row(S, name, "OLD split+reduce", L, us_old))
            if summary is not None:
                summary[(name, dtype, L)]["before"] = us_old
    if sweep and dtype == "f16":
        full = ao.num_splits(hkv, S["lay"].max_pages)
        variants = [(f"sk={k}", dict(split_keys=k)) for k in (64, 128, 256) if k != sk]
        variants += [("one-level combine", dict(flat_max=4096)), ("flat_max=8", dict(flat_max=8)),
                     ("tc (cp.async)", dict(decode_kernel="tc"))]
        variants += [(f"grid={g}", dict(splits=g)) for g in sorted({16, 24, 33, 48, 64, full}) if g != grid]
        for tag, kn in variants:
            st = decode_steps(cp, S, **kn)
            for L in kv_lens:
                rows.append(decode_row(S, name, f"sweep {tag}", L, time_decode(cp, S, st, L, reps)))
    del S
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


def sm_clock_mhz(cp) -> float:
    """SM clock while busy: cycles a spinning kernel counts (clock64) over the time events measure."""
    k = cp.RawKernel(r'''extern "C" __global__ void spin(long long n, long long* out) {
        long long t0 = clock64(), t = t0;
        while (t - t0 < n) t = clock64();
        if (threadIdx.x == 0) out[blockIdx.x] = t - t0; }''', "spin")
    out = cp.zeros(132, cp.int64)
    n = 20_000_000
    k((132,), (32,), (np.int64(n), out))
    cp.cuda.runtime.deviceSynchronize()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record()
    k((132,), (32,), (np.int64(n), out))
    b.record()
    b.synchronize()
    return n / (cp.cuda.get_elapsed_time(a, b) * 1e3)


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


def precompile(old: str | None) -> None:
    """Compile the module variants of this benchmark and of tests/test_cuda_attention.py in parallel."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = []
    for kvb in (2, 4):
        for d in (64, 128, 256):
            jobs.append((None, kvb, d))
            if old:
                jobs.append((old, kvb, d))
    with ProcessPoolExecutor(8) as ex:
        for r in ex.map(_compile_one, jobs):
            print(r, flush=True)


def _compile_one(job):
    import time
    path, kvb, d = job
    t = time.time()
    m = load_old(path).module if path else ao
    opts = (f"-DATTN_KV_F16={int(kvb == 2)}", f"-DATTN_DK={d}", f"-DATTN_DV={d}", f"-DATTN_PAGE={PAGE}",
            f"-DATTN_DEC_STAGES={m.decode_stages(kvb, d, d)}", f"-DATTN_DEC_TC_STAGES={m.decode_tc_stages(d, d)}")
    import cupy

    from ggml_py.cuda import compile as comp
    src = (Path(path) / "attention.cu").read_text()
    if comp.COMMON in src:                      # a version that includes common.cuh: splice it, as load_module does
        common = Path(path) / "common.cuh"
        src = src.replace(comp.COMMON, (common if common.exists() else comp.HERE / "common.cuh").read_text(), 1) if path else comp.cu_path("attention").read_text()
    cupy.RawModule(code=src, options=comp.DEFAULT_OPTIONS + opts, backend="nvrtc").compile()
    return f"compiled {path or 'current'} kvb={kvb} d={d} in {time.time() - t:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no sweeps")
    ap.add_argument("--sweep", action="store_true", help="decode split sweeps, decode in context, prefill tiles")
    ap.add_argument("--old", metavar="DIR", help="also time attention_ops.py + attention.cu from DIR")
    ap.add_argument("--precompile", action="store_true", help="compile the module variants in parallel and exit")
    ap.add_argument("--no-prefill", action="store_true", help="decode only")
    args = ap.parse_args()
    if args.precompile:
        precompile(args.old)
        return
    import cupy as cp

    reps = 20 if args.quick else 50
    rng = np.random.default_rng(0)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}  SMs: {ao.num_sms()}", flush=True)
    old = load_old(args.old) if args.old else None
    rows = [bench_copy(cp, reps)]
    print(f"SM clock under load: {sm_clock_mhz(cp):.0f} MHz", flush=True)
    summary: dict = {}
    for name, (H, hkv, dk) in SHAPES.items():
        k0 = len(rows)
        rows += bench_decode(cp, name, H, hkv, dk, "f16", (128, 1024, 8192), reps, rng, old, args.sweep, summary)
        for r in rows[k0:]:
            print(r, flush=True)
    rows += bench_decode(cp, "llama3-8b", 32, 8, 128, "f32", (8192,), reps, rng, old, False, summary)
    if not args.no_prefill:
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
    print(f"| {'case':<52} | {'n / kv':>6} | {'median us':>10} | {'rate':>14} |")
    print(f"|{'-' * 54}|{'-' * 8}|{'-' * 12}|{'-' * 16}|")
    for what, L, us, rate, unit in rows:
        print(f"| {what:<52} | {L:>6} | {us:>10.2f} | {rate:>8.1f} {unit:<7}|")
    if summary:
        print()
        print("decode, us per call (CUDA-graph replays, f16 unless noted):")
        print(f"| {'shape':<22} | {'kv':>5} | {'before':>8} | {'after':>8} |")
        print(f"|{'-' * 24}|{'-' * 7}|{'-' * 10}|{'-' * 10}|")
        for (name, dtype, L), d in summary.items():
            b = f"{d['before']:.2f}" if "before" in d else "-"
            print(f"| {name + ('' if dtype == 'f16' else ' ' + dtype):<22} | {L:>5} | {b:>8} | {d['after']:>8.2f} |")


if __name__ == "__main__":
    main()
