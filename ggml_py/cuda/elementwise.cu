// Elementwise, normalisation, softmax, RoPE, row gather and argmax kernels of the CuPy backend.
//
// Launched by ggml_py/cuda/elementwise_ops.py (see DESIGN.md in this folder). Every tensor is a
// contiguous float32 (or int32) array; shapes are in NumPy order. The NumPy backend
// (ggml_py/backend_numpy.py) is the specification: the comments say where its order of
// roundings is copied on purpose (the __fmul_rn/__fadd_rn intrinsics keep the compiler from
// contracting a*b+c into one FMA, which would round differently).
//
// Everything a launch needs is a kernel argument fixed at plan time or device memory
// (positions, ids), so every launch can be captured into a CUDA graph.
//
// Compiles with NVRTC (through CuPy) and stand-alone: nvcc -arch=sm_90 --cubin elementwise.cu

typedef long long i64;

#include "common.cuh"

#define EW_FLT_MAX 3.402823466e+38f
#define EW_FLT_TINY 1.175494351e-38f         // smallest normal float (np.finfo(float32).tiny)

// -- binary ops with broadcast -------------------------------------------------------------------
// op: 0 = add, 1 = mul.  The three layouts of b (decided at plan time):
//   same:  b has a's shape                       y[i] = a[i] op b[i]
//   row:   b is a trailing block of nb elements   y[i] = a[i] op b[i % nb]     ((d,) over (n, d))
//   bcast: general NumPy broadcast, a collapsed to <= 4 dims s0..s3, b's strides t0..t3 (0 = broadcast)

__device__ __forceinline__ float ew_binop(float a, float b, int op) {
    return op == 0 ? a + b : a * b;
}

extern "C" __global__ void binary_same_f32(const float* a, const float* b, float* y, i64 n, int op) {
    PDL_TRIGGER();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = ew_binop(a[i], b[i], op);
}

extern "C" __global__ void binary_row_f32(const float* a, const float* b, float* y, i64 n, i64 nb, int op) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = ew_binop(a[i], b[i % nb], op);
}

extern "C" __global__ void binary_bcast_f32(const float* a, const float* b, float* y, i64 n,
                                            i64 s1, i64 s2, i64 s3, i64 t0, i64 t1, i64 t2, i64 t3, int op) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i;
        const i64 i3 = r % s3; r /= s3;
        const i64 i2 = r % s2; r /= s2;
        const i64 i1 = r % s1; r /= s1;
        y[i] = ew_binop(a[i], b[r * t0 + i1 * t1 + i2 * t2 + i3 * t3], op);
    }
}

// -- unary ops and the gated units -----------------------------------------------------------------

extern "C" __global__ void scale_f32(const float* x, float* y, float s, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = x[i] * s;
}

extern "C" __global__ void silu_f32(const float* x, float* y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = act_silu(x[i]);
}

extern "C" __global__ void gelu_f32(const float* x, float* y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = act_gelu(x[i]);
}

// y = act(gate) * up, act = silu (swiglu) or tanh-GELU (geglu); y may alias gate or up.
extern "C" __global__ void swiglu_f32(const float* g, const float* u, float* y, i64 n) {
    PDL_TRIGGER();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = act_silu(g[i]) * u[i];
}

extern "C" __global__ void geglu_f32(const float* g, const float* u, float* y, i64 n) {
    PDL_TRIGGER();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = act_gelu(g[i]) * u[i];
}

// -- block reductions ------------------------------------------------------------------------------
// blockDim.x is a multiple of 32 and at most 1024; red has 32 slots.

__device__ __forceinline__ float ew_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float ew_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float ew_block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = ew_warp_sum(v);
    __syncthreads();                          // red may still be read by an earlier reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return ew_warp_sum(v);                    // every warp reduces the partials: all threads get it
}

__device__ float ew_block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = ew_warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -__int_as_float(0x7f800000);
    return ew_warp_max(v);
}

// -- RMS norm: one block per row of d elements -------------------------------------------------------
// y = x * (1 / sqrt(mean(x^2) + eps)) [* w]; squares summed in float (the NumPy reference sums in
// double; the difference is far below 1e-7 NMSE). y may alias x: every thread writes only the
// elements it read, after the reduction's barrier.
// Two tensors of the same d and eps in one launch (gemma's q and k norms): blocks [0, rows) norm
// (x, w, y), blocks [rows, gridDim.x) norm (x2, w2, y2). The backend never lets y2 overlap x.

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int rows,
                                        const float* x2, const float* w2, float* y2, int d, float eps) {
    PDL_TRIGGER();
    __shared__ float red[32];
    i64 row = blockIdx.x;
    if (row >= rows) { row -= rows; x = x2; w = w2; y = y2; }
    const float* xr = x + row * d;
    float* yr = y + row * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = xr[i];
        s += __fmul_rn(v, v);
    }
    s = ew_block_sum(s, red);
    const float mean = s / (float)d;
    const float scale = 1.0f / sqrtf(mean + eps);
    if (w != nullptr) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __fmul_rn(xr[i], scale);
    }
}

// The residual add fused with the RMS norm that reads it (llama/gemma: x = o + x; h = norm(x) * w):
// s = a + b (written: the residual stream goes on), y = rms_norm(s) [* w]. s may alias a or b,
// y may alias whichever of a and b s does not: pass 2 reads only s, after a barrier.
extern "C" __global__ void add_rms_norm_f32(const float* a, const float* b, float* s_out, const float* w,
                                            float* y, int d, float eps) {
    PDL_TRIGGER();
    __shared__ float red[32];
    const i64 row = blockIdx.x;
    const float* ar = a + row * d;
    const float* br = b + row * d;
    float* sr = s_out + row * d;
    float* yr = y + row * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = ar[i] + br[i];
        sr[i] = v;
        s += __fmul_rn(v, v);
    }
    s = ew_block_sum(s, red);                 // its barriers also order the writes of sr before pass 2
    const float mean = s / (float)d;
    const float scale = 1.0f / sqrtf(mean + eps);
    if (w != nullptr) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __fmul_rn(__fmul_rn(sr[i], scale), w[i]);
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __fmul_rn(sr[i], scale);
    }
}

// -- soft_max: one block per row of ncols ------------------------------------------------------------
// y = softmax(x * scale + mask) (ggml_soft_max_ext); rows are indexed (r0, r1, r2) over x's leading
// dims (s0, s1, s2), the mask element of (r0, r1, r2, j) is mask[r0*m0 + r1*m1 + r2*m2 + j*mj]
// (strides 0 where the mask broadcasts). A row with nothing visible (all -inf) gives zeros: the max
// is clamped to -FLT_MAX and the sum to FLT_TINY, as in the NumPy reference. y may alias x.

extern "C" __global__ void soft_max_f32(const float* x, const float* mask, float* y, int ncols, float scale,
                                        int s1, int s2, i64 m0, i64 m1, i64 m2, i64 mj) {
    __shared__ float red[32];
    const i64 row = blockIdx.x;
    const float* xr = x + row * ncols;
    float* yr = y + row * ncols;
    const float* mr = nullptr;
    if (mask != nullptr) {
        const i64 r2 = row % s2, r1 = (row / s2) % s1, r0 = row / ((i64)s1 * s2);
        mr = mask + r0 * m0 + r1 * m1 + r2 * m2;
    }
    float mx = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < ncols; j += blockDim.x) {
        float v = __fmul_rn(xr[j], scale);
        if (mr != nullptr) v = __fadd_rn(v, mr[j * mj]);
        yr[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = fmaxf(ew_block_max(mx, red), -EW_FLT_MAX);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < ncols; j += blockDim.x) {
        const float e = expf(yr[j] - mx);
        yr[j] = e;
        sum += e;
    }
    sum = fmaxf(ew_block_sum(sum, red), EW_FLT_TINY);
    for (int j = threadIdx.x; j < ncols; j += blockDim.x) yr[j] = yr[j] / sum;
}

// -- RoPE: one block per token ------------------------------------------------------------------------
// x, y: (n, H, d); pos: (n,) i32. theta follows ggml_rope_cache_init in float32 exactly as the NumPy
// reference does: theta_0 = (float)p, theta_{i+1} = theta_i * theta_scale (one rounded multiply per
// pair), angle_i = theta_i * freq_scale; cos/sin are computed in double and rounded once to float
// (NumPy: np.cos of the float64 angle, cast to float32). theta_scale = powf(base, -2/n_rot) is
// computed on the host (correctly rounded). Any position works: no table, no maximum.
// A second tensor (x2, y2: (n, H2, d), H2 > 0) at the same positions rides along in the same launch
// (q and k of a layer). Dynamic shared memory: n_rot floats. y may alias x (and y2 x2).

extern "C" __global__ void rope_f32(const float* x, float* y, int H, const float* x2, float* y2, int H2,
                                    const int* pos, int d, int n_rot, float theta_scale, float freq_scale,
                                    int neox) {
    PDL_TRIGGER();
    extern __shared__ float cs[];
    const int half = n_rot / 2;
    float* cs_cos = cs;
    float* cs_sin = cs + half;
    const i64 t = blockIdx.x;
    const int p = pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float theta = (float)p;
        for (int k = 0; k < i; ++k) theta = __fmul_rn(theta, theta_scale);
        const double a = (double)__fmul_rn(theta, freq_scale);
        double sv, cv;
        sincos(a, &sv, &cv);
        cs_cos[i] = (float)cv;
        cs_sin[i] = (float)sv;
    }
    __syncthreads();
    const float* xt = x + t * H * d;
    float* yt = y + t * H * d;
    const float* xt2 = x2 + t * H2 * d;
    float* yt2 = y2 + t * H2 * d;
    const int npairs = (H + H2) * half;
    for (int j = threadIdx.x; j < npairs; j += blockDim.x) {
        int h = j / half;
        const int i = j - h * half;
        const float* xs = xt;
        float* ys = yt;
        if (h >= H) { h -= H; xs = xt2; ys = yt2; }
        const int i0 = neox ? i : 2 * i;
        const int i1 = neox ? i + half : 2 * i + 1;
        const float x0 = xs[h * d + i0], x1 = xs[h * d + i1];
        const float c = cs_cos[i], s = cs_sin[i];
        ys[h * d + i0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));    // a cos - b sin
        ys[h * d + i1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));    // a sin + b cos
    }
    const int rest = d - n_rot;
    if (rest > 0) {
        for (int j = threadIdx.x; j < (H + H2) * rest; j += blockDim.x) {
            int h = j / rest;
            const int i = n_rot + (j - h * rest);
            const float* xs = xt;
            float* ys = yt;
            if (h >= H) { h -= H; xs = xt2; ys = yt2; }
            if (ys != xs) ys[h * d + i] = xs[h * d + i];
        }
    }
}

// -- get_rows of an activation: one block per output row ---------------------------------------------
// y[r] = a[ids[r]] for a (R, C); an id outside [0, R) is clamped (the backend checks ids that come
// straight from the graph's inputs on the host, so a clamp is only a guard against reading past a).

extern "C" __global__ void get_rows_f32(const float* a, const int* ids, float* y, int R, i64 C) {
    const i64 r = blockIdx.x;
    int id = ids[r];
    id = id < 0 ? 0 : (id >= R ? R - 1 : id);
    const float* src = a + (i64)id * C;
    float* dst = y + r * C;
    for (i64 j = threadIdx.x; j < C; j += blockDim.x) dst[j] = src[j];
}

// -- argmax over the last dimension: one block per row ------------------------------------------------
// y[r] = the lowest index of the row's maximum, or -1 when that maximum is not finite (a NaN or +inf
// in the row, or a row of -inf): NaN wins every comparison, so the winner is NaN iff the row has one.

__device__ __forceinline__ bool ew_better(float v1, int i1, float v2, int i2) {   // (v1, i1) wins?
    const bool n1 = v1 != v1, n2 = v2 != v2;
    if (n1 || n2) return n1 && n2 ? i1 < i2 : n1;
    if (v1 != v2) return v1 > v2;
    return i1 < i2;
}

extern "C" __global__ void argmax_f32(const float* x, int* y, i64 ncols) {
    __shared__ float rv[32];
    __shared__ int ri[32];
    const i64 row = blockIdx.x;
    const float* xr = x + row * ncols;
    float bv = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (i64 j = threadIdx.x; j < ncols; j += blockDim.x) {
        const float v = xr[j];
        if (ew_better(v, (int)j, bv, bi)) { bv = v; bi = (int)j; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ew_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { rv[warp] = bv; ri[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nw ? rv[lane] : -__int_as_float(0x7f800000);
        bi = lane < nw ? ri[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ew_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) y[row] = (isfinite(bv) && bi != 0x7fffffff) ? bi : -1;
    }
}
