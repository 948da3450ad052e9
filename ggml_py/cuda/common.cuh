// What several kernel files share. compile.load_module splices this text into a source in place of
// the line that includes this file (CuPy caches compiled code by the source text, so an edit here
// reaches every module); nvcc finds the file beside the .cu that includes it.
#pragma once

// Programmatic dependent launch (Hopper): let a kernel launched after this one with the PDL
// attribute (the Marlin GEMM, ggml_py/cuda/launch.py) start its weight loads now; it waits for
// this grid to finish before it reads anything this grid writes.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory")
#else
#define PDL_TRIGGER()
#endif

// %globaltimer (ns): the trace builds' stamps (MARLIN_TRACE, ATTN_TRACE), on one clock across kernels
__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// The gate activations, in the NumPy backend's step order.
// y = x / (1 + exp(-x)): exp overflows to inf for x < -88 and gives -0, never NaN
__device__ __forceinline__ float act_silu(float x) { return x / (1.0f + expf(-x)); }

// 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))   -- ggml_gelu_f32's factorisation
__device__ __forceinline__ float act_gelu(float x) {
    float t = __fmul_rn(x, x);
    t = __fmul_rn(t, 0.044715f);
    t = __fadd_rn(t, 1.0f);
    t = __fmul_rn(t, x);
    t = __fmul_rn(t, 0.79788456080286535587989211986876f);
    t = tanhf(t);
    t = __fadd_rn(t, 1.0f);
    t = __fmul_rn(t, x);
    return __fmul_rn(t, 0.5f);
}

// Ask L2 for bytes [p, p + n): this block's 1/grid share of them, in 4 KB pieces spread over its
// threads, by the copy engine (cp.async.bulk.prefetch.L2: no registers, no shared memory, nothing
// to wait for). For weights that no kernel writes, so no ordering is needed. p must be 16-byte
// aligned (a CuPy allocation is); a last piece shorter than 16 bytes is left out.
__device__ __forceinline__ void l2_prefetch_share(const unsigned char* p, unsigned long long n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n == 0ull) return;
    const unsigned long long nb = (unsigned long long)gridDim.x * gridDim.y * gridDim.z;
    const unsigned long long b = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned long long share = ((n + nb - 1ull) / nb + 4095ull) & ~4095ull;
    const unsigned long long lo = b * share, hi = lo + share < n ? lo + share : n;
    for (unsigned long long o = lo + threadIdx.x * 4096ull; o < hi; o += blockDim.x * 4096ull) {
        const unsigned len = (unsigned)((hi - o < 4096ull ? hi - o : 4096ull) & ~15ull);
        if (len) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" :: "l"(p + o), "r"(len) : "memory");
    }
#endif
}
