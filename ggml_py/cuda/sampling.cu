// Sorting-free token sampling: ops.sample on the GPU (FlashInfer's rejection sampling with the dual
// pivot, flashinfer.ai 2025-03-10; /work/shared/PAPERS.md). The specification is the NumPy twin,
// ggml_py/sample_ref.py: same algorithm, same Philox4x32-10 stream, same float32 weights, so a seed
// gives the same tokens on both backends except where float rounding differs. The distribution is
// engine/sampling.py's (llama.cpp's chain penalties -> top-k -> top-p -> min-p -> temperature).
//
// One row (one sequence) per cluster of C CTAs (C in {1, 2, 4, 8}, compile-time __cluster_dims__);
// CTA `rank` holds vocabulary ids [rank*SL, rank*SL + SL) of the row in shared memory (float4s,
// padded with -inf), penalised in place. Every later pass reads shared memory only: one global read
// of the logits per row. Block reductions go warp shuffles -> shared memory -> one thread, then
// each CTA reads every CTA's partial through distributed shared memory (mapa + ld.shared::cluster),
// summing them in rank order so that every CTA gets bit-identical totals and takes the same
// branches (each reduction is one cluster barrier; partials are double-buffered).
//
// Where the time goes (V = 128256, C = 8, 512 threads): the global load of 64 KB per CTA, then
// ~2-4 shared-memory passes of 16K elements (exp2f: 16/clk/SM) and two cluster barriers per
// rejection round; most draws end in 1-3 rounds.
//
// The draw: a pivot (v, i) names the prefix of (logit desc, id asc) strictly before it,
// cand(v, i) = { l > v or (l == v and id < i) }. Candidates start at the min-p set (or all finite
// tokens). A round picks the CTA whose running mass passes u * total (per-CTA masses are known from
// the previous pass), that CTA scans its slice in chunks of 512 float4s (warp scans, one thread
// walks the 16 warp totals in order, early exit at the chunk that passes the draw) and picks the
// first weighted element whose running sum passes the draw; a rounding miss picks the last weighted
// element, so a zero-weight or excluded token is never returned (running sums of non-negative
// floats taken in order are monotone; lane-parallel ones are not, so lanes only nominate).

typedef long long i64;
typedef unsigned int u32;
typedef unsigned long long u64;

#define SMP_THREADS 512
#define SMP_WARPS (SMP_THREADS / 32)
#define SMP_MAX_ROUNDS 96        // sample_ref.MAX_ROUNDS: then the argmax (never seen)
#define SMP_MAX_CLUSTER 16
#define SMP_SLOTS 12
#define SMP_MAX_HISTORY 1024     // sampling_ops.MAX_HISTORY
#define SMP_INT_MAX 0x7fffffff
#define SMP_LOG2E 1.4426950408889634f
#define SMP_BOUND_EPS 1e-5       // sample_ref.BOUND_EPS

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SMP_HD __host__ __device__ __forceinline__
#else
#define SMP_HD static inline
#endif

// -- Philox4x32-10 (Salmon et al. SC'11, Random123's philox4x32 with 10 rounds) ----------------------
// key = the row's seed, counter = (counter_lo, counter_hi, rejection round, 0); the uniform is the
// first word / 2^32.

struct smp_u4 { u32 x, y, z, w; };

SMP_HD smp_u4 smp_philox(smp_u4 c, u32 k0, u32 k1) {
    for (int r = 0; r < 10; ++r) {
        if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const u64 p0 = (u64)0xD2511F53u * c.x, p1 = (u64)0xCD9E8D57u * c.z;
        smp_u4 n;
        n.x = (u32)(p1 >> 32) ^ c.y ^ k0;
        n.y = (u32)p1;
        n.z = (u32)(p0 >> 32) ^ c.w ^ k1;
        n.w = (u32)p0;
        c = n;
    }
    return c;
}

SMP_HD double smp_uniform(u32 x) { return (double)x * (1.0 / 4294967296.0); }

// llama_sampler_penalties_apply in float32, every rounding as the NumPy reference (no FMA).
SMP_HD float smp_penalize(float v, int cnt, float rp, float fp, float pp) {
#ifdef __CUDA_ARCH__
    v = v <= 0.f ? __fmul_rn(v, rp) : __fdiv_rn(v, rp);
    return __fsub_rn(v, __fadd_rn(__fmul_rn((float)cnt, fp), pp));
#else
    v = v <= 0.f ? v * rp : v / rp;       // host check: built with -ffp-contract=off
    const float f = (float)cnt * fp;
    const float t = f + pp;
    return v - t;
#endif
}

#ifdef SAMPLING_HOST
// -- host build (tests/test_cuda_sampling.py compiles this file with g++ -DSAMPLING_HOST) -------------
extern "C" void sampling_host_philox(const u32* ctr, const u32* key, u32* out, int n) {
    for (int i = 0; i < n; ++i) {
        const smp_u4 r = smp_philox({ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3]}, key[2 * i], key[2 * i + 1]);
        out[4 * i] = r.x; out[4 * i + 1] = r.y; out[4 * i + 2] = r.z; out[4 * i + 3] = r.w;
    }
}
extern "C" double sampling_host_uniform(u32 x) { return smp_uniform(x); }
extern "C" void sampling_host_penalize(const float* v, const int* cnt, int n, float rp, float fp, float pp, float* out) {
    for (int i = 0; i < n; ++i) out[i] = smp_penalize(v[i], cnt[i], rp, fp, pp);
}
#else

#define SMP_INF __int_as_float(0x7f800000)

// -- cluster plumbing ------------------------------------------------------------------------------------

__device__ __forceinline__ u32 smp_smem_u32(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

template <int C> __device__ __forceinline__ u32 smp_rank() {
#if __CUDA_ARCH__ >= 900
    if constexpr (C > 1) {
        u32 r;
        asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
        return r;
    }
#endif
    return 0;
}

// A barrier over the cluster (release/acquire: shared-memory writes before it are visible to every
// CTA of the cluster after it); __syncthreads without a cluster.
template <int C> __device__ __forceinline__ void smp_csync() {
#if __CUDA_ARCH__ >= 900
    if constexpr (C > 1) {
        asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
        return;
    }
#endif
    __syncthreads();
}

// *p in the shared memory of CTA `rank` of the cluster.
template <int C> __device__ __forceinline__ double smp_ld(const double* p, u32 rank) {
#if __CUDA_ARCH__ >= 900
    if constexpr (C > 1) {
        u32 r;
        double v;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smp_smem_u32(p)), "r"(rank));
        asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(r) : "memory");
        return v;
    }
#endif
    return *p;
}

struct SmpShared {
    double red[2][SMP_SLOTS];                   // this CTA's partials (double-buffered)
    double gath[SMP_MAX_CLUSTER][SMP_SLOTS];    // every CTA's partials, rank order
    double warp[SMP_WARPS][SMP_SLOTS];          // per-warp partials
    double wsum[SMP_WARPS];                     // search: a chunk's warp totals
    double wl[SMP_MAX_CLUSTER];                 // per-CTA T-mass of the current candidates cand(L)
    double w1[SMP_MAX_CLUSTER], w2[SMP_MAX_CLUSTER], wpk[SMP_MAX_CLUSTER];   // ... of P1, P2, the top-k
    double bc[2];                               // a searching CTA's pick: global id, value
    double run, hit_base;                       // search control
    int hit_warp, last_warp, pick;
    int pen_bad;
    int hist[SMP_MAX_HISTORY];
};

// Slots [0, NS) add, [NS, NS+NM) take the max, the rest take the max of their bits as u64.
template <int NS, int NM> __device__ __forceinline__ double smp_comb(int i, double a, double b) {
    if (i < NS) return a + b;
    if (i < NS + NM) return fmax(a, b);
    return (u64)__double_as_longlong(a) >= (u64)__double_as_longlong(b) ? a : b;
}

// Reduce v over the CTA, then gather every CTA's result: afterwards sh.gath[c][i] is CTA c's value of
// slot i, the same in every CTA of the cluster.
template <int C, int NS, int NM, int NK>
__device__ __forceinline__ void smp_reduce(SmpShared& sh, double (&v)[NS + NM + NK], int& buf) {
    constexpr int N = NS + NM + NK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        double x = v[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x = smp_comb<NS, NM>(i, x, __shfl_xor_sync(0xffffffffu, x, o));
        if (lane == 0) sh.warp[warp][i] = x;
    }
    __syncthreads();
    if (threadIdx.x < N) {
        const int i = threadIdx.x;
        double x = sh.warp[0][i];
        for (int w = 1; w < SMP_WARPS; ++w) x = smp_comb<NS, NM>(i, x, sh.warp[w][i]);
        sh.red[buf][i] = x;
    }
    smp_csync<C>();
    if (threadIdx.x < C * N) {
        const int c = threadIdx.x / N, i = threadIdx.x - c * N;
        sh.gath[c][i] = smp_ld<C>(&sh.red[buf][i], (u32)c);
    }
    __syncthreads();
    buf ^= 1;
}

template <int C> __device__ __forceinline__ double smp_sum(const SmpShared& sh, int i) {
    double s = sh.gath[0][i];
    for (int c = 1; c < C; ++c) s += sh.gath[c][i];
    return s;
}

template <int C> __device__ __forceinline__ double smp_max(const SmpShared& sh, int i) {
    double s = sh.gath[0][i];
    for (int c = 1; c < C; ++c) s = fmax(s, sh.gath[c][i]);
    return s;
}

// -- small pieces ---------------------------------------------------------------------------------------

__device__ __forceinline__ bool smp_better(float l, int g, float pv, int pid) {
    return l > pv || (l == pv && g < pid);
}

// exp(l - m) and exp((l - m) / T) as exp2f of a float32 product (sample_ref: np.exp2 of the same)
__device__ __forceinline__ float smp_e(float d) { return exp2f(__fmul_rn(d, SMP_LOG2E)); }
__device__ __forceinline__ float smp_w(float d, float s) { return exp2f(d == 0.f ? 0.f : __fmul_rn(d, s)); }

// order-preserving float <-> u32
__device__ __forceinline__ u32 smp_okey(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float smp_fkey(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <class F> __device__ __forceinline__ void smp_each(const float4* row4, int SL4, int base, F f) {
    for (int i4 = threadIdx.x; i4 < SL4; i4 += SMP_THREADS) {
        const float4 v = row4[i4];
        const int g = base + 4 * i4;
        f(v.x, g); f(v.y, g + 1); f(v.z, g + 2); f(v.w, g + 3);
    }
}

// The first element of this CTA's slice (ascending id) whose running sum of wf(l, id) passes
// `target`, among elements of positive weight; the last such element when rounding leaves the sum
// short. Returns its slice index, -1 when no element has weight. All threads of the CTA call it.
template <class Wf>
__device__ int smp_search(SmpShared& sh, const float4* row4, int SL4, int base, double target, Wf wf) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    double run = 0.0;
    int last_chunk = -1, last_warp = -1;
    for (int c0 = 0; c0 < SL4; c0 += SMP_THREADS) {
        const int i4 = c0 + tid;
        double w0 = 0.0, w1 = 0.0, w2 = 0.0, w3 = 0.0;
        if (i4 < SL4) {
            const float4 v = row4[i4];
            const int g = base + 4 * i4;
            w0 = wf(v.x, g); w1 = wf(v.y, g + 1); w2 = wf(v.z, g + 2); w3 = wf(v.w, g + 3);
        }
        const double ts = ((w0 + w1) + w2) + w3;
        double incl = ts;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) sh.wsum[warp] = incl;
        __syncthreads();
        if (tid == 0) {                       // warp totals in order: a monotone running sum
            double acc = run, hb = 0.0;
            int hit = -1, lw = -1;
            for (int w = 0; w < SMP_WARPS; ++w) {
                const double t = sh.wsum[w];
                if (t > 0.0) {
                    lw = w;
                    if (hit < 0 && acc + t > target) { hit = w; hb = acc; }
                }
                acc += t;
            }
            sh.hit_warp = hit; sh.hit_base = hb; sh.run = acc; sh.last_warp = lw;
        }
        __syncthreads();
        const int hit = sh.hit_warp;
        if (sh.last_warp >= 0) { last_chunk = c0; last_warp = sh.last_warp; }
        if (hit >= 0) {
            if (warp == hit) {
                double ex = __shfl_up_sync(0xffffffffu, incl, 1);
                if (lane == 0) ex = 0.0;
                const double start = sh.hit_base + ex;
                const u32 ok = __ballot_sync(0xffffffffu, ts > 0.0 && start + ts > target);
                const u32 any = __ballot_sync(0xffffffffu, ts > 0.0);     // not 0: the warp's total is > 0
                const int f = ok ? __ffs(ok) - 1 : 31 - __clz(any);
                if (lane == f) {
                    double a = start;
                    int q = -1, lq = -1;
                    const double ws[4] = {w0, w1, w2, w3};
#pragma unroll
                    for (int t = 0; t < 4; ++t) {
                        if (ws[t] > 0.0) {
                            lq = t;
                            a += ws[t];
                            if (q < 0 && a > target) q = t;
                        }
                    }
                    sh.pick = 4 * i4 + (q >= 0 ? q : lq);
                }
            }
            __syncthreads();
            return sh.pick;
        }
        run = sh.run;
    }
    if (last_chunk < 0) return -1;
    {                                          // the sum fell short: the last weighted element
        const int i4 = last_chunk + tid;
        double ws[4] = {0.0, 0.0, 0.0, 0.0};
        if (i4 < SL4) {
            const float4 v = row4[i4];
            const int g = base + 4 * i4;
            ws[0] = wf(v.x, g); ws[1] = wf(v.y, g + 1); ws[2] = wf(v.z, g + 2); ws[3] = wf(v.w, g + 3);
        }
        const bool has = ws[0] > 0.0 || ws[1] > 0.0 || ws[2] > 0.0 || ws[3] > 0.0;
        if (warp == last_warp) {
            const u32 any = __ballot_sync(0xffffffffu, has);
            if (lane == 31 - __clz(any)) {
                int lq = 0;
#pragma unroll
                for (int t = 0; t < 4; ++t) if (ws[t] > 0.0) lq = t;
                sh.pick = 4 * i4 + lq;
            }
        }
        __syncthreads();
        return sh.pick;
    }
}

// -- the kernel -----------------------------------------------------------------------------------------
// logits: row r at logits + r * ld (ld = 0 broadcasts one row); params (n, 8) f32, state (n, 8) i32,
// hist (n, W) i32 (W = 0: no penalties), out (n,) i32; SL = slice length per CTA (a multiple of 4,
// C * SL >= V), dynamic shared memory 4 * SL bytes; grid = n * C CTAs of SMP_THREADS threads.

template <int C>
__device__ __forceinline__ void smp_kernel(const float* __restrict__ logits, i64 ld, const float* __restrict__ params,
                                           const int* __restrict__ state, const int* __restrict__ hist, int W,
                                           int* __restrict__ out, int V, int SL) {
    extern __shared__ float4 smp_row4[];
    __shared__ SmpShared sh;
    float* srow = reinterpret_cast<float*>(smp_row4);
    const float4* row4 = smp_row4;
    const int tid = threadIdx.x;
    const u32 rank = smp_rank<C>();
    const int row = blockIdx.x / C;
    const int base = (int)rank * SL;
    const int SL4 = SL >> 2;
    const float* lrow = logits + (i64)row * ld;
    const float* prm = params + (i64)row * 8;
    const int* st = state + (i64)row * 8;
    const float T = prm[0], top_p = prm[1], lmp = prm[2], rp = prm[3], fpen = prm[4], ppen = prm[5];
    const int k = st[0];
    const u32 seed0 = (u32)st[1], seed1 = (u32)st[2], ctr0 = (u32)st[3], ctr1 = (u32)st[4];
    int buf = 0;

    // ---- 1. the slice into shared memory, with the raw statistics ------------------------------------
    float mx = -SMP_INF, mn = SMP_INF;
    int ag = SMP_INT_MAX, nf = 0;
    bool bad = false;
    auto stat = [&](float l, int g) {
        if (l != l || l == SMP_INF) bad = true;
        else if (l > -SMP_INF) {
            ++nf;
            if (l > mx || (l == mx && g < ag)) { mx = l; ag = g; }
            mn = fminf(mn, l);
        }
    };
    const bool vec = (ld & 3) == 0 && (reinterpret_cast<u64>(logits) & 15) == 0;
    for (int i0 = tid; i0 < SL4; i0 += 4 * SMP_THREADS) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {            // four loads in flight per thread
            const int i4 = i0 + u * SMP_THREADS;
            const int g = base + 4 * i4;
            if (i4 < SL4 && vec && g + 3 < V) {
                v[u] = *reinterpret_cast<const float4*>(lrow + g);
            } else {
                v[u].x = i4 < SL4 && g < V ? lrow[g] : -SMP_INF;
                v[u].y = i4 < SL4 && g + 1 < V ? lrow[g + 1] : -SMP_INF;
                v[u].z = i4 < SL4 && g + 2 < V ? lrow[g + 2] : -SMP_INF;
                v[u].w = i4 < SL4 && g + 3 < V ? lrow[g + 3] : -SMP_INF;
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i4 = i0 + u * SMP_THREADS;
            if (i4 < SL4) {
                smp_row4[i4] = v[u];
                const int g = base + 4 * i4;
                stat(v[u].x, g); stat(v[u].y, g + 1); stat(v[u].z, g + 2); stat(v[u].w, g + 3);
            }
        }
    }
    const int rawf = nf;

    // ---- 2. penalties from the row's history (each distinct token once, by its first occurrence) -----
    const bool pen_on = hist != nullptr && W > 0 && (rp != 1.f || fpen != 0.f || ppen != 0.f);
    bool pen_bad = false;
    if (pen_on) {
        const int* h = hist + (i64)row * W;
        if (tid == 0) sh.pen_bad = 0;
        for (int a = tid; a < W; a += SMP_THREADS) sh.hist[a] = h[a];
        __syncthreads();
        for (int a = tid; a < W; a += SMP_THREADS) {
            const int t = sh.hist[a];
            if (t < base || t >= base + SL || t >= V) continue;     // another CTA's, or no token
            int cnt = 0;
            bool first = true;
            for (int b = 0; b < W; ++b) {
                if (sh.hist[b] == t) { ++cnt; if (b < a) first = false; }
            }
            if (!first) continue;
            const float v = smp_penalize(srow[t - base], cnt, rp, fpen, ppen);
            if (v != v || v == SMP_INF) sh.pen_bad = 1;
            srow[t - base] = v;
        }
        __syncthreads();
        pen_bad = sh.pen_bad != 0;
        mx = -SMP_INF; mn = SMP_INF; ag = SMP_INT_MAX; nf = 0;
        smp_each(row4, SL4, base, [&](float l, int g) {
            if (l > -SMP_INF && l < SMP_INF) {
                ++nf;
                if (l > mx || (l == mx && g < ag)) { mx = l; ag = g; }
                mn = fminf(mn, l);
            }
        });
    }

    // ---- 3. row statistics: errors, max (lowest id), min finite, finite count -----------------------
    const u64 key = mx > -SMP_INF ? ((u64)smp_okey(mx) << 32) | (u64)(~(u32)ag) : 0ull;
    {
        double sv[6] = {(double)nf, (double)rawf, bad ? 1.0 : 0.0, pen_bad ? 1.0 : 0.0, -(double)mn,
                        __longlong_as_double((long long)key)};
        smp_reduce<C, 2, 3, 1>(sh, sv, buf);
    }
    const double nfin = smp_sum<C>(sh, 0), rawfin = smp_sum<C>(sh, 1);
    u64 gkey = 0;
    for (int c = 0; c < C; ++c) {
        const u64 kc = (u64)__double_as_longlong(sh.gath[c][5]);
        gkey = kc > gkey ? kc : gkey;
    }
    const float m = smp_fkey((u32)(gkey >> 32));
    const int arg = (int)~(u32)gkey;
    const float vmin = (float)(-smp_max<C>(sh, 4));
    int res = -1;
    bool done = true;
    if (smp_max<C>(sh, 2) > 0.0 || rawfin == 0.0) res = -1;          // NaN/+inf, or everything masked
    else if (smp_max<C>(sh, 3) > 0.0) res = -2;                      // the penalties overflowed
    else if (nfin == 0.0) res = -1;                                  // ... or masked everything
    else if (!(T > 0.f)) res = arg;                                  // greedy
    else done = false;

    if (!done) {
        // ---- 4. candidates: the min-p set (or every finite token) ----------------------------------
        const float s = __fdiv_rn(SMP_LOG2E, T);
        const bool t1 = s == SMP_LOG2E;                  // T == 1: w == e
        const bool topk = k > 0 && (double)k < nfin;
        const bool topp = top_p < 1.f;
        const bool minp = lmp > -SMP_INF;
        const bool bounds = topk && topp;
        const float thr = __fadd_rn(m, lmp);
        float Lv = minp ? thr : -SMP_INF;
        int Lid = minp ? SMP_INT_MAX : 0;
        double cntL;
        double Z, ML;
        // with top-k and top-p, also count and weigh the tokens above m - 1.5, 4, 8, 16: pivots
        // that bound the top-k's mass before any draw (sample_ref.BOUND_STEPS)
        const float th0 = __fadd_rn(m, -1.5f), th1 = __fadd_rn(m, -4.f), th2 = __fadd_rn(m, -8.f),
                    th3 = __fadd_rn(m, -16.f);
        {
            double a[12] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
            smp_each(row4, SL4, base, [&](float l, int g) {   // Z, cnt(L), W(L), M(L), (cnt, M) x 4
                if (!(l > -SMP_INF)) return;
                const float d = __fsub_rn(l, m);
                const float e = (topp || t1) ? smp_e(d) : 0.f;
                a[0] += e;
                if (smp_better(l, g, Lv, Lid)) { a[1] += 1.0; a[2] += t1 ? e : smp_w(d, s); a[3] += e; }
                if (bounds) {
                    if (l > th0) { a[4] += 1.0; a[5] += e; }
                    if (l > th1) { a[6] += 1.0; a[7] += e; }
                    if (l > th2) { a[8] += 1.0; a[9] += e; }
                    if (l > th3) { a[10] += 1.0; a[11] += e; }
                }
            });
            smp_reduce<C, 12, 0, 0>(sh, a, buf);
        }
        Z = smp_sum<C>(sh, 0); cntL = smp_sum<C>(sh, 1); ML = smp_sum<C>(sh, 3);
        const double tc0 = smp_sum<C>(sh, 4), tm0 = smp_sum<C>(sh, 5), tc1 = smp_sum<C>(sh, 6), tm1 = smp_sum<C>(sh, 7);
        const double tc2 = smp_sum<C>(sh, 8), tm2 = smp_sum<C>(sh, 9), tc3 = smp_sum<C>(sh, 10), tm3 = smp_sum<C>(sh, 11);
        if (tid < C) sh.wl[tid] = sh.gath[tid][2];
        __syncthreads();

        // bounds on Z_k (top-k and top-p): X (c <= k) and Y (c >= k), see sample_ref._Bounds
        const double kd = (double)k;
        double Xc = 0.0, XM = 0.0, Yc = nfin, YM = Z;
        float Xv = m, Yv = vmin;
        bool zk_known = !topk;
        double Zk = Z;
        auto upd = [&](double c, double M, float v) {
            if (!bounds) return;
            if (c <= kd && c > Xc) { Xc = c; XM = M; Xv = v; }
            if (c >= kd && c < Yc) { Yc = c; YM = M; Yv = v; }
            if (c == kd && !zk_known) { zk_known = true; Zk = M; }
        };
        auto zlo = [&]() {
            const double ey = (double)smp_e(__fsub_rn(Yv, m));
            return __dmul_rn(__dadd_rn(XM, __dmul_rn(kd - Xc, ey)), 1.0 - SMP_BOUND_EPS);
        };
        auto zhi = [&]() {
            const double ex = (double)smp_e(__fsub_rn(Xv, m));
            return __dmul_rn(fmin(YM, __dadd_rn(XM, __dmul_rn(kd - Xc, ex))), 1.0 + SMP_BOUND_EPS);
        };
        if (minp) upd(cntL, ML, thr);
        upd(tc0, tm0, th0); upd(tc1, tm1, th1); upd(tc2, tm2, th2); upd(tc3, tm3, th3);
        const double p = (double)top_p;
        float vH = m;
        bool pk_ok = false;
        float pk_v = 0.f;
        int pk_id = 0;
        res = -1;

        // ---- 5. rejection rounds --------------------------------------------------------------------
        for (int r = 0; r < SMP_MAX_ROUNDS; ++r) {
            // the CTA whose running mass passes the draw
            double wt = 0.0;
            for (int c = 0; c < C; ++c) wt += sh.wl[c];
            const smp_u4 rb = smp_philox({ctr0, ctr1, (u32)r, 0u}, seed0, seed1);
            const double target = smp_uniform(rb.x) * wt;
            int cs = -1, lc = -1;
            double acc = 0.0, pre = 0.0;
            for (int c = 0; c < C; ++c) {
                const double wc = sh.wl[c];
                if (wc > 0.0) {
                    lc = c;
                    if (cs < 0 && acc + wc > target) { cs = c; pre = acc; }
                }
                acc += wc;
            }
            const double tl = cs >= 0 ? target - pre : SMP_INF;   // short by rounding: the last one
            if (cs < 0) cs = lc;
            if (cs < 0) break;                                     // (no candidate: never)
            if ((int)rank == cs) {
                const int loc = smp_search(sh, row4, SL4, base, tl, [&](float l, int g) -> double {
                    return smp_better(l, g, Lv, Lid) ? (double)smp_w(__fsub_rn(l, m), s) : 0.0;
                });
                if (tid == 0) {
                    sh.bc[0] = loc >= 0 ? (double)(base + loc) : -1.0;
                    sh.bc[1] = loc >= 0 ? (double)srow[loc] : 0.0;
                }
            }
            smp_csync<C>();
            const double jd = smp_ld<C>(&sh.bc[0], (u32)cs);
            const float v1 = (float)smp_ld<C>(&sh.bc[1], (u32)cs);
            if (jd < 0.0) break;
            const int j = (int)jd;
            if (!topk && !topp) { res = j; break; }               // min-p only: cand(L) is S

            // P1 = (v1, j), P2 = (mid, 0): count, T=1 mass and T mass of both
            const float hi = vH > v1 ? vH : m;
            const float mid = fmaxf(__fadd_rn(__fmul_rn(v1, 0.5f), __fmul_rn(hi, 0.5f)), v1);
            {
                double a[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};   // c1, M1, W1, c2, M2, W2
                smp_each(row4, SL4, base, [&](float l, int g) {
                    if (!smp_better(l, g, v1, j)) return;
                    const float d = __fsub_rn(l, m);
                    const float e = (topp || t1) ? smp_e(d) : 0.f;
                    const float w = t1 ? e : smp_w(d, s);
                    a[0] += 1.0; a[1] += e; a[2] += w;
                    if (l > mid) { a[3] += 1.0; a[4] += e; a[5] += w; }
                });
                smp_reduce<C, 6, 0, 0>(sh, a, buf);
            }
            const double c1 = smp_sum<C>(sh, 0), M1 = smp_sum<C>(sh, 1);
            const double c2 = smp_sum<C>(sh, 3), M2 = smp_sum<C>(sh, 4);
            if (tid < C) { sh.w1[tid] = sh.gath[tid][2]; sh.w2[tid] = sh.gath[tid][5]; }
            __syncthreads();
            upd(c1, M1, v1);                                       // the tokens before j
            upd(c1 + 1.0, __dadd_rn(M1, (double)smp_e(__fsub_rn(v1, m))), v1);   // ... and j
            upd(c2, M2, mid);

            bool rej = topk && c1 >= kd;
            if (!rej && topp) {
                int dec = 0;                                       // 1 keep, 2 reject
                if (zk_known) dec = M1 < p * Zk ? 1 : 2;
                else if (M1 < p * zlo()) dec = 1;
                else if (M1 >= p * zhi()) dec = 2;
                if (dec == 0) {
                    // ---- the exact top-k boundary: the k-th token's value by a ternary search on the
                    // float order that snaps to data values, then ties by id --------------------------
                    float A = Yv, B = Xv;                           // A <= v_k <= B
                    for (int it = 0; it < 64 && A < B; ++it) {
                        const u32 ka = smp_okey(A), span = smp_okey(B) - ka;
                        const float q1 = smp_fkey(ka + span / 3u);
                        const float q2 = smp_fkey(ka + (u32)(((u64)span * 2u) / 3u));
                        float mn1 = SMP_INF, mn2 = SMP_INF, mx1 = -SMP_INF, mx2 = -SMP_INF;
                        double n1 = 0.0, n2 = 0.0;
                        smp_each(row4, SL4, base, [&](float l, int g) {
                            if (!(l > -SMP_INF)) return;
                            if (l > q1) { n1 += 1.0; mn1 = fminf(mn1, l); } else mx1 = fmaxf(mx1, l);
                            if (l > q2) { n2 += 1.0; mn2 = fminf(mn2, l); } else mx2 = fmaxf(mx2, l);
                        });
                        double a[6] = {n1, n2, -(double)mn1, -(double)mn2, (double)mx1, (double)mx2};
                        smp_reduce<C, 2, 4, 0>(sh, a, buf);
                        // c(q) >= k: v_k > q, so v_k >= min{l > q}; else v_k <= max{l <= q}
                        if (smp_sum<C>(sh, 1) >= kd) A = fmaxf(A, (float)(-smp_max<C>(sh, 3)));
                        else B = fminf(B, (float)smp_max<C>(sh, 5));
                        if (smp_sum<C>(sh, 0) >= kd) A = fmaxf(A, (float)(-smp_max<C>(sh, 2)));
                        else B = fminf(B, (float)smp_max<C>(sh, 4));
                    }
                    const float vk = A;
                    {
                        double a[4] = {0.0, 0.0, 0.0, 0.0};           // c(> vk), M, W, c(== vk)
                        smp_each(row4, SL4, base, [&](float l, int g) {
                            if (l > vk) {
                                const float d = __fsub_rn(l, m);
                                const float e = smp_e(d);
                                a[0] += 1.0; a[1] += e; a[2] += t1 ? e : smp_w(d, s);
                            } else if (l == vk) a[3] += 1.0;
                        });
                        smp_reduce<C, 4, 0, 0>(sh, a, buf);
                    }
                    const double need = kd - smp_sum<C>(sh, 0);        // ties of vk in the top-k (>= 1)
                    const double ceq = smp_sum<C>(sh, 3);
                    const float dk = __fsub_rn(vk, m);
                    const float ek = smp_e(dk), wk = t1 ? ek : smp_w(dk, s);
                    Zk = __dadd_rn(smp_sum<C>(sh, 1), __dmul_rn(need, (double)ek));
                    if (tid < C) {                                     // the top-k's T-mass per CTA
                        double before = 0.0;
                        for (int c = 0; c < tid; ++c) before += sh.gath[c][3];
                        const double ties = fmin(sh.gath[tid][3], fmax(0.0, need - before));
                        sh.wpk[tid] = __dadd_rn(sh.gath[tid][2], __dmul_rn(ties, (double)wk));
                    }
                    pk_v = vk;
                    pk_id = SMP_INT_MAX;
                    if (need < ceq) {                                  // the need-th tie by id
                        int ct = -1;
                        double acc2 = 0.0, pre2 = 0.0;
                        for (int c = 0; c < C; ++c) {
                            if (ct < 0 && acc2 + sh.gath[c][3] > need - 0.5) { ct = c; pre2 = acc2; }
                            acc2 += sh.gath[c][3];
                        }
                        __syncthreads();                               // wpk written before the search
                        if ((int)rank == ct) {
                            const int loc = smp_search(sh, row4, SL4, base, need - 0.5 - pre2,
                                                       [&](float l, int g) -> double { return l == vk ? 1.0 : 0.0; });
                            if (tid == 0) sh.bc[0] = loc >= 0 ? (double)(base + loc) : -1.0;
                        }
                        smp_csync<C>();
                        pk_id = (int)smp_ld<C>(&sh.bc[0], (u32)ct) + 1;
                    }
                    __syncthreads();
                    zk_known = pk_ok = true;
                    dec = M1 < p * Zk ? 1 : 2;
                }
                rej = dec == 2;
            }
            if (!rej) { res = j; break; }

            // j and everything worse are out; P2 too when its first excluded token is out
            Lv = v1; Lid = j; cntL = c1;
            const double zr = zk_known ? Zk : zhi();
            const bool mv = c2 > 0.0 && ((topk && c2 >= kd) || (topp && M2 >= p * zr));
            if (mv) { Lv = mid; Lid = 0; cntL = c2; } else vH = mid;
            const bool to_pk = pk_ok && cntL > kd;
            if (to_pk) { Lv = pk_v; Lid = pk_id; cntL = kd; }
            if (tid < C) sh.wl[tid] = to_pk ? sh.wpk[tid] : (mv ? sh.w2[tid] : sh.w1[tid]);
            __syncthreads();
        }
        if (res < 0) res = arg;
    }
    if (rank == 0 && tid == 0) out[row] = res;
    smp_csync<C>();                 // no CTA leaves while another may still read its shared memory
}

#define SMP_ARGS const float* __restrict__ logits, i64 ld, const float* __restrict__ params, \
    const int* __restrict__ state, const int* __restrict__ hist, int W, int* __restrict__ out, int V, int SL
#define SMP_PASS logits, ld, params, state, hist, W, out, V, SL

extern "C" __global__ void __launch_bounds__(SMP_THREADS) sample_c1(SMP_ARGS) { smp_kernel<1>(SMP_PASS); }

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(SMP_THREADS) sample_c2(SMP_ARGS) { smp_kernel<2>(SMP_PASS); }
extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(SMP_THREADS) sample_c4(SMP_ARGS) { smp_kernel<4>(SMP_PASS); }
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(SMP_THREADS) sample_c8(SMP_ARGS) { smp_kernel<8>(SMP_PASS); }
// 16 CTAs a row (H100's non-portable cluster size): the cluster dimension is a launch attribute
// (ggml_py/cuda/launch.py), not compiled in
extern "C" __global__ void __launch_bounds__(SMP_THREADS) sample_c16(SMP_ARGS) { smp_kernel<16>(SMP_PASS); }
#endif

#endif  // SAMPLING_HOST
