"""What a kernel's first global load costs after another kernel streamed a large buffer (H100):
separates the data path (an L2 miss, a TLB miss) from the instruction path (the kernel's own code
fetched again), the two readings of the ~2 us "A first" stall that every decode launch shows in
benchmarks/trace_decode.py.

    python benchmarks/first_touch.py [--big-gb 4] [--small-mb 128] [--reps 10]

Each scenario runs `reps` times; every block (one a SM) records in SM cycles, on its thread 0:
  first   its first load of x (a line no other load of this kernel touched),
  line2   a second line (one line a block further) (the same page: translation now cached in the SM),
  page2   a line 64 KB further,
  far     a line in another 2 MB page of x,
and the code test records how long a straight run of 4096 multiply-adds in 8 independent chains
(64 KB of SASS) takes, warm, and after other kernels' code and a stream have passed through.
Printed: the median over blocks and repetitions, and the 90th percentile.
"""
from __future__ import annotations

import argparse

import numpy as np

SRC = r"""
extern "C" __global__ void fill(float* x, long long n, float v) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = v + (float)(i & 1023);
}
extern "C" __global__ void stream(const float4* __restrict__ b, long long n4, float* sink) {
    float acc = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
        float4 v = __ldcs(b + i);
        acc += v.x + v.y + v.z + v.w;
    }
    if (acc == -1.2345f) sink[0] = acc;
}
__shared__ float s_sink;
// the clock once v has arrived: the shared store needs v, and a warp issues in order
__device__ __forceinline__ long long clk_after(float v) {
    long long c;
    asm volatile("st.volatile.shared.f32 [%1], %2;\nmov.u64 %0, %%clock64;\n"
                 : "=l"(c) : "r"((unsigned)__cvta_generic_to_shared(&s_sink)), "f"(v) : "memory");
    return c;
}
__device__ __forceinline__ float ldcg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
    return v;
}
// one warp a block; block b's thread 0 reads x at line b (all blocks in x's first page, as the
// decode launches all read one activation buffer), then 256 B on, 64 KB on, 2 MB + its line on
extern "C" __global__ void probe(const float* x, long long* rec, float* sink) {
    if (threadIdx.x != 0) return;
    const float* p = x + blockIdx.x * 32;
    long long c0 = clock64();
    float v1 = ldcg(p);
    long long c1 = clk_after(v1);
    float v2 = ldcg(p + 32 * gridDim.x);
    long long c2 = clk_after(v2);
    float v3 = ldcg(p + 16384);
    long long c3 = clk_after(v3);
    float v4 = ldcg(p + 524288);
    long long c4 = clk_after(v4);
    long long* r = rec + blockIdx.x * 4;
    r[0] = c1 - c0; r[1] = c2 - c1; r[2] = c3 - c2; r[3] = c4 - c3;
    if (v1 + v2 + v3 + v4 == -1.2345f) sink[0] = v1;
}
// the code test: 4096 integer multiply-adds, 8 independent chains (ptxas cannot fold them), straight-line (64 KB of SASS)
#define A8 "mad.lo.u32 %0, %0, %0, %8;\nmad.lo.u32 %1, %1, %1, %8;\nmad.lo.u32 %2, %2, %2, %8;\nmad.lo.u32 %3, %3, %3, %8;\n" \
           "mad.lo.u32 %4, %4, %4, %8;\nmad.lo.u32 %5, %5, %5, %8;\nmad.lo.u32 %6, %6, %6, %8;\nmad.lo.u32 %7, %7, %7, %8;\n"
#define A64 A8 A8 A8 A8 A8 A8 A8 A8
#define A512 A64 A64 A64 A64 A64 A64 A64 A64
template <int V> __device__ __forceinline__ void code_body(long long* rec, unsigned* sink) {
    if (threadIdx.x != 0) return;
    long long c0 = clock64();
    const unsigned s = (unsigned)c0 | (2u * V + 1u);   // (run-time values: nothing for ptxas to fold)
    unsigned r0 = s, r1 = s + 2, r2 = s + 4, r3 = s + 6, r4 = s + 8, r5 = s + 10, r6 = s + 12, r7 = s + 14;
    asm volatile(A512 A512 A512 A512 A512 A512 A512 A512
                 : "+r"(r0), "+r"(r1), "+r"(r2), "+r"(r3), "+r"(r4), "+r"(r5), "+r"(r6), "+r"(r7) : "r"(s));
    long long c1;
    asm volatile("mov.u64 %0, %%clock64;\n" : "=l"(c1) : "r"(r0), "r"(r7));
    rec[blockIdx.x * 4] = c1 - c0;
    if (r0 + r1 + r2 + r3 + r4 + r5 + r6 + r7 == 12345u) sink[0] = r0;
}
// four copies of that code (64 KB of SASS each): code0 is timed, code1-3 push it out of the SMs'
// instruction caches
extern "C" __global__ void code0(long long* rec, unsigned* sink) { code_body<0>(rec, sink); }
extern "C" __global__ void code1(long long* rec, unsigned* sink) { code_body<1>(rec, sink); }
extern "C" __global__ void code2(long long* rec, unsigned* sink) { code_body<2>(rec, sink); }
extern "C" __global__ void code3(long long* rec, unsigned* sink) { code_body<3>(rec, sink); }
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big-gb", type=float, default=4.0)
    ap.add_argument("--small-mb", type=float, default=128.0)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    import cupy as cp
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    fill, stream, probe = (mod.get_function(n) for n in ("fill", "stream", "probe"))
    code = [mod.get_function(f"code{i}") for i in range(4)]
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    clock_khz = cp.cuda.runtime.getDeviceProperties(0)["clockRate"]
    x = cp.zeros(4 << 20, cp.float32)                       # 16 MB: 8 pages of 2 MB
    big = cp.empty(int(args.big_gb * (1 << 30)) // 16 * 4, cp.float32)
    sink = cp.zeros(4, cp.float32)
    rec = cp.zeros(sms * 4, cp.int64)
    small_n4 = int(args.small_mb * (1 << 20)) // 16

    def run_stream(n4):
        stream((sms * 4,), (512,), (big, cp.int64(n4), sink))

    def probe_after(pre):
        out = []
        for _ in range(args.reps):
            fill((sms,), (256,), (x, cp.int64(x.size), cp.float32(1.0)))
            pre()
            probe((sms,), (32,), (x, rec, sink))
            cp.cuda.runtime.deviceSynchronize()
            out.append(rec.get().reshape(sms, 4))
        return np.concatenate(out)

    def others():
        for k in code[1:]:
            k((sms,), (32,), (rec, sink))

    def code_after(pre):
        out = []
        for _ in range(args.reps):
            code[0]((sms,), (32,), (rec, sink))
            pre()
            code[0]((sms,), (32,), (rec, sink))
            cp.cuda.runtime.deviceSynchronize()
            out.append(rec.get().reshape(sms, 4)[:, :1])
        return np.concatenate(out)

    def ns(c):
        return c / clock_khz * 1e6

    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sms} SMs, clock {clock_khz / 1e6:.2f} GHz "
          f"(cycles -> ns at that clock), {args.reps} reps")
    scen = [("right after fill (L2 hit)", lambda: None),
            (f"after streaming {args.small_mb:.0f} MB", lambda: run_stream(small_n4)),
            (f"after streaming {args.big_gb:g} GB", lambda: run_stream(big.size // 4))]
    print("| x's loads after ... | first | line2 (same page) | page2 (+64 KB) | far (+2 MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, pre in scen:
        r = probe_after(pre)
        cells = [f"{ns(np.median(r[:, i])):.0f} / {ns(np.percentile(r[:, i], 90)):.0f}" for i in range(4)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| 4096 straight-line instructions after ... | ns median / p90 |")
    print("|---|---:|")
    for name, pre in [("the same kernel (code warm)", lambda: None),
                      ("three other kernels of 64 KB of code each", others),
                      (f"streaming {args.big_gb:g} GB, then the three others",
                       lambda: (run_stream(big.size // 4), others()))] + scen[1:]:
        r = code_after(pre)
        print(f"| {name} | {ns(np.median(r)):.0f} / {ns(np.percentile(r, 90)):.0f} |")


if __name__ == "__main__":
    main()
