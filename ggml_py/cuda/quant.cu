// Quantized weight kernels of the CuPy backend: decode GGUF blocks in place.
//
// Weights stay as their raw GGUF blocks (quant_formats/ is the layout spec, its NumPy
// dequantizers the reference). Every type is described by one small struct (QK elements
// in BB bytes per block, NI "items" per block) whose dec() decodes one ITEM: 8 weights in
// two groups of 4 consecutive elements, at block offsets o0(i) and o1(i):
//
//     weight = v * s_g (+ m_g)            v exact small integers (or the float itself),
//                                         s_g the group's scale, m_g its (negated) min
//
// The same dec() serves three kernels:
//   mmv_<T>_n<N>_r<R>   decode GEMV, out (n, M) = x (n, K) @ W.T for n <= N <= 8: a CTA of
//                       W warps owns R rows and splits their items across its lanes, so
//                       every x float4 it loads feeds R rows; f32 FMAs, shuffle + smem
//                       reduction, one store per output.
//   getrows_<T>         rows of W picked by ids (on the device) -> f32, bit-exact with
//                       quant_formats.dequantize (same roundings: __fmul_rn / __fadd_rn).
//   deq16_<T>           a tile of rows -> f16 for the prefill path's cuBLAS GEMM.
//
// Block fields are 2-, 4- or 16-byte aligned depending on the type (Q4_0 blocks are 18
// bytes): ld32_2 reads a 4-byte word at a 2-aligned address as two u16 loads.
//
// Compiles stand-alone (nvcc -arch=sm_90 --cubin) and under NVRTC; with -DQUANT_HOST the
// decoders compile as plain C++ (tests/test_cuda_quant.py checks them against NumPy on
// the CPU).

#ifdef QUANT_HOST
#include <cstring>
#define QDEV static inline
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
QDEV float q_as_float(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
QDEV u32 q_perm(u32 x, u32 y, u32 s) {           // __byte_perm without the sign modes
    unsigned long long v = ((unsigned long long)y << 32) | x;
    u32 r = 0;
    for (int k = 0; k < 4; ++k) r |= (u32)((v >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k);
    return r;
}
QDEV float q_h2f(u16 h) {                        // exact IEEE half -> float
    u32 s = (u32)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return q_as_float(s | 0x7F800000u | (m << 13));
    if (e == 0) {                                // subnormal: m * 2^-24
        float f = (float)m * q_as_float(0x33800000u);
        return s ? -f : f;
    }
    return q_as_float(s | ((e + 112) << 23) | (m << 13));
}
QDEV float q_mul(float a, float b) { return a * b; }   // built with -ffp-contract=off
QDEV float q_add(float a, float b) { return a + b; }
QDEV u16 ld16(const u8* p) { u16 v; std::memcpy(&v, p, 2); return v; }
QDEV u32 ld32(const u8* p) { u32 v; std::memcpy(&v, p, 4); return v; }
QDEV u32 ld32_2(const u8* p) { return ld32(p); }
struct u2 { u32 x, y; };
QDEV u2 ld64(const u8* p) { u2 v; std::memcpy(&v, p, 8); return v; }
struct f4 { float x, y, z, w; };
QDEV void ld_f4x2(const u8* p, f4& a, f4& b) { std::memcpy(&a, p, 16); std::memcpy(&b, p + 16, 16); }
QDEV void ld_u4(const u8* p, u32 v[4]) { std::memcpy(v, p, 16); }
#else
#include <cuda_fp16.h>
#include "common.cuh"
#define QDEV static __device__ __forceinline__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
QDEV float q_as_float(u32 u) { return __uint_as_float(u); }
QDEV u32 q_perm(u32 x, u32 y, u32 s) { return __byte_perm(x, y, s); }
QDEV float q_h2f(u16 h) { return __half2float(__ushort_as_half(h)); }
QDEV float q_mul(float a, float b) { return __fmul_rn(a, b); }   // never contracted to FMA
QDEV float q_add(float a, float b) { return __fadd_rn(a, b); }
QDEV u16 ld16(const u8* p) { return *(const u16*)p; }
QDEV u32 ld32(const u8* p) { return *(const u32*)p; }             // 4-aligned
QDEV u32 ld32_2(const u8* p) {                                    // 2-aligned
    const u16* q = (const u16*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}
typedef uint2 u2;
QDEV u2 ld64(const u8* p) { return *(const uint2*)p; }                // 8-aligned
typedef float4 f4;
QDEV void ld_f4x2(const u8* p, f4& a, f4& b) { a = ((const float4*)p)[0]; b = ((const float4*)p)[1]; }
QDEV void ld_u4(const u8* p, u32 v[4]) {
    uint4 t = *(const uint4*)p;
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
#endif

// ---------------------------------------------------------------------------------------
// One decoded item: v[0..3] (group 0), v[4..7] (group 1); weight = v * s_g (+ m_g).
struct Item { float v[8]; float s0, s1, m0, m1; };

// bytes of q (each <= 255) as floats minus `bias`: float(0x4B0000bb) = 2^23 + bb exactly,
// so one PRMT and one FADD per weight.
QDEV void bytes4(u32 q, float bias, float* v) {
    const float off = 8388608.0f + bias;
    v[0] = q_as_float(q_perm(q, 0x4B000000u, 0x7540)) - off;
    v[1] = q_as_float(q_perm(q, 0x4B000000u, 0x7541)) - off;
    v[2] = q_as_float(q_perm(q, 0x4B000000u, 0x7542)) - off;
    v[3] = q_as_float(q_perm(q, 0x4B000000u, 0x7543)) - off;
}
// bits 0..3 of x to bit 4 of bytes 0..3 (the 5th bit of Q5 quants)
QDEV u32 spread4(u32 x) { return ((x * 0x00204081u) & 0x01010101u) << 4; }

// get_scale_min_k4 (Q4_K, Q5_K) of sub-blocks 2c and 2c + 1 from the 12 scale bytes as words
// w0 (bytes 0-3), w1 (4-7), w2 (8-11). Sub-block j < 4: sc = s[j] & 63, m = s[j+4] & 63;
// j >= 4 (k = j - 4): sc = (s[k+8] & 15) | (s[k] >> 6) << 4, m = (s[k+8] >> 4) | (s[k+4] >> 6) << 4.
// Word-wide for four sub-blocks at once, then bytes k, k+1 (k = 2c & 3) become floats as
// 2^23 + v - 2^23: branch-free (a warp's lanes hold different c), ~20 instructions.
QDEV void scale_min_k4(u32 w0, u32 w1, u32 w2, int c, float* sc, float* mn) {
    const bool hi = c >= 2;
    const u32 S = hi ? ((w2 & 0x0F0F0F0Fu) | ((w0 >> 2) & 0x30303030u)) : (w0 & 0x3F3F3F3Fu);
    const u32 Mn = hi ? (((w2 >> 4) & 0x0F0F0F0Fu) | ((w1 >> 2) & 0x30303030u)) : (w1 & 0x3F3F3F3Fu);
    const u32 k = (u32)(2 * c) & 3u;
    sc[0] = q_as_float(q_perm(S, 0x4B000000u, 0x7540u | k)) - 8388608.0f;
    sc[1] = q_as_float(q_perm(S, 0x4B000000u, 0x7540u | (k + 1))) - 8388608.0f;
    mn[0] = q_as_float(q_perm(Mn, 0x4B000000u, 0x7540u | k)) - 8388608.0f;
    mn[1] = q_as_float(q_perm(Mn, 0x4B000000u, 0x7540u | (k + 1))) - 8388608.0f;
}

// ---- the types ---------------------------------------------------------------------------
// QK elems / BB bytes per block, NI items per block; MIN: has a per-group additive term;
// ONE: s0 == s1 (one scale per item); FLT: a float type (weight = v).

struct TQ4_0 {   // d f16 | qs[16]: elem j = lo nibble of qs[j], elem j+16 = hi nibble
    enum { QK = 32, BB = 18, NI = 4, MIN = 0, ONE = 1, FLT = 0 };
    QDEV int o0(int i) { return 4 * i; }
    QDEV int o1(int i) { return 16 + 4 * i; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const u32 q = ld32_2(b + 2 + 4 * i);
        bytes4(q & 0x0F0F0F0Fu, 8.0f, t.v);
        bytes4((q >> 4) & 0x0F0F0F0Fu, 8.0f, t.v + 4);
        t.s0 = t.s1 = q_h2f(ld16(b)); t.m0 = t.m1 = 0.0f;
    }
};

struct TQ4_1 {   // d f16 | m f16 | qs[16]
    enum { QK = 32, BB = 20, NI = 4, MIN = 1, ONE = 1, FLT = 0 };
    QDEV int o0(int i) { return 4 * i; }
    QDEV int o1(int i) { return 16 + 4 * i; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const u32 q = ld32(b + 4 + 4 * i);
        const u32 dm = ld32(b);
        bytes4(q & 0x0F0F0F0Fu, 0.0f, t.v);
        bytes4((q >> 4) & 0x0F0F0F0Fu, 0.0f, t.v + 4);
        t.s0 = t.s1 = q_h2f((u16)dm); t.m0 = t.m1 = q_h2f((u16)(dm >> 16));
    }
};

struct TQ5_0 {   // d f16 | qh u32 (bit j = 5th bit of elem j) | qs[16]
    enum { QK = 32, BB = 22, NI = 4, MIN = 0, ONE = 1, FLT = 0 };
    QDEV int o0(int i) { return 4 * i; }
    QDEV int o1(int i) { return 16 + 4 * i; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const u32 q = ld32_2(b + 6 + 4 * i);
        const u32 qh = ld32_2(b + 2);
        bytes4((q & 0x0F0F0F0Fu) | spread4((qh >> (4 * i)) & 15), 16.0f, t.v);
        bytes4(((q >> 4) & 0x0F0F0F0Fu) | spread4((qh >> (16 + 4 * i)) & 15), 16.0f, t.v + 4);
        t.s0 = t.s1 = q_h2f(ld16(b)); t.m0 = t.m1 = 0.0f;
    }
};

struct TQ5_1 {   // d f16 | m f16 | qh u32 | qs[16]
    enum { QK = 32, BB = 24, NI = 4, MIN = 1, ONE = 1, FLT = 0 };
    QDEV int o0(int i) { return 4 * i; }
    QDEV int o1(int i) { return 16 + 4 * i; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const u32 q = ld32(b + 8 + 4 * i);
        const u32 qh = ld32(b + 4);
        const u32 dm = ld32(b);
        bytes4((q & 0x0F0F0F0Fu) | spread4((qh >> (4 * i)) & 15), 0.0f, t.v);
        bytes4(((q >> 4) & 0x0F0F0F0Fu) | spread4((qh >> (16 + 4 * i)) & 15), 0.0f, t.v + 4);
        t.s0 = t.s1 = q_h2f((u16)dm); t.m0 = t.m1 = q_h2f((u16)(dm >> 16));
    }
};

struct TQ8_0 {   // d f16 | qs int8[32]
    enum { QK = 32, BB = 34, NI = 4, MIN = 0, ONE = 1, FLT = 0 };
    QDEV int o0(int i) { return 4 * i; }
    QDEV int o1(int i) { return 16 + 4 * i; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const u32 q0 = ld32_2(b + 2 + 4 * i), q1 = ld32_2(b + 18 + 4 * i);
        bytes4(q0 ^ 0x80808080u, 128.0f, t.v);           // int8 + 128 as a byte, minus 128
        bytes4(q1 ^ 0x80808080u, 128.0f, t.v + 4);
        t.s0 = t.s1 = q_h2f(ld16(b)); t.m0 = t.m1 = 0.0f;
    }
};

// Q2_K / Q3_K item i: qs word w = i/2 (bytes 32h + l .. +3, h = w/8, l = 4(w%8)) and the
// shift pair j0 = 2(i%2), j0 + 1: elements 128h + 32j + l .. +3.
struct TQ2_K {   // scales[16] (lo: scale, hi: min) | qs[64] | d f16 | dmin f16
    enum { QK = 256, BB = 84, NI = 32, MIN = 1, ONE = 0, FLT = 0 };
    QDEV int o0(int i) { return 128 * (i >> 4) + 64 * (i & 1) + 4 * ((i >> 1) & 7); }
    QDEV int o1(int i) { return o0(i) + 32; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const int w = i >> 1, j0 = 2 * (i & 1);
        const u32 q = ld32(b + 16 + 4 * w);
        const u32 dd = ld32(b + 80);
        bytes4((q >> (2 * j0)) & 0x03030303u, 0.0f, t.v);
        bytes4((q >> (2 * j0 + 2)) & 0x03030303u, 0.0f, t.v + 4);
        const int sub0 = o0(i) >> 4;                      // 16-element sub-block
        const u32 sc0 = b[sub0], sc1 = b[sub0 + 2];
        const float d = q_h2f((u16)dd), dmin = q_h2f((u16)(dd >> 16));
        t.s0 = q_mul(d, (float)(sc0 & 15)); t.m0 = -q_mul(dmin, (float)(sc0 >> 4));
        t.s1 = q_mul(d, (float)(sc1 & 15)); t.m1 = -q_mul(dmin, (float)(sc1 >> 4));
    }
};

struct TQ3_K {   // hmask[32] | qs[64] | scales[12] | d f16
    enum { QK = 256, BB = 110, NI = 32, MIN = 0, ONE = 0, FLT = 0 };
    QDEV int o0(int i) { return 128 * (i >> 4) + 64 * (i & 1) + 4 * ((i >> 1) & 7); }
    QDEV int o1(int i) { return o0(i) + 32; }
    QDEV float scale(const u8* s, int k) {               // 6-bit scale k, minus 32
        const u32 lo = k < 8 ? (s[k] & 15) : (s[k - 8] >> 4);
        const u32 hi = (s[8 + (k & 3)] >> (2 * (k >> 2))) & 3;
        return (float)((int)(lo | (hi << 4)) - 32);
    }
    QDEV void dec(const u8* b, int i, Item& t) {
        const int w = i >> 1, h = w >> 3, l = 4 * (w & 7), j0 = 2 * (i & 1);
        const u32 q = ld32_2(b + 32 + 4 * w);
        const u32 hm = ld32_2(b + l);                     // hmask[l'] bit 4h + j: elem 128h + 32j + l'
        bytes4(((q >> (2 * j0)) & 0x03030303u) | (((hm >> (4 * h + j0)) & 0x01010101u) << 2), 4.0f, t.v);
        bytes4(((q >> (2 * j0 + 2)) & 0x03030303u) | (((hm >> (4 * h + j0 + 1)) & 0x01010101u) << 2), 4.0f,
               t.v + 4);
        const int sub0 = o0(i) >> 4;
        const float d = q_h2f(ld16(b + 108));
        t.s0 = q_mul(d, scale(b + 96, sub0));
        t.s1 = q_mul(d, scale(b + 96, sub0 + 2));
        t.m0 = t.m1 = 0.0f;
    }
};

// Q4_K / Q5_K item i: qs word i (bytes 32c + l, c = i/8, l = 4(i%8)): low nibbles are
// elements 64c + l .. +3 (sub-block 2c), high nibbles 64c + 32 + l .. (sub-block 2c + 1).
struct TQ4_K {   // d f16 | dmin f16 | scales[12] | qs[128]
    enum { QK = 256, BB = 144, NI = 32, MIN = 1, ONE = 0, FLT = 0 };
    QDEV int o0(int i) { return 64 * (i >> 3) + 4 * (i & 7); }
    QDEV int o1(int i) { return o0(i) + 32; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const int c = i >> 3;
        const u32 q = ld32(b + 16 + 4 * i);
        const u2 h0 = ld64(b), h1 = ld64(b + 8);          // d, dmin | scales 0-3 | 4-7 | 8-11
        bytes4(q & 0x0F0F0F0Fu, 0.0f, t.v);
        bytes4((q >> 4) & 0x0F0F0F0Fu, 0.0f, t.v + 4);
        const float d = q_h2f((u16)h0.x), dmin = q_h2f((u16)(h0.x >> 16));
        float sc[2], mn[2];
        scale_min_k4(h0.y, h1.x, h1.y, c, sc, mn);
        t.s0 = q_mul(d, sc[0]); t.m0 = -q_mul(dmin, mn[0]);
        t.s1 = q_mul(d, sc[1]); t.m1 = -q_mul(dmin, mn[1]);
    }
};

struct TQ5_K {   // d f16 | dmin f16 | scales[12] | qh[32] (byte l bit s: elem 32s + l) | qs[128]
    enum { QK = 256, BB = 176, NI = 32, MIN = 1, ONE = 0, FLT = 0 };
    QDEV int o0(int i) { return 64 * (i >> 3) + 4 * (i & 7); }
    QDEV int o1(int i) { return o0(i) + 32; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const int c = i >> 3, l = 4 * (i & 7);
        const u32 q = ld32(b + 48 + 4 * i);
        const u32 qh = ld32(b + 16 + l);
        const u2 h0 = ld64(b), h1 = ld64(b + 8);
        bytes4((q & 0x0F0F0F0Fu) | (((qh >> (2 * c)) & 0x01010101u) << 4), 0.0f, t.v);
        bytes4(((q >> 4) & 0x0F0F0F0Fu) | (((qh >> (2 * c + 1)) & 0x01010101u) << 4), 0.0f, t.v + 4);
        const float d = q_h2f((u16)h0.x), dmin = q_h2f((u16)(h0.x >> 16));
        float sc[2], mn[2];
        scale_min_k4(h0.y, h1.x, h1.y, c, sc, mn);
        t.s0 = q_mul(d, sc[0]); t.m0 = -q_mul(dmin, mn[0]);
        t.s1 = q_mul(d, sc[1]); t.m1 = -q_mul(dmin, mn[1]);
    }
};

// Q6_K item i: ql word i (bytes 64h + 32c + l): low nibbles -> elems 128h + 32c + l (group c),
// high nibbles -> 128h + 32(c + 2) + l; the 2 high bits of group g are bits 2g of qh[32h + l].
struct TQ6_K {   // ql[128] | qh[64] | scales int8[16] | d f16
    enum { QK = 256, BB = 210, NI = 32, MIN = 0, ONE = 0, FLT = 0 };
    QDEV int o0(int i) { return 128 * (i >> 4) + 32 * ((i >> 3) & 1) + 4 * (i & 7); }
    QDEV int o1(int i) { return o0(i) + 64; }
    QDEV void dec(const u8* b, int i, Item& t) {
        const int h = i >> 4, c = (i >> 3) & 1, l = 4 * (i & 7);
        const u32 ql = ld32_2(b + 4 * i);
        const u32 qh = ld32_2(b + 128 + 32 * h + l);
        bytes4((ql & 0x0F0F0F0Fu) | (((qh >> (2 * c)) & 0x03030303u) << 4), 32.0f, t.v);
        bytes4(((ql >> 4) & 0x0F0F0F0Fu) | (((qh >> (2 * c + 4)) & 0x03030303u) << 4), 32.0f, t.v + 4);
        const float d = q_h2f(ld16(b + 208));
        const int sub0 = o0(i) >> 4;
        t.s0 = q_mul(d, (float)(i8)b[192 + sub0]);
        t.s1 = q_mul(d, (float)(i8)b[192 + sub0 + 4]);
        t.m0 = t.m1 = 0.0f;
    }
};

// Float types as "blocks" of 8 elements (rows of K % 8 == 0): one item, loaded as 16 bytes.
struct TF32 {
    enum { QK = 8, BB = 32, NI = 1, MIN = 0, ONE = 1, FLT = 1 };
    QDEV int o0(int) { return 0; }
    QDEV int o1(int) { return 4; }
    QDEV void dec(const u8* b, int, Item& t) {
        f4 a, c;
        ld_f4x2(b, a, c);
        t.v[0] = a.x; t.v[1] = a.y; t.v[2] = a.z; t.v[3] = a.w;
        t.v[4] = c.x; t.v[5] = c.y; t.v[6] = c.z; t.v[7] = c.w;
        t.s0 = t.s1 = 1.0f; t.m0 = t.m1 = 0.0f;
    }
};

struct TF16 {
    enum { QK = 8, BB = 16, NI = 1, MIN = 0, ONE = 1, FLT = 1 };
    QDEV int o0(int) { return 0; }
    QDEV int o1(int) { return 4; }
    QDEV void dec(const u8* b, int, Item& t) {
        u32 w[4];
        ld_u4(b, w);
        for (int k = 0; k < 4; ++k) {
            t.v[2 * k] = q_h2f((u16)w[k]);
            t.v[2 * k + 1] = q_h2f((u16)(w[k] >> 16));
        }
        t.s0 = t.s1 = 1.0f; t.m0 = t.m1 = 0.0f;
    }
};

struct TBF16 {
    enum { QK = 8, BB = 16, NI = 1, MIN = 0, ONE = 1, FLT = 1 };
    QDEV int o0(int) { return 0; }
    QDEV int o1(int) { return 4; }
    QDEV void dec(const u8* b, int, Item& t) {
        u32 w[4];
        ld_u4(b, w);
        for (int k = 0; k < 4; ++k) {
            t.v[2 * k] = q_as_float(w[k] << 16);
            t.v[2 * k + 1] = q_as_float(w[k] & 0xFFFF0000u);
        }
        t.s0 = t.s1 = 1.0f; t.m0 = t.m1 = 0.0f;
    }
};

// The exact values of an item, rounded as quant_formats' dequantizers round them.
template <class T>
QDEV void item_values(const Item& t, float* y) {
    for (int k = 0; k < 8; ++k) {
        const float s = k < 4 ? t.s0 : t.s1, m = k < 4 ? t.m0 : t.m1;
        if (T::FLT) y[k] = t.v[k];
        else if (T::MIN) y[k] = q_add(q_mul(t.v[k], s), m);
        else y[k] = q_mul(t.v[k], s);
    }
}

#ifdef QUANT_HOST
// Host check of the decoders: rows of raw blocks -> f32 (row-major, nb*QK per row).
template <class T>
static void host_dequant(const u8* raw, long long n_blocks, float* out) {
    for (long long b = 0; b < n_blocks; ++b)
        for (int i = 0; i < T::NI; ++i) {
            Item t;
            T::dec(raw + b * T::BB, i, t);
            float y[8];
            item_values<T>(t, y);
            float* o = out + b * T::QK;
            for (int k = 0; k < 4; ++k) { o[T::o0(i) + k] = y[k]; o[T::o1(i) + k] = y[4 + k]; }
        }
}
extern "C" int quant_host_dequant(int type, const u8* raw, long long n_blocks, float* out) {
    switch (type) {
        case 0: host_dequant<TF32>(raw, n_blocks, out); return 0;
        case 1: host_dequant<TF16>(raw, n_blocks, out); return 0;
        case 2: host_dequant<TQ4_0>(raw, n_blocks, out); return 0;
        case 3: host_dequant<TQ4_1>(raw, n_blocks, out); return 0;
        case 6: host_dequant<TQ5_0>(raw, n_blocks, out); return 0;
        case 7: host_dequant<TQ5_1>(raw, n_blocks, out); return 0;
        case 8: host_dequant<TQ8_0>(raw, n_blocks, out); return 0;
        case 10: host_dequant<TQ2_K>(raw, n_blocks, out); return 0;
        case 11: host_dequant<TQ3_K>(raw, n_blocks, out); return 0;
        case 12: host_dequant<TQ4_K>(raw, n_blocks, out); return 0;
        case 13: host_dequant<TQ5_K>(raw, n_blocks, out); return 0;
        case 14: host_dequant<TQ6_K>(raw, n_blocks, out); return 0;
        case 30: host_dequant<TBF16>(raw, n_blocks, out); return 0;
    }
    return -1;
}
#else
// one item of each of R rows against N rows of x
template <class T, int N, int R>
__device__ __forceinline__ void mmv_step(const u8* const (&wr)[R], const float* const (&xr)[N], int it,
                                         float (&acc)[R][N]) {
    const int blk = it / T::NI, i = it % T::NI;
    float4 xa[N], xb[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float* p = xr[j] + blk * T::QK;
        xa[j] = *(const float4*)(p + T::o0(i));
        xb[j] = *(const float4*)(p + T::o1(i));
    }
    float sa[N], sb[N];                                   // x sums of the two groups (mins)
#pragma unroll
    for (int j = 0; j < N; ++j) {
        sa[j] = T::MIN ? (xa[j].x + xa[j].y) + (xa[j].z + xa[j].w) : 0.0f;
        sb[j] = T::MIN ? (xb[j].x + xb[j].y) + (xb[j].z + xb[j].w) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        Item t;
        T::dec(wr[r] + (long long)blk * T::BB, i, t);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float a = t.v[0] * xa[j].x;
            a = fmaf(t.v[1], xa[j].y, a);
            a = fmaf(t.v[2], xa[j].z, a);
            a = fmaf(t.v[3], xa[j].w, a);
            float c;
            if (T::ONE) {
                c = fmaf(t.v[4], xb[j].x, a);
                c = fmaf(t.v[5], xb[j].y, c);
                c = fmaf(t.v[6], xb[j].z, c);
                c = fmaf(t.v[7], xb[j].w, c);
                acc[r][j] = T::FLT ? acc[r][j] + c : fmaf(t.s0, c, acc[r][j]);
            } else {
                c = t.v[4] * xb[j].x;
                c = fmaf(t.v[5], xb[j].y, c);
                c = fmaf(t.v[6], xb[j].z, c);
                c = fmaf(t.v[7], xb[j].w, c);
                acc[r][j] = fmaf(t.s0, a, acc[r][j]);
                acc[r][j] = fmaf(t.s1, c, acc[r][j]);
            }
            if (T::MIN) {
                acc[r][j] = fmaf(t.m0, sa[j], acc[r][j]);
                acc[r][j] = fmaf(t.m1, sb[j], acc[r][j]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decode GEMV: out[j, r] = sum_k x[j, k] * W[r, k] for j < n <= N, rows r0 .. r0+R-1.
//
// CTA = W warps (blockDim.x / 32) x R rows. Item `it` of a row (it = blk * NI + i) goes
// to lane it % 32 of warp (it / 32) % W: a warp step reads 32 consecutive items of each of
// its R rows (Q4_0: 8 blocks, 144 contiguous bytes a row) and the matching x float4s once
// for all R rows. Rows past M and x rows past n are clamped for loads, masked for stores.
//
// Where the time goes (H100, benchmarks/bench_cuda_quant.py; D2D copy 3.0 TB/s): n = 1 on
// 33 MB matrices reads 1.6 (Q4_0, 20 us) to 2.2 TB/s (Q8_0); the SM's load path limits it,
// not DRAM: per item a lane issues 2-3 narrow weight loads (blocks are 2-aligned) and two
// x float4 loads, which R rows share. x traffic grows with n, so n = 8 takes ~3x n = 1.
//
// mmv_impl keeps its own copy of the step, the loop and the reduction: sharing them with the
// grouped kernel below (mmvg_step, mmvg_rows, mmv_sums) changed its register allocation, and
// the big-matrix path's timings were tuned on this code.

// lanes -> lane 0 (shuffles) -> red[warp][r * N + j]; a barrier, then thread t < R*N sums
// red[0..nw)[t] (mmv_total)
template <int N, int R>
__device__ __forceinline__ void mmv_sums(float (&acc)[R][N], float (*red)[R * N]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float v = acc[r][j];
            v += __shfl_xor_sync(0xffffffffu, v, 16);
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            if (lane == 0) red[warp][r * N + j] = v;
        }
    __syncthreads();
}

template <int N, int R>
__device__ __forceinline__ float mmv_total(const float (*red)[R * N], int t) {
    const int nw = blockDim.x >> 5;
    float s = red[0][t];
    for (int q = 1; q < nw; ++q) s += red[q][t];
    return s;
}

template <class T, int N, int R>
__device__ __forceinline__ void mmv_impl(const u8* __restrict__ w, const float* __restrict__ x,
                                         float* __restrict__ out, int M, int nb, int n) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int r0 = blockIdx.x * R;
    const long long rb = (long long)nb * T::BB;
    const int K = nb * T::QK;
    const u8* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wr[r] = w + (long long)(r0 + r < M ? r0 + r : M - 1) * rb;
    const float* xr[N];
#pragma unroll
    for (int j = 0; j < N; ++j) xr[j] = x + (long long)(j < n ? j : n - 1) * K;

    float acc[R][N];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < N; ++j) acc[r][j] = 0.0f;

    const int items = nb * T::NI, stride = nw * 32;
    int it = warp * 32 + lane;
    // U steps per trip with no exit between them, so the scheduler can issue all their
    // loads before the first FMA; single steps for the rest
    constexpr int U = N <= 2 ? 4 : 2;
    for (; it + (U - 1) * stride < items; it += U * stride) {
#pragma unroll
        for (int u = 0; u < U; ++u) mmv_step<T, N, R>(wr, xr, it + u * stride, acc);
    }
    for (; it < items; it += stride) mmv_step<T, N, R>(wr, xr, it, acc);

    // lanes -> lane 0 (shuffles), warps -> thread t < R*N (shared memory)
    __shared__ float red[8][R * N];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float v = acc[r][j];
            v += __shfl_xor_sync(0xffffffffu, v, 16);
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            if (lane == 0) red[warp][r * N + j] = v;
        }
    __syncthreads();
    const int t = threadIdx.x;
    if (t < R * N) {
        const int r = t / N, j = t % N;
        float s = red[0][t];
        for (int q = 1; q < nw; ++q) s += red[q][t];
        if (r0 + r < M && j < n) out[(long long)j * M + r0 + r] = s;
    }
}

// ---------------------------------------------------------------------------------------
// Grouped decode GEMV: the mul_mats of one decode step that share x (q/k/v of a layer; its
// gate/up) as ONE launch; the weights stay separate tensors of one type and one K.
//
// mode 0 (group): CTAs [0, c1) compute rows of w0 -> o0 (M0 rows), [c1, c2) of w1 -> o1,
//   [c2, grid) of w2 -> o2 (R rows a CTA, each weight's last CTA clamped as in mmv_impl).
//   rope_mask bit g: member g's output is rotated (RoPE, ggml's "normal" mode: adjacent
//   pairs) before it is stored, at positions pos[j]: row r of the member is element
//   i = r % hd of its head, pairs (i, i+1) for even i < n_rot rotate, the rest pass. With R
//   and hd even a pair never straddles two CTAs. The angle arithmetic is elementwise.cu's
//   rope_f32, step for step (float theta by repeated multiplication, double sincos rounded
//   once), so a fused rope gives the unfused one's bits.
//   resid (mode 0, not with rope): out = x . W + resid (ops.add of the product and a residual
//   stream of out's shape: llama's o and down projections); out may be resid itself (each
//   element is read and written by one thread).
// norm (1: no weight, 2: with norm_w): the products are of ops.rms_norm(x, eps, norm_w), folded
//   into the loop (mmvg_step): the norm before q/k/v and before gate/up needs no launch of its
//   own, and costs the CTA only FMAs on x it loads anyway. (A first version normed x into shared
//   memory before the loop: every CTA then waited for that, and it cost what the launch saved.)
// mode 1 (swiglu) / 2 (geglu): w0 = gate, w1 = up (M0 rows each); CTA b computes gate rows
//   and up rows b*R/2 .. b*R/2 + R/2 - 1 (R weight rows, as many loads in flight as mmv's R)
//   and stores only o0 = act(gate) * up (the elementwise kernels' formulas).
//
// Where the time goes: a SmolLM2 decode step's GEMVs are 0.3-1 MB each, 2-3 us of which
// most is launch and ramp. H100, per layer, in a CUDA graph: norm + q/k/v + rope 10.3 us as 5
// launches, 3.4 as one; norm + gate/up + swiglu 8.9 as 4, 3.3 as one; down + residual add 3.9
// as 2, 2.9 as one. The whole decode step: 1.21 -> 0.78 ms (395 -> 186 launches).

// mmv_step for the grouped kernel, with the rms_norm folded in (norm != 0): the x float4s it
// loads anyway give this thread's share of sum(x^2) (acc[R][j], reduced with the products;
// each element of x is loaded once per CTA), and with a norm weight nw (norm == 2) x is
// multiplied by it before the products; the epilogue multiplies by 1 / sqrt(mean + eps).
// (rms_norm(x) . W = scale * sum_k x_k nw_k W_k: the reference's rounding differs only in
// where scale is applied, ~1e-7 relative.) A copy of mmv_step, which stays as it is.
template <class T, int N, int R>
__device__ __forceinline__ void mmvg_step(const u8* const (&wr)[R], const float* const (&xr)[N], int it,
                                          float (&acc)[R + 1][N], int norm, const float* __restrict__ nw) {
    const int blk = it / T::NI, i = it % T::NI;
    float4 xa[N], xb[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float* p = xr[j] + blk * T::QK;
        xa[j] = *(const float4*)(p + T::o0(i));
        xb[j] = *(const float4*)(p + T::o1(i));
    }
    if (norm) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float q = acc[R][j];
            q = fmaf(xa[j].x, xa[j].x, q); q = fmaf(xa[j].y, xa[j].y, q);
            q = fmaf(xa[j].z, xa[j].z, q); q = fmaf(xa[j].w, xa[j].w, q);
            q = fmaf(xb[j].x, xb[j].x, q); q = fmaf(xb[j].y, xb[j].y, q);
            q = fmaf(xb[j].z, xb[j].z, q); q = fmaf(xb[j].w, xb[j].w, q);
            acc[R][j] = q;
        }
        if (norm == 2) {
            const float* p = nw + blk * T::QK;
            const float4 wa = *(const float4*)(p + T::o0(i)), wb = *(const float4*)(p + T::o1(i));
#pragma unroll
            for (int j = 0; j < N; ++j) {
                xa[j].x *= wa.x; xa[j].y *= wa.y; xa[j].z *= wa.z; xa[j].w *= wa.w;
                xb[j].x *= wb.x; xb[j].y *= wb.y; xb[j].z *= wb.z; xb[j].w *= wb.w;
            }
        }
    }
    float sa[N], sb[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        sa[j] = T::MIN ? (xa[j].x + xa[j].y) + (xa[j].z + xa[j].w) : 0.0f;
        sb[j] = T::MIN ? (xb[j].x + xb[j].y) + (xb[j].z + xb[j].w) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        Item t;
        T::dec(wr[r] + (long long)blk * T::BB, i, t);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float a = t.v[0] * xa[j].x;
            a = fmaf(t.v[1], xa[j].y, a);
            a = fmaf(t.v[2], xa[j].z, a);
            a = fmaf(t.v[3], xa[j].w, a);
            float c;
            if (T::ONE) {
                c = fmaf(t.v[4], xb[j].x, a);
                c = fmaf(t.v[5], xb[j].y, c);
                c = fmaf(t.v[6], xb[j].z, c);
                c = fmaf(t.v[7], xb[j].w, c);
                acc[r][j] = T::FLT ? acc[r][j] + c : fmaf(t.s0, c, acc[r][j]);
            } else {
                c = t.v[4] * xb[j].x;
                c = fmaf(t.v[5], xb[j].y, c);
                c = fmaf(t.v[6], xb[j].z, c);
                c = fmaf(t.v[7], xb[j].w, c);
                acc[r][j] = fmaf(t.s0, a, acc[r][j]);
                acc[r][j] = fmaf(t.s1, c, acc[r][j]);
            }
            if (T::MIN) {
                acc[r][j] = fmaf(t.m0, sa[j], acc[r][j]);
                acc[r][j] = fmaf(t.m1, sb[j], acc[r][j]);
            }
        }
    }
}

// acc[r][j] = this thread's share of row wr[r] . x[j]; acc[R][j]: of sum(x[j]^2) when norm
template <class T, int N, int R>
__device__ __forceinline__ void mmvg_rows(const u8* const (&wr)[R], const float* __restrict__ x, int nb, int n,
                                          float (&acc)[R + 1][N], int norm, const float* __restrict__ nw) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int K = nb * T::QK;
    const float* xr[N];
#pragma unroll
    for (int j = 0; j < N; ++j) xr[j] = x + (long long)(j < n ? j : n - 1) * K;
#pragma unroll
    for (int r = 0; r <= R; ++r)
#pragma unroll
        for (int j = 0; j < N; ++j) acc[r][j] = 0.0f;

    const int items = nb * T::NI, stride = nwarps * 32;
    int it = warp * 32 + lane;
    constexpr int U = N <= 2 ? 4 : 2;                  // as mmv_impl
    for (; it + (U - 1) * stride < items; it += U * stride) {
#pragma unroll
        for (int u = 0; u < U; ++u) mmvg_step<T, N, R>(wr, xr, it + u * stride, acc, norm, nw);
    }
    for (; it < items; it += stride) mmvg_step<T, N, R>(wr, xr, it, acc, norm, nw);
}

template <class T, int N, int R>
__device__ __forceinline__ void mmvg_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                          const u8* __restrict__ w2, float* __restrict__ o0,
                                          float* __restrict__ o1, float* __restrict__ o2, int M0, int M1,
                                          int M2, int c1, int c2, const float* __restrict__ x, int nb, int n,
                                          int mode, const int* __restrict__ pos, int rope_mask, int hd,
                                          int n_rot, float theta_scale, float freq_scale, const float* resid,
                                          int norm, const float* __restrict__ norm_w, float eps) {
    const long long rb = (long long)nb * T::BB;
    const int b = blockIdx.x;
    const u8* wr[R];
    const u8* w;
    float* out;
    int M, r0, rope = 0;
    if (mode == 0) {
        const int g = b < c1 ? 0 : (b < c2 ? 1 : 2);
        w = g == 0 ? w0 : (g == 1 ? w1 : w2);
        out = g == 0 ? o0 : (g == 1 ? o1 : o2);
        M = g == 0 ? M0 : (g == 1 ? M1 : M2);
        r0 = (b - (g == 0 ? 0 : (g == 1 ? c1 : c2))) * R;
        rope = (rope_mask >> g) & 1;
#pragma unroll
        for (int r = 0; r < R; ++r) wr[r] = w + (long long)(r0 + r < M ? r0 + r : M - 1) * rb;
    } else {
        w = w0;
        out = o0;
        M = M0;
        r0 = b * (R / 2);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = r0 + (r % (R / 2));
            wr[r] = (r < R / 2 ? w0 : w1) + (long long)(row < M ? row : M - 1) * rb;
        }
    }
    float acc[R + 1][N];
    mmvg_rows<T, N, R>(wr, x, nb, n, acc, norm, norm_w);
    __shared__ float red[8][(R + 1) * N];
    mmv_sums<N, R + 1>(acc, red);
    const int t = threadIdx.x;
    // the rms_norm's 1 / sqrt(mean(x[j]^2) + eps) of the output's x row j (1 without a norm)
    auto nscale = [&](int j) -> float {
        return norm ? 1.0f / sqrtf(mmv_total<N, R + 1>(red, R * N + j) / (float)(nb * T::QK) + eps) : 1.0f;
    };
    if (mode != 0) {                                   // gated: act(gate row r) * (up row r)
        if (t < (R / 2) * N) {
            const int r = t / N, j = t % N;
            const float sc = nscale(j);
            const float gs = mmv_total<N, R + 1>(red, t) * sc;
            const float us = mmv_total<N, R + 1>(red, t + (R / 2) * N) * sc;
            const float y = (mode == 1 ? act_silu(gs) : act_gelu(gs)) * us;
            if (r0 + r < M && j < n) out[(long long)j * M + r0 + r] = y;
        }
        return;
    }
    if (!rope) {
        if (t < R * N) {
            const int r = t / N, j = t % N;
            float s = mmv_total<N, R + 1>(red, t) * nscale(j);
            if (r0 + r < M && j < n) {
                const long long e = (long long)j * M + r0 + r;
                if (resid != nullptr) s = s + resid[e];          // ops.add(mul_mat, resid); resid may be out
                out[e] = s;
            }
        }
        return;
    }
    __shared__ float fin[R * N];                       // the sums, for the pair partner
    float s = 0.0f;
    if (t < R * N) {
        s = mmv_total<N, R + 1>(red, t) * nscale(t % N);
        fin[t] = s;
    }
    __syncthreads();
    if (t < R * N) {
        const int r = t / N, j = t % N, row = r0 + r;
        const int i = row % hd;
        float y = s;
        if (i < n_rot) {
            const float other = fin[(r ^ 1) * N + j];
            const float a0 = (i & 1) ? other : s, a1 = (i & 1) ? s : other;
            float theta = (float)pos[j < n ? j : n - 1];
            for (int k = 0; k < (i >> 1); ++k) theta = __fmul_rn(theta, theta_scale);
            const double ang = (double)__fmul_rn(theta, freq_scale);
            double sv, cv;
            sincos(ang, &sv, &cv);
            const float c = (float)cv, sn = (float)sv;
            y = (i & 1) ? __fadd_rn(__fmul_rn(a0, sn), __fmul_rn(a1, c))     // a sin + b cos
                        : __fsub_rn(__fmul_rn(a0, c), __fmul_rn(a1, sn));    // a cos - b sin
        }
        if (row < M && j < n) out[(long long)j * M + row] = y;
    }
}

// rows of W picked by ids: out[j, :] = W[clamp(ids[j]), :] (f32), one thread per item
template <class T>
__device__ __forceinline__ void getrows_impl(const u8* __restrict__ w, const int* __restrict__ ids,
                                             float* __restrict__ out, int n, int rows, int nb) {
    const long long per = (long long)nb * T::NI;
    const long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (it >= per * n) return;
    const int j = (int)(it / per);
    const int rem = (int)(it - (long long)j * per);
    const int blk = rem / T::NI, i = rem % T::NI;
    int id = ids[j];
    id = id < 0 ? 0 : (id >= rows ? rows - 1 : id);
    Item t;
    T::dec(w + ((long long)id * nb + blk) * T::BB, i, t);
    float y[8];
    item_values<T>(t, y);
    float* o = out + (long long)j * nb * T::QK + blk * T::QK;
    *(float4*)(o + T::o0(i)) = make_float4(y[0], y[1], y[2], y[3]);
    *(float4*)(o + T::o1(i)) = make_float4(y[4], y[5], y[6], y[7]);
}

// rows 0 .. rows-1 of w (already offset to the tile) -> f16 out (rows, nb*QK)
template <class T>
__device__ __forceinline__ void deq16_impl(const u8* __restrict__ w, __half* __restrict__ out, int rows, int nb) {
    const long long per = (long long)nb * T::NI;
    const long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (it >= per * rows) return;
    const long long row = it / per;
    const int rem = (int)(it - row * per);
    const int blk = rem / T::NI, i = rem % T::NI;
    Item t;
    T::dec(w + (row * nb + blk) * T::BB, i, t);
    float y[8];
    item_values<T>(t, y);
    __half* o = out + row * nb * T::QK + blk * T::QK;
    __half2 h[4] = {__floats2half2_rn(y[0], y[1]), __floats2half2_rn(y[2], y[3]),
                    __floats2half2_rn(y[4], y[5]), __floats2half2_rn(y[6], y[7])};
    *(uint2*)(o + T::o0(i)) = *(const uint2*)&h[0];
    *(uint2*)(o + T::o1(i)) = *(const uint2*)&h[2];
}

#define Q_MMV(NAME, T, N, R)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        mmv_##NAME##_n##N##_r##R(const u8* __restrict__ w, const float* __restrict__ x,           \
                                 float* __restrict__ out, int M, int nb, int n) {                 \
        mmv_impl<T, N, R>(w, x, out, M, nb, n);                                                   \
    }

#define Q_MMVG(NAME, T, N, R)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) mmvg_##NAME##_n##N##_r##R(                  \
        const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,           \
        float* __restrict__ o0, float* __restrict__ o1, float* __restrict__ o2, int M0, int M1,    \
        int M2, int c1, int c2, const float* __restrict__ x, int nb, int n, int mode,              \
        const int* __restrict__ pos, int rope_mask, int hd, int n_rot, float theta_scale,          \
        float freq_scale, const float* resid, int norm, const float* __restrict__ norm_w,          \
        float eps) {                                                                              \
        mmvg_impl<T, N, R>(w0, w1, w2, o0, o1, o2, M0, M1, M2, c1, c2, x, nb, n, mode, pos,        \
                           rope_mask, hd, n_rot, theta_scale, freq_scale, resid, norm, norm_w, eps); \
    }

#define Q_TYPE(NAME, T)                                                                           \
    extern "C" __global__ void getrows_##NAME(const u8* __restrict__ w, const int* __restrict__ ids, \
                                              float* __restrict__ out, int n, int rows, int nb) {  \
        getrows_impl<T>(w, ids, out, n, rows, nb);                                                \
    }                                                                                             \
    extern "C" __global__ void deq16_##NAME(const u8* __restrict__ w, __half* __restrict__ out,    \
                                            int rows, int nb) {                                   \
        deq16_impl<T>(w, out, rows, nb);                                                          \
    }                                                                                             \
    Q_MMV(NAME, T, 1, 1) Q_MMV(NAME, T, 1, 2) Q_MMV(NAME, T, 2, 2) Q_MMV(NAME, T, 4, 2)           \
    Q_MMV(NAME, T, 8, 2)

// The types of the reference models (SmolLM2 Q4_1 + Q8_0, Gemma-3 Q4_K_M = Q4_K, Q6_K,
// Q5_0, Q8_0, Llama Q4_0) get extra row-count variants for tuning (quant_ops picks one).
// They also get the grouped kernels (mmvg_*), in the variants quant_ops' choice can name.
#define Q_MAIN(NAME, T) Q_TYPE(NAME, T) Q_MMV(NAME, T, 1, 4) Q_MMV(NAME, T, 4, 4) Q_MMV(NAME, T, 8, 4)  \
    Q_MMVG(NAME, T, 1, 2) Q_MMVG(NAME, T, 1, 4) Q_MMVG(NAME, T, 2, 2) Q_MMVG(NAME, T, 4, 4)        \
    Q_MMVG(NAME, T, 8, 4)

Q_MAIN(q4_0, TQ4_0)
Q_MAIN(q4_1, TQ4_1)
Q_MAIN(q5_0, TQ5_0)
Q_MAIN(q8_0, TQ8_0)
Q_MAIN(q4_k, TQ4_K)
Q_MAIN(q6_k, TQ6_K)
Q_TYPE(q5_1, TQ5_1)
Q_TYPE(q2_k, TQ2_K)
Q_TYPE(q3_k, TQ3_K)
Q_TYPE(q5_k, TQ5_K)
Q_TYPE(f32, TF32)
Q_TYPE(f16, TF16)
Q_TYPE(bf16, TBF16)

// ---- float rows of any length (K % 8 != 0) and the activation cast -------------------------

// out[j, c] = w[clamp(ids[j]), c] for float rows of any length; kind 0: f32, 1: f16, 2: bf16
extern "C" __global__ void getrows_float_any(const u8* __restrict__ w, const int* __restrict__ ids,
                                             float* __restrict__ out, int n, int rows, int C, int kind) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)n * C) return;
    const int j = (int)(e / C), c = (int)(e - (long long)j * C);
    int id = ids[j];
    id = id < 0 ? 0 : (id >= rows ? rows - 1 : id);
    const long long k = (long long)id * C + c;
    float v;
    if (kind == 0) v = ((const float*)w)[k];
    else if (kind == 1) v = q_h2f(((const u16*)w)[k]);
    else v = q_as_float((u32)((const u16*)w)[k] << 16);
    out[e] = v;
}

// f16 copy of a float matrix (f32 or bf16, kind 0 / 2) of `total` elements, any length
extern "C" __global__ void deq16_float_any(const u8* __restrict__ w, __half* __restrict__ out,
                                           long long total, int kind) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const float v = kind == 0 ? ((const float*)w)[e] : q_as_float((u32)((const u16*)w)[e] << 16);
    out[e] = __float2half_rn(v);
}

// y (f16) = x (f32), `total` elements; four per thread when total % 4 == 0 (vec = 1)
extern "C" __global__ void cast_f32_f16(const float* __restrict__ x, __half* __restrict__ y,
                                        long long total, int vec) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        if (4 * t >= total) return;
        const float4 v = ((const float4*)x)[t];
        __half2 h[2] = {__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w)};
        ((uint2*)y)[t] = *(const uint2*)h;
    } else {
        if (t >= total) return;
        y[t] = __float2half_rn(x[t]);
    }
}
#endif
