"""What any kernel in a decode graph pays on this GPU, to read the Marlin figures against.

    python benchmarks/bench_floor.py [--mb 9.4,33,66,295] [--pdl]

1. An empty kernel (132 CTAs): the time per launch of a CUDA graph of back-to-back launches,
   i.e. the launch gap a graph node costs before it does anything.
2. A pure read of B bytes (16-byte loads, 8 in flight per thread, grid = SMs x 1/2/4/8 CTAs of 256
   threads), buffers rotating to overflow the 50 MB L2 and timed like bench_marlin.py: the
   fastest any kernel can stream a weight matrix of that size, launch gap included.
With --pdl the launches carry the programmatic-dependent-launch attribute, as the engine's are.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SRC = r"""
extern "C" __global__ void empty_kernel(int* out) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    if (out != nullptr && threadIdx.x == 1024) out[0] = 1;
}

extern "C" __global__ void __launch_bounds__(256) read_floor(const uint4* __restrict__ p, long long n16,
                                                             unsigned* out) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 7 * stride < n16; i += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __ldcs(p + i + j * stride);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    for (; i < n16; i += stride) { uint4 v = __ldcs(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

// the same bytes, each warp streaming its own contiguous share (as a GEMM warp streams its tile)
extern "C" __global__ void __launch_bounds__(256) read_blocked(const uint4* __restrict__ p, long long n16,
                                                               unsigned* out) {
    const long long warps = (long long)gridDim.x * 8, w = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const long long per = (n16 + warps - 1) / warps;
    const long long b = w * per, e = min(n16, b + per);
    unsigned acc = 0;
    long long i = b + (threadIdx.x & 31);
    for (; i + 7 * 32 < e; i += 8 * 32) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __ldcs(p + i + j * 32);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
    for (; i < e; i += 32) { uint4 v = __ldcs(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w; }
    if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", default="9.4,14.2,33,66,295")
    ap.add_argument("--pdl", action="store_true")
    args = ap.parse_args(argv)
    if not args.pdl:
        os.environ["GGFLAT_PDL"] = "0"
    import cupy as cp
    import numpy as np
    from benchmarks.bench_cuda_quant import time_graph
    from ggml_py.cuda.launch import launcher
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    empty, rd = mod.get_function("empty_kernel"), mod.get_function("read_floor")
    rb = mod.get_function("read_blocked")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    stream = cp.cuda.Stream(non_blocking=True)
    out = cp.zeros(sms * 64, cp.uint32)
    pdl = args.pdl
    print(f"# {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, PDL {'on' if pdl else 'off'}")
    calls = [launcher(empty.kernel, (sms,), (256,), (out,), 0, stream, programmatic=pdl) for _ in range(64)]
    print(f"empty kernel, {sms} CTAs: {time_graph(cp, calls, stream, reps=25)[0] * 1e6:.2f} us per launch")
    print("\n| MB | CTAs/SM | us per launch | GB/s |\n|---:|---:|---:|---:|")
    for mb in (float(x) for x in args.mb.split(",")):
        n16 = int(mb * 1e6) // 16
        nbuf = max(3, min(64, math.ceil((160 << 20) / (n16 * 16))))
        bufs = [cp.ones(n16 * 4, cp.uint32) for _ in range(nbuf)]
        for per in (1, 2, 4, 8):
            calls = [launcher(rd.kernel, (sms * per,), (256,), (b, np.int64(n16), out), 0, stream, programmatic=pdl)
                     for b in bufs]
            t = time_graph(cp, calls, stream, reps=25)[0]
            print(f"| {mb:g} | {per} | {t * 1e6:.2f} | {n16 * 16 / t / 1e9:.0f} |", flush=True)
        for per in (1, 2, 4):
            calls = [launcher(rb.kernel, (sms * per,), (256,), (b, np.int64(n16), out), 0, stream, programmatic=pdl)
                     for b in bufs]
            t = time_graph(cp, calls, stream, reps=25)[0]
            print(f"| {mb:g} | {per} (warp-blocked) | {t * 1e6:.2f} | {n16 * 16 / t / 1e9:.0f} |", flush=True)
        del bufs
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
