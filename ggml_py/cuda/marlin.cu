// Marlin-style W4A16 GEMM for 4-bit GGUF weights (Q4_0, Q4_1, Q4_K), after Frantar et al.,
// "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large Language Models"
// (arXiv 2408.11743). Our own implementation; the layout is specified (and repacked, and
// dequantized, in NumPy) by quant_formats/marlin.py -- read its docstring first.
//
//   out[m, n] = sum_k A[m, k] * W[n, k]        A: (M, K) f32 or f16, W: (N, K) 4-bit, out f32
//
// Two mma.sync kernels share the layout, the work partitioning, the cp.async stream and the epilogue:
// marlin_main (weights as the mma's B operand, 16-row tiles of A: M > 16) and marlin_dec_main
// (weights as the A operand, 8-row tiles: M <= 16, decode; see its comment). A third, marlin_wg_main
// (sm_90a: wgmma, bulk copies, mbarriers), streams the same layout its own way; see its comment.
// What follows describes the first two.
//
// Work. Every warp owns one 64-column tile of one weight and a contiguous run of its 32-element
// k groups, which it streams through a warp-private cp.async ring (GroupStream; no CTA-wide
// barrier in the loop). A CTA is 8 warps: 8 / kws tiles, kws warps sharing each tile's k range.
// grid = (tiles / (8 / kws), slabs, row tiles): the slabs split K across CTAs. A CTA first stages
// its slab's A window in shared memory as f16 (f32 activations are converted there, so decode
// needs no cast launch), read with ldmatrix. marlin_main turns codes into f16x2 with the 0x6400
// exponent trick (one lop3 per pair of values) and a sub/fma and a mul by the group scale; each
// lane's 16-byte word of the layout IS its four B fragments.
//
// Reduction and epilogue (marlin_finish). The kws warps of a tile reduce in shared memory; slabs
// reduce through a thread-block cluster's distributed shared memory (2-16 CTAs) or through
// partials in global memory and a per-tile ticket: the warp that arrives last sums them, applies
// the epilogue and resets the ticket (so a captured CUDA graph can replay). The host picks kws,
// slabs and the cluster (marlin_ops.py). Epilogues (mode): 0 store; 1 swiglu / 2 geglu of the
// (gate = weight 0, up = weight 1) pair, one output; 3 add a residual (one weight). Up to three
// weights of one type and K share a launch (q/k/v), each with its own output; the decode kernel
// can also fold in the rms_norm of A, the ropes of q and k, and the KV-cache write of k and v.

#include <cuda_fp16.h>

#include "common.cuh"

typedef unsigned int u32;
typedef unsigned char u8;
typedef long long i64;

#define MARLIN_THREADS 256
#define MARLIN_STAGES 4
#define MARLIN_WSTAGE 1408          // one warp's stage: 1024 bytes of codes + up to 384 of scales

// MARLIN_TRACE (a measurement build, benchmarks/trace_decode.py): the decode kernel's warps record
// %globaltimer at their start, when the A window is ready, at the end of their loop and at their
// end, with the launch's shape (words 0-7 of a 16-word record in marlin_trace_buf; marlin_trace_n
// counts them), and at finer points (words 8-13): PDL's wait returned, its A-window items
// staged, the norm's pass done, the rope table done, the k-warps' sums reduced (marlin_finish, kws
// > 1: the warps that go on), the partial sums' ticket won (slabs > 1). 0: not reached.
#ifndef MARLIN_TRACE
#define MARLIN_TRACE 0
#endif
#ifndef MARLIN_AGATE
#define MARLIN_AGATE 1
#endif
#ifndef MARLIN_PAR_EPI
#define MARLIN_PAR_EPI 1                           // marlin_store_elementwise (0: one warp a tile, for A/B runs)
#endif
#if MARLIN_TRACE
#define MARLIN_TRACE_CAP (1 << 18)
#define MARLIN_TRACE_W 16
__device__ unsigned long long marlin_trace_buf[MARLIN_TRACE_CAP * MARLIN_TRACE_W];
__device__ unsigned int marlin_trace_n;
__device__ unsigned long long marlin_trace_mark[4096 * 2];   // a warp's marks from marlin_finish
__device__ __forceinline__ int trace_warp_id() {
    return (int)(((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5)) & 4095;
}
#define TRACE_T(v) const unsigned long long v = global_timer_ns()
#define TRACE_MARK(i) do { if ((threadIdx.x & 31) == 0) marlin_trace_mark[trace_warp_id() * 2 + (i)] = global_timer_ns(); } while (0)
#else
#define TRACE_T(v)
#define TRACE_MARK(i) do {} while (0)
#endif

// -- small helpers -------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smem_addr(dst)), "l"(src));
}

// the copy only where p holds (no zero fill elsewhere: the other lanes' destinations stay untouched)
__device__ __forceinline__ void cp_async16_if(u32 dst, const void* src, bool p) {
    asm volatile("{\n.reg .pred q;\nsetp.ne.b32 q, %2, 0;\n@q cp.async.cg.shared.global [%0], [%1], 16;\n}\n"
                 :: "r"(dst), "l"(src), "r"((int)p));
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// (a & b) | c in one instruction
__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ u32 h2u(half2 h) { return *reinterpret_cast<u32*>(&h); }
__device__ __forceinline__ half2 u2h(u32 u) { return *reinterpret_cast<half2*>(&u); }

__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d = a b + (c0, c1, c0, c1): the C fragment's two columns' addends
__device__ __forceinline__ void mma_16816_c(float* d, const u32* a, u32 b0, u32 b1, float c0, float c1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%10,%11};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c0), "f"(c1));
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ u32 f2_to_h2(float2 v) { return h2u(__floats2half2_rn(v.x, v.y)); }

// thread-block clusters (sm_90): a barrier over the cluster, and loads from another CTA's shared memory
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ u32 cluster_rank() {
    u32 r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
    return r;
}

__device__ __forceinline__ float ld_cluster_f32(const float* p, u32 rank) {
    float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    u32 a = smem_addr(p), b;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(b) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(b) : "memory");
#endif
    return v;
}

__host__ __device__ __forceinline__ i64 align256(i64 n) { return (n + 255) / 256 * 256; }

// Byte offsets of the scale sections (quant_formats/marlin.py MarlinLayout).
struct Layout {
    i64 gs, ss;
    int nt, groups;
};

template <int QT>
__device__ __forceinline__ Layout layout_of(int N, int K) {
    Layout l;
    l.nt = (N + 63) / 64;
    l.groups = K / 32;
    const i64 qw = (i64)l.nt * (K / 16) * 512;
    const i64 gsb = (i64)l.nt * l.groups * (QT == 1 ? 256 : 128);
    l.gs = align256(qw);
    l.ss = l.gs + align256(gsb);
    return l;
}

// Tile t of a launch's concatenated weights (t1, t2: where weights 1 and 2 start): its weight g,
// that weight's base W and rows N, and the tile's index nt inside it (every GEMM kernel).
struct TileRef {
    const u8* W;
    int N, nt, g;
};

__device__ __forceinline__ TileRef tile_ref(int t, int t1, int t2, int N0, int N1, int N2, const u8* w0,
                                            const u8* w1, const u8* w2) {
    TileRef r;
    r.g = t < t1 ? 0 : (t < t2 ? 1 : 2);
    r.nt = t - (r.g == 0 ? 0 : (r.g == 1 ? t1 : t2));
    r.W = r.g == 0 ? w0 : (r.g == 1 ? w1 : w2);
    r.N = r.g == 0 ? N0 : (r.g == 1 ? N1 : N2);
    return r;
}

// -- dequantization of one word: four f16x2 B registers ------------------------------------------
// b[0], b[1]: the n8 tile of column c0 (k, k+1 | k+8, k+9); b[2], b[3]: column c1.
// Q4_0: (q - 8) * s; Q4_1 and Q4_K: q * s + m (Q4_K: s = d*sc, m = -dmin*min).
template <int QT>
__device__ __forceinline__ void dequant_word(u32 w, half2 s0, half2 m0, half2 s1, half2 m1, u32* b) {
    const u32 LO = 0x000f000fu, HI = 0x00f000f0u, EX = 0x64006400u;
    const u32 w8 = w >> 8;
    const half2 a0 = u2h(lop3_and_or(w, LO, EX)), a1 = u2h(lop3_and_or(w, HI, EX));
    const half2 a2 = u2h(lop3_and_or(w8, LO, EX)), a3 = u2h(lop3_and_or(w8, HI, EX));
    const half2 sixteenth = __float2half2_rn(0.0625f);
    if (QT == 0) {
        const half2 olo = __float2half2_rn(-1032.0f), ohi = __float2half2_rn(-72.0f);
        b[0] = h2u(__hmul2(__hadd2(a0, olo), s0));
        b[1] = h2u(__hmul2(__hfma2(a1, sixteenth, ohi), s0));
        b[2] = h2u(__hmul2(__hadd2(a2, olo), s1));
        b[3] = h2u(__hmul2(__hfma2(a3, sixteenth, ohi), s1));
    } else {
        const half2 olo = __float2half2_rn(-1024.0f), ohi = __float2half2_rn(-64.0f);
        b[0] = h2u(__hfma2(__hadd2(a0, olo), s0, m0));
        b[1] = h2u(__hfma2(__hfma2(a1, sixteenth, ohi), s0, m0));
        b[2] = h2u(__hfma2(__hadd2(a2, olo), s1, m1));
        b[3] = h2u(__hfma2(__hfma2(a3, sixteenth, ohi), s1, m1));
    }
}

// This lane's 8 column scales of one group (slot j*2 + h: word j, column c0 (h=0) / c1):
// gs: the group's scale chunk base, ss: Q4_K's superblock d/dmin chunk base.
template <int QT>
__device__ __forceinline__ void lane_scales(const u8* gs, const u8* ss, int lane, half* s, half* m) {
    const int q = lane >> 2;
    if (QT == 0) {
        const uint4 v = *reinterpret_cast<const uint4*>(gs + q * 16);
        const half* h = reinterpret_cast<const half*>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) { s[i] = h[i]; m[i] = __float2half(0.0f); }
    } else if (QT == 1) {
        const uint4 v = *reinterpret_cast<const uint4*>(gs + q * 16);
        const uint4 u = *reinterpret_cast<const uint4*>(gs + 128 + q * 16);
        const half* h = reinterpret_cast<const half*>(&v);
        const half* g = reinterpret_cast<const half*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) { s[i] = h[i]; m[i] = g[i]; }
    } else {
        const uint4 v = *reinterpret_cast<const uint4*>(gs + q * 16);         // 8 sc | 8 min
        const uint4 d = *reinterpret_cast<const uint4*>(ss + q * 32);         // 8 d
        const uint4 e = *reinterpret_cast<const uint4*>(ss + q * 32 + 16);    // 8 dmin
        const u8* b = reinterpret_cast<const u8*>(&v);
        const half* dh = reinterpret_cast<const half*>(&d);
        const half* eh = reinterpret_cast<const half*>(&e);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            s[i] = __float2half_rn(__half2float(dh[i]) * (float)b[i]);
            m[i] = __float2half_rn(-(__half2float(eh[i]) * (float)b[8 + i]));
        }
    }
}

// The scales of one stage (shared memory: the group's chunk at 1024, Q4_K's d/dmin at 1024 + 128).
template <int QT>
__device__ __forceinline__ void stage_scales(const u8* st, int lane, half* s, half* m) {
    lane_scales<QT>(st + 1024, st + 1024 + 128, lane, s, m);
}

// Every accumulator element of this lane: f(w, mt, t8, r, row, col) with row the tile row (0 ..
// 16*MT) and col the tile column (0 .. 63) of acc[w][mt][t8][r] (mma.m16n8k16's C fragment).
template <int NWT, int MT, typename F>
__device__ __forceinline__ void for_acc(int lane, F&& f) {
#pragma unroll
    for (int w = 0; w < NWT; ++w)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int t8 = 0; t8 < 8; ++t8)
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    f(w, mt, t8, r, mt * 16 + (lane >> 2) + (r >= 2 ? 8 : 0), t8 * 8 + 2 * (lane & 3) + (r & 1));
}

// The same for the decode kernel's acc[w][tt][jj][r] (out^T's C fragment: weight columns are the
// fragment's rows, rows of A its columns): f(tt, jj, r, row, col) for one weight's elements.
template <int T, typename F>
__device__ __forceinline__ void for_dec_acc(int lane, F&& f) {
#pragma unroll
    for (int tt = 0; tt < T; ++tt)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                f(tt, jj, r, tt * 8 + 2 * (lane & 3) + (r & 1), 16 * jj + (lane >> 2) + 8 * (r >> 1));
}

// -- the end of a warp's work item, shared by both GEMM kernels ---------------------------------
// `each(f)` calls f(row, col, a, b) for every accumulator element of this lane: row the tile row
// (0 .. rows), col the tile column (0 .. 63), a the sum of weight 0 (or of the gate) and b the
// up projection's sum (the same element as a when NWT == 1). Reduces the k-split inside the CTA
// (kws warps a tile, shared memory), across the CTAs of a cluster (distributed shared memory) or
// through partials and tickets, then applies the epilogue and stores.
// The KV-cache write folded into a q/k/v launch (store path only): weight 1's outputs (the keys,
// after their rope) and weight 2's (the values) also go to the cache rows of the tokens' slots,
// as attention.cu's kv_store writes them (f16 rounded to nearest, or f32), with the tokens'
// positions beside them. kc == nullptr: no fold. Slots outside [0, cap) are skipped, as there.
struct KVFold {
    void *kc, *vc;
    int* pc;
    const int *slots, *pos;
    int f16, cap;
    const int* sk;                                 // or nullptr: [rows][2] slots and positions staged in shared memory
};

struct MarlinJob {
    float *o0, *o1, *o2;
    int N0, N1, N2, t1, t2, t3;
    int M, m0, rows, slabs, kws, cluster, mode, y;
    const float* resid;
    float* part;
    u32* tickets;
    const float2* rtab;                            // rope (store path only): [rows][n_rot / 2] (cos, sin)
    int rope_mask, hd, n_rot;
    KVFold kv;
};

// RoPE, ggml's normal mode: the cos and sin of pair p (elements 2p, 2p + 1 of a head) at position
// pos -- elementwise.cu's rope_f32 step for step (theta by repeated multiplication, one double
// sincos), as quant.cu's grouped GEMV does it, so a fused rope gives the unfused one's bits.
__device__ __forceinline__ float2 rope_cs(int pos, int p, float theta_scale, float freq_scale) {
    float theta = (float)pos;
    for (int k = 0; k < p; ++k) theta = __fmul_rn(theta, theta_scale);
    const double ang = (double)__fmul_rn(theta, freq_scale);
    double sv, cv;
    sincos(ang, &sv, &cv);
    return make_float2((float)cv, (float)sv);
}

// One output element's epilogue after its full sum a (b: the up projection's, for the glu): the glu
// or the residual, the store into out (group g's output, N columns), and where the launch folds the
// KV-cache write (PX != 0; g 1 and 2: k and v) the cache element and, once a row, the slot's position
template <bool GLU, int PX>
__device__ __forceinline__ void store_element(const MarlinJob& j, float* out, int mode, int m0, int g, int row,
                                              int n, int N, float a, float b) {
    const i64 o = (i64)(m0 + row) * N + n;
    float v = a;
    if (GLU) v = (mode == 1 ? act_silu(v) : act_gelu(v)) * b;
    else if (mode == 3) v += j.resid[o];
    out[o] = v;
    if (PX != 0 && j.kv.kc != nullptr && g != 0) {
        const int s = j.kv.sk ? j.kv.sk[2 * row] : j.kv.slots[m0 + row];
        if (s >= 0 && s < j.kv.cap) {
            const i64 e = (i64)s * N + n;
            void* c = g == 1 ? j.kv.kc : j.kv.vc;
            if (j.kv.f16) reinterpret_cast<half*>(c)[e] = __float2half_rn(v);
            else reinterpret_cast<float*>(c)[e] = v;
            if (g == 1 && n == 0) j.kv.pc[s] = j.kv.sk ? j.kv.sk[2 * row + 1] : j.kv.pos[m0 + row];
        }
    }
}

#if MARLIN_PAR_EPI
// The store path of a kws > 1 launch with one slab, on all the CTA's threads: red holds every warp's
// sums ([warp][w][rows][64]); thread e takes element e of the CTA's tiles, sums its k-warps in the
// order the one-warp path does (so the same bits), and applies the epilogue: rope (the pair's
// partner is column col ^ 1), glu, residual, store, KV-cache write. Instead of one warp a tile
// walking 64 x rows elements with dependent shuffles and loads (8B q/k/v: 3.3 us from the
// k-reduction to the end, benchmarks/RESULTS.md session 7).
template <int NWT, bool GLU, int PX>
__device__ __forceinline__ void marlin_store_elementwise(const MarlinJob& j, const float* red) {
    const int rows = j.rows, kws = j.kws, per = rows * 64, tiles = 8 / kws;
    for (int e = threadIdx.x; e < tiles * per; e += MARLIN_THREADS) {
        const int tl = e / per, rem = e - tl * per, row = rem >> 6, col = rem & 63;
        const int t = blockIdx.x * tiles + tl;
        if (t >= j.t3) continue;
        const TileRef re = tile_ref(t, j.t1, j.t2, j.N0, j.N1, j.N2, nullptr, nullptr, nullptr);
        const int g = re.g, N = re.N, n = re.nt * 64 + col;
        if (n >= N) continue;
        auto sum = [&](int c, int w) {
            float v = red[(((tl * kws) * NWT + w) * rows + row) * 64 + c];
            for (int q = 1; q < kws; ++q) v += red[(((tl * kws + q) * NWT + w) * rows + row) * 64 + c];
            return v;
        };
        float a = sum(col, 0);
        const float b = NWT == 2 ? sum(col, 1) : a;
        if (PX != 0 && ((j.rope_mask >> g) & 1)) {
            const int i = n % j.hd;
            if (i < j.n_rot) {
                const float other = sum(col ^ 1, 0);
                const float2 cs = j.rtab[row * (j.n_rot >> 1) + (i >> 1)];
                const float a0 = (i & 1) ? other : a, a1 = (i & 1) ? a : other;
                a = (i & 1) ? __fadd_rn(__fmul_rn(a0, cs.y), __fmul_rn(a1, cs.x))
                            : __fsub_rn(__fmul_rn(a0, cs.x), __fmul_rn(a1, cs.y));
            }
        }
        store_element<GLU, PX>(j, g == 0 ? j.o0 : (g == 1 ? j.o1 : j.o2), j.mode, j.m0, g, row, n, N, a, b);
    }
}
#endif

template <int NWT, bool GLU, int PX, typename Each>
__device__ __forceinline__ void marlin_finish(const MarlinJob& j, Each&& each, u8* smem, int warp, int lane,
                                              int t, bool active, int sub, int g, int nt, int N) {
    const int rows = j.rows;
    if (j.kws > 1) {                               // the tile's other k-warps -> its first (sub == 0)
        __syncthreads();                           // every ring is drained
        float* red = reinterpret_cast<float*>(smem);             // [warp][w][rows][64]
#if MARLIN_PAR_EPI
        if (j.slabs == 1 && !j.cluster) {          // the store path, element by element on all 8 warps
            if (active)
                each([&](int row, int col, float& a, float& b) {
                    if (row < rows) {
                        red[((warp * NWT) * rows + row) * 64 + col] = a;
                        if (NWT == 2) red[((warp * NWT + 1) * rows + row) * 64 + col] = b;
                    }
                });
            __syncthreads();
            marlin_store_elementwise<NWT, GLU, PX>(j, red);
            return;
        }
#endif
        if (active && sub != 0) {
            each([&](int row, int col, float& a, float& b) {
                if (row < rows) {
                    red[((warp * NWT) * rows + row) * 64 + col] = a;
                    if (NWT == 2) red[((warp * NWT + 1) * rows + row) * 64 + col] = b;
                }
            });
        }
        __syncthreads();
        if (!active || sub != 0) return;
        for (int q = 1; q < j.kws; ++q)
            each([&](int row, int col, float& a, float& b) {
                if (row < rows) {
                    a += red[(((warp + q) * NWT) * rows + row) * 64 + col];
                    if (NWT == 2) b += red[(((warp + q) * NWT + 1) * rows + row) * 64 + col];
                }
            });
        TRACE_MARK(0);
    }

    float* out = g == 0 ? j.o0 : (g == 1 ? j.o1 : j.o2);
    const int ncol0 = nt * 64;
    const int slabs = j.slabs, mode = j.mode, m0 = j.m0, t3 = j.t3;
    if (j.cluster && slabs > 1) {
        // the slabs of these 8 tiles are the CTAs of one cluster: each CTA puts its warps' tiles in
        // its shared memory, then reduces 1/slabs of the elements over all the cluster's CTAs
        __syncthreads();                           // the ring is free (cp_wait<0> before this call)
        float* red = reinterpret_cast<float*>(smem);             // [w][warp][rows][64]
        const int per = rows * 64;
        if (active) {
            each([&](int row, int col, float& a, float& b) {
                if (row < rows) {
                    red[(warp * rows + row) * 64 + col] = a;
                    if (NWT == 2) red[((8 + warp) * rows + row) * 64 + col] = b;
                }
            });
        }
        cluster_sync();
        const int total = 8 * per;
        const u32 rank = cluster_rank();
        const int e0 = (int)((i64)rank * total / slabs), e1 = (int)((i64)(rank + 1) * total / slabs);
        for (int e = e0 + threadIdx.x; e < e1; e += MARLIN_THREADS) {
            const int wp = e / per, rem = e - wp * per, row = rem >> 6, col = rem & 63;
            const int te = blockIdx.x * 8 + wp;    // (cluster mode: kws == 1)
            if (te >= t3) continue;
            const TileRef re = tile_ref(te, j.t1, j.t2, j.N0, j.N1, j.N2, nullptr, nullptr, nullptr);
            const int ge = re.g, Ne = re.N;
            const int n = re.nt * 64 + col;
            if (n >= Ne) continue;
            float v = 0.0f, u = 0.0f;
            for (int q = 0; q < slabs; ++q) {
                v += ld_cluster_f32(red + e, (u32)q);
                if (GLU) u += ld_cluster_f32(red + 8 * per + e, (u32)q);
            }
            const i64 o = (i64)(m0 + row) * Ne + n;
            if (GLU) v = (mode == 1 ? act_silu(v) : act_gelu(v)) * u;
            else if (mode == 3) v += j.resid[o];
            (ge == 0 ? j.o0 : (ge == 1 ? j.o1 : j.o2))[o] = v;
        }
        cluster_sync();                            // shared memory stays until every CTA has read it
        return;
    }
    if (!active) return;
    if (slabs == 1) {                              // the whole k range: store
        const bool rope = PX != 0 && ((j.rope_mask >> g) & 1);
        each([&](int row, int col, float& a, float& b) {
            const int n = ncol0 + col;
            if (PX != 0 && rope) {                 // (every lane of the warp is here)
                const float other = __shfl_xor_sync(0xffffffffu, a, PX);
                const int i = n % j.hd;
                if (row < rows && n < N && i < j.n_rot) {
                    const float2 cs = j.rtab[row * (j.n_rot >> 1) + (i >> 1)];
                    const float a0 = (i & 1) ? other : a, a1 = (i & 1) ? a : other;
                    a = (i & 1) ? __fadd_rn(__fmul_rn(a0, cs.y), __fmul_rn(a1, cs.x))      // a sin + b cos
                                : __fsub_rn(__fmul_rn(a0, cs.x), __fmul_rn(a1, cs.y));     // a cos - b sin
                }
            }
            if (row < rows && n < N) store_element<GLU, PX>(j, out, mode, m0, g, row, n, N, a, b);
        });
        return;
    }
    // partials: part[w][slab][row][tile][64]
    const int M = j.M;
    float* part = j.part;
    const i64 pw = (i64)slabs * M * t3 * 64;
    each([&](int row, int col, float& a, float& b) {
        if (row < rows) {
            const i64 p = (((i64)j.y * M + m0 + row) * t3 + t) * 64 + col;
            part[p] = a;
            if (NWT == 2) part[pw + p] = b;
        }
    });
    // one or two rows with a residual (decode's o and down): every contributor loads the residuals of
    // the tile's elements before the fence, so the one that sums does not wait for them after its
    // ticket (8B decode, o and down: tails 2.94 -> 2.77 and 3.45 -> 2.64 us, benchmarks/trace_decode.py)
    const bool pre = !GLU && mode == 3 && rows * 64 <= 128;
    float rpre[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (pre) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int e = q * 32 + lane;
            if (e < rows * 64 && ncol0 + (e & 63) < N) rpre[q] = j.resid[(i64)(m0 + (e >> 6)) * N + ncol0 + (e & 63)];
        }
    }
    __threadfence();
    __syncwarp();
    u32* ticket = j.tickets + (i64)t * gridDim.z + blockIdx.z;
    u32 old = 0;
    if (lane == 0) old = atomicAdd(ticket, 1u);
    old = __shfl_sync(0xffffffffu, old, 0);
    if (old != (u32)(slabs - 1)) return;
    TRACE_MARK(1);
    __threadfence();
    // sum the slabs: 4 elements a lane at a time, the loads of 4 slabs in flight together
    for (int e0 = 0; e0 < rows * 64; e0 += 128) {
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f}, u[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        i64 pi[4];
        bool ok[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int e = e0 + q * 32 + lane;
            ok[q] = e < rows * 64 && ncol0 + (e & 63) < N;
            pi[q] = (((i64)(m0 + (e >> 6))) * t3 + t) * 64 + (e & 63);
        }
        const i64 sstride = (i64)M * t3 * 64;
#pragma unroll 4
        for (int s2 = 0; s2 < slabs; ++s2) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (ok[q]) {
                    v[q] += __ldcg(part + s2 * sstride + pi[q]);
                    if (GLU) u[q] += __ldcg(part + pw + s2 * sstride + pi[q]);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (!ok[q]) continue;
            const int e = e0 + q * 32 + lane;
            const i64 o = (i64)(m0 + (e >> 6)) * N + ncol0 + (e & 63);
            float x = v[q];
            if (GLU) x = (mode == 1 ? act_silu(x) : act_gelu(x)) * u[q];
            else if (mode == 3) x += pre ? rpre[q] : j.resid[o];      // (pre: one pass, e0 == 0)
            out[o] = x;
        }
    }
    if (lane == 0) *ticket = 0u;                   // ready for the next replay
}

// -- the GEMM ------------------------------------------------------------------------------------
// Work items. Every warp owns one 64-column tile of one weight ("tile" t over the concatenated
// tiles of the launch's weights) and one k-slab (a contiguous run of 32-element groups): it walks
// its slab through a warp-private cp.async ring -- no CTA-wide barrier in the loop, so the warps
// of an SM stream independently -- and keeps the (16*MT) x 64 tile of sums in registers. A CTA is
// 8 warps = 8 consecutive tiles of one slab (grid: x = tiles / 8, y = slab, z = row tile); they
// share the slab's A window, converted to f16 into shared memory once at the start (so f32
// activations need no cast launch) and read with ldmatrix.
// With one slab the warp stores its tile (applying the epilogue); with several it writes a
// partial, takes the tile's ticket, and the warp that arrives last sums the slabs' partials,
// applies the epilogue, stores and resets the ticket (so a captured CUDA graph can replay).

// One warp's work item (both GEMM kernels): grid x = tile groups (8 / kws tiles a CTA), y = k-slab,
// z = row tile of MR rows. kws warps share a tile, each taking 1/kws of the slab's 32-element groups
// (reduced in shared memory); tile t runs over the concatenated tiles of the launch's weights.
struct WarpWork {
    int G, g0, ngc, kw, lds, m0, rows, sub, t, gw0, ng, g, nt, N;
    bool active;
    const u8* W;
};

__device__ __forceinline__ WarpWork warp_work(int MR, int K, int M, int slabs, int kws, int t1, int t2, int t3,
                                              int N0, int N1, int N2, const u8* w0, const u8* w1, const u8* w2) {
    WarpWork w;
    const int warp = threadIdx.x >> 5, y = blockIdx.y;
    w.G = K / 32;
    w.g0 = (int)((i64)y * w.G / slabs);
    w.ngc = (int)((i64)(y + 1) * w.G / slabs) - w.g0;  // groups of the CTA's slab
    w.kw = w.ngc * 32;                                   // k of the A window
    w.lds = w.kw + 8;                                    // its row stride (halves): rows 16 bytes apart mod 128
    w.m0 = blockIdx.z * MR;
    w.rows = min(M - w.m0, MR);
    w.sub = warp % kws;
    w.t = blockIdx.x * (8 / kws) + warp / kws;           // this warp's tile
    w.gw0 = w.g0 + (w.sub * w.ngc) / kws;                // this warp's groups: gw0 .. gw0 + ng
    w.ng = w.g0 + ((w.sub + 1) * w.ngc) / kws - w.gw0;
    w.active = w.t < t3;
    const TileRef r = tile_ref(w.t, t1, t2, N0, N1, N2, w0, w1, w2);
    w.g = r.g;
    w.nt = r.nt;
    w.W = r.W;
    w.N = r.N;
    return w;
}

// A warp's stream of weight groups into its cp.async ring (both GEMM kernels). Per group the
// ring holds NWT blocks of GB bytes: 1024 of codes (each lane's 16 bytes of both k-steps), then the
// scales (Q4_0: 8 lanes' 16 bytes; Q4_1: 16; Q4_K: the group's sc/min from 8 lanes at 1024, the
// superblock's d/dmin from lanes 8-23 at 1024 + 128). Branch-free: every copy is predicated (a
// scale copy on its lane, every copy on the group being in range) and its address is a stream
// offset fixed at the warp's first group plus the group's stride.
template <int QT, int NWT, int GPS, int GB>
struct GroupStream {
    static constexpr int SCB = QT == 1 ? 256 : 128;          // a group's scale bytes in the gs section
    static constexpr int WST1 = GB * NWT, WST = WST1 * GPS;  // one group, one stage
    const u8 *w0, *w1;
    i64 qoff, goff, soff;
    u32 ring_s;
    int gw0, ng;
    bool sc_lane, ss_lane, active;
    __device__ __forceinline__ GroupStream(const u8* W, const u8* W1, const Layout& L, int nt, int K, int G,
                                           int gw0_, int ng_, bool active_, const u8* ring, int lane)
        : w0(W), w1(W1), qoff(((i64)nt * (K / 16) + 2 * gw0_) * 512 + lane * 16),
          goff(L.gs + ((i64)nt * G + gw0_) * SCB + lane * 16), soff(L.ss + (i64)nt * (G / 8) * 256 + (lane - 8) * 16),
          ring_s(smem_addr(ring) + lane * 16), gw0(gw0_), ng(ng_), sc_lane(QT == 1 ? lane < 16 : lane < 8),
          ss_lane(QT == 2 && lane >= 8 && lane < 24), active(active_) {}
    // stage i (groups GPS i .. GPS i + GPS - 1 of the warp) into ring slot `slot`: one commit group
    __device__ __forceinline__ void issue(int i, int slot) const {
#pragma unroll
        for (int q = 0; q < GPS; ++q) {
            const int gi = i * GPS + q;
            const bool ok = active && gi < ng;
#pragma unroll
            for (int w = 0; w < NWT; ++w) {
                const u8* Wp = w == 0 ? w0 : w1;
                const u32 dst = ring_s + (u32)(slot * WST + q * WST1 + w * GB);
                const u8* src = Wp + qoff + (i64)gi * 1024;
                cp_async16_if(dst, src, ok);
                cp_async16_if(dst + 512, src + 512, ok);
                cp_async16_if(dst + 1024, Wp + goff + (i64)gi * SCB, ok && sc_lane);
                if (QT == 2) cp_async16_if(dst + 1024, Wp + soff + (i64)((gw0 + gi) >> 3) * 256, ok && ss_lane);
            }
        }
        cp_commit();
    }
};

// A warp's walk through its cp.async ring: n_st stages, STAGES - 1 already issued; before stage i
// is consumed (body(i, its ring slot)) stage i + STAGES - 1 is issued into the slot freed last.
template <int STAGES, typename Issue, typename Body>
__device__ __forceinline__ void ring_walk(int n_st, u8* ring, int wst, Issue&& issue, Body&& body) {
    int slot = 0, slot_in = STAGES - 1;
    for (int i = 0; i < n_st; ++i) {
        cp_wait<STAGES - 2>();
        __syncwarp();
        issue(i + STAGES - 1, slot_in);
        slot_in = slot_in + 1 == STAGES ? 0 : slot_in + 1;
        body(i, ring + slot * wst);
        slot = slot + 1 == STAGES ? 0 : slot + 1;
    }
}

template <int QT, int MT, bool GLU, int STAGES, int GPS>
__device__ __forceinline__ void marlin_main(
        const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        float* o0, float* o1, float* o2, int N0, int N1, int N2, int t1, int t2, int t3,
        const void* __restrict__ Av, int a_f16, int M, int K, int lda,
        const float* resid, int mode, int slabs, int kws, int cluster, float* part, u32* tickets,
        const int* pos, int rope_mask, int hd, int n_rot, float theta_scale, float freq_scale,
        const float* norm_w, float eps, int norm, void* kc, void* vc, int* pc, const int* kslots,
        const int* kpos, int kv_f16, int kv_cap, int early) {
    constexpr int NWT = GLU ? 2 : 1;               // weights a warp reads (gate and up together)
    constexpr int WST1 = MARLIN_WSTAGE * NWT;      // one group's bytes (codes + scales, both weights)
    constexpr int WST = WST1 * GPS;                // one warp's bytes of one stage (GPS groups)
    constexpr int MR = 16 * MT;                    // rows of a tile
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, y = blockIdx.y;
    const WarpWork ww = warp_work(MR, K, M, slabs, kws, t1, t2, t3, N0, N1, N2, w0, w1, w2);
    const int G = ww.G, g0 = ww.g0, ngc = ww.ngc, kw = ww.kw, lds = ww.lds, m0 = ww.m0, rows = ww.rows;
    const int sub = ww.sub, t = ww.t, gw0 = ww.gw0, ng = ww.ng, g = ww.g, nt = ww.nt, N = ww.N;
    const bool active = ww.active;
    const u8* W = ww.W;
    const Layout L = layout_of<QT>(N, K);          // (gate and up share a shape: one layout)

    extern __shared__ uint4 smem4[];
    u8* smem = reinterpret_cast<u8*>(smem4);
    u8* ring = smem + warp * STAGES * WST;
    half* sA = reinterpret_cast<half*>(smem + 8 * STAGES * WST);

    const int n_st = (ng + GPS - 1) / GPS;         // stages of this warp
    const GroupStream<QT, NWT, GPS, MARLIN_WSTAGE> stream(W, w1, L, nt, K, G, gw0, ng, active, ring, lane);
    auto issue = [&](int i, int slot) { stream.issue(i, slot); };

    PDL_TRIGGER();
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(i, i);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // launched with PDL: the weights above are already streaming; A (and every buffer written
    // below) belongs to the previous kernel until it has finished
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

    // the A window: rows x kw, f16, loaded by the whole CTA while the first stages are in flight
    {
        const int cpr = kw / 8;                    // 8-element chunks per row
        for (int c = threadIdx.x; c < rows * cpr; c += MARLIN_THREADS) {
            const int r = c / cpr, q = c - r * cpr;
            uint4 v;
            if (a_f16) {
                v = *reinterpret_cast<const uint4*>(reinterpret_cast<const half*>(Av) + (i64)(m0 + r) * lda + g0 * 32 + q * 8);
            } else {
                const float4* src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(Av) +
                                                                    (i64)(m0 + r) * lda + g0 * 32 + q * 8);
                const float4 a = src[0], b = src[1];
                v.x = h2u(__floats2half2_rn(a.x, a.y));
                v.y = h2u(__floats2half2_rn(a.z, a.w));
                v.z = h2u(__floats2half2_rn(b.x, b.y));
                v.w = h2u(__floats2half2_rn(b.z, b.w));
            }
            *reinterpret_cast<uint4*>(sA + r * lds + q * 8) = v;
        }
    }
    __syncthreads();
    if (!active && !cluster && kws == 1) return;   // (else every thread reaches the barriers below)

    float acc[NWT][MT][8][4];
    for_acc<NWT, MT>(lane, [&](int w, int mt, int t8, int r, int, int) { acc[w][mt][t8][r] = 0.0f; });

    // ldmatrix row addresses of this lane at its first group. Tile rows past M read row rows - 1:
    // an mma's row r of A makes only row r of its sums, and rows past M are never stored.
    u32 a_addr[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int r = min(mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, rows - 1);
        a_addr[mt] = smem_addr(sA + r * lds + (gw0 - g0) * 32 + (lane >> 4) * 8);
    }

    ring_walk<STAGES>(active ? n_st : 0, ring, WST, issue, [&](int i, const u8* stage) {
#pragma unroll
        for (int q = 0; q < GPS; ++q) {
            const int gi = i * GPS + q;
            if (GPS > 1 && gi >= ng) break;
            const u8* st = stage + q * WST1;
            half sv[NWT][8], mv[NWT][8];
#pragma unroll
            for (int w = 0; w < NWT; ++w) stage_scales<QT>(st + w * MARLIN_WSTAGE, lane, sv[w], mv[w]);
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                u32 af[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], a_addr[mt] + (u32)(gi * 64 + ks * 32));
#pragma unroll
                for (int w = 0; w < NWT; ++w) {
                    const uint4 wq = *reinterpret_cast<const uint4*>(st + w * MARLIN_WSTAGE + ks * 512 + lane * 16);
                    const u32 wv[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        u32 b[4];
                        dequant_word<QT>(wv[j], __half2half2(sv[w][2 * j]), __half2half2(mv[w][2 * j]),
                                         __half2half2(sv[w][2 * j + 1]), __half2half2(mv[w][2 * j + 1]), b);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            mma_16816(acc[w][mt][2 * j], af[mt], b[0], b[1]);
                            mma_16816(acc[w][mt][2 * j + 1], af[mt], b[2], b[3]);
                        }
                    }
                }
            }
        }
    });
    cp_wait<0>();
    const MarlinJob job{o0, o1, o2, N0, N1, N2, t1, t2, t3, M, m0, rows, slabs, kws, cluster, mode, y, resid, part,
                        tickets, nullptr, 0, hd, n_rot, KVFold{}};
    marlin_finish<NWT, GLU, 0>(job, [&](auto&& f) {
        for_acc<1, MT>(lane, [&](int, int mt, int t8, int r, int row, int col) {
            f(row, col, acc[0][mt][t8][r], acc[NWT - 1][mt][t8][r]);
        });
    }, smem, warp, lane, t, active, sub, g, nt, N);
}

// -- the decode kernel (M <= 16): weights as the mma's A operand ---------------------------------
// For a few rows of activations the roles swap: mma.m16n8k16 computes out^T = W (16 columns x 16 k,
// the "A" operand) x act^T (16 k x 8 rows), so no accumulator holds a padding row at M <= 8. A
// lane's 16-byte word of the layout is, register-reordered, the A fragment of its 16 columns:
// words j = 0..3 cover columns 16j .. 16j+15 (b[0], b[2], b[1], b[3] of dequant_word's order).
// The nibbles enter the mma raw: the low nibble of a pair as 1024 + q and the high one as
// 1024 + 16q (the 0x6400 trick with no arithmetic after the lop3), and the activations at the
// high nibbles' k positions (8..15 of every k-step) are stored divided by 16, so a group's sum is
//   R = sum q a + 1024 sum_lo a + 64 sum_hi a.
// The CTA precomputes per row and group C = (1024 + z) sum_lo a + (64 + z) sum_hi a (z = 8 for Q4_0,
// whose codes are q - 8, else 0) and, for Q4_1/Q4_K, S = sum a; then per group and element
//   acc += s (R - C) [+ m S]
// in f32 (s, m: the column's group scale and offset). All products inside the mma are exact
// (integers times f16), so this is at least as accurate as scaling in f16 first.
// T: row tiles of 8 (rows = 8 T). Otherwise the work partitioning, ring and epilogue are
// marlin_main's: a warp streams one 64-column tile's k-slab through a private cp.async ring.

template <int QT>
struct DecGroup {
    static constexpr int GB = 1024 + (QT == 0 ? 128 : (QT == 1 ? 256 : 384));   // one group in the ring
};

// This lane's column scales (and offsets) of one group, read from the ring (layout of GroupStream
// below) once and turned into f32 two at a time: slot i = 2 j + h is word j, column c0 (h = 0) / c1.
template <int QT>
struct DecScales {
    uint4 v, u, d;                                 // Q4_0: v = 8 f16 d; Q4_1: + u = 8 f16 m; Q4_K: v = 8 sc | 8 min, u/d = d/dmin
    __device__ __forceinline__ void load(const u8* st, int lane) {
        const int q = lane >> 2;
        v = *reinterpret_cast<const uint4*>(st + 1024 + q * 16);
        if (QT == 1) u = *reinterpret_cast<const uint4*>(st + 1024 + 128 + q * 16);
        if (QT == 2) {
            u = *reinterpret_cast<const uint4*>(st + 1024 + 128 + q * 32);
            d = *reinterpret_cast<const uint4*>(st + 1024 + 128 + q * 32 + 16);
        }
    }
    __device__ __forceinline__ float s(int i) const {
        if (QT == 2) return __half2float(reinterpret_cast<const half*>(&u)[i]) * (float)reinterpret_cast<const u8*>(&v)[i];
        return __half2float(reinterpret_cast<const half*>(&v)[i]);
    }
    __device__ __forceinline__ float m(int i) const {
        if (QT == 2) return -(__half2float(reinterpret_cast<const half*>(&d)[i]) * (float)reinterpret_cast<const u8*>(&v)[8 + i]);
        if (QT == 1) return __half2float(reinterpret_cast<const half*>(&u)[i]);
        return 0.0f;
    }
};

// PROBE (benchmarks only, wrong results): 1 streams the weights but skips the arithmetic, 2 skips the
// A window's loads -- to time the kernel's parts by leaving one out
template <int QT, int T, bool GLU, int STAGES, int GPS, int PROBE = 0>
__device__ __forceinline__ void marlin_dec_main(
        const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        float* o0, float* o1, float* o2, int N0, int N1, int N2, int t1, int t2, int t3,
        const void* __restrict__ Av, int a_f16, int M, int K, int lda,
        const float* resid, int mode, int slabs, int kws, int cluster, float* part, u32* tickets,
        const int* pos, int rope_mask, int hd, int n_rot, float theta_scale, float freq_scale,
        const float* norm_w, float eps, int norm, void* kc, void* vc, int* pc, const int* kslots,
        const int* kpos, int kv_f16, int kv_cap, int early) {
    constexpr int NWT = GLU ? 2 : 1;
    constexpr int GB = DecGroup<QT>::GB;
    constexpr int WST1 = GB * NWT;                 // one group of the warp's weights
    constexpr int WST = WST1 * GPS;                // one stage
    constexpr int MR = 8 * T;                      // rows of a tile
    constexpr bool OFS = QT != 0;                  // codes carry an offset m (Q4_1, Q4_K)
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, y = blockIdx.y;
    const WarpWork ww = warp_work(MR, K, M, slabs, kws, t1, t2, t3, N0, N1, N2, w0, w1, w2);
    const int G = ww.G, g0 = ww.g0, ngc = ww.ngc, kw = ww.kw, lds = ww.lds, m0 = ww.m0, rows = ww.rows;
    const int sub = ww.sub, t = ww.t, gw0 = ww.gw0, ng = ww.ng, g = ww.g, nt = ww.nt, N = ww.N;
    const bool active = ww.active;
    const u8* W = ww.W;
    const Layout L = layout_of<QT>(N, K);          // (gate and up share a shape: one layout)

    extern __shared__ uint4 smem4[];
    u8* smem = reinterpret_cast<u8*>(smem4);
    u8* ring = smem + warp * STAGES * WST;
    half* sA = reinterpret_cast<half*>(smem + 8 * STAGES * WST);
    float* sC = reinterpret_cast<float*>(sA + rows * lds);          // [rows][ngc]
    float* sS = sC + rows * ngc;                                    // [rows][ngc] (OFS)
    float* sNorm = sS + (OFS ? rows * ngc : 0);                     // [16][8]: the rows' sums of x^2 per warp
    u8* sZero = reinterpret_cast<u8*>(sNorm + 128);
    sZero = reinterpret_cast<u8*>((reinterpret_cast<size_t>(sZero) + 15) & ~(size_t)15);
    float2* sRope = reinterpret_cast<float2*>(sZero + 16);         // [rows][n_rot / 2] when the plan ropes
    int* sKV = reinterpret_cast<int*>(sRope + (rope_mask ? rows * (n_rot >> 1) : 0));   // [rows][2] (early, KV fold)

    const int n_st = (ng + GPS - 1) / GPS;
    const GroupStream<QT, NWT, GPS, GB> stream(W, w1, L, nt, K, G, gw0, ng, active, ring, lane);
    auto issue = [&](int i, int slot) { stream.issue(i, slot); };

    TRACE_T(tr0);
#if MARLIN_TRACE
    if (lane == 0) marlin_trace_mark[trace_warp_id() * 2] = marlin_trace_mark[trace_warp_id() * 2 + 1] = 0ull;
#endif
    PDL_TRIGGER();
    if (MARLIN_AGATE != 3) issue(0, 0);            // weights: nothing before us writes them
    // The rope's angles: the positions' loads and the double sincos take 1 us. `early` (the host's
    // promise that the positions and the KV fold's slots are the graph's inputs, which no kernel
    // writes) moves them, with the slots into shared memory and an L2 hint for the norm's weights,
    // before PDL's wait, where they overlap the previous kernel (8B decode: q/k/v's A window ready
    // 6.1 -> 5.3 us after the previous launch's end; tg128 +2.3% over five interleaved pairs as a
    // build switch, benchmarks/RESULTS.md session 7).
    auto rope_table = [&]() {                      // one (row, pair) a thread
        const int np = n_rot >> 1;
        for (int e = threadIdx.x; e < rows * np; e += MARLIN_THREADS)
            sRope[e] = rope_cs(pos[m0 + e / np], e % np, theta_scale, freq_scale);
    };
    if (early) {
        if (kc != nullptr && (int)threadIdx.x < rows) {
            sKV[2 * threadIdx.x] = kslots[m0 + threadIdx.x];
            sKV[2 * threadIdx.x + 1] = kpos[m0 + threadIdx.x];
        }
        if (norm && norm_w && (int)threadIdx.x < ngc)
            asm volatile("prefetch.global.L2 [%0];\n" :: "l"(norm_w + (i64)(g0 + threadIdx.x) * 32));
        if (rope_mask) rope_table();
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // launched with PDL: A (and every buffer written below) belongs to the previous kernel until it
    // has finished
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    TRACE_T(trw);
    // The A window: one thread per (row, group) of the slab. Its loads go out before the other
    // weight stages so that they are not queued behind them.
    const int items = rows * ngc;
    constexpr float ZP = QT == 0 ? 8.0f : 0.0f;
    auto stage_a = [&](int it) {
        const int r = it / ngc, gg = it - r * ngc;
        const i64 k0 = (i64)(g0 + gg) * 32;
        uint4 h[4];
        if (a_f16 && !(norm && norm_w)) {
            const uint4* src = reinterpret_cast<const uint4*>(reinterpret_cast<const half*>(Av) + (i64)(m0 + r) * lda + k0);
#pragma unroll
            for (int c = 0; c < 4; ++c) h[c] = src[c];
        } else {
            float4 f[8];
            if (a_f16) {
                const uint4* src = reinterpret_cast<const uint4*>(reinterpret_cast<const half*>(Av) + (i64)(m0 + r) * lda + k0);
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const uint4 v = src[c];
                    const float2 p0 = __half22float2(u2h(v.x)), p1 = __half22float2(u2h(v.y));
                    const float2 p2 = __half22float2(u2h(v.z)), p3 = __half22float2(u2h(v.w));
                    f[2 * c] = make_float4(p0.x, p0.y, p1.x, p1.y);
                    f[2 * c + 1] = make_float4(p2.x, p2.y, p3.x, p3.y);
                }
            } else {
                const float4* src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(Av) + (i64)(m0 + r) * lda + k0);
#pragma unroll
                for (int c = 0; c < 8; ++c) f[c] = src[c];
            }
            if (norm && norm_w) {                  // x * norm_w; the row's scale comes at the end
                const float4* wv = reinterpret_cast<const float4*>(norm_w + k0);
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    const float4 wq = wv[c];
                    f[c].x *= wq.x; f[c].y *= wq.y; f[c].z *= wq.z; f[c].w *= wq.w;
                }
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                h[c].x = h2u(__floats2half2_rn(f[2 * c].x, f[2 * c].y));
                h[c].y = h2u(__floats2half2_rn(f[2 * c].z, f[2 * c].w));
                h[c].z = h2u(__floats2half2_rn(f[2 * c + 1].x, f[2 * c + 1].y));
                h[c].w = h2u(__floats2half2_rn(f[2 * c + 1].z, f[2 * c + 1].w));
            }
        }
        float slo = 0.0f, shi = 0.0f;
        const half2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
        for (int c = 0; c < 4; ++c) {              // chunks of 8: k 0-7 (lo), 8-15 (hi), 16-23 (lo), 24-31 (hi)
            u32* u = reinterpret_cast<u32*>(&h[c]);
            float s = 0.0f;
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const float2 v = __half22float2(u2h(u[p]));
                s += v.x + v.y;
                if (c & 1) u[p] = h2u(__hmul2(u2h(u[p]), sixteenth));
            }
            if (c & 1) shi += s; else slo += s;
            *reinterpret_cast<uint4*>(sA + r * lds + gg * 32 + c * 8) = h[c];
        }
        sC[r * ngc + gg] = (1024.0f + ZP) * slo + (64.0f + ZP) * shi;
        if (OFS) sS[r * ngc + gg] = slo + shi;
    };
    if (threadIdx.x == 0) *reinterpret_cast<uint4*>(sZero) = make_uint4(0, 0, 0, 0);
    if ((int)threadIdx.x < items && PROBE != 2) stage_a(threadIdx.x);
    TRACE_T(tra0);
    // MARLIN_AGATE: the weight stages after the first wait until every A item of the CTA has landed,
    // so that A's loads (hits in L2) do not queue behind the grid's burst of weight misses. 1 (the
    // default): launches that rope, i.e. q/k/v -- their last warp ready 0.6 us sooner, tg128 +2%
    // over five interleaved pairs in three calls (session 9); 2: every launch; 3: every launch, and no
    // weights at all before then (o starts ~0.6 us before its wait, so its stage 0 lands in the same
    // burst): 3 measured worse (359.9 against 375.5 t/s); 0: none, for A/B runs
    if (MARLIN_AGATE >= 2 || (MARLIN_AGATE == 1 && rope_mask)) __syncthreads();
    if (MARLIN_AGATE == 3) issue(0, 0);
#pragma unroll
    for (int i = 1; i < STAGES - 1; ++i) issue(i, i);
    for (int it = threadIdx.x + MARLIN_THREADS; it < items && PROBE != 2; it += MARLIN_THREADS) stage_a(it);
    TRACE_T(tra);
    if (norm) {                                    // sum(x^2) over each whole row: every thread a strided share,
        float* red = sNorm;                        // reduced per warp, then (at the end) over the 8 warps
        for (int r = 0; r < rows; ++r) {
            float q = 0.0f;
            if (a_f16) {
                const uint2* xr = reinterpret_cast<const uint2*>(reinterpret_cast<const half*>(Av) + (i64)(m0 + r) * lda);
#pragma unroll 4
                for (int k = threadIdx.x; k < K / 4; k += MARLIN_THREADS) {
                    const uint2 v = xr[k];
                    const float2 p0 = __half22float2(u2h(v.x)), p1 = __half22float2(u2h(v.y));
                    q = fmaf(p0.x, p0.x, fmaf(p0.y, p0.y, fmaf(p1.x, p1.x, fmaf(p1.y, p1.y, q))));
                }
            } else {
                const float4* xr = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(Av) + (i64)(m0 + r) * lda);
#pragma unroll 4
                for (int k = threadIdx.x; k < K / 4; k += MARLIN_THREADS) {
                    const float4 v = xr[k];
                    q = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, q))));
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
            if (lane == 0) red[r * 8 + warp] = q;
        }
    }
    TRACE_T(trn);
    if (rope_mask && !early) rope_table();
    TRACE_T(trr);
    __syncthreads();
    if (!active && !cluster && kws == 1) return;   // (else every thread reaches the barriers below)
    TRACE_T(tr1);

    float acc[NWT][T][4][4];
#pragma unroll
    for (int w = 0; w < NWT; ++w)
        for_dec_acc<T>(lane, [&](int tt, int jj, int r, int, int) { acc[w][tt][jj][r] = 0.0f; });

    // ldmatrix.x4 row addresses: lanes 8i .. 8i+7 give rows 0-7 of k chunk i (of the group's 32)
    u32 b_addr[T], b_mul[T];
    // the C fragment's rows (columns of out^T): 2 (lane & 3) + {0, 1} within each row tile
    int crow[T][2];
    bool cok[T][2];
#pragma unroll
    for (int tt = 0; tt < T; ++tt) {
        const int r = tt * 8 + (lane & 7);
        b_addr[tt] = r < rows ? smem_addr(sA + r * lds + (gw0 - g0) * 32 + (lane >> 3) * 8) : smem_addr(sZero);
        b_mul[tt] = r < rows ? 2u : 0u;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rr = tt * 8 + 2 * (lane & 3) + h;
            cok[tt][h] = rr < rows;
            crow[tt][h] = (cok[tt][h] ? rr : 0) * ngc + (gw0 - g0);
        }
    }

    const u32 LO = 0x000f000fu, HI = 0x00f000f0u, EX = 0x64006400u;
    ring_walk<STAGES>(active ? n_st : 0, ring, WST, issue, [&](int i, const u8* stage) {
#pragma unroll
        for (int q = 0; q < GPS; ++q) {
            const int gi = i * GPS + q;
            if (GPS > 1 && gi >= ng) break;
            if (PROBE == 1) {
                acc[0][0][0][0] += __uint_as_float(*reinterpret_cast<const u32*>(stage + q * WST1 + lane * 16) & 1u);
                continue;
            }
            u32 bf[T][4];
            float cv[T][2], sv2[T][2];
#pragma unroll
            for (int tt = 0; tt < T; ++tt) {
                ldmatrix_x4(bf[tt], b_addr[tt] + (u32)(gi * 32) * b_mul[tt]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    cv[tt][h] = cok[tt][h] ? -sC[crow[tt][h] + gi] : 0.0f;
                    sv2[tt][h] = (OFS && cok[tt][h]) ? sS[crow[tt][h] + gi] : 0.0f;
                }
            }
#pragma unroll
            for (int w = 0; w < NWT; ++w) {
                const u8* st = stage + q * WST1 + w * GB;
                DecScales<QT> sc;
                sc.load(st, lane);
                const uint4 k0 = *reinterpret_cast<const uint4*>(st + lane * 16);
                const uint4 k1 = *reinterpret_cast<const uint4*>(st + 512 + lane * 16);
                const u32 x0[4] = {k0.x, k0.y, k0.z, k0.w}, x1[4] = {k1.x, k1.y, k1.z, k1.w};
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    const u32 a0 = x0[jj], a1 = x1[jj], a08 = a0 >> 8, a18 = a1 >> 8;
                    const u32 f0[4] = {lop3_and_or(a0, LO, EX), lop3_and_or(a08, LO, EX),
                                       lop3_and_or(a0, HI, EX), lop3_and_or(a08, HI, EX)};
                    const u32 f1[4] = {lop3_and_or(a1, LO, EX), lop3_and_or(a18, LO, EX),
                                       lop3_and_or(a1, HI, EX), lop3_and_or(a18, HI, EX)};
                    const float s0 = sc.s(2 * jj), s1 = sc.s(2 * jj + 1);
                    const float m0v = OFS ? sc.m(2 * jj) : 0.0f, m1v = OFS ? sc.m(2 * jj + 1) : 0.0f;
#pragma unroll
                    for (int tt = 0; tt < T; ++tt) {
                        float R[4];                // R = (this group's products) - C, C entering as the mma's addend
                        mma_16816_c(R, f0, bf[tt][0], bf[tt][1], cv[tt][0], cv[tt][1]);
                        mma_16816(R, f1, bf[tt][2], bf[tt][3]);
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            float v = fmaf(r < 2 ? s0 : s1, R[r], acc[w][tt][jj][r]);
                            if (OFS) v = fmaf(r < 2 ? m0v : m1v, sv2[tt][r & 1], v);
                            acc[w][tt][jj][r] = v;
                        }
                    }
                }
            }
        }
    });
    cp_wait<0>();
    TRACE_T(tr2);
    const MarlinJob job{o0, o1, o2, N0, N1, N2, t1, t2, t3, M, m0, rows, slabs, kws, cluster, mode, y, resid, part,
                        tickets, sRope, rope_mask, hd, n_rot, KVFold{kc, vc, pc, kslots, kpos, kv_f16, kv_cap, early && kc != nullptr ? sKV : nullptr}};
    if (norm) {                                    // the rms_norm's 1 / sqrt(mean(x^2) + eps) of each row
        float sc[T][2];
#pragma unroll
        for (int tt = 0; tt < T; ++tt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rr = tt * 8 + 2 * (lane & 3) + h;
                float q = 0.0f;
                if (rr < rows)
#pragma unroll
                    for (int w = 0; w < 8; ++w) q += sNorm[rr * 8 + w];
                sc[tt][h] = rr < rows ? 1.0f / sqrtf(q / (float)K + eps) : 0.0f;
            }
#pragma unroll
        for (int w = 0; w < NWT; ++w)
            for_dec_acc<T>(lane, [&](int tt, int jj, int r, int, int) { acc[w][tt][jj][r] *= sc[tt][r & 1]; });
    }
    marlin_finish<NWT, GLU, 4>(job, [&](auto&& f) {
        for_dec_acc<T>(lane, [&](int tt, int jj, int r, int row, int col) {
            f(row, col, acc[0][tt][jj][r], acc[NWT - 1][tt][jj][r]);
        });
    }, smem, warp, lane, t, active, sub, g, nt, N);
#if MARLIN_TRACE
    if (lane == 0) {
        const unsigned long long tr3 = global_timer_ns();   // (before the record's atomic: its contention is not ours)
        const unsigned int n = atomicAdd(&marlin_trace_n, 1u);
        if (n < MARLIN_TRACE_CAP) {
            unsigned long long* r = marlin_trace_buf + (size_t)n * MARLIN_TRACE_W;
            r[0] = tr0; r[1] = tr1; r[2] = tr2; r[3] = tr3;
            r[4] = ((unsigned long long)N0 << 32) | (unsigned)K;
            r[5] = ((unsigned long long)(GLU ? 1 : 0) << 32) | (unsigned)t3;
            r[6] = ((unsigned long long)blockIdx.x << 32) | ((unsigned)blockIdx.y << 8) | (unsigned)warp;
            r[7] = ((unsigned long long)gridDim.x << 32) | ((unsigned)gridDim.y << 8) | (unsigned)ng;
            r[8] = trw; r[9] = tra; r[10] = trn; r[11] = trr;
            r[12] = marlin_trace_mark[trace_warp_id() * 2]; r[13] = marlin_trace_mark[trace_warp_id() * 2 + 1];
            r[14] = tra0; r[15] = 0ull;
        }
    }
#endif
}

// -- the warpgroup kernel (sm_90a, 9..64 rows): wgmma with the weights in registers ---------------
// wgmma.m64nNk16 computes out^T (64 weight columns x NB rows of A) of one 64-column tile per k-step
// on the four warps of a warpgroup: warp w's A operand is the 16 x 16 fragment of columns 16 w ..
// 16 w + 15, which is word w of every lane's 16-byte word of the layout, dequantized in registers
// (dequant_word, f16, the group scale applied: (q - 8) s or q s + m, as marlin_main does); its B
// operand is act^T, read by the tensor cores straight from the CTA's A window in shared memory
// (K-major, 128-byte swizzle). Accumulators: NB / 2 f32 a thread (32 at 64 rows, against m4's 128).
// Work: a CTA of NWG warpgroups stages one k-slab's A window once and serves a run of tiles:
// warpgroup wg takes tiles tb + wg, tb + wg + NWG, ..., streamed back to back through its own ring of
// shared-memory stages, filled by bulk copies (one thread issues them) that complete on an mbarrier
// per stage: no CTA-wide barrier in the loop, and a slot is refilled once the wgmmas that read its
// fragments are done (so no "empty" barrier either). A tile's sums are stored (one slab) or written
// as partials and summed by the warpgroup that takes the tile's ticket last, as in marlin_finish.
// Epilogues: store and residual add (modes 0 and 3). Without sm_90a features (plain sm_90 builds: the
// nvcc test) the kernel body is empty; the host uses it on sm_90a only.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MARLIN_HAVE_WGMMA 1
#endif

// d (NB / 2 f32, wgmma's D fragment) = a (A fragment, 4 x f16x2) x B (shared memory descriptor) [+ d when
// acc != 0: the first k-step of a tile overwrites, so no instruction outside the wgmmas writes d]
template <int NB> struct Wgmma;
#define WG_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WG_A "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(acc)
template <> struct Wgmma<16> {
    static __device__ __forceinline__ void run(float* d, const u32* a, unsigned long long b, int acc) {
#ifdef MARLIN_HAVE_WGMMA
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, "
                     "{%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"
                     : WG_D4(0), WG_D4(4) : WG_A);
#endif
    }
};
template <> struct Wgmma<32> {
    static __device__ __forceinline__ void run(float* d, const u32* a, unsigned long long b, int acc) {
#ifdef MARLIN_HAVE_WGMMA
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,"
                     "%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
                     : WG_D4(0), WG_D4(4), WG_D4(8), WG_D4(12) : WG_A);
#endif
    }
};
template <> struct Wgmma<64> {
    static __device__ __forceinline__ void run(float* d, const u32* a, unsigned long long b, int acc) {
#ifdef MARLIN_HAVE_WGMMA
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,"
                     "%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
                     "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
                     : WG_D4(0), WG_D4(4), WG_D4(8), WG_D4(12), WG_D4(16), WG_D4(20), WG_D4(24), WG_D4(28)
                     : WG_A);
#endif
    }
};
#undef WG_D4
#undef WG_A

__device__ __forceinline__ void wg_fence() {
#ifdef MARLIN_HAVE_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef MARLIN_HAVE_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wg_wait() {
#ifdef MARLIN_HAVE_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
#endif
}
// the 128 threads of warpgroup wg (named barrier 1 + wg; 0 is __syncthreads)
__device__ __forceinline__ void wg_bar(int wg) { asm volatile("bar.sync %0, 128;\n" :: "r"(1 + wg) : "memory"); }

// a shared-memory matrix descriptor: start address, LBO and SBO (the caller ORs in the swizzle mode)
__device__ __forceinline__ unsigned long long wg_desc(u32 addr, u32 lbo, u32 sbo) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32);
}

// A lane's scales (and offsets) of word w of one group, as f16x2 pairs for dequant_word: slot 2 w
// (column c0 = 16 w + lane / 4) and 2 w + 1 (c1 = c0 + 8). gs: the group's chunk of the gs section,
// ss: Q4_K's superblock chunk (d, dmin).
template <int QT>
__device__ __forceinline__ void wg_scales(const u8* gs, const u8* ss, int lane, int w, half2& s0, half2& m0,
                                          half2& s1, half2& m1) {
    const int q = lane >> 2;
    if (QT == 2) {
        const u8* b = gs + q * 16 + 2 * w;                               // sc at slot, min at 8 + slot
        const half2 dd = *reinterpret_cast<const half2*>(ss + q * 32 + 4 * w);
        const half2 dm = *reinterpret_cast<const half2*>(ss + q * 32 + 16 + 4 * w);
        const float2 df = __half22float2(dd), mf = __half22float2(dm);
        s0 = __float2half2_rn(df.x * (float)b[0]);
        s1 = __float2half2_rn(df.y * (float)b[1]);
        m0 = __float2half2_rn(-(mf.x * (float)b[8]));
        m1 = __float2half2_rn(-(mf.y * (float)b[9]));
    } else {
        const half2 s = *reinterpret_cast<const half2*>(gs + q * 16 + 4 * w);
        s0 = __low2half2(s);
        s1 = __high2half2(s);
        if (QT == 1) {
            const half2 m = *reinterpret_cast<const half2*>(gs + 128 + q * 16 + 4 * w);
            m0 = __low2half2(m);
            m1 = __high2half2(m);
        } else {
            m0 = m1 = __float2half2_rn(0.0f);
        }
    }
}

// mbarriers and bulk copies (the tensor memory accelerator's plain 1-D copies): a stage of the ring is
// a few contiguous runs of the layout, each one cp.async.bulk that counts its bytes on the barrier
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 ok = 0;
    while (!ok)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// One tile's layout runs of one stage of GPS groups, as the warpgroup kernels stream them into
// shared memory: the groups' codes (CB), their gs chunks (SB) and (Q4_K) their superblock's d/dmin
template <int QT, int GPS> struct StageRuns {
    static constexpr int SCB = QT == 1 ? 256 : 128;          // a group's bytes in the gs section
    static constexpr int CB = GPS * 1024, SB = GPS * SCB, BYTES = CB + SB + (QT == 2 ? 256 : 0);
};
// those runs by bulk copy into dst, counted on bar; c, g, s: where the stage's runs start
template <int QT, int GPS>
__device__ __forceinline__ void copy_stage_runs(u32 dst, const u8* c, const u8* g, const u8* s, u32 bar) {
    using R = StageRuns<QT, GPS>;
    bulk_copy(dst, c, R::CB, bar);
    bulk_copy(dst + R::CB, g, R::SB, bar);
    if (QT == 2) bulk_copy(dst + R::CB + R::SB, s, 256, bar);
}
// (the host's shared memory size against a kernel's needs)
__device__ __forceinline__ void trap_unless_smem(u32 need) {
    u32 dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
    if (need > dyn) __trap();
}

template <int QT, int NB, int NWG, int STAGES, int GPS, bool SWAP = false>
__device__ __forceinline__ void marlin_wg_main(
        const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        float* o0, float* o1, float* o2, int N0, int N1, int N2, int t1, int t2, int t3,
        const void* __restrict__ Av, int a_f16, int M, int K, int lda,
        const float* resid, int mode, int slabs, int kws, int cluster, float* part, u32* tickets,
        const int* pos, int rope_mask, int hd, int n_rot, float theta_scale, float freq_scale,
        const float* norm_w, float eps, int norm, void* kc, void* vc, int* pc, const int* kslots,
        const int* kpos, int kv_f16, int kv_cap, int early) {
#ifdef MARLIN_HAVE_WGMMA
    using RS = StageRuns<QT, GPS>;
    constexpr int SCB = RS::SCB, CB = RS::CB, SB = RS::SB, WST = RS::BYTES;   // a stage's runs
    constexpr int ND = NB / 2;                     // accumulators a thread
    constexpr int NT = 128 * NWG;
    static_assert(8 % GPS == 0, "a stage's groups lie in one Q4_K superblock");
    // (the warpgroup and warp indices through a shuffle: values the compiler then knows to be warp-uniform,
    // so that the wgmmas below are not serialized as if they sat on divergent paths)
    const int tid = threadIdx.x, wt = tid & 127, lane = tid & 31;
    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0), wl = __shfl_sync(0xffffffffu, wt >> 5, 0);
    const int y = blockIdx.y, G = K / 32;
    const int GU = G / GPS;                        // (the host makes G a multiple of GPS: slabs of whole stages)
    const int g0 = GPS * (int)((i64)y * GU / slabs), ngc = GPS * (int)((i64)(y + 1) * GU / slabs) - g0;
    const int kw = ngc * 32;
    const int m0 = blockIdx.z * NB, rows = min(M - m0, NB);
    const int tpc = (t3 + gridDim.x - 1) / gridDim.x;                    // tiles of this CTA
    const int tb = blockIdx.x * tpc, te = min(tb + tpc, t3);
    const int my_tiles = te - tb > wg ? (te - tb - wg + NWG - 1) / NWG : 0;   // tb + wg, tb + wg + NWG, ...
    const int n_st = ngc / GPS;                    // stages a tile
    const int total = my_tiles * n_st;

    extern __shared__ uint4 smem4[];
    u8* smem = reinterpret_cast<u8*>(smem4);
    u8* ring = smem + wg * STAGES * WST;
    // the A window: NB rows x kw in 128-byte swizzled atoms (below), 1024-aligned as the swizzle needs
    u8* sA = smem + ((smem_addr(smem) + NWG * STAGES * WST + 1023u) & ~1023u) - smem_addr(smem);
    __shared__ u32 s_last[NWG];
    __shared__ __align__(8) unsigned long long s_full[NWG][STAGES];   // a stage has landed

    auto tile_of = [&](int t) { return tile_ref(t, t1, t2, N0, N1, N2, w0, w1, w2); };
    // The producer: thread 0 of each warpgroup issues the warpgroup's stream, one stage a call (tile
    // ti_in, stage si_in of it), into ring slot `slot`: the codes, gs and ss runs as bulk copies. Its
    // state lives in shared memory, so that the other threads hold no registers for it.
    struct Producer {
        const u8 *c, *g, *s;                       // the tile's codes, gs and ss runs at the slab's start
        int ti, si;
    };
    __shared__ Producer s_prod[NWG];
    const u32 ring_s = smem_addr(ring), full_s = smem_addr(&s_full[wg][0]);
    auto set_tile = [&](Producer& P) {
        if (P.ti >= my_tiles) return;
        const TileRef r = tile_of(tb + wg + NWG * P.ti);
        const Layout L = layout_of<QT>(r.N, K);
        P.c = r.W + ((i64)r.nt * (K / 16) + 2 * g0) * 512;
        P.g = r.W + L.gs + ((i64)r.nt * G + g0) * SCB;
        P.s = r.W + L.ss + (i64)r.nt * (G / 8) * 256;
    };
    auto issue = [&](int slot) {
        Producer P = s_prod[wg];
        if (P.ti >= my_tiles) return;
        const u32 bar = full_s + 8u * slot, dst = ring_s + (u32)(slot * WST);
        const i64 gs = (i64)P.si * GPS;
        mbar_expect(bar, WST);
        copy_stage_runs<QT, GPS>(dst, P.c + gs * 1024, P.g + gs * SCB, P.s + (i64)((g0 + gs) >> 3) * 256, bar);
        if (++P.si == n_st) {
            P.si = 0;
            ++P.ti;
            set_tile(P);
        }
        s_prod[wg] = P;
    };

    trap_unless_smem((u32)(NWG * STAGES * WST + 1024 + NB * kw * 2));
    PDL_TRIGGER();
    if (wt == 0) {
#pragma unroll
        for (int i = 0; i < STAGES; ++i) mbar_init(full_s + 8u * i, 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // the barriers, to the copy engine
        Producer P{nullptr, nullptr, nullptr, 0, 0};
        set_tile(P);
        s_prod[wg] = P;
#pragma unroll
        for (int i = 0; i < STAGES - 2; ++i) issue(i);   // weights: nothing before us writes them
    }
    asm volatile("griddepcontrol.wait;\n" ::: "memory");

    // The A window, K-major with the 128-byte swizzle: atom a (k 64 a .. 64 a + 63) holds NB rows of 128
    // bytes, 16-byte chunk c of row r at chunk c ^ (r % 8) -- so that the tensor cores' reads of 8-row
    // core matrices meet no bank conflicts (the unswizzled layout measured slower). A thread takes one
    // 16-byte chunk (8 k of one row); consecutive threads take a row's consecutive chunks (coalesced
    // reads, and every 8 of them one whole 128-byte row: conflict-free stores). f16 A goes in by
    // cp.async (every chunk in flight at once), f32 A four chunks a thread at a time.
    {
        const int cpr = kw / 8, n = NB * cpr;
        auto chunk = [&](int c, int& r, i64& off) -> u32 {
            r = c / cpr;
            const int q = c - r * cpr;
            off = (i64)(m0 + r) * lda + (i64)g0 * 32 + q * 8;
            return (u32)((q >> 3) * (NB * 128) + r * 128 + (((q & 7) ^ (r & 7)) << 4));
        };
        if (a_f16) {
            const u32 a0 = smem_addr(sA);
            for (int c = tid; c < n; c += NT) {
                int r;
                i64 off;
                const u32 d = chunk(c, r, off);
                if (r < rows) cp_async16_if(a0 + d, reinterpret_cast<const half*>(Av) + off, true);
                else *reinterpret_cast<uint4*>(sA + d) = make_uint4(0, 0, 0, 0);
            }
            cp_commit();
            cp_wait<0>();
        } else {
            for (int c0 = tid; c0 < n; c0 += 4 * NT) {
                float4 f[4][2];
                u32 d[4];
                bool ok[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    int r;
                    i64 off;
                    const int c = c0 + u * NT;
                    d[u] = chunk(c < n ? c : c0, r, off);
                    ok[u] = c < n && r < rows;
                    const float4* src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(Av) + off);
                    f[u][0] = ok[u] ? src[0] : make_float4(0.f, 0.f, 0.f, 0.f);
                    f[u][1] = ok[u] ? src[1] : make_float4(0.f, 0.f, 0.f, 0.f);
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    if (c0 + u * NT >= n) break;
                    uint4 v;
                    v.x = h2u(__floats2half2_rn(f[u][0].x, f[u][0].y));
                    v.y = h2u(__floats2half2_rn(f[u][0].z, f[u][0].w));
                    v.z = h2u(__floats2half2_rn(f[u][1].x, f[u][1].y));
                    v.w = h2u(__floats2half2_rn(f[u][1].z, f[u][1].w));
                    *reinterpret_cast<uint4*>(sA + d[u]) = v;
                }
            }
        }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // the window, to the tensor cores
    __syncthreads();                               // (and the barriers' initialisation, to every thread)

    // the window's descriptor (128-byte swizzle; SBO: 8 rows = 1024 bytes; LBO unused) at k-step 0;
    // k-step j is 32 bytes into atom j / 4: its address field (>> 4) gains 2 (j % 4) + (j / 4) NB 8
    const u32 lbo = SWAP ? 1024u : 16u, sbo = SWAP ? 16u : 1024u;
    const unsigned long long desc0 = wg_desc(smem_addr(sA), lbo, sbo) | (1ull << 62);
    float acc[ND];
#pragma unroll
    for (int i = 0; i < ND; ++i) acc[i] = 0.0f;    // (never read before a tile's first wgmma overwrites it)

    // Step i: thread 0 refills the slot of stage i - 2 (free: its wgmmas, which needed every warp's
    // fragments of it, are complete) with stage i + STAGES - 2; the warpgroup waits for stage i,
    // dequantizes it into fa while stage i - 1's wgmmas run, and commits its wgmmas as one group.
    int slot = 0, ti = 0, si = 0;                  // the ring slot, tile and stage being computed
    u32 phase = 0;
    auto step = [&](u32 (&fa)[GPS][2][4]) {
        if (wt == 0) issue(slot >= 2 ? slot - 2 : slot + STAGES - 2);
        mbar_wait(full_s + 8u * slot, phase);
        const u8* stage = ring + slot * WST;
        if (++slot == STAGES) {
            slot = 0;
            phase ^= 1u;
        }
#pragma unroll
        for (int q = 0; q < GPS; ++q) {
            half2 s0, m0v, s1, m1v;
            wg_scales<QT>(stage + CB + q * SCB, stage + CB + SB, lane, wl, s0, m0v, s1, m1v);
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                const u32 word = *reinterpret_cast<const u32*>(stage + q * 1024 + ks * 512 + lane * 16 + wl * 4);
                u32 b[4];
                dequant_word<QT>(word, s0, m0v, s1, m1v, b);
                fa[q][ks][0] = b[0]; fa[q][ks][1] = b[2]; fa[q][ks][2] = b[1]; fa[q][ks][3] = b[3];
            }
        }
        wg_fence();
#pragma unroll
        for (int q = 0; q < GPS; ++q)
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                const int j = (si * GPS + q) * 2 + ks;             // k-step of the slab
                Wgmma<NB>::run(acc, fa[q][ks], desc0 + (unsigned long long)(2 * (j & 3) + (j >> 2) * NB * 8),
                               si != 0 || q != 0 || ks != 0);
            }
        wg_commit();
        if (++si != n_st) {
            wg_wait<1>();
            return;
        }
        si = 0;
        wg_wait<0>();
        // the tile is done: store, or partials and the ticket
        const int t = tb + wg + NWG * ti++;
        const TileRef r = tile_of(t);
        const int N = r.N;
        float* out = r.g == 0 ? o0 : (r.g == 1 ? o1 : o2);
        const int ncol0 = r.nt * 64;
        if (slabs == 1) {
#pragma unroll
            for (int j = 0; j < ND; ++j) {
                const int col = wl * 16 + (lane >> 2) + 8 * ((j >> 1) & 1), row = (j >> 2) * 8 + 2 * (lane & 3) + (j & 1);
                if (row < rows && ncol0 + col < N) {
                    const i64 o = (i64)(m0 + row) * N + ncol0 + col;
                    out[o] = mode == 3 ? acc[j] + resid[o] : acc[j];
                }
            }
            return;
        }
#pragma unroll
        for (int j = 0; j < ND; j += 2) {          // (columns 2c, 2c + 1 of D: rows r, r + 1 of the tile)
            const int col = wl * 16 + (lane >> 2) + 8 * ((j >> 1) & 1), row = (j >> 2) * 8 + 2 * (lane & 3);
            float* pp = part + (((i64)y * M + m0 + row) * t3 + t) * 64 + col;
            if (row < rows) pp[0] = acc[j];
            if (row + 1 < rows) pp[(i64)t3 * 64] = acc[j + 1];
        }
        // (one thread's fences, after the warpgroup's barrier, order the warpgroup's partials before its
        // ticket and the other slabs' partials before the sum, as a cooperative grid sync does)
        wg_bar(wg);
        u32* ticket = tickets + (i64)t * gridDim.z + blockIdx.z;
        if (wt == 0) {
            __threadfence();
            const bool last = atomicAdd(ticket, 1u) == (u32)(slabs - 1);
            if (last) __threadfence();
            s_last[wg] = last;
        }
        wg_bar(wg);
        if (!s_last[wg]) return;
        // the sum over the slabs: 16-byte loads, four a thread in flight per slab
        const i64 sstride = (i64)M * t3 * 64;
        for (int e0 = wt; e0 < rows * 16; e0 += 128 * 4) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int s = 0; s < slabs; ++s) {
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int e = e0 + u * 128;
                    if (e < rows * 16) {
                        const float4 x = __ldcg(reinterpret_cast<const float4*>(
                            part + (((i64)s * M + m0 + (e >> 4)) * t3 + t) * 64) + (e & 15));
                        v[u].x += x.x; v[u].y += x.y; v[u].z += x.z; v[u].w += x.w;
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int e = e0 + u * 128;
                if (e >= rows * 16) break;
                const int row = e >> 4, c4 = (e & 15) * 4;
                const float vv[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    if (ncol0 + c4 + h >= N) break;
                    const i64 o = (i64)(m0 + row) * N + ncol0 + c4 + h;
                    out[o] = mode == 3 ? vv[h] + resid[o] : vv[h];
                }
            }
        }
        if (wt == 0) *ticket = 0u;                 // ready for the next replay
    };
    u32 fa0[GPS][2][4], fa1[GPS][2][4];
    for (int i = 0; i < total; i += 2) {
        step(fa0);
        if (i + 1 < total) step(fa1);
    }
    wg_wait<0>();
#endif
}

#define MARLIN_ARGS                                                                                   \
    const u8 *w0, const u8 *w1, const u8 *w2, float *o0, float *o1, float *o2, int N0, int N1, int N2, \
        int t1, int t2, int t3, const void *A, int a_f16, int M, int K, int lda, const float *resid,      \
        int mode, int slabs, int kws, int cluster, float *part, u32 *tickets, const int *pos, int rope_mask, \
        int hd, int n_rot, float theta_scale, float freq_scale, const float *norm_w, float eps, int norm,      \
        void *kc, void *vc, int *pc, const int *kslots, const int *kpos, int kv_f16, int kv_cap, int early
#define MARLIN_PASS w0, w1, w2, o0, o1, o2, N0, N1, N2, t1, t2, t3, A, a_f16, M, K, lda, resid, mode, slabs, kws, \
        cluster, part, tickets, pos, rope_mask, hd, n_rot, theta_scale, freq_scale, norm_w, eps, norm, kc, vc, pc, \
        kslots, kpos, kv_f16, kv_cap, early

// marlin_<type>_m<MT>[_glu]: 16*MT rows of A per tile; marlin_q4_0_{m,d}1_s<STAGES>g<GPS>: pipeline
// variants of the m1 and d1 kernels for benchmarks/bench_marlin.py --sweep
#define MARLIN_KERNEL(NAME, QT, MT, GLU, STAGES, GPS, MINB)                                            \
    extern "C" __global__ void __launch_bounds__(MARLIN_THREADS, MINB) NAME(MARLIN_ARGS) {           \
        marlin_main<QT, MT, GLU, STAGES, GPS>(MARLIN_PASS);                                           \
    }

// marlin_<type>_d<T>[_glu]: the decode kernel, 8*T rows of A per tile
#define MARLIN_DEC_KERNEL(NAME, QT, T, GLU, STAGES, GPS, MINB)                                        \
    extern "C" __global__ void __launch_bounds__(MARLIN_THREADS, MINB) NAME(MARLIN_ARGS) {           \
        marlin_dec_main<QT, T, GLU, STAGES, GPS>(MARLIN_PASS);                                        \
    }

// (MB1, MB2: CTAs per SM the d1 / d2 kernels are built for; Q4_K's scales need more registers)
#define MARLIN_TYPE(QT, QN, MB1, MB2)                                      \
    MARLIN_DEC_KERNEL(marlin_##QN##_d1, QT, 1, false, 4, 2, MB1)           \
    MARLIN_DEC_KERNEL(marlin_##QN##_d1_glu, QT, 1, true, 4, 1, 2)          \
    MARLIN_DEC_KERNEL(marlin_##QN##_d2, QT, 2, false, 4, 2, MB2)           \
    MARLIN_DEC_KERNEL(marlin_##QN##_d2_glu, QT, 2, true, 4, 1, 1)          \
    MARLIN_KERNEL(marlin_##QN##_m1, QT, 1, false, 4, 2, 3)                 \
    MARLIN_KERNEL(marlin_##QN##_m1_glu, QT, 1, true, 4, 1, 2)              \
    MARLIN_KERNEL(marlin_##QN##_m2, QT, 2, false, 4, 1, 2)                 \
    MARLIN_KERNEL(marlin_##QN##_m2_glu, QT, 2, true, 4, 1, 1)              \
    MARLIN_KERNEL(marlin_##QN##_m4, QT, 4, false, 4, 1, 1)

// MARLIN_XONLY (measurement builds of the x64 kernel, benchmarks/xtrace.py): no other GEMM kernels,
// so NVRTC compiles the module in seconds rather than ~50
#ifndef MARLIN_XONLY
#define MARLIN_XONLY 0
#endif
#if !MARLIN_XONLY
MARLIN_TYPE(0, q4_0, 2, 1)
MARLIN_TYPE(1, q4_1, 2, 1)
MARLIN_TYPE(2, q4_k, 2, 1)
#endif

// marlin_<type>_w<NB>: the warpgroup kernel (sm_90a), NB rows of A per tile, NWG warpgroups a CTA (as
// many as the registers allow without spills: marlin_ops.WG_NWG), STAGES stages of GPS groups (w32/w64:
// four groups a stage in two warpgroups measured faster than two in three: 64 x 4096 x 4096 15.8
// against 20.4 us); _x: LBO and SBO swapped (a layout check for tests)
#define MARLIN_WG_KERNEL(NAME, QT, NB, NWG, STAGES, GPS, SWAP)                                   \
    extern "C" __global__ void __launch_bounds__(128 * NWG, 1) NAME(MARLIN_ARGS) {                \
        marlin_wg_main<QT, NB, NWG, STAGES, GPS, SWAP>(MARLIN_PASS);                              \
    }
#define MARLIN_WG_TYPE(QT, QN)                                         \
    MARLIN_WG_KERNEL(marlin_##QN##_w16, QT, 16, 4, 8, 2, false)        \
    MARLIN_WG_KERNEL(marlin_##QN##_w32, QT, 32, 2, 6, 4, false)        \
    MARLIN_WG_KERNEL(marlin_##QN##_w64, QT, 64, 2, 6, 4, false)
#if !MARLIN_XONLY
MARLIN_WG_TYPE(0, q4_0)
MARLIN_WG_TYPE(1, q4_1)
MARLIN_WG_TYPE(2, q4_k)
MARLIN_WG_KERNEL(marlin_q4_0_w16_x, 0, 16, 4, 8, 2, true)
#endif

// -- the mixed-input kernel (sm_90a; the plan's choice at 33..64 rows with f16 A) -----------------
// marlin_<type>_x64: out (64 rows x 128 columns: two 64-column tiles) over the whole K in one CTA,
// warp-specialized (544 threads):
//  - warp 16's lane 0 streams the two tiles' layout runs into a raw ring (bulk copies, a "raw
//    full" mbarrier a stage, X_DR stages ahead, a slot reused once its "raw empty" completes);
//  - warpgroup 3 stages A's 64 rows x 64 k of a stage (cp.async, 128-byte swizzle) as soon as the
//    stage's slot is free, each lane's copies arriving on the stage's "full" barrier when they land
//    (cp.async.mbarrier.arrive.noinc: the warps never wait for them; f32 A is loaded, converted and
//    stored by the lanes, which then arrive). One warp doing all of A issued 1 us a stage;
//  - warpgroups 1 and 2 dequantize, alternate stages: a stage's raw runs into a K-major f16 B tile
//    (128 columns x 64 k, 128-byte swizzle, written with stmatrix from the mma fragments
//    dequant_word yields), then arrive on "raw empty" and "full";
//  - warpgroup 0 consumes: four wgmma.m64n128k16 a stage with both operands in shared memory (A:
//    the activations, m = rows; B: the weights, n = columns), and arrives on the stage's "empty"
//    barrier once those wgmmas are complete; then the epilogue.
// Session 9's first version had one producer warpgroup do all of this in turn: 830 ns a stage
// (benchmarks/xtrace.py), the consumer idle 84% of it. Modes 0 (store) and 3 (residual add).
#ifndef MARLIN_XST
#define MARLIN_XST 6
#endif
#ifndef MARLIN_XRS
#define MARLIN_XRS 8
#endif
constexpr int X_ST = MARLIN_XST;                   // stages of the A/B ring (64 k each)
constexpr int X_RS = MARLIN_XRS;                   // stages of the raw (layout) ring
constexpr int X_DR = X_RS - 2;                     // raw stages issued before the CTA's barrier (the rest as
                                                   // their slots are read)
constexpr int X_THREADS = 544;
constexpr int X_AB = 64 * 128;                     // bytes of an A stage (64 rows x 64 k f16)
constexpr int X_BB = 128 * 128;                    // bytes of a B stage (128 columns x 64 k f16)
// MARLIN_XTRACE (a measurement build, benchmarks/xtrace.py): CTA 0 stamps clock64 at each stage's
// waits (marlin_xtrace[event][stage], stages < 512)
#ifndef MARLIN_XTRACE
#define MARLIN_XTRACE 0
#endif
#if MARLIN_XTRACE
__device__ long long marlin_xtrace[10 * 512];
#define XSTAMP(ev, s) do { if (blockIdx.x == 0 && blockIdx.z == 0 && (s) < 512) \
    marlin_xtrace[(ev) * 512 + (s)] = clock64(); } while (0)
#else
#define XSTAMP(ev, s) do {} while (0)
#endif

__device__ __forceinline__ void cp_async16_zfill(u32 dst, const void* src, bool p) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(p ? 16 : 0));
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void stmatrix_x4(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}
// d (64 f32, the D fragment) [+]= A (shared, descriptor a) x B (shared, descriptor b), m64n128k16
__device__ __forceinline__ void wgmma_ss_128(float* d, unsigned long long a, unsigned long long b, int acc) {
#ifdef MARLIN_HAVE_WGMMA
#define XD8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
               "+f"(d[i + 6]), "+f"(d[i + 7])
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,"
                 "%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,"
                 "%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,"
                 "%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : XD8(0), XD8(8), XD8(16), XD8(24), XD8(32), XD8(40), XD8(48), XD8(56)
                 : "l"(a), "l"(b), "r"(acc));
#undef XD8
#endif
}

template <int QT>
__device__ __forceinline__ void marlin_x_main(
        const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        float* o0, float* o1, float* o2, int N0, int N1, int N2, int t1, int t2, int t3,
        const void* __restrict__ Av, int a_f16, int M, int K, int lda, const float* resid, int mode,
        int slabs, float* part, u32* tickets) {
#ifdef MARLIN_HAVE_WGMMA
    using R = StageRuns<QT, 2>;                    // a tile's layout runs of one stage (two groups)
    static_assert(X_ST >= 2 && X_DR >= 1, "x64: ring depths");
    const int tid = threadIdx.x, lane = tid & 31;
    const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0), wl = warp & 3, wg = warp >> 2;
    const int G = K / 32;                          // (the host makes G even)
    // k-split: slab blockIdx.y of `slabs` takes stages [st0, st0 + n_st) of the G / 2; the rings count
    // from the slab's first stage (s), the global copies from st0 + s
    const int st0 = (int)((i64)blockIdx.y * (G / 2) / slabs);
    const int n_st = (int)((i64)(blockIdx.y + 1) * (G / 2) / slabs) - st0;
    const int m0 = blockIdx.z * 64, rows = min(M - m0, 64);
    const int tb = blockIdx.x * 2;                 // tiles tb, tb + 1 (the second may not exist)

    extern __shared__ uint4 smem4[];
    const u32 base = (smem_addr(smem4) + 1023u) & ~1023u;
    u8* smem = reinterpret_cast<u8*>(smem4) + (base - smem_addr(smem4));
    const u32 sA = base, sB = base + X_ST * X_AB;  // the rings' shared addresses (1024-aligned stages)
    u8* raw = smem + X_ST * (X_AB + X_BB);
    __shared__ __align__(8) unsigned long long s_full[X_ST], s_empty[X_ST], s_rfull[X_RS], s_rempty[X_RS];
    const u32 full_s = smem_addr(&s_full[0]), empty_s = smem_addr(&s_empty[0]);
    const u32 rfull_s = smem_addr(&s_rfull[0]), rempty_s = smem_addr(&s_rempty[0]);
    trap_unless_smem((u32)(X_ST * (X_AB + X_BB) + X_RS * 2 * R::BYTES + 1024));
    TileRef tr[2];
    bool tok[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        tok[u] = tb + u < t3;
        tr[u] = tile_ref(tok[u] ? tb + u : tb, t1, t2, N0, N1, N2, w0, w1, w2);
    }

    // A of stage s by warpgroup `wl`'s 4 warps: 64 rows x 64 k as 512 16-byte chunks, 4 a lane (column
    // chunk q = lane & 7, rows lane / 8 + 4 wl + 16 i, i < 4: the swizzle's row term is fixed); f16
    // by cp.async, each lane's copies arriving on full(s) when they land; f32 loaded and converted
    const int aq = lane & 7, ar0 = (lane >> 3) + 4 * wl;
    u32 avalid = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) avalid |= (ar0 + 16 * i < rows ? 1u : 0u) << i;
    const u32 adoff = (u32)(ar0 * 128 + ((aq ^ (ar0 & 7)) << 4));
    const i64 abase = (i64)(m0 + ar0) * lda + aq * 8;
    auto stage_a = [&](int s) {
        const u32 dst = sA + (u32)((s % X_ST) * X_AB) + adoff;
        if (a_f16) {
            const half* A = reinterpret_cast<const half*>(Av) + abase + (i64)(st0 + s) * 64;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const bool ok = (avalid >> i) & 1u;
                cp_async16_zfill(dst + (u32)(i * 16 * 128), ok ? (const void*)(A + (i64)i * 16 * lda) : Av, ok);
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n"
                         :: "r"(full_s + 8u * (s % X_ST)) : "memory");
        } else {
            const float* A = reinterpret_cast<const float*>(Av) + abase + (i64)(st0 + s) * 64;
            float4 f[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                f[i][0] = f[i][1] = make_float4(0.f, 0.f, 0.f, 0.f);
                if ((avalid >> i) & 1u) {
                    const float4* src = reinterpret_cast<const float4*>(A + (i64)i * 16 * lda);
                    f[i][0] = src[0]; f[i][1] = src[1];
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
                asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"
                             :: "r"(dst + (u32)(i * 16 * 128)),
                                "r"(h2u(__floats2half2_rn(f[i][0].x, f[i][0].y))), "r"(h2u(__floats2half2_rn(f[i][0].z, f[i][0].w))),
                                "r"(h2u(__floats2half2_rn(f[i][1].x, f[i][1].y))), "r"(h2u(__floats2half2_rn(f[i][1].z, f[i][1].w)))
                             : "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // to the tensor cores
            mbar_arrive(full_s + 8u * (s % X_ST));
        }
    };

    if (warp == 16) {
        // ---- the raw warp: its lane 0 streams stage s's runs of both tiles into raw slot s % X_RS
        // (a stage's runs are contiguous in the layout: the next stage is a fixed step further)
        const u8 *rc[2], *rg[2], *rsc[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const Layout L = layout_of<QT>(tr[u].N, K);
            rc[u] = tr[u].W + (i64)tr[u].nt * (K / 16) * 512;
            rg[u] = tr[u].W + L.gs + (i64)tr[u].nt * G * R::SCB;
            rsc[u] = tr[u].W + L.ss + (i64)tr[u].nt * (G / 8) * 256;
        }
        const u32 rbytes = (tok[0] ? R::BYTES : 0) + (tok[1] ? R::BYTES : 0);
        auto issue_raw = [&](int s) {
            const u32 bar = rfull_s + 8u * (s % X_RS), dst = smem_addr(raw) + (u32)((s % X_RS) * 2 * R::BYTES);
            const int gs = st0 + s;                // the stage in the weight's k order
            mbar_expect(bar, rbytes);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                if (!tok[u]) continue;
                copy_stage_runs<QT, 2>(dst + (u32)(u * R::BYTES), rc[u] + (i64)gs * R::CB, rg[u] + (i64)gs * R::SB,
                                       rsc[u] + (i64)(gs >> 2) * 256, bar);
            }
        };
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < X_ST; ++i) {
                // full: a dequantizing warpgroup's 4 warps + the A warpgroup's 128 lanes; empty: the
                // consumer's 4 warps (one arrive a warp where it can be: with every thread arriving,
                // 512 arrives a stage went to these barriers)
                mbar_init(full_s + 8u * i, 4 + 128);
                mbar_init(empty_s + 8u * i, 4);
            }
#pragma unroll
            for (int i = 0; i < X_RS; ++i) {
                mbar_init(rfull_s + 8u * i, 1);
                mbar_init(rempty_s + 8u * i, 4);
            }
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            for (int s = 0; s < X_DR && s < n_st; ++s) issue_raw(s);   // weights: nothing before us writes them
        }
        PDL_TRIGGER();
        __syncthreads();                           // the barriers' initialisation, to every thread
        if (lane == 0) {
            for (int s = X_DR; s < n_st; ++s) {    // into the slot stage s - X_RS held, once it is read
                if (s >= X_RS) mbar_wait(rempty_s + 8u * (s % X_RS), ((s / X_RS) + 1) & 1);
                issue_raw(s);
            }
        }
        return;
    }
    PDL_TRIGGER();
    __syncthreads();
    asm volatile("griddepcontrol.wait;\n" ::: "memory");

    if (wg == 3) {
        // ---- the A warpgroup ----
        for (int s = 0; s < n_st; ++s) {
            if (s >= X_ST) mbar_wait(empty_s + 8u * (s % X_ST), ((s / X_ST) + 1) & 1);
            if (tid == 384) XSTAMP(0, s);
            stage_a(s);
        }
        cp_wait<0>();                              // (the CTA's shared memory outlives the copies)
        return;
    }

    if (wg == 1 || wg == 2) {
        // ---- the dequantizing warpgroups: wg 1 the even stages, wg 2 the odd ones ----
        const int u = wl >> 1, q = wl & 1;         // this warp: tile u, group q of a stage, both k16 steps
        const bool ok = u ? tok[1] : tok[0];       // (tok[u] with a run-time u would live in local memory)
        for (int s = wg - 1; s < n_st; s += 2) {
            if (s >= X_ST) mbar_wait(empty_s + 8u * (s % X_ST), ((s / X_ST) + 1) & 1);
            if ((tid & 127) == 0) XSTAMP(1, s);
            mbar_wait(rfull_s + 8u * (s % X_RS), (s / X_RS) & 1);
            if ((tid & 127) == 0) XSTAMP(2, s);
            const u8* st = raw + (s % X_RS) * 2 * R::BYTES + u * R::BYTES;
            const u32 bdst = sB + (u32)((s % X_ST) * X_BB);
            uint4 wv[2];
#pragma unroll
            for (int ks = 0; ks < 2; ++ks)
                wv[ks] = ok ? *reinterpret_cast<const uint4*>(st + q * 1024 + ks * 512 + lane * 16)
                                : make_uint4(0, 0, 0, 0);
            half2 sc[4][4];
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                sc[w][0] = sc[w][1] = sc[w][2] = sc[w][3] = __float2half2_rn(0.0f);
                if (ok) wg_scales<QT>(st + R::CB + q * R::SCB, st + R::CB + R::SB, lane, w, sc[w][0], sc[w][1], sc[w][2], sc[w][3]);
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(rempty_s + 8u * (s % X_RS));   // the warp has read the raw slot
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                const u32 words[4] = {wv[ks].x, wv[ks].y, wv[ks].z, wv[ks].w};
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    u32 b[4];
                    dequant_word<QT>(words[w], sc[w][0], sc[w][1], sc[w][2], sc[w][3], b);
                    // matrices (col half, k half): 0 = (0-7, 0-7) b0, 1 = (8-15, 0-7) b2, 2 = (0-7, 8-15) b1,
                    // 3 = (8-15, 8-15) b3; lane l gives row l & 7 of matrix l >> 3
                    const int mi = lane >> 3, n = u * 64 + w * 16 + (lane & 7) + 8 * (mi & 1);
                    const int c = 4 * q + 2 * ks + (mi >> 1);
                    stmatrix_x4(bdst + (u32)(n * 128 + ((c ^ (n & 7)) << 4)), b[0], b[2], b[1], b[3]);
                }
            }
            if ((tid & 127) == 0) XSTAMP(3, s);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // B, to the tensor cores
            __syncwarp();
            if (lane == 0) mbar_arrive(full_s + 8u * (s % X_ST));
        }
        return;
    }
    // ---- the consumer: warpgroup 0 ----
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    const u32 SW = 1u << 30;                       // (bit 62 of the descriptor: the 128-byte swizzle)
    for (int s = 0; s < n_st; ++s) {
        const int slot = s % X_ST;
        if (tid == 0) XSTAMP(7, s);
        mbar_wait(full_s + 8u * slot, (s / X_ST) & 1);
        if (tid == 0) XSTAMP(8, s);
        // A came by cp.async (the generic proxy) from warps that do not wait for it: this thread
        // orders it before its wgmma's reads (the async proxy)
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        const unsigned long long da = wg_desc(sA + (u32)(slot * X_AB), 16, 1024) | ((unsigned long long)SW << 32);
        const unsigned long long db = wg_desc(sB + (u32)(slot * X_BB), 16, 1024) | ((unsigned long long)SW << 32);
        wg_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_ss_128(acc, da + 2 * j, db + 2 * j, s != 0 || j != 0);
        wg_commit();
        wg_wait<1>();
        if (tid == 0) XSTAMP(9, s);
        __syncwarp();
        if (s > 0 && lane == 0) mbar_arrive(empty_s + 8u * ((s - 1) % X_ST));
    }
    wg_wait<0>();
    // D fragment: row 16 wl + lane / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2
    if (slabs == 1) {
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            const int row = 16 * wl + (lane >> 2) + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
            const int u = col >> 6;
            if (!tok[u] || row >= rows) continue;
            const int n = tr[u].nt * 64 + (col & 63), N = tr[u].N;
            if (n >= N) continue;
            float* out = tr[u].g == 0 ? o0 : (tr[u].g == 1 ? o1 : o2);
            const i64 o = (i64)(m0 + row) * N + n;
            out[o] = mode == 3 ? acc[i] + resid[o] : acc[i];
        }
        return;
    }
    // several slabs: partials part[slab][row][tile][64] (as marlin_finish's), the pair's ticket (tile
    // tb's), and the consumer that arrives last sums the slabs in order, stores and resets the ticket
#pragma unroll
    for (int i = 0; i < 64; i += 2) {
        const int row = 16 * wl + (lane >> 2) + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * (lane & 3);
        const int u = col >> 6;
        if (!tok[u] || row >= rows) continue;
        float2* pp = reinterpret_cast<float2*>(part + (((i64)blockIdx.y * M + m0 + row) * t3 + tb + u) * 64 + (col & 63));
        *pp = make_float2(acc[i], acc[i + 1]);
    }
    __shared__ int s_xlast;
    asm volatile("bar.sync 1, 128;\n" ::: "memory");                 // the consumer warpgroup's partials
    u32* ticket = tickets + (i64)tb * gridDim.z + blockIdx.z;
    if (tid == 0) {
        __threadfence();
        const bool last = atomicAdd(ticket, 1u) == (u32)(slabs - 1);
        if (last) __threadfence();
        s_xlast = last;
    }
    asm volatile("bar.sync 1, 128;\n" ::: "memory");
    if (!s_xlast) return;
    // the sum: element e = (row, tile u, 4 columns) of rows x 2 tiles x 16 float4
    const int nu = tok[1] ? 2 : 1;
    for (int e = tid; e < rows * nu * 16; e += 128) {
        const int row = e / (nu * 16), u = (e / 16) % nu, c4 = (e & 15) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int y = 0; y < slabs; ++y) {
            const float4 x = __ldcg(reinterpret_cast<const float4*>(
                part + (((i64)y * M + m0 + row) * t3 + tb + u) * 64 + c4));
            v.x += x.x; v.y += x.y; v.z += x.z; v.w += x.w;
        }
        const TileRef r = u ? tr[1] : tr[0];      // (u is not known at compile time here)
        const int N = r.N, n = r.nt * 64 + c4;
        float* out = r.g == 0 ? o0 : (r.g == 1 ? o1 : o2);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const float x = h == 0 ? v.x : (h == 1 ? v.y : (h == 2 ? v.z : v.w));
            const i64 o = (i64)(m0 + row) * N + n + h;
            if (n + h < N) out[o] = mode == 3 ? x + resid[o] : x;
        }
    }
    if (tid == 0) *ticket = 0u;                    // ready for the next replay
#endif
}

#define MARLIN_X_KERNEL(NAME, QT)                                                                   \
    extern "C" __global__ void __launch_bounds__(X_THREADS, 1) NAME(MARLIN_ARGS) {                  \
        marlin_x_main<QT>(w0, w1, w2, o0, o1, o2, N0, N1, N2, t1, t2, t3, A, a_f16, M, K, lda, resid, mode, \
                          slabs, part, tickets);                                                   \
    }
MARLIN_X_KERNEL(marlin_q4_0_x64, 0)
MARLIN_X_KERNEL(marlin_q4_1_x64, 1)
MARLIN_X_KERNEL(marlin_q4_k_x64, 2)

#if !MARLIN_XONLY
MARLIN_KERNEL(marlin_q4_0_m1_s4g1, 0, 1, false, 4, 1, 3)
MARLIN_KERNEL(marlin_q4_0_m1_s6g1, 0, 1, false, 6, 1, 3)
MARLIN_KERNEL(marlin_q4_0_m1_s8g1, 0, 1, false, 8, 1, 2)
MARLIN_KERNEL(marlin_q4_0_m1_s3g2, 0, 1, false, 3, 2, 3)
MARLIN_KERNEL(marlin_q4_0_m1_s4g4, 0, 1, false, 4, 4, 2)
MARLIN_KERNEL(marlin_q4_0_m2_s4g2, 0, 2, false, 4, 2, 2)
MARLIN_KERNEL(marlin_q4_0_m4_s3g2, 0, 4, false, 3, 2, 1)
MARLIN_DEC_KERNEL(marlin_q4_0_d1_s3g2, 0, 1, false, 3, 2, 2)
MARLIN_DEC_KERNEL(marlin_q4_0_d1_s6g1, 0, 1, false, 6, 1, 2)
MARLIN_DEC_KERNEL(marlin_q4_0_d1_s3g4, 0, 1, false, 3, 4, 2)
extern "C" __global__ void __launch_bounds__(MARLIN_THREADS, 2) marlin_q4_0_d1_probe1(MARLIN_ARGS) {
    marlin_dec_main<0, 1, false, 4, 2, 1>(MARLIN_PASS);
}
extern "C" __global__ void __launch_bounds__(MARLIN_THREADS, 2) marlin_q4_0_d1_probe2(MARLIN_ARGS) {
    marlin_dec_main<0, 1, false, 4, 2, 2>(MARLIN_PASS);
}
#endif

// -- repacking GGUF blocks into the layout (at load), and reading it back ------------------------

// code (0..15) of element (n, k) of a GGUF row-major tensor of K columns
__device__ __forceinline__ u32 gguf_code(const u8* src, int type, int K, int n, int k) {
    if (type == 12) {                                  // Q4_K: 144-byte blocks of 256
        const u8* blk = src + ((i64)n * (K / 256) + k / 256) * 144;
        const int e = k & 255, c = e >> 6, h = (e >> 5) & 1, l = e & 31;
        const u8 b = blk[16 + c * 32 + l];
        return h ? (b >> 4) : (b & 15);
    }
    const int bs = type == 2 ? 18 : 20;                // Q4_0: d + 16; Q4_1: d + m + 16
    const u8* blk = src + ((i64)n * (K / 32) + k / 32) * bs;
    const int e = k & 31;
    const u8 b = blk[bs - 16 + (e & 15)];
    return e < 16 ? (b & 15) : (b >> 4);
}

// One thread per (tile, k-step, lane): the lane's four words.
extern "C" __global__ void marlin_repack_codes(const u8* __restrict__ src, u32* __restrict__ qw, int type,
                                               int N, int K) {
    const int KS = K / 16, NT = (N + 63) / 64;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)NT * KS * 32) return;
    const int t = (int)(i & 31);
    const i64 ts = i >> 5;
    const int ks = (int)(ts % KS), nt = (int)(ts / KS);
    uint4 out;
    u32* o = reinterpret_cast<u32*>(&out);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 w = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            const int c = j * 16 + (t >> 2) + 8 * ((b & 3) >> 1);
            const int k = ks * 16 + 2 * (t & 3) + (b >> 2) + 8 * (b & 1);
            const int n = nt * 64 + c;
            if (n < N) w |= gguf_code(src, type, K, n, k) << (4 * b);
        }
        o[j] = w;
    }
    reinterpret_cast<uint4*>(qw)[i] = out;
}

__device__ __forceinline__ int lane_slot(int c) { return (c & 7) * 8 + (c >> 4) * 2 + ((c & 15) >> 3); }

// get_scale_min_k4 of llama.cpp's Q4_K: sub-block j's 6-bit scale and min from the 12 packed bytes
__device__ __forceinline__ void q4k_scale_min(const u8* q, int j, u32* sc, u32* mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// One thread per (column, group): the group scales (and, on a Q4_K superblock's first group, d/dmin).
extern "C" __global__ void marlin_repack_scales(const u8* __restrict__ src, u8* __restrict__ dst, int type,
                                                int N, int K, long long gs_off, long long ss_off) {
    const int G = K / 32, NT = (N + 63) / 64;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)NT * 64 * G) return;
    const int grp = (int)(i % G);
    const int n = (int)(i / G);
    const int nt = n >> 6, c = n & 63, slot = lane_slot(c);
    const bool real = n < N;
    if (type == 2 || type == 3) {
        const int bs = type == 2 ? 18 : 20;
        const unsigned short* blk = reinterpret_cast<const unsigned short*>(src + ((i64)n * G + grp) * bs);
        unsigned short* gsd = reinterpret_cast<unsigned short*>(dst + gs_off);
        if (type == 2) {
            gsd[((i64)nt * G + grp) * 64 + slot] = real ? blk[0] : 0;
        } else {
            gsd[((i64)nt * G + grp) * 128 + slot] = real ? blk[0] : 0;
            gsd[((i64)nt * G + grp) * 128 + 64 + slot] = real ? blk[1] : 0;
        }
        return;
    }
    // Q4_K
    const int sb = grp / 8, j = grp % 8;
    const u8* blk = src + ((i64)n * (K / 256) + sb) * 144;
    u32 sc = 0, mn = 0;
    if (real) q4k_scale_min(blk + 4, j, &sc, &mn);
    u8* gs = dst + gs_off + ((i64)nt * G + grp) * 128 + (slot >> 3) * 16 + (slot & 7);
    gs[0] = (u8)sc;
    gs[8] = (u8)mn;
    if (j == 0) {
        const unsigned short* h = reinterpret_cast<const unsigned short*>(blk);
        unsigned short* ss = reinterpret_cast<unsigned short*>(dst + ss_off + ((i64)nt * (K / 256) + sb) * 256 +
                                                             (slot >> 3) * 32);
        ss[slot & 7] = real ? h[0] : 0;
        ss[8 + (slot & 7)] = real ? h[1] : 0;
    }
}

// Element (n, k) of the repacked weight as float, with the NumPy reference's f32 arithmetic.
template <int QT>
__device__ __forceinline__ void marlin_group_values(const u8* W, int N, int K, int n, int grp, float* v) {
    const Layout L = layout_of<QT>(N, K);
    const int G = L.groups;
    const int nt = n >> 6, c = n & 63, slot = lane_slot(c);
    const int h = (c & 15) >> 3, j = c >> 4;
    const u32* qw = reinterpret_cast<const u32*>(W);
    float s, m = 0.0f;
    float ds = 0.0f, dm = 0.0f;
    if (QT == 0) {
        s = __half2float(reinterpret_cast<const half*>(W + L.gs)[((i64)nt * G + grp) * 64 + slot]);
    } else if (QT == 1) {
        const half* p = reinterpret_cast<const half*>(W + L.gs) + ((i64)nt * G + grp) * 128;
        s = __half2float(p[slot]);
        m = __half2float(p[64 + slot]);
    } else {
        const u8* p = W + L.gs + ((i64)nt * G + grp) * 128 + (slot >> 3) * 16 + (slot & 7);
        const half* q = reinterpret_cast<const half*>(W + L.ss + ((i64)nt * (G / 8) + grp / 8) * 256 + (slot >> 3) * 32);
        ds = __fmul_rn(__half2float(q[slot & 7]), (float)p[0]);
        dm = __fmul_rn(__half2float(q[8 + (slot & 7)]), (float)p[8]);
        s = ds;
    }
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
        for (int tq = 0; tq < 4; ++tq) {
            const int t = (c & 7) * 4 + tq;
            const u32 w = qw[(((i64)nt * (K / 16) + 2 * grp + ks) * 32 + t) * 4 + j];
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
                for (int hi8 = 0; hi8 < 2; ++hi8) {
                    const int b = 2 * h + hi8 + 4 * e;
                    const float q = (float)((w >> (4 * b)) & 15);
                    float x;
                    if (QT == 0) x = __fmul_rn(q - 8.0f, s);
                    else if (QT == 1) x = __fadd_rn(__fmul_rn(q, s), m);
                    else x = __fsub_rn(__fmul_rn(q, ds), dm);
                    v[ks * 16 + 2 * tq + e + 8 * hi8] = x;
                }
        }
    }
}

template <int QT>
__device__ __forceinline__ void marlin_getrows_body(const u8* W, const int* ids, float* out, int n_ids, int N, int K) {
    const int G = K / 32;
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)n_ids * G) return;
    const int r = (int)(i / G), grp = (int)(i % G);
    const int n = min(max(ids[r], 0), N - 1);
    float v[32];
    marlin_group_values<QT>(W, N, K, n, grp, v);
    float4* o = reinterpret_cast<float4*>(out + (i64)r * K + grp * 32);
#pragma unroll
    for (int q = 0; q < 8; ++q) o[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
}

// The prefill path's f16 copy of rows n0 .. n0 + rows (n0 % 64 == 0): a CTA takes one 64-column tile
// and 256 k; each warp decodes two k-steps (its lanes' 16-byte words, the GEMM's own f16
// dequantization) into a shared-memory tile, which is then written out row by row, coalesced.
#define DEQ_KC 256
template <int QT>
__device__ __forceinline__ void marlin_deq16_body(const u8* W, half* out, int N, int K, int n0, int rows) {
    __shared__ __align__(16) half tile[64][DEQ_KC + 8];
    const Layout L = layout_of<QT>(N, K);
    const int KS = K / 16, G = L.groups;
    const int nt = n0 / 64 + blockIdx.x;
    const int k0 = blockIdx.y * DEQ_KC;
    const int kc = min(DEQ_KC, K - k0);
    const int warp = threadIdx.x >> 5, t = threadIdx.x & 31;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
        const int kl = (2 * warp + h2) * 16;       // k-step inside the chunk
        if (kl >= kc) break;
        const int ks = (k0 + kl) / 16, grp = ks / 2;
        half sv[8], mv[8];
        lane_scales<QT>(W + L.gs + ((i64)nt * G + grp) * (QT == 1 ? 256 : 128),
                        W + L.ss + ((i64)nt * (G / 8) + grp / 8) * 256, t, sv, mv);
        const uint4 wq = reinterpret_cast<const uint4*>(W)[((i64)nt * KS + ks) * 32 + t];
        const u32 wv[4] = {wq.x, wq.y, wq.z, wq.w};
        const int k = kl + 2 * (t & 3);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u32 b[4];
            dequant_word<QT>(wv[j], __half2half2(sv[2 * j]), __half2half2(mv[2 * j]),
                             __half2half2(sv[2 * j + 1]), __half2half2(mv[2 * j + 1]), b);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int c = j * 16 + (t >> 2) + 8 * h;
                *reinterpret_cast<u32*>(&tile[c][k]) = b[2 * h];
                *reinterpret_cast<u32*>(&tile[c][k + 8]) = b[2 * h + 1];
            }
        }
    }
    __syncthreads();
    const int cpr = kc / 8;                        // 16-byte chunks per row
    for (int i = threadIdx.x; i < 64 * cpr; i += blockDim.x) {
        const int c = i / cpr, q = i - c * cpr;
        const int n = nt * 64 + c, r = n - n0;
        if (r < rows && n < N)
            *reinterpret_cast<uint4*>(out + (i64)r * K + k0 + q * 8) = *reinterpret_cast<const uint4*>(&tile[c][q * 8]);
    }
}

#define MARLIN_AUX(QT, QN)                                                                                 \
    extern "C" __global__ void marlin_getrows_##QN(const u8* W, const int* ids, float* out, int n_ids, int N, \
                                                   int K) {                                                 \
        marlin_getrows_body<QT>(W, ids, out, n_ids, N, K);                                                  \
    }                                                                                                       \
    extern "C" __global__ void marlin_deq16_##QN(const u8* W, half* out, int N, int K, int n0, int rows) {  \
        marlin_deq16_body<QT>(W, out, N, K, n0, rows);                                                      \
    }

MARLIN_AUX(0, q4_0)
MARLIN_AUX(1, q4_1)
MARLIN_AUX(2, q4_k)
