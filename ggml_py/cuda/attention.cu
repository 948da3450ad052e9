// Paged KV cache writes and attention of the CuPy backend.
//
// Launched by ggml_py/cuda/attention_ops.py (see DESIGN.md in this folder); the NumPy backend's
// _kv_store / _attention (ggml_py/backend_numpy.py) are the specification, ggml_py/ops.py's
// docstrings the contract:
//
//   k_cache: (n_pages, PAGE, Hkv, DK)  f16 or f32      pos_cache: (n_pages, PAGE) i32, INT32_MAX = empty
//   v_cache: (n_pages, PAGE, Hkv, DV)                   block_table: (max_pages,) i32
//   logical slot j of the sequence = physical slot block_table[j / PAGE] * PAGE + j % PAGE
//   query i sees slot j < kv_len iff pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - pos[j] < window)
//
// One module per (storage type, DK, DV, PAGE), chosen at plan time with
//   -DATTN_KV_F16=1|0 -DATTN_DK=.. -DATTN_DV=.. -DATTN_PAGE=.. -DATTN_DEC_STAGES=.. -DATTN_DEC_TC_STAGES=..
// so every index division is by a constant and only the variants a model uses get compiled.
// The defaults below let the file compile stand-alone: nvcc -arch=sm_90 --cubin attention.cu
//
// kv_len is read from device memory and every grid is sized at plan time (for the block
// table's max_pages), so a decode step captured once in a CUDA graph replays correctly as
// kv_len grows: blocks with nothing to do return at once.
//
// Kernels:
//   kv_store             f32 keys/values -> storage type at their physical slots, positions beside.
//   attn_decode_tc       flash-decoding (n * H/Hkv <= 8 query rows per kv head), f16 pages: grid
//                        (splits, Hkv); a block streams 64-key tiles of a run of pages of one kv head
//                        through a cp.async pipeline once for all its query rows (GQA); each warp
//                        does 16 keys with mma.m16n8k16 (the rows are the n = 8 side), keeps its own
//                        online softmax in f32, and the warps' states are merged at the end.
//                        How many splits run follows kv_len on the device (split_geometry): one
//                        split writes the output itself; several write partials (max, sum,
//                        unnormalised acc) and the last block of each kv head to finish combines
//                        them (decode_combine: ticket counters in scratch; two levels when many
//                        splits ran). One launch per call.
//   attn_decode_tcb      the same, its tiles staged by bulk copies (TMA, mbarrier completion;
//                        Hopper) instead of cp.async: more bytes in flight per block.
//   attn_decode_r4/_r8   the same with f32 FMAs (f32 pages; 4 / 8 rows), 32-key tiles.
//   attn_prefill_tc_w*   tiled flash attention on the tensor cores (f16 pages): 16 * w query rows
//                        (query x head of one kv head) by 64 keys per tile, FlashAttention-2 style.
//   attn_prefill_r1/2/4  the same with f32 FMAs (f32 pages), 16 * r rows.
// Key tiles no query of a prefill block can see (causal, window: decided from the stored
// positions) are skipped.
// Scores live in the log2 domain (q pre-scaled by scale*log2(e)), softmax uses exp2f.
// No header is included (NVRTC ships none of the host's): f16 conversions are PTX.

#ifndef ATTN_KV_F16
#define ATTN_KV_F16 1
#endif
#ifndef ATTN_DK
#define ATTN_DK 128
#endif
#ifndef ATTN_DV
#define ATTN_DV ATTN_DK
#endif
#ifndef ATTN_PAGE
#define ATTN_PAGE 16
#endif
#ifndef ATTN_DEC_STAGES
#define ATTN_DEC_STAGES 4
#endif
#ifndef ATTN_DEC_TC_STAGES
#define ATTN_DEC_TC_STAGES 2
#endif

#include "common.cuh"

// ATTN_QFIRST (GGFLAT_ATTN_QFIRST=1; off until measured on the H100): the tensor-core decode kernels
// load q before kv_len and the block table (see decode_tc_impl).
#ifndef ATTN_QFIRST
#define ATTN_QFIRST 0
#endif

// ATTN_TRACE (GGFLAT_ATTN_TRACE=1, read by benchmarks/trace_decode.py): the tensor-core decode kernels
// record %globaltimer per block -- start, q staged, first tile in, tile loop done, end -- with the
// block's split, kv head, tiles and splits (an 8-word record in attn_trace_buf, attn_trace_n counts).
#ifndef ATTN_TRACE
#define ATTN_TRACE 0
#endif
#if ATTN_TRACE
#define ATTN_TRACE_CAP (1 << 16)
__device__ unsigned long long attn_trace_buf[ATTN_TRACE_CAP * 8];
__device__ unsigned int attn_trace_n;
// stamps[0..4] of this block (thread 0's view), written out once at its end
#define ATTN_STAMP(st, i) do { if (threadIdx.x == 0) (st)[i] = global_timer_ns(); } while (0)
__device__ __forceinline__ void attn_trace_write(const unsigned long long* st, int tiles, int nsplit) {
    if (threadIdx.x != 0) return;
    const unsigned long long t_end = global_timer_ns();
    const unsigned int n = atomicAdd(&attn_trace_n, 1u);
    if (n >= ATTN_TRACE_CAP) return;
    unsigned long long* r = attn_trace_buf + (size_t)n * 8;
    r[0] = st[0]; r[1] = st[1]; r[2] = st[2]; r[3] = st[3]; r[4] = t_end;
    r[5] = ((unsigned long long)blockIdx.x << 32) | blockIdx.y;
    r[6] = ((unsigned long long)(unsigned)tiles << 32) | (unsigned)nsplit;
    r[7] = 0ull;
}
#define ATTN_TRACE_DECL unsigned long long attn_st[4] = {0ull, 0ull, 0ull, 0ull}; ATTN_STAMP(attn_st, 0)
#define ATTN_TRACE_END(tiles, nsplit) attn_trace_write(attn_st, (tiles), (nsplit))
#else
#define ATTN_STAMP(st, i) do {} while (0)
#define ATTN_TRACE_DECL
#define ATTN_TRACE_END(tiles, nsplit) do {} while (0)
#endif

#define ATTN_INT_MAX 2147483647
#define ATTN_INT_MIN (-2147483647 - 1)
#define ATTN_NEG_INF (-__int_as_float(0x7f800000))

#if ATTN_KV_F16
typedef unsigned short kv_t;          // raw IEEE half bits
#else
typedef float kv_t;
#endif

constexpr int DK = ATTN_DK;
constexpr int DV = ATTN_DV;
constexpr int PAGE = ATTN_PAGE;
constexpr int KVB = (int)sizeof(kv_t);     // bytes per stored element
constexpr int KCH = DK / 8;                // 8-element chunks per key row
constexpr int VCH = DV / 8;
constexpr int KSTR = DK + 16 / KVB;        // shared-memory row strides (elements): +16 bytes so
constexpr int VSTR = DV + 16 / KVB;        //   consecutive rows start in different bank groups
static_assert(DK % 8 == 0 && DV % 8 == 0, "head dims must be multiples of 8");
static_assert(PAGE >= 1, "page size");

// -- small helpers ------------------------------------------------------------------------------

__device__ __forceinline__ void h2x2(unsigned w, float& a, float& b) {
    asm("{.reg .f16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;}"
        : "=f"(a), "=f"(b) : "r"(w));
}

__device__ __forceinline__ unsigned f2h2(float a, float b) {      // round to nearest even, as NumPy
    unsigned short lo, hi;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(a));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(b));
    return (unsigned)lo | ((unsigned)hi << 16);
}

// 8 stored elements (16-byte aligned, shared or global) -> 8 floats
__device__ __forceinline__ void load8(const kv_t* p, float (&x)[8]) {
#if ATTN_KV_F16
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    h2x2(u.x, x[0], x[1]); h2x2(u.y, x[2], x[3]); h2x2(u.z, x[4], x[5]); h2x2(u.w, x[6], x[7]);
#else
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
#endif
}

__device__ __forceinline__ float4 f4(float a, float b, float c, float d) {
    float4 r; r.x = a; r.y = b; r.z = c; r.w = d; return r;
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(smem_u32(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" :: "r"(smem_u32(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

// Hopper bulk copies (the TMA engine; 1-D, no tensor map): global -> shared, completion counted in
// bytes on an mbarrier. Addresses 16-byte aligned, sizes multiples of 16. Unlike cp.async, the
// bytes in flight are not bounded by the SM's load-tracking slots.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile("{\n\t.reg .pred P1;\n"
                 "LAB_WAIT:\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n\t"
                 "@P1 bra DONE;\n\t"
                 "bra LAB_WAIT;\n"
                 "DONE:\n\t}\n" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_g2s(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// one 8-element chunk global -> shared (16 or 32 bytes)
__device__ __forceinline__ void copy_chunk(kv_t* dst, const kv_t* src) {
    cp_async16(dst, src);
#if !ATTN_KV_F16
    cp_async16(dst + 4, src + 4);
#endif
}

__device__ __forceinline__ void zero_chunk(kv_t* dst) {
    uint4 z; z.x = z.y = z.z = z.w = 0u;
    *reinterpret_cast<uint4*>(dst) = z;
#if !ATTN_KV_F16
    *reinterpret_cast<uint4*>(dst + 4) = z;
#endif
}

// physical slot of logical slot j, or -1 (beyond end, or a block-table entry outside the cache)
__device__ __forceinline__ int slot_of(int j, int end, const int* __restrict__ bt, int n_pages) {
    if (j >= end) return -1;
    const int page = __ldg(bt + j / PAGE);
    if ((unsigned)page >= (unsigned)n_pages) return -1;
    return page * PAGE + j % PAGE;
}

__device__ __forceinline__ bool visible(int kp, int qp, int window) {
    return kp <= qp && (window <= 0 || (long long)qp - (long long)kp < (long long)window);
}

// raw score (q pre-scaled) -> log2-domain logit, softcap applied when cap2 > 0
__device__ __forceinline__ float logit(float s, float cap2) {
    return cap2 > 0.f ? cap2 * tanhf(s) : s;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The decode kernels' L2 prefetch (attention_ops.plan_attention's ``prefetch``): the weights of the
// launch after attention (the o projection) are brought into L2 while attention runs. Attention is
// the one launch of a decode layer during which DRAM idles (at short contexts it reads a few KB of
// keys and values, all in L2 since q/k/v wrote them), and o follows it without PDL. Skipped when
// this step's keys and values (L x Hkv x (DK + DV) elements) exceed pf_kv_max bytes: then they
// stream from DRAM themselves, and prefetched lines would compete with them for L2.
#define ATTN_PREFETCH(L)                                                                            \
    do {                                                                                            \
        if ((unsigned long long)(L) * Hkv * (DK + DV) * sizeof(kv_t) <= pf_kv_max)                  \
            l2_prefetch_share(pf, pf_bytes);                                                        \
    } while (0)

// sequence length as the kernels see it: kv_len clamped to [0, max_pages * PAGE]
__device__ __forceinline__ int seq_len(const int* __restrict__ kv_len, int max_pages) {
    const long long L = (long long)*kv_len;
    const long long cap = (long long)max_pages * PAGE;
    return (int)(L < 0 ? 0 : (L > cap ? cap : L));
}

// =============================================================================================
// kv_store: k (n, Hkv, DK), v (n, Hkv, DV) f32 -> cache rows at slots[i]; pos_cache[slot] = pos[i].
// grid (n), 128 threads. Slots outside [0, cap) are skipped (the NumPy backend raises).
// =============================================================================================
extern "C" __global__ void __launch_bounds__(128) kv_store(
    const float* __restrict__ k, const float* __restrict__ v,
    const int* __restrict__ slots, const int* __restrict__ pos,
    kv_t* __restrict__ kc, kv_t* __restrict__ vc, int* __restrict__ pc,
    int hkv, int cap)
{
    const int i = blockIdx.x;
    const int s = slots[i];
    if (s < 0 || s >= cap) return;
    if (threadIdx.x == 0) pc[s] = pos[i];
    const int nk = hkv * DK / 4, nv = hkv * DV / 4;            // float4s per token
    const float4* ks = reinterpret_cast<const float4*>(k + (size_t)i * hkv * DK);
    const float4* vs = reinterpret_cast<const float4*>(v + (size_t)i * hkv * DV);
    kv_t* kd = kc + (size_t)s * hkv * DK;
    kv_t* vd = vc + (size_t)s * hkv * DV;
    for (int j = threadIdx.x; j < nk + nv; j += blockDim.x) {
        const bool isk = j < nk;
        const int jj = isk ? j : j - nk;
        const float4 x = isk ? ks[jj] : vs[jj];
        kv_t* d = (isk ? kd : vd) + 4 * jj;
#if ATTN_KV_F16
        uint2 h; h.x = f2h2(x.x, x.y); h.y = f2h2(x.z, x.w);
        *reinterpret_cast<uint2*>(d) = h;
#else
        *reinterpret_cast<float4*>(d) = x;
#endif
    }
}

// Stage TK keys starting at logical slot kbase (this kv head) into shared memory with NT threads:
// K rows and V rows by 16-byte cp.async, positions by 4-byte cp.async. Keys at or past `end`
// (or on a block-table entry outside the cache) get zeros and position INT32_MAX, so they are
// invisible and contribute 0 * 0 to p.v. Caller commits the group.
template <int TK, int NT>
__device__ __forceinline__ void stage_tile(
    kv_t* kb, kv_t* vb, int* pb, int kbase, int end,
    const kv_t* __restrict__ kh, const kv_t* __restrict__ vh, const int* __restrict__ pc,
    const int* __restrict__ bt, int n_pages, size_t kstride, size_t vstride)
{
    const int tid = threadIdx.x;
    constexpr int ITK = (TK * KCH + NT - 1) / NT;
    constexpr int ITV = (TK * VCH + NT - 1) / NT;
    int sk[ITK], sv[ITV];
#pragma unroll
    for (int m = 0; m < ITK; ++m) {            // block-table reads first, all in flight together
        const int idx = tid + m * NT;
        sk[m] = idx < TK * KCH ? slot_of(kbase + idx / KCH, end, bt, n_pages) : -1;
    }
#pragma unroll
    for (int m = 0; m < ITV; ++m) {
        const int idx = tid + m * NT;
        sv[m] = idx < TK * VCH ? slot_of(kbase + idx / VCH, end, bt, n_pages) : -1;
    }
#pragma unroll
    for (int m = 0; m < ITK; ++m) {
        const int idx = tid + m * NT;
        if (idx < TK * KCH) {
            const int t = idx / KCH, c = idx % KCH;
            kv_t* dst = kb + t * KSTR + c * 8;
            if (sk[m] >= 0) copy_chunk(dst, kh + (size_t)sk[m] * kstride + c * 8);
            else zero_chunk(dst);
        }
    }
#pragma unroll
    for (int m = 0; m < ITV; ++m) {
        const int idx = tid + m * NT;
        if (idx < TK * VCH) {
            const int t = idx / VCH, c = idx % VCH;
            kv_t* dst = vb + t * VSTR + c * 8;
            if (sv[m] >= 0) copy_chunk(dst, vh + (size_t)sv[m] * vstride + c * 8);
            else zero_chunk(dst);
        }
    }
    for (int t = tid; t < TK; t += NT) {
        const int s = slot_of(kbase + t, end, bt, n_pages);
        if (s >= 0) cp_async4(pb + t, pc + s);
        else pb[t] = ATTN_INT_MAX;
    }
}

// Decode split geometry, from the device's kv_len (the grid stays `splits` blocks per kv head, so
// a captured graph replays at any length). The pages below kv_len are cut into units of
// SPLIT_KEYS keys (whole 64-key tiles when pages divide 64, else single pages); a split takes
// at least `min_units` units and at most `splits` splits are used:
//     units per split = max(min_units, ceil(n_units / splits)),  nsplit = ceil(n_units / that)
// so short sequences run on few splits (one split: the block writes the output itself, no
// partials, no combine) and long ones on all of them. Blocks with split >= nsplit return at
// once. L == 0 gives nsplit = 1 with no keys: split 0 writes the zeros. The combine and
// attention_ops.split_geometry compute the same numbers.
constexpr int SPLIT_KEYS = 64;
constexpr int SPLIT_UNIT = (PAGE < SPLIT_KEYS && SPLIT_KEYS % PAGE == 0) ? SPLIT_KEYS / PAGE : 1;  // pages
__device__ __forceinline__ void split_geometry(int L, int splits, int min_units, int& nsplit, int& ppb) {
    const int np_used = (L + PAGE - 1) / PAGE;
    const int n_units = (np_used + SPLIT_UNIT - 1) / SPLIT_UNIT;
    const int ups = max(max(min_units, 1), (n_units + splits - 1) / splits);
    nsplit = max(1, (n_units + ups - 1) / ups);
    ppb = ups * SPLIT_UNIT;
}

// Flash-decoding's combine, fused into the decode kernels. Called by every thread of a block
// once it has written its split's partial (m, l, acc) for the R query rows of kv head kvh:
//   part_ml  (splits, Hkv, R, 2) f32 = (running max in log2 units, sum of 2^(s - max))
//   part_acc (splits, Hkv, R, DV) f32, unnormalised.            R = n * G, row r = i * G + g.
// Tickets: a block publishes its writes (bar.sync, then one thread's fence) and takes a ticket
// from a counter; atomicInc wraps the counter back to 0 at the last ticket, so every counter is 0
// again for the next launch (a replayed graph needs no reset; attention_ops zeroes them once, at
// plan time). The block holding the last ticket has seen every other holder's fence.
// Up to flat_max splits: one level, the last block of the kv head merges all partials into out.
// More: two levels, so that no block reads more than ~sqrt(nsplit) partials (one block's loads
// are what the combine waits on): the splits form groups of gs = ceil(sqrt(nsplit)); the last
// block of each group merges the group into the partial slot of its first split, and the last
// of those group mergers merges the group partials into out.
//   counters: [Hkv] per kv head (level 2) | [Hkv][COMBINE_GMAX] per group (level 1, or the only one)
// out[row] = sum_s w_s acc_s / sum_s w_s l_s,  w_s = 2^(m_s - max_s m_s)  (0 where all are -inf).
// A merge reads every (m, l, acc) it needs in one pass (an online merge: a larger max rescales
// what was summed so far), so all its loads are independent and in flight together; threads are
// (float4 column, split group) and the split groups are merged through shared memory.
// sm: shared memory of at least combine_floats() floats (attention_ops.combine_bytes mirrors it),
// free to overwrite (every thread is past its last read of it when a ticket barrier passes).
// Partials are read with ld.global.cg (L2): other SMs wrote them during this launch.
constexpr int COMBINE_GMAX = 64;                // groups per kv head at most (splits <= 64 * 64)
__device__ constexpr int combine_floats(int nt) { return 6 * nt + 16; }

// Merge the partials in slots first, first + stride, ... (count of them) of kv head kvh: into
// out (normalised) when `final`, else into slot `first` (unnormalised: a partial again).
template <int NT>
__device__ __forceinline__ void combine_slots(
    float* __restrict__ part_ml, float* __restrict__ part_acc, float* __restrict__ out, float* __restrict__ sm,
    int first, int count, int stride, bool final, int kvh, int Hkv, int R, int G, int H)
{
    constexpr int DV4 = DV / 4;
    const int tid = threadIdx.x;
    const size_t srow = (size_t)Hkv * R;                    // partial rows per split slot
    const size_t row0 = (size_t)kvh * R;
    const int C4 = R * DV4;                                 // float4 columns of this head's rows
    const int nsg = C4 >= NT ? 1 : NT / C4;                 // split groups
    const int cpp = NT / nsg;                               // columns per pass (>= C4 when nsg > 1)
    const float2* ml2 = reinterpret_cast<const float2*>(part_ml);
    const float4* acc4 = reinterpret_cast<const float4*>(part_acc);
    float4* sa = reinterpret_cast<float4*>(sm);             // [NT] acc of each thread
    float2* sml = reinterpret_cast<float2*>(sm + 4 * NT);   // [NT] (m, l) of each thread
    float2* rml = reinterpret_cast<float2*>(sm + 6 * NT);   // [8] merged (m, l) per row (not final)
    // (not final: acc column c of slot `first` is read and rewritten by the same thread; the
    // row's (m, l) there is read by every thread of the row, so it is written after a barrier)
    for (int c0 = 0; c0 < C4; c0 += cpp) {
        const int c = c0 + tid % cpp, sg = tid / cpp;
        const bool live = c < C4 && sg < nsg;
        const int r = live ? c / DV4 : 0;
        float M = ATTN_NEG_INF, l = 0.f;
        float4 a = f4(0.f, 0.f, 0.f, 0.f);
        if (live) {
#pragma unroll 16
            for (int i = sg; i < count; i += nsg) {
                const size_t slot = (size_t)(first + i * stride);
                const float2 ml = __ldcg(ml2 + slot * srow + row0 + r);
                const float4 x = __ldcg(acc4 + (slot * srow + row0) * DV4 + c);
                if (ml.x > M) {                             // new max: rescale the sum so far
                    const float f = M == ATTN_NEG_INF ? 0.f : exp2f(M - ml.x);
                    a.x *= f; a.y *= f; a.z *= f; a.w *= f; l *= f;
                    M = ml.x;
                }
                const float w = ml.x == ATTN_NEG_INF ? 0.f : exp2f(ml.x - M);
                a.x = fmaf(w, x.x, a.x); a.y = fmaf(w, x.y, a.y); a.z = fmaf(w, x.z, a.z); a.w = fmaf(w, x.w, a.w);
                l = fmaf(w, ml.y, l);
            }
        }
        if (nsg > 1) {                                      // merge the split groups (one pass only)
            float2 t; t.x = M; t.y = l;
            sa[tid] = a;
            sml[tid] = t;
            __syncthreads();
            if (sg == 0 && live) {
                for (int g2 = 1; g2 < nsg; ++g2) {
                    const float2 o = sml[g2 * cpp + tid];
                    if (o.x == ATTN_NEG_INF) continue;
                    const float4 x = sa[g2 * cpp + tid];
                    const float Mn = fmaxf(M, o.x);
                    const float f = M == ATTN_NEG_INF ? 0.f : exp2f(M - Mn), w = exp2f(o.x - Mn);
                    a.x = a.x * f + w * x.x; a.y = a.y * f + w * x.y; a.z = a.z * f + w * x.z; a.w = a.w * f + w * x.w;
                    l = l * f + w * o.y;
                    M = Mn;
                }
            }
        }
        if (sg == 0 && live) {
            if (final) {
                const float iv = l > 0.f ? 1.f / l : 0.f;
                a.x *= iv; a.y *= iv; a.z *= iv; a.w *= iv;
                reinterpret_cast<float4*>(out)[((size_t)(r / G) * H + kvh * G + r % G) * DV4 + c % DV4] = a;
            } else {
                if (c % DV4 == 0) { float2 t; t.x = M; t.y = l; rml[r] = t; }
                reinterpret_cast<float4*>(part_acc)[((size_t)first * srow + row0) * DV4 + c] = a;
            }
        }
    }
    if (final) return;
    __syncthreads();                                        // every read of slot `first`'s (m, l) is done
    if (tid < R) reinterpret_cast<float2*>(part_ml)[(size_t)first * srow + row0 + tid] = rml[tid];
}

// One ticket on `counter` for `holders` blocks; true (in every thread) for the last holder.
__device__ __forceinline__ bool last_ticket(unsigned* counter, int holders) {
    __syncthreads();                                        // every thread's partial stores are issued
    unsigned ticket = 0;
    if (threadIdx.x == 0) {
        __threadfence();                                    // release (cumulative through bar.sync)
        ticket = atomicInc(counter, (unsigned)(holders - 1));
        if (ticket == (unsigned)(holders - 1)) __threadfence();   // acquire
    }
    return __syncthreads_or(threadIdx.x == 0 && ticket == (unsigned)(holders - 1));
}

template <int NT>
__device__ __forceinline__ void decode_combine(
    float* __restrict__ part_ml, float* __restrict__ part_acc, unsigned* __restrict__ counters,
    float* __restrict__ out, float* __restrict__ sm, int nsplit, int split, int flat_max, int kvh, int Hkv,
    int R, int G, int H)
{
    int gs = nsplit;                                        // splits per group
    if (nsplit > flat_max) {
        gs = 1;
        while (gs * gs < nsplit) ++gs;                      // ceil(sqrt(nsplit))
        while ((nsplit + gs - 1) / gs > COMBINE_GMAX) ++gs;
    }
    const int ngroups = (nsplit + gs - 1) / gs, group = split / gs;
    const int gsize = min(gs, nsplit - group * gs);
    if (!last_ticket(counters + Hkv + kvh * COMBINE_GMAX + group, gsize)) return;
    combine_slots<NT>(part_ml, part_acc, out, sm, group * gs, gsize, 1, ngroups == 1, kvh, Hkv, R, G, H);
    if (ngroups == 1) return;
    if (!last_ticket(counters + kvh, ngroups)) return;
    combine_slots<NT>(part_ml, part_acc, out, sm, 0, ngroups, gs, true, kvh, Hkv, R, G, H);
}

// =============================================================================================
// Decode: flash-decoding over splits of the sequence's pages.
// =============================================================================================
constexpr int DEC_NT = 128;                  // threads
constexpr int DEC_T = 32;                    // keys per tile (one per lane in the softmax)
constexpr int DEC_NS = ATTN_DEC_STAGES;      // cp.async pipeline depth
constexpr int DEC_RG = DEC_NT / DEC_T;       // row groups in q.k (4)
constexpr int DEC_VCG = VCH;                 // column groups (8 values) of a V row in p.v
constexpr int DEC_KG = DEC_NT / DEC_VCG;     // key groups in p.v
constexpr int DEC_KPT = (DEC_T + DEC_KG - 1) / DEC_KG;   // keys per thread per tile in p.v
static_assert(DEC_T == 32, "the decode softmax gives one key to each lane");
static_assert(DEC_VCG <= DEC_NT, "DV too large for the decode kernel");
static_assert(DEC_NS >= 2, "at least two stages");

// Shared memory (bytes), in this order -- attention_ops._decode_smem mirrors it:
//   kbuf [NS][T][KSTR] kv_t | vbuf [NS][T][VSTR] kv_t | pbuf [NS][T] i32 |
//   qs [RMAX][DK] f32 | S [RMAX][T] f32 | al [RMAX] f32 | qp [RMAX] i32
// and, after the last tile, red [KG][RMAX][DV] f32 | rinv [RMAX] over the start of it, then
// (combine) combine_floats(splits) floats; the size is the max of the three.
//
// Partials (scratch, when more than one split runs): see decode_combine.
template <int RMAX>
__device__ __forceinline__ void decode_impl(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
    const int* __restrict__ pc, const int* __restrict__ bt, const int* __restrict__ kv_len,
    const int* __restrict__ q_pos, float* __restrict__ part_ml, float* __restrict__ part_acc,
    unsigned* __restrict__ counters, float* __restrict__ out,
    int n, int H, int Hkv, int n_pages, int max_pages, int splits, int min_units, int flat_max,
    float qscale, float cap2, int window,
    const unsigned char* __restrict__ pf, unsigned long long pf_bytes, unsigned long long pf_kv_max)
{
    static_assert(RMAX % DEC_RG == 0, "rows per block");
    constexpr int RPT = RMAX / DEC_RG;       // rows per thread in q.k, and per warp in the softmax
    extern __shared__ __align__(16) unsigned char smem[];

    const int tid = threadIdx.x;
    const int split = blockIdx.x, kvh = blockIdx.y;
    const int G = H / Hkv, R = n * G;
    const int L = seq_len(kv_len, max_pages);
    ATTN_PREFETCH(L);
    int nsplit, ppb;
    split_geometry(L, splits, min_units, nsplit, ppb);
    if (split >= nsplit) return;                         // no keys here
    const int key0 = split * ppb * PAGE;
    const int key_end = min(L, key0 + ppb * PAGE);
    const int n_tiles = key_end > key0 ? (key_end - key0 + DEC_T - 1) / DEC_T : 0;

    kv_t* kbuf = reinterpret_cast<kv_t*>(smem);
    kv_t* vbuf = kbuf + DEC_NS * DEC_T * KSTR;
    int* pbuf = reinterpret_cast<int*>(vbuf + DEC_NS * DEC_T * VSTR);
    float* qs = reinterpret_cast<float*>(pbuf + DEC_NS * DEC_T);
    float* S = qs + RMAX * DK;
    float* al = S + RMAX * DEC_T;
    int* qp = reinterpret_cast<int*>(al + RMAX);

    const size_t kstride = (size_t)Hkv * DK, vstride = (size_t)Hkv * DV;   // elements per slot
    const kv_t* kh = kc + (size_t)kvh * DK;
    const kv_t* vh = vc + (size_t)kvh * DV;

    auto issue = [&](int tile) {
        const int buf = tile % DEC_NS;
        stage_tile<DEC_T, DEC_NT>(kbuf + buf * DEC_T * KSTR, vbuf + buf * DEC_T * VSTR, pbuf + buf * DEC_T,
                                  key0 + tile * DEC_T, key_end, kh, vh, pc, bt, n_pages, kstride, vstride);
    };

    // prologue: queries (pre-scaled, f32) and their positions; first NS-1 tiles in flight
#pragma unroll
    for (int s = 0; s < DEC_NS - 1; ++s) {
        if (s < n_tiles) issue(s);
        cp_commit();
    }
    for (int idx = tid; idx < RMAX * DK; idx += DEC_NT) {
        const int r = idx / DK, d = idx % DK;
        float x = 0.f;
        if (r < R) x = q[((size_t)(r / G) * H + kvh * G + r % G) * DK + d] * qscale;
        qs[idx] = x;
    }
    if (tid < RMAX) qp[tid] = tid < R ? q_pos[tid / G] : ATTN_INT_MIN;

    const int warp = tid / 32, lane = tid % 32;
    float m_run[RPT], l_run[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) { m_run[i] = ATTN_NEG_INF; l_run[i] = 0.f; }
    const int cg = tid % DEC_VCG, kg = tid / DEC_VCG;      // p.v: column group, key group
    float acc[RMAX][8];
#pragma unroll
    for (int r = 0; r < RMAX; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;

    for (int tt = 0; tt < n_tiles; ++tt) {
        cp_wait<DEC_NS - 2>();                   // this thread's copies of tile tt have landed
        __syncthreads();                         // ... everyone's; and tile tt-1 is consumed
        if (tt + DEC_NS - 1 < n_tiles) issue(tt + DEC_NS - 1);
        cp_commit();
        const int buf = tt % DEC_NS;
        const kv_t* kb = kbuf + buf * DEC_T * KSTR;
        const kv_t* vb = vbuf + buf * DEC_T * VSTR;
        const int* pb = pbuf + buf * DEC_T;

        {   // scores: thread = (key t, row group rg), rows rg + 4 i
            const int t = tid % DEC_T, rg = tid / DEC_T;
            float s[RPT];
#pragma unroll
            for (int i = 0; i < RPT; ++i) s[i] = 0.f;
#pragma unroll 4
            for (int c = 0; c < KCH; ++c) {
                float kx[8];
                load8(kb + t * KSTR + c * 8, kx);
#pragma unroll
                for (int i = 0; i < RPT; ++i) {
                    const float* qr = qs + (rg + DEC_RG * i) * DK + c * 8;
                    const float4 a = *reinterpret_cast<const float4*>(qr);
                    const float4 b = *reinterpret_cast<const float4*>(qr + 4);
                    float x = s[i];
                    x = fmaf(a.x, kx[0], x); x = fmaf(a.y, kx[1], x); x = fmaf(a.z, kx[2], x); x = fmaf(a.w, kx[3], x);
                    x = fmaf(b.x, kx[4], x); x = fmaf(b.y, kx[5], x); x = fmaf(b.z, kx[6], x); x = fmaf(b.w, kx[7], x);
                    s[i] = x;
                }
            }
            const int kp = pb[t];
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const int r = rg + DEC_RG * i;
                S[r * DEC_T + t] = (r < R && visible(kp, qp[r], window)) ? logit(s[i], cap2) : ATTN_NEG_INF;
            }
        }
        __syncthreads();
        {   // online softmax: warp w owns rows w + 4 i, one key per lane
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const int r = warp + DEC_RG * i;
                const float sc = S[r * DEC_T + lane];
                const float m_new = fmaxf(m_run[i], warp_max(sc));
                const float p = sc == ATTN_NEG_INF ? 0.f : exp2f(sc - m_new);
                const float a = m_run[i] == ATTN_NEG_INF ? 0.f : exp2f(m_run[i] - m_new);
                l_run[i] = l_run[i] * a + warp_sum(p);
                m_run[i] = m_new;
                S[r * DEC_T + lane] = p;
                if (lane == 0) al[r] = a;
            }
        }
        __syncthreads();
        if (kg < DEC_KG) {   // acc = acc * alpha + p.v: thread = (column group cg, key group kg)
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
                const float a = al[r];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[r][e] *= a;
            }
#pragma unroll
            for (int u = 0; u < DEC_KPT; ++u) {
                const int t = kg + DEC_KG * u;
                if (DEC_T % DEC_KG == 0 || t < DEC_T) {
                    float vx[8];
                    load8(vb + t * VSTR + cg * 8, vx);
#pragma unroll
                    for (int r = 0; r < RMAX; ++r) {
                        const float p = S[r * DEC_T + t];
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(p, vx[e], acc[r][e]);
                    }
                }
            }
        }
    }

    // epilogue: sum the key groups' accumulators through shared memory; one split: normalise and
    // write the output; else write this split's partial and combine (the last block of the head)
    cp_wait<0>();
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);          // [KG][RMAX][DV]
    float* rinv = red + DEC_KG * RMAX * DV;               // [RMAX]: 1 / l (one split)
    const bool direct = nsplit == 1;
    if (kg < DEC_KG) {
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
            float* d = red + (kg * RMAX + r) * DV + cg * 8;
            *reinterpret_cast<float4*>(d) = f4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            *reinterpret_cast<float4*>(d + 4) = f4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
        }
    }
    const size_t pbase = ((size_t)split * Hkv + kvh) * R;
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int r = warp + DEC_RG * i;
            rinv[r] = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
            if (!direct && r < R) {
                part_ml[(pbase + r) * 2] = m_run[i];
                part_ml[(pbase + r) * 2 + 1] = l_run[i];
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < R * DV; idx += DEC_NT) {
        const int r = idx / DV, d = idx % DV;
        float x = 0.f;
#pragma unroll
        for (int g = 0; g < DEC_KG; ++g) x += red[(g * RMAX + r) * DV + d];
        if (direct) out[((size_t)(r / G) * H + kvh * G + r % G) * DV + d] = x * rinv[r];
        else part_acc[(pbase + r) * DV + d] = x;
    }
    if (!direct)
        decode_combine<DEC_NT>(part_ml, part_acc, counters, out, reinterpret_cast<float*>(smem), nsplit, split,
                               flat_max, kvh, Hkv, R, G, H);
}

#define ATTN_DECODE_ARGS                                                                           \
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,         \
    const int* __restrict__ pc, const int* __restrict__ bt, const int* __restrict__ kv_len,        \
    const int* __restrict__ q_pos, float* __restrict__ part_ml, float* __restrict__ part_acc,      \
    unsigned* __restrict__ counters, float* __restrict__ out,                                      \
    int n, int H, int Hkv, int n_pages, int max_pages, int splits, int min_units, int flat_max,    \
    float qscale, float cap2, int window,                                                          \
    const unsigned char* __restrict__ pf, unsigned long long pf_bytes, unsigned long long pf_kv_max
#define ATTN_DECODE_PASS q, kc, vc, pc, bt, kv_len, q_pos, part_ml, part_acc, counters, out, n, H, Hkv, \
    n_pages, max_pages, splits, min_units, flat_max, qscale, cap2, window, pf, pf_bytes, pf_kv_max

extern "C" __global__ void __launch_bounds__(DEC_NT, 2) attn_decode_r4(ATTN_DECODE_ARGS) {
    PDL_TRIGGER();
    decode_impl<4>(ATTN_DECODE_PASS);
}
extern "C" __global__ void __launch_bounds__(DEC_NT, 2) attn_decode_r8(ATTN_DECODE_ARGS) {
    PDL_TRIGGER();
    decode_impl<8>(ATTN_DECODE_PASS);
}

// =============================================================================================
// Prefill: tiled flash attention. grid (ceil(n*G / BR), Hkv), 128 threads, BR = 16 * RPT rows.
// Thread (rg = tid / 8, cg = tid % 8) owns rows rg + 16 i and, in q.k, keys cg + 8 j of a tile;
// in p.v, output columns (cg + 8 u) * 8 .. +8. The 8 threads of a row are 8 consecutive lanes,
// so row max / sum are 3 shuffles.
// =============================================================================================
constexpr int PF_NT = 128;
constexpr int PF_BC = 64;                     // keys per tile
constexpr int PF_PSTR = PF_BC + 8;            // P row stride (floats): rows 8 banks apart
constexpr int PF_VCPT = (VCH + 7) / 8;        // 8-column chunks of the output per thread

// Shared memory (bytes), in this order -- attention_ops._prefill_smem mirrors it:
//   Qs [BR][DK+4] f32 | Ks [BC][KSTR] kv_t | Vs [BC][VSTR] kv_t | Ps [BR][PSTR] f32 |
//   kpos [BC] i32 | kslot [BC] i32 | qp [BR] i32
template <int RPT>
__device__ __forceinline__ void prefill_impl(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
    const int* __restrict__ pc, const int* __restrict__ bt, const int* __restrict__ kv_len,
    const int* __restrict__ q_pos, float* __restrict__ out,
    int n, int H, int Hkv, int n_pages, int max_pages, float qscale, float cap2, int window)
{
    constexpr int BR = 16 * RPT;
    constexpr int QSTR = DK + 4;
    extern __shared__ __align__(16) unsigned char smem[];
    float* Qs = reinterpret_cast<float*>(smem);
    kv_t* Ks = reinterpret_cast<kv_t*>(Qs + BR * QSTR);
    kv_t* Vs = Ks + PF_BC * KSTR;
    float* Ps = reinterpret_cast<float*>(Vs + PF_BC * VSTR);
    int* kpos = reinterpret_cast<int*>(Ps + BR * PF_PSTR);
    int* kslot = kpos + PF_BC;
    int* qps = kslot + PF_BC;

    const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
    const int kvh = blockIdx.y, row0 = blockIdx.x * BR;
    const int G = H / Hkv, R = n * G;
    const int L = seq_len(kv_len, max_pages);

    // queries of this block, pre-scaled, f32
    for (int idx = tid; idx < BR * (DK / 4); idx += PF_NT) {
        const int r = idx / (DK / 4), c4 = idx % (DK / 4);
        const int gr = row0 + r;
        float4 x = f4(0.f, 0.f, 0.f, 0.f);
        if (gr < R) {
            x = reinterpret_cast<const float4*>(q + ((size_t)(gr / G) * H + kvh * G + gr % G) * DK)[c4];
            x.x *= qscale; x.y *= qscale; x.z *= qscale; x.w *= qscale;
        }
        *reinterpret_cast<float4*>(Qs + r * QSTR + c4 * 4) = x;
    }
    if (tid < BR) qps[tid] = row0 + tid < R ? q_pos[(row0 + tid) / G] : ATTN_INT_MIN;
    __syncthreads();
    int qmin = ATTN_INT_MAX, qmax = ATTN_INT_MIN;        // positions of the block's queries
    for (int r = 0; r < BR; ++r)
        if (row0 + r < R) { qmin = min(qmin, qps[r]); qmax = max(qmax, qps[r]); }
    int myqp[RPT];
    bool myok[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        myqp[i] = qps[rg + 16 * i];
        myok[i] = row0 + rg + 16 * i < R;
    }

    float m_run[RPT], l_run[RPT], o[RPT][PF_VCPT * 8];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        m_run[i] = ATTN_NEG_INF; l_run[i] = 0.f;
#pragma unroll
        for (int e = 0; e < PF_VCPT * 8; ++e) o[i][e] = 0.f;
    }

    const int n_kt = (L + PF_BC - 1) / PF_BC;
    for (int kt = 0; kt < n_kt; ++kt) {
        const int kbase = kt * PF_BC;
        __syncthreads();                                  // the last tile's K, V, P are consumed
        bool vis = false;
        if (tid < PF_BC) {
            const int s = slot_of(kbase + tid, L, bt, n_pages);
            const int p = s >= 0 ? pc[s] : ATTN_INT_MAX;
            kslot[tid] = s;
            kpos[tid] = p;
            vis = p <= qmax && (window <= 0 || (long long)p + window > (long long)qmin);
        }
        if (!__syncthreads_or(vis)) continue;            // no query of the block sees this tile

        for (int idx = tid; idx < PF_BC * KCH; idx += PF_NT) {
            const int t = idx / KCH, c = idx % KCH, s = kslot[t];
            kv_t* dst = Ks + t * KSTR + c * 8;
            if (s >= 0) copy_chunk(dst, kc + ((size_t)s * Hkv + kvh) * DK + c * 8);
            else zero_chunk(dst);
        }
        cp_commit();
        for (int idx = tid; idx < PF_BC * VCH; idx += PF_NT) {
            const int t = idx / VCH, c = idx % VCH, s = kslot[t];
            kv_t* dst = Vs + t * VSTR + c * 8;
            if (s >= 0) copy_chunk(dst, vc + ((size_t)s * Hkv + kvh) * DV + c * 8);
            else zero_chunk(dst);
        }
        cp_commit();
        cp_wait<1>();                                     // K is here (V may still be in flight)
        __syncthreads();

        float s[RPT][8];
#pragma unroll
        for (int i = 0; i < RPT; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) s[i][j] = 0.f;
#pragma unroll 2
        for (int c = 0; c < KCH; ++c) {
            float qv[RPT][8];
#pragma unroll
            for (int i = 0; i < RPT; ++i) {
                const float* qr = Qs + (rg + 16 * i) * QSTR + c * 8;
                const float4 a = *reinterpret_cast<const float4*>(qr);
                const float4 b = *reinterpret_cast<const float4*>(qr + 4);
                qv[i][0] = a.x; qv[i][1] = a.y; qv[i][2] = a.z; qv[i][3] = a.w;
                qv[i][4] = b.x; qv[i][5] = b.y; qv[i][6] = b.z; qv[i][7] = b.w;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float kx[8];
                load8(Ks + (cg + 8 * j) * KSTR + c * 8, kx);
#pragma unroll
                for (int i = 0; i < RPT; ++i)
#pragma unroll
                    for (int e = 0; e < 8; ++e) s[i][j] = fmaf(qv[i][e], kx[e], s[i][j]);
            }
        }

        // mask, softcap, online softmax (row state replicated in the row's 8 lanes)
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            float mx = ATTN_NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int kp = kpos[cg + 8 * j];
                s[i][j] = (myok[i] && visible(kp, myqp[i], window)) ? logit(s[i][j], cap2) : ATTN_NEG_INF;
                mx = fmaxf(mx, s[i][j]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            const float m_new = fmaxf(m_run[i], mx);
            const float a = m_run[i] == ATTN_NEG_INF ? 0.f : exp2f(m_run[i] - m_new);
            float rs = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float p = s[i][j] == ATTN_NEG_INF ? 0.f : exp2f(s[i][j] - m_new);
                rs += p;
                Ps[(rg + 16 * i) * PF_PSTR + cg + 8 * j] = p;
            }
            rs += __shfl_xor_sync(0xffffffffu, rs, 1);
            rs += __shfl_xor_sync(0xffffffffu, rs, 2);
            rs += __shfl_xor_sync(0xffffffffu, rs, 4);
            l_run[i] = l_run[i] * a + rs;
            m_run[i] = m_new;
#pragma unroll
            for (int e = 0; e < PF_VCPT * 8; ++e) o[i][e] *= a;
        }
        cp_wait<0>();
        __syncthreads();                                  // P and V are visible

#pragma unroll 4
        for (int c = 0; c < PF_BC; ++c) {
            float p[RPT];
#pragma unroll
            for (int i = 0; i < RPT; ++i) p[i] = Ps[(rg + 16 * i) * PF_PSTR + c];
#pragma unroll
            for (int u = 0; u < PF_VCPT; ++u) {
                const int ch = cg + 8 * u;
                if (VCH % 8 == 0 || ch < VCH) {
                    float vx[8];
                    load8(Vs + c * VSTR + ch * 8, vx);
#pragma unroll
                    for (int i = 0; i < RPT; ++i)
#pragma unroll
                        for (int e = 0; e < 8; ++e) o[i][u * 8 + e] = fmaf(p[i], vx[e], o[i][u * 8 + e]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int gr = row0 + rg + 16 * i;
        if (gr < R) {
            const float inv = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
            float* dst = out + (size_t)(gr / G) * H * DV + (size_t)(kvh * G + gr % G) * DV;
#pragma unroll
            for (int u = 0; u < PF_VCPT; ++u) {
                const int ch = cg + 8 * u;
                if (VCH % 8 == 0 || ch < VCH) {
                    const float* x = o[i] + u * 8;
                    *reinterpret_cast<float4*>(dst + ch * 8) = f4(x[0] * inv, x[1] * inv, x[2] * inv, x[3] * inv);
                    *reinterpret_cast<float4*>(dst + ch * 8 + 4) = f4(x[4] * inv, x[5] * inv, x[6] * inv, x[7] * inv);
                }
            }
        }
    }
}

#define ATTN_PREFILL_ARGS                                                                          \
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,         \
    const int* __restrict__ pc, const int* __restrict__ bt, const int* __restrict__ kv_len,        \
    const int* __restrict__ q_pos, float* __restrict__ out,                                        \
    int n, int H, int Hkv, int n_pages, int max_pages, float qscale, float cap2, int window
#define ATTN_PREFILL_PASS q, kc, vc, pc, bt, kv_len, q_pos, out, n, H, Hkv, n_pages, max_pages, \
    qscale, cap2, window

extern "C" __global__ void __launch_bounds__(PF_NT) attn_prefill_r1(ATTN_PREFILL_ARGS) {
    prefill_impl<1>(ATTN_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(PF_NT) attn_prefill_r2(ATTN_PREFILL_ARGS) {
    prefill_impl<2>(ATTN_PREFILL_PASS);
}
#if ATTN_DV <= 128
extern "C" __global__ void __launch_bounds__(PF_NT) attn_prefill_r4(ATTN_PREFILL_ARGS) {
    prefill_impl<4>(ATTN_PREFILL_PASS);
}
#endif

// =============================================================================================
// Prefill on the tensor cores (f16 pages only): mma.sync m16n8k16, f16 operands, f32 accumulation.
// grid (ceil(n*G / (16*NW)), Hkv), 32*NW threads; warp w owns rows 16w..16w+15 of the block, a
// tile is 64 keys. q (pre-scaled by scale*log2 e) and p are rounded to f16 for the products
// (NMSE ~1e-7 against the f32 reference); scores, softmax state and the output stay f32.
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16): lane = 4 * g + t4;
//   A (16x16, row):  a0 = A[g][2t4..+1]  a1 = A[g+8][2t4..]  a2 = A[g][2t4+8..]  a3 = A[g+8][2t4+8..]
//   B (16x8, col):   b0 = B[2t4..+1][g]  b1 = B[2t4+8..][g]
//   C (16x8, f32):   c0,c1 = C[g][2t4..+1]  c2,c3 = C[g+8][2t4..+1]
// so the S accumulators of key columns 16kk..16kk+15 are exactly the A fragment of P for the
// k-step kk of P.V (FlashAttention-2's register reuse). Q and K fragments come from row-major
// shared memory through ldmatrix, V's through ldmatrix.trans.
// Shared memory (bytes) -- attention_ops._prefill_tc_smem mirrors it:
//   Qs [BR][KSTR] f16 | Ks [BC][KSTR] f16 | Vs [BC][VSTR] f16 | kpos [BC] i32 | kslot [BC] i32 | qp [BR] i32
// =============================================================================================
#if ATTN_KV_F16
constexpr int TC_BC = DV > 128 ? 32 : 64;    // keys per tile (32 keeps d=256 in registers)

// ldmatrix from a shared-space byte address
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int NW>
__device__ __forceinline__ void prefill_tc_impl(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
    const int* __restrict__ pc, const int* __restrict__ bt, const int* __restrict__ kv_len,
    const int* __restrict__ q_pos, float* __restrict__ out,
    int n, int H, int Hkv, int n_pages, int max_pages, float qscale, float cap2, int window)
{
    static_assert(DK % 16 == 0 && DV % 16 == 0, "tensor-core prefill needs head dims % 16 == 0");
    constexpr int NT = 32 * NW, BR = 16 * NW;
    constexpr int NKS = DK / 16;           // k-steps of q.k
    constexpr int NST = TC_BC / 8;         // 8-key column tiles of S (8)
    constexpr int NOT = DV / 8;            // 8-column tiles of O
    extern __shared__ __align__(16) unsigned char smem[];
    kv_t* Qs = reinterpret_cast<kv_t*>(smem);
    kv_t* Ks = Qs + BR * KSTR;
    kv_t* Vs = Ks + TC_BC * KSTR;
    int* kpos = reinterpret_cast<int*>(Vs + TC_BC * VSTR);
    int* kslot = kpos + TC_BC;
    int* qps = kslot + TC_BC;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int kvh = blockIdx.y, row0 = blockIdx.x * BR;
    const int G = H / Hkv, R = n * G;
    const int L = seq_len(kv_len, max_pages);

    for (int idx = tid; idx < BR * (DK / 4); idx += NT) {          // q rows -> f16, pre-scaled
        const int r = idx / (DK / 4), c4 = idx % (DK / 4);
        const int gr = row0 + r;
        float4 x = f4(0.f, 0.f, 0.f, 0.f);
        if (gr < R) x = reinterpret_cast<const float4*>(q + ((size_t)(gr / G) * H + kvh * G + gr % G) * DK)[c4];
        uint2 h;
        h.x = f2h2(x.x * qscale, x.y * qscale);
        h.y = f2h2(x.z * qscale, x.w * qscale);
        *reinterpret_cast<uint2*>(Qs + r * KSTR + c4 * 4) = h;
    }
    if (tid < BR) qps[tid] = row0 + tid < R ? q_pos[(row0 + tid) / G] : ATTN_INT_MIN;
    __syncthreads();
    int qmin = ATTN_INT_MAX, qmax = ATTN_INT_MIN;
    for (int r = 0; r < BR; ++r)
        if (row0 + r < R) { qmin = min(qmin, qps[r]); qmax = max(qmax, qps[r]); }
    const int lr0 = warp * 16 + g, lr1 = lr0 + 8;                  // this thread's two rows
    const int qp0 = qps[lr0], qp1 = qps[lr1];
    const bool ok0 = row0 + lr0 < R, ok1 = row0 + lr1 < R;

    float o[NOT][4];
#pragma unroll
    for (int j = 0; j < NOT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = ATTN_NEG_INF, m1 = ATTN_NEG_INF, l0 = 0.f, l1 = 0.f;

    // ldmatrix addresses (lane-dependent parts)
    const unsigned qa = smem_u32(Qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * KSTR + (lane >> 4) * 8);
    const unsigned kb = smem_u32(Ks + ((lane & 7) + (lane >> 4) * 8) * KSTR + ((lane >> 3) & 1) * 8);
    const unsigned vb = smem_u32(Vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * VSTR + (lane >> 4) * 8);

    const int n_kt = (L + TC_BC - 1) / TC_BC;
    for (int kt = 0; kt < n_kt; ++kt) {
        const int kbase = kt * TC_BC;
        __syncthreads();
        bool vis = false;
        for (int t = tid; t < TC_BC; t += NT) {
            const int s = slot_of(kbase + t, L, bt, n_pages);
            const int p = s >= 0 ? pc[s] : ATTN_INT_MAX;
            kslot[t] = s;
            kpos[t] = p;
            vis |= p <= qmax && (window <= 0 || (long long)p + window > (long long)qmin);
        }
        if (!__syncthreads_or(vis)) continue;
        for (int idx = tid; idx < TC_BC * KCH; idx += NT) {
            const int t = idx / KCH, c = idx % KCH, s = kslot[t];
            kv_t* dst = Ks + t * KSTR + c * 8;
            if (s >= 0) copy_chunk(dst, kc + ((size_t)s * Hkv + kvh) * DK + c * 8);
            else zero_chunk(dst);
        }
        cp_commit();
        for (int idx = tid; idx < TC_BC * VCH; idx += NT) {
            const int t = idx / VCH, c = idx % VCH, s = kslot[t];
            kv_t* dst = Vs + t * VSTR + c * 8;
            if (s >= 0) copy_chunk(dst, vc + ((size_t)s * Hkv + kvh) * DV + c * 8);
            else zero_chunk(dst);
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        float sc[NST][4];
#pragma unroll
        for (int j = 0; j < NST; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < NKS; ++ks) {
            unsigned a[4];
            ldsm_x4(a, qa + ks * 32);
#pragma unroll
            for (int np = 0; np < NST / 2; ++np) {
                unsigned b[4];
                ldsm_x4(b, kb + (np * 16 * KSTR + ks * 16) * 2);
                mma16816(sc[2 * np], a, b[0], b[1]);
                mma16816(sc[2 * np + 1], a, b[2], b[3]);
            }
        }

        float mx0 = ATTN_NEG_INF, mx1 = ATTN_NEG_INF;
#pragma unroll
        for (int j = 0; j < NST; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int kp = kpos[j * 8 + 2 * t4 + e];
                sc[j][e] = (ok0 && visible(kp, qp0, window)) ? logit(sc[j][e], cap2) : ATTN_NEG_INF;
                sc[j][2 + e] = (ok1 && visible(kp, qp1, window)) ? logit(sc[j][2 + e], cap2) : ATTN_NEG_INF;
                mx0 = fmaxf(mx0, sc[j][e]);
                mx1 = fmaxf(mx1, sc[j][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float a0 = m0 == ATTN_NEG_INF ? 0.f : exp2f(m0 - mn0);
        const float a1 = m1 == ATTN_NEG_INF ? 0.f : exp2f(m1 - mn1);
        float rs0 = 0.f, rs1 = 0.f;
        unsigned pa[NST][2];                          // P as f16 pairs: [tile][row g / row g+8]
#pragma unroll
        for (int j = 0; j < NST; ++j) {
            const float p0 = sc[j][0] == ATTN_NEG_INF ? 0.f : exp2f(sc[j][0] - mn0);
            const float p1 = sc[j][1] == ATTN_NEG_INF ? 0.f : exp2f(sc[j][1] - mn0);
            const float p2 = sc[j][2] == ATTN_NEG_INF ? 0.f : exp2f(sc[j][2] - mn1);
            const float p3 = sc[j][3] == ATTN_NEG_INF ? 0.f : exp2f(sc[j][3] - mn1);
            rs0 += p0 + p1;
            rs1 += p2 + p3;
            pa[j][0] = f2h2(p0, p1);
            pa[j][1] = f2h2(p2, p3);
        }
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
        l0 = l0 * a0 + rs0;
        l1 = l1 * a1 + rs1;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int j = 0; j < NOT; ++j) { o[j][0] *= a0; o[j][1] *= a0; o[j][2] *= a1; o[j][3] *= a1; }

        cp_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TC_BC / 16; ++kk) {
            const unsigned a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
#pragma unroll
            for (int dp = 0; dp < NOT / 2; ++dp) {
                unsigned b[4];
                ldsm_x4_t(b, vb + (kk * 16 * VSTR + dp * 16) * 2);
                mma16816(o[2 * dp], a, b[0], b[1]);
                mma16816(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }

    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (ok0) {
        const int gr = row0 + lr0;
        float* dst = out + (size_t)(gr / G) * H * DV + (size_t)(kvh * G + gr % G) * DV + 2 * t4;
#pragma unroll
        for (int j = 0; j < NOT; ++j) {
            float2 v; v.x = o[j][0] * inv0; v.y = o[j][1] * inv0;
            *reinterpret_cast<float2*>(dst + j * 8) = v;
        }
    }
    if (ok1) {
        const int gr = row0 + lr1;
        float* dst = out + (size_t)(gr / G) * H * DV + (size_t)(kvh * G + gr % G) * DV + 2 * t4;
#pragma unroll
        for (int j = 0; j < NOT; ++j) {
            float2 v; v.x = o[j][2] * inv1; v.y = o[j][3] * inv1;
            *reinterpret_cast<float2*>(dst + j * 8) = v;
        }
    }
}

extern "C" __global__ void __launch_bounds__(32) attn_prefill_tc_w1(ATTN_PREFILL_ARGS) {
    prefill_tc_impl<1>(ATTN_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(64) attn_prefill_tc_w2(ATTN_PREFILL_ARGS) {
    prefill_tc_impl<2>(ATTN_PREFILL_PASS);
}
extern "C" __global__ void __launch_bounds__(128) attn_prefill_tc_w4(ATTN_PREFILL_ARGS) {
    prefill_tc_impl<4>(ATTN_PREFILL_PASS);
}
// =============================================================================================
// Decode on the tensor cores (f16 pages, n * G <= 8 query rows): the same splits and partials as
// attn_decode_r*, but each warp multiplies 16 keys at a time with mma.m16n8k16, the query rows
// being the n = 8 side:  S^T (16 keys x 8 rows) = K (16 x dk) . Q^T,  O^T (dv x 8) += V^T . P^T.
// A block streams 64-key tiles (16 per warp) through a cp.async pipeline; each warp keeps its own
// online softmax (no barrier inside a tile), and the 4 warps' states are merged once at the end.
// Lane (g = lane/4, t4 = lane%4) holds rows 2t4, 2t4+1: S^T[key g | g+8][row 2t4 | 2t4+1] and
// O^T[dim 16mt + g | g+8][row 2t4 | 2t4+1], so the softmax rescale needs no shuffle; row max/sum
// reduce over the 8 lanes of equal t4 (xor 4, 8, 16). P^T goes through 0.75 KB of shared memory
// per warp to become the B operand of P.V.
// Shared memory (bytes) -- attention_ops.decode_tc_smem mirrors it:
//   Qs [8][KSTR] f16 | NS x { K [64][KSTR] f16, V [64][VSTR] f16, pos [64] i32 } | Pw [4][8][24] f16 |
//   qp [8] i32;  after the last tile over the stages: wm [4][8], wl [4][8], wacc [4][8][DV], rsc [8]
//   f32, then (combine) combine_floats(splits) floats.
// =============================================================================================
constexpr int DTC_NS = ATTN_DEC_TC_STAGES;
constexpr int DTC_T = 64;                     // keys per block tile
constexpr int DTC_R = 8;                      // query rows (the mma's n)
constexpr int DTC_PSTR = 24;                  // P row stride (halves)
constexpr int DTC_STG = DTC_T * (KSTR + VSTR) + DTC_T * 2;      // stage size in halves (pos = 2 each)
static_assert(DTC_NS >= 2, "at least two stages");

// Bulk copies need whole 16-byte position runs: a page holds a multiple of 4 slots, and a 64-key
// tile is whole pages or a part of one page.
constexpr bool DTC_BULK_OK = PAGE % 4 == 0 && (DTC_T % PAGE == 0 || PAGE % DTC_T == 0);
constexpr int DTC_PCH = PAGE < DTC_T ? PAGE : DTC_T;          // keys per position run
constexpr int DTC_NPCH = DTC_T / DTC_PCH;                     // position runs per tile

// BULK: stage the tiles with bulk copies (one per K row, V row and position run, each thread
// issuing at most two, counted on one mbarrier per stage) instead of 16-byte cp.async.
template <bool BULK>
__device__ __forceinline__ void decode_tc_impl(ATTN_DECODE_ARGS)
{
    static_assert(DK % 16 == 0 && DV % 16 == 0, "tensor-core decode needs head dims % 16 == 0");
    constexpr int NKS = DK / 16, NMT = DV / 16;
    extern __shared__ __align__(16) unsigned char smem_dtc[];
    kv_t* Qs = reinterpret_cast<kv_t*>(smem_dtc);
    kv_t* stg = Qs + DTC_R * KSTR;
    kv_t* Pw_all = stg + DTC_NS * DTC_STG;
    int* qp = reinterpret_cast<int*>(Pw_all + 4 * DTC_R * DTC_PSTR);
    const unsigned bars = smem_u32(qp + DTC_R);                // BULK: [NS] mbarriers (8 bytes each)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int split = blockIdx.x, kvh = blockIdx.y;
    ATTN_TRACE_DECL;
    const int G = H / Hkv, R = n * G;
    // this thread's q elements (f32, rows past R zero) and q_pos; ATTN_QFIRST loads them first, before
    // kv_len's and the block table's reads: the three used to be read in series (kv_len -> the first
    // tiles' slots -> q), 2 of the kernel's 3.9 us at short contexts (benchmarks/RESULTS.md, session
    // 9's attention trace), and q depends on neither
    constexpr int QV = DTC_R * (DK / 4), QIT = (QV + 127) / 128;
    float4 qx[QIT];
    int qpv = ATTN_INT_MIN;
    auto load_q = [&]() {
#pragma unroll
        for (int i = 0; i < QIT; ++i) {
            const int idx = tid + i * 128, r = idx / (DK / 4), c4 = idx % (DK / 4);
            qx[i] = f4(0.f, 0.f, 0.f, 0.f);
            if (idx < QV && r < R) qx[i] = reinterpret_cast<const float4*>(q + ((size_t)(r / G) * H + kvh * G + r % G) * DK)[c4];
        }
        if (tid < DTC_R && tid < R) qpv = q_pos[tid / G];
    };
    if constexpr (ATTN_QFIRST) load_q();
    const int L = seq_len(kv_len, max_pages);
    ATTN_PREFETCH(L);
    int nsplit, ppb;
    split_geometry(L, splits, min_units, nsplit, ppb);
    if (split >= nsplit) {                       // no keys here
        ATTN_TRACE_END(-1, nsplit);
        return;
    }
    const int key0 = split * ppb * PAGE;
    const int key_end = min(L, key0 + ppb * PAGE);
    const int n_tiles = key_end > key0 ? (key_end - key0 + DTC_T - 1) / DTC_T : 0;

    const size_t kstride = (size_t)Hkv * DK, vstride = (size_t)Hkv * DV;
    const kv_t* kh = kc + (size_t)kvh * DK;
    const kv_t* vh = vc + (size_t)kvh * DV;
    auto issue = [&](int tile) {
        kv_t* kb = stg + (tile % DTC_NS) * DTC_STG;
        kv_t* vb = kb + DTC_T * KSTR;
        int* pbuf = reinterpret_cast<int*>(vb + DTC_T * VSTR);
        const int kbase = key0 + tile * DTC_T;
        if constexpr (BULK) {
            // thread t < 64: K row of key t (and position run t); t >= 64: V row of key t - 64
            const unsigned bar = bars + (tile % DTC_NS) * 8;
            const int t = tid & (DTC_T - 1);
            const bool isv = tid >= DTC_T;
            const int slot = slot_of(kbase + t, key_end, bt, n_pages);
            int pslot = -1;
            if (tid < DTC_NPCH) pslot = slot_of(kbase + tid * DTC_PCH, key_end, bt, n_pages);
            const unsigned rb = isv ? DV * 2 : DK * 2;
            mbar_arrive_expect(bar, (slot >= 0 ? rb : 0u) + (pslot >= 0 ? DTC_PCH * 4u : 0u));
            kv_t* dst = isv ? vb + t * VSTR : kb + t * KSTR;
            if (slot >= 0) {
                const kv_t* src = isv ? vh + (size_t)slot * vstride : kh + (size_t)slot * kstride;
                bulk_g2s(smem_u32(dst), src, rb, bar);
            } else {
                const int nch = isv ? VCH : KCH;
                for (int c = 0; c < nch; ++c) zero_chunk(dst + c * 8);
            }
            if (pslot >= 0) {
                bulk_g2s(smem_u32(pbuf + tid * DTC_PCH), pc + pslot, DTC_PCH * 4, bar);
            } else if (tid < DTC_NPCH) {
                for (int k = 0; k < DTC_PCH; ++k) pbuf[tid * DTC_PCH + k] = ATTN_INT_MAX;
            }
            fence_proxy_async_smem();            // these generic stores before later bulk writes here
        } else {
            stage_tile<DTC_T, 128>(kb, vb, pbuf, kbase, key_end, kh, vh, pc, bt, n_pages, kstride, vstride);
        }
    };
    if constexpr (BULK) {
        if (tid == 0) {
            for (int s = 0; s < DTC_NS; ++s) mbar_init(bars + s * 8, 128);
            mbar_init_fence();
        }
        __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < DTC_NS - 1; ++s) {
        if (s < n_tiles) issue(s);
        if constexpr (!BULK) cp_commit();
    }
    if constexpr (!ATTN_QFIRST) load_q();
#pragma unroll
    for (int i = 0; i < QIT; ++i) {                                     // q rows -> f16, pre-scaled
        const int idx = tid + i * 128, r = idx / (DK / 4), c4 = idx % (DK / 4);
        if (idx >= QV) break;
        uint2 hq;
        hq.x = f2h2(qx[i].x * qscale, qx[i].y * qscale);
        hq.y = f2h2(qx[i].z * qscale, qx[i].w * qscale);
        *reinterpret_cast<uint2*>(Qs + r * KSTR + c4 * 4) = hq;
    }
    if (tid < DTC_R) qp[tid] = qpv;
    __syncthreads();
    ATTN_STAMP(attn_st, 1);

    unsigned qf[NKS][2];                        // B = Q^T: b0 = Q[row g][16ks + 2t4 ..+1], b1 = +8
#pragma unroll
    for (int ks = 0; ks < NKS; ++ks) {
        qf[ks][0] = *reinterpret_cast<const unsigned*>(Qs + g * KSTR + ks * 16 + 2 * t4);
        qf[ks][1] = *reinterpret_cast<const unsigned*>(Qs + g * KSTR + ks * 16 + 2 * t4 + 8);
    }
    const int r0 = 2 * t4, r1 = r0 + 1;
    const int qp0 = qp[r0], qp1 = qp[r1];
    const bool ok0 = r0 < R, ok1 = r1 < R;
    float m0 = ATTN_NEG_INF, m1 = ATTN_NEG_INF, l0 = 0.f, l1 = 0.f;
    float o[NMT][4];
#pragma unroll
    for (int j = 0; j < NMT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    kv_t* Pw = Pw_all + warp * DTC_R * DTC_PSTR;
    const unsigned stg_u = smem_u32(stg);
    // ldmatrix lane offsets (bytes) inside a stage: K rows as the A operand, V rows (.trans) as A
    const unsigned ka = ((warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * KSTR + (lane >> 4) * 8) * 2;
    const unsigned va = (DTC_T * KSTR + (warp * 16 + (lane & 7) + (lane >> 4) * 8) * VSTR + ((lane >> 3) & 1) * 8) * 2;
    const int kl0 = warp * 16 + g, kl1 = kl0 + 8;      // this lane's keys within a tile

    for (int tt = 0; tt < n_tiles; ++tt) {
        if constexpr (BULK) mbar_wait(bars + (tt % DTC_NS) * 8, (tt / DTC_NS) & 1);
        else cp_wait<DTC_NS - 2>();
        __syncthreads();                        // tile tt is in; tile tt-1's buffer is free
        if (tt == 0) ATTN_STAMP(attn_st, 2);
        if (tt + DTC_NS - 1 < n_tiles) issue(tt + DTC_NS - 1);
        if constexpr (!BULK) cp_commit();
        const int buf = tt % DTC_NS;
        const int nvalid = key_end - (key0 + tt * DTC_T);        // keys of this tile below the end
        const unsigned sb = stg_u + buf * DTC_STG * 2;
        const int* pb = reinterpret_cast<const int*>(stg + buf * DTC_STG + DTC_T * (KSTR + VSTR));

        float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb2[4] = {0.f, 0.f, 0.f, 0.f};   // two chains
#pragma unroll
        for (int ks = 0; ks < NKS; ks += 2) {
            unsigned a[4];
            ldsm_x4(a, sb + ka + ks * 32);
            mma16816(sa, a, qf[ks][0], qf[ks][1]);
            if (ks + 1 < NKS) {
                unsigned a2[4];
                ldsm_x4(a2, sb + ka + (ks + 1) * 32);
                mma16816(sb2, a2, qf[ks + 1][0], qf[ks + 1][1]);
            }
        }
        // (bulk position runs may carry slots past the end: masked by nvalid)
        const int kp0 = kl0 < nvalid ? pb[kl0] : ATTN_INT_MAX, kp1 = kl1 < nvalid ? pb[kl1] : ATTN_INT_MAX;
        const float s0 = (ok0 && visible(kp0, qp0, window)) ? logit(sa[0] + sb2[0], cap2) : ATTN_NEG_INF;
        const float s1 = (ok1 && visible(kp0, qp1, window)) ? logit(sa[1] + sb2[1], cap2) : ATTN_NEG_INF;
        const float s2 = (ok0 && visible(kp1, qp0, window)) ? logit(sa[2] + sb2[2], cap2) : ATTN_NEG_INF;
        const float s3 = (ok1 && visible(kp1, qp1, window)) ? logit(sa[3] + sb2[3], cap2) : ATTN_NEG_INF;
        float mx0 = fmaxf(s0, s2), mx1 = fmaxf(s1, s3);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float a0 = m0 == ATTN_NEG_INF ? 0.f : exp2f(m0 - mn0);
        const float a1 = m1 == ATTN_NEG_INF ? 0.f : exp2f(m1 - mn1);
        const float p0 = s0 == ATTN_NEG_INF ? 0.f : exp2f(s0 - mn0);
        const float p1 = s1 == ATTN_NEG_INF ? 0.f : exp2f(s1 - mn1);
        const float p2 = s2 == ATTN_NEG_INF ? 0.f : exp2f(s2 - mn0);
        const float p3 = s3 == ATTN_NEG_INF ? 0.f : exp2f(s3 - mn1);
        float rs0 = p0 + p2, rs1 = p1 + p3;
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            rs0 += __shfl_xor_sync(0xffffffffu, rs0, off);
            rs1 += __shfl_xor_sync(0xffffffffu, rs1, off);
        }
        l0 = l0 * a0 + rs0;
        l1 = l1 * a1 + rs1;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int j = 0; j < NMT; ++j) { o[j][0] *= a0; o[j][1] *= a1; o[j][2] *= a0; o[j][3] *= a1; }

        // P^T -> P[row][key] f16 in this warp's corner, then B = P^T: b0 = P[g][2t4..+1], b1 = +8
        __syncwarp();
        const unsigned h01 = f2h2(p0, p1), h23 = f2h2(p2, p3);
        Pw[r0 * DTC_PSTR + g] = (kv_t)(h01 & 0xffffu);
        Pw[r1 * DTC_PSTR + g] = (kv_t)(h01 >> 16);
        Pw[r0 * DTC_PSTR + g + 8] = (kv_t)(h23 & 0xffffu);
        Pw[r1 * DTC_PSTR + g + 8] = (kv_t)(h23 >> 16);
        __syncwarp();
        const unsigned pb0 = *reinterpret_cast<const unsigned*>(Pw + g * DTC_PSTR + 2 * t4);
        const unsigned pb1 = *reinterpret_cast<const unsigned*>(Pw + g * DTC_PSTR + 2 * t4 + 8);
#pragma unroll
        for (int mt = 0; mt < NMT; ++mt) {
            unsigned a[4];
            ldsm_x4_t(a, sb + va + mt * 32);
            mma16816(o[mt], a, pb0, pb1);
        }
    }

    // merge the 4 warps' (m, l, acc) per row; one split: normalise and write the output, else
    // write this split's partial and combine (the last block of this kv head)
    if constexpr (!BULK) cp_wait<0>();      // (bulk: every issued tile was waited for)
    __syncthreads();
    ATTN_STAMP(attn_st, 3);
    float* wm = reinterpret_cast<float*>(stg);            // [4][8]  max per warp and row
    float* wl = wm + 4 * DTC_R;                           // [4][8]  sum; then the warp's weight
    float* wacc = wl + 4 * DTC_R;                         // [4][8][DV]
    float* rsc = wacc + 4 * DTC_R * DV;                   // [8]  1 / l (one split)
    if (g == 0) {
        wm[warp * DTC_R + r0] = m0; wm[warp * DTC_R + r1] = m1;
        wl[warp * DTC_R + r0] = l0; wl[warp * DTC_R + r1] = l1;
    }
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt) {
        wacc[(warp * DTC_R + r0) * DV + mt * 16 + g] = o[mt][0];
        wacc[(warp * DTC_R + r1) * DV + mt * 16 + g] = o[mt][1];
        wacc[(warp * DTC_R + r0) * DV + mt * 16 + g + 8] = o[mt][2];
        wacc[(warp * DTC_R + r1) * DV + mt * 16 + g + 8] = o[mt][3];
    }
    __syncthreads();
    const bool direct = nsplit == 1;
    const size_t pbase = ((size_t)split * Hkv + kvh) * R;
    if (tid < DTC_R) {
        float M = wm[tid];
#pragma unroll
        for (int w = 1; w < 4; ++w) M = fmaxf(M, wm[w * DTC_R + tid]);
        float l = 0.f, sw[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float mw = wm[w * DTC_R + tid];
            sw[w] = mw == ATTN_NEG_INF ? 0.f : exp2f(mw - M);
            l = fmaf(sw[w], wl[w * DTC_R + tid], l);
        }
#pragma unroll
        for (int w = 0; w < 4; ++w) wl[w * DTC_R + tid] = sw[w];
        rsc[tid] = l > 0.f ? 1.f / l : 0.f;
        if (!direct && tid < R) {
            part_ml[(pbase + tid) * 2] = M;
            part_ml[(pbase + tid) * 2 + 1] = l;
        }
    }
    __syncthreads();
    constexpr int DV4 = DV / 4;
    for (int idx = tid; idx < R * DV4; idx += 128) {
        const int r = idx / DV4, d4 = idx % DV4;
        float4 x = f4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float sw = wl[w * DTC_R + r];
            const float4 a = reinterpret_cast<const float4*>(wacc + (w * DTC_R + r) * DV)[d4];
            x.x = fmaf(sw, a.x, x.x); x.y = fmaf(sw, a.y, x.y); x.z = fmaf(sw, a.z, x.z); x.w = fmaf(sw, a.w, x.w);
        }
        if (direct) {
            const float iv = rsc[r];
            x.x *= iv; x.y *= iv; x.z *= iv; x.w *= iv;
            reinterpret_cast<float4*>(out)[((size_t)(r / G) * H + kvh * G + r % G) * DV4 + d4] = x;
        } else {
            reinterpret_cast<float4*>(part_acc)[(pbase + r) * DV4 + d4] = x;
        }
    }
    if (!direct)
        decode_combine<128>(part_ml, part_acc, counters, out, reinterpret_cast<float*>(stg), nsplit, split,
                            flat_max, kvh, Hkv, R, G, H);
    ATTN_TRACE_END(n_tiles, nsplit);
}

extern "C" __global__ void __launch_bounds__(128, 2) attn_decode_tc(ATTN_DECODE_ARGS) {
    PDL_TRIGGER();
    decode_tc_impl<false>(ATTN_DECODE_PASS);
}
#if __CUDA_ARCH__ >= 900 || !defined(__CUDA_ARCH__)
// No PDL trigger here, unlike the other decode kernels: the o projection launched early from it
// measured slower twice (8B tg128 -2..-5%, benchmarks/RESULTS.md sessions 4 and 8). Its CTAs and the
// gate/up launch that o in turn lets start early stream weights while attention and o's reduction
// run, and o's tail grew by 2 us.
extern "C" __global__ void __launch_bounds__(128, 2) attn_decode_tcb(ATTN_DECODE_ARGS) {
    if constexpr (DTC_BULK_OK) decode_tc_impl<true>(ATTN_DECODE_PASS);
}
#endif
#endif  // ATTN_KV_F16
