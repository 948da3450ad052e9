"""The Marlin layout and W4A16 GEMM (quant_formats/marlin.py, ggml_py/cuda/marlin.cu, marlin_ops.py).

CPU (always): repack -> unpack gives the GGUF bytes back exactly, for every type, odd N and
several K; the layout's dequantization equals quant_formats.dequantize bit for bit; the
fragment mapping puts each code where the mma B fragment expects it.
GPU (skipped without CuPy and a device): the repack kernels produce the NumPy layout byte for
byte; the GEMM for every type x M in {1, 2, 3, 8, 16, 17, 64, 100, 512} x odd and large K, N,
f32 and f16 A, forced k-splits (one slab: direct stores; several: partials + tickets), grouped weights, gate/up + swiglu/geglu and residual epilogues,
against ``A @ W.T`` in float64 (NMSE <= 5e-4); get_rows and the f16 dequantization; the
engine's mul_mat on repacked weights; a CUDA-graph capture replayed with new inputs (the
split-K tickets reset themselves).
"""
from __future__ import annotations

import numpy as np
import pytest

from quant_formats import dequantize, quantize, random_blocks, tensor_nbytes
from quant_formats import marlin as mq

TYPES = {2: "Q4_0", 3: "Q4_1", 12: "Q4_K"}
NMSE = 5e-4


def _seed() -> int:
    return int(np.random.SeedSequence().entropy % (1 << 32))


def _raw(rng, t, shape, quantized=True):
    """Raw GGUF bytes: quantized Gaussians (realistic scales) or random valid blocks."""
    if quantized:
        w = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(0.05, 1.0))
        return np.ascontiguousarray(quantize(w, t)).reshape(-1).view(np.uint8)
    return random_blocks(rng, t, shape, -0.05, 0.05).reshape(-1)


def _shapes(t):
    if t == 12:
        return [(1, 256), (65, 512), (191, 1024), (300, 2304)]
    return [(1, 32), (63, 96), (129, 576), (200, 1056)]


def _nmse(a, ref):
    a = np.asarray(a, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    den = float((ref * ref).sum())
    return float(((a - ref) ** 2).sum()) / (den if den > 0 else 1.0)


# -- CPU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_round_trip_exact(t):
    seed = _seed()
    rng = np.random.default_rng(seed)
    for shape in _shapes(t):
        raw = rng.integers(0, 256, tensor_nbytes(t, shape), dtype=np.uint8)    # every bit pattern
        buf = mq.repack(raw, t, shape)
        assert buf.size == mq.MarlinLayout(t, *shape).nbytes
        back = mq.unpack(buf, t, shape)
        assert np.array_equal(back.reshape(-1), raw), f"{TYPES[t]} {shape} seed {seed}"
        ref = dequantize(raw, t, shape)
        got = mq.dequantize(buf, t, shape)
        fin = np.isfinite(ref)
        assert np.array_equal(fin, np.isfinite(got)) and np.array_equal(ref[fin], got[fin]), \
            f"{TYPES[t]} {shape} seed {seed}: layout dequantization differs"


def test_layout_sizes():
    # Q4_0 with N a multiple of 64: exactly GGUF's bytes (16 of codes + 2 of scale per 32)
    assert mq.MarlinLayout(2, 4096, 4096).nbytes == tensor_nbytes(2, (4096, 4096))
    assert mq.MarlinLayout(3, 14336, 4096).nbytes == tensor_nbytes(3, (14336, 4096))
    lay = mq.MarlinLayout(12, 4096, 4096)      # Q4_K: sub-block scales one per byte (+2.8%)
    assert lay.nbytes == 4096 * 16 * 148
    with pytest.raises(ValueError):
        mq.MarlinLayout(12, 10, 100)
    with pytest.raises(ValueError):
        mq.MarlinLayout(8, 64, 64)


def test_fragment_mapping():
    """A one-hot code lands in the word, lane and nibble that mma.m16n8k16's B fragment names:
    lane t holds column t//4 of each n8 tile, rows 2(t%4)+{0,1} (register 0) and +8 (register 1)."""
    t, shape = 2, (64, 32)
    rng = np.random.default_rng(1)
    for _ in range(20):
        n, k = int(rng.integers(64)), int(rng.integers(32))
        blk = np.zeros(shape[0], np.dtype([("d", "<f2"), ("qs", "u1", 16)]))   # one Q4_0 block a row
        blk["d"] = 1.0
        blk["qs"] = 0x88                             # code 8 everywhere
        blk["qs"][n, k % 16] = (0x89 if k < 16 else 0x98)
        raw = blk.view(np.uint8).reshape(-1)
        words = mq.repack(raw, t, shape)[:2 * 512].view(np.uint32).reshape(2, 32, 4)
        ks, kk = divmod(k, 16)
        j, c16 = divmod(n, 16)
        h, col = divmod(c16, 8)                    # n8 tile 2j + h, column col inside it
        lane = col * 4 + (kk % 8) // 2
        reg = kk // 8                              # b0 (rows 0-7) or b1 (rows 8-15)
        elem = kk % 2                              # low or high half of the f16x2 register
        # nibble i -> register order of dequant_word: (lo0, hi0, lo1, hi1) for i = 0..3 (+4: high half)
        nib = 2 * h + reg + 4 * elem
        got = (words[ks, lane, j] >> (4 * nib)) & 0xF
        assert got == 9, (n, k)
        others = words.copy()
        others[ks, lane, j] = (others[ks, lane, j] & ~np.uint32(0xF << (4 * nib))) | np.uint32(8 << (4 * nib))
        assert np.all(((others[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF) == 8)


def test_marlin_env_values(monkeypatch):
    from engine.errors import GGFlatError
    from ggml_py.cuda import marlin_ops as mo
    for raw, want in (("", "auto"), ("auto", "auto"), ("ALL", "all"), ("1", "all"), ("off", "off"), ("0", "off")):
        monkeypatch.setenv("GGFLAT_MARLIN", raw)
        assert mo.enabled() == want
    monkeypatch.setenv("GGFLAT_MARLIN", "sometimes")
    with pytest.raises(GGFlatError, match="GGFLAT_MARLIN"):
        mo.should_repack(2, (14336, 4096), 33 << 20)


def test_split_override(monkeypatch):
    """GGFLAT_MARLIN_SPLIT (a measurement switch): per weight shape, M <= 16 only; a malformed
    value is a GGFlatError naming the variable."""
    from engine.errors import GGFlatError
    from ggml_py.cuda import marlin_ops as mo
    monkeypatch.setenv("GGFLAT_MARLIN_SPLIT", "14336x4096g=2x4, 4096x14336=8X2")
    assert mo._split_override(14336, 4096, True, 1) == (2, 4)
    assert mo._split_override(14336, 4096, False, 1) is None
    assert mo._split_override(4096, 14336, False, 16) == (8, 2)
    assert mo._split_override(4096, 14336, False, 17) is None
    monkeypatch.setenv("GGFLAT_MARLIN_SPLIT", "4096x4096=eight")
    with pytest.raises(GGFlatError, match="GGFLAT_MARLIN_SPLIT"):
        mo._split_override(4096, 4096, False, 1)


def test_default_variants_and_splits(monkeypatch):
    """The kernel for M rows and the splits the cost model picks for the shapes it was fitted on:
    above 16 rows m2 in 32-row tiles with as many slabs as keep two CTAs a SM resident (64 x 4096 x
    14336: k1s4; 64 x 14336 x 4096: k1s16, measured best); the decode gate/up pair unchanged (k1s9)."""
    from ggml_py.cuda import marlin_ops as mo
    monkeypatch.delenv("GGFLAT_MARLIN_DEC", raising=False)
    assert [mo._config(m) for m in (1, 8, 9, 16, 17, 32, 64, 100)] == ["d1"] * 2 + ["d2"] * 2 + ["m2"] * 4
    monkeypatch.setenv("GGFLAT_MARLIN_DEC", "0")
    assert mo._config(16) == "m1" and mo._config(64) == "m2"
    assert mo.choose_split(224, 2, 128, 32, "m2", 128, 132) == (1, 4)
    assert mo.choose_split(64, 2, 448, 32, "m2", 128, 132) == (1, 16)
    assert mo.choose_split(224, 1, 128, 1, "d1_glu", 128, 132) == (1, 9)


def test_warpgroup_choice(monkeypatch):
    """Where the warpgroup kernels replace m2 by default (17..64 rows, every warpgroup at most one
    tile: 4096 x 4096 measured 1.6-1.8x faster, 4096 x 14336 slower), and the switch that turns it off."""
    from ggml_py.cuda import marlin_ops as mo
    monkeypatch.setattr(mo, "wg_available", lambda: True)
    monkeypatch.setattr(mo, "sm_count", lambda: 132)
    G = 4096 // 32
    assert mo._wg_choice(64, G, 64, 2) == "w64" and mo._wg_choice(64, G, 33, 12) == "w64"
    assert mo._wg_choice(64, G, 32, 3) == "w32" and mo._wg_choice(64, G, 17, 2) == "w32"
    assert mo.choose_split_wg(64, 1, G, "w64", 132) == (2, 4)              # the measured 15.4 us split
    for M in (1, 16, 65, 128):
        assert mo._wg_choice(64, G, M, 2) is None
    assert mo._wg_choice(224, G, 64, 2) is None                           # 4096 x 14336: m2
    assert mo._wg_choice(64, 14336 // 32, 64, 2) is None                  # 14336 x 4096: m2
    assert mo._wg_choice(64, 3, 64, 2) is None                            # K = 96: not whole stages
    # the mixed-input kernel, f16 A, 33..64 rows: where its 128-column CTAs fill the GPU (4096 x 14336:
    # 112 CTAs, 32.6 us against m2's 43.7 at 64 rows); at 17..32 rows m2 is faster (27.0 at 32)
    assert mo._wg_choice(224, G, 64, 2, "f16") == "x64" and mo._wg_choice(224, G, 33, 12, "f16") == "x64"
    assert mo._wg_choice(64, G, 64, 2, "f16") == "w64"                   # 4096 x 4096: slabs of 16 stages
    assert mo._wg_choice(64, 14336 // 32, 64, 2, "f16") == "x64"         # 14336 x 4096: 4 slabs of 56
    assert mo._wg_choice(64, 14336 // 32, 64, 2) is None                 # (f32 A: m2)
    assert mo._wg_choice(224, G, 32, 2, "f16") is None and mo._wg_choice(224, G, 16, 2, "f16") is None
    assert mo._wg_choice(224, G, 64, 2, "f32") is None
    # x64's k-split: CTAs up to the SMs, slabs of at least 8 stages
    assert mo.x64_slabs(224, 1, G, 132) == 1 and mo.x64_slabs(64, 1, 14336 // 32, 132) == 4
    assert mo.x64_slabs(64, 1, G, 132) == 4 and mo.x64_slabs(10, 1, 1024 // 32, 132) == 2
    monkeypatch.setenv("GGFLAT_MARLIN_WG", "0")
    assert mo._wg_choice(64, G, 64, 2) is None


def test_eligibility():
    from ggml_py.cuda import marlin_ops as mo
    assert mo.eligible(2, (4096, 4096)) and mo.eligible(12, (10, 256))
    assert not mo.eligible(12, (10, 128)) and not mo.eligible(8, (64, 64)) and not mo.eligible(2, (64,))
    assert mo.should_repack(2, (14336, 4096), 33 << 20) and not mo.should_repack(2, (64, 64), 2304)
    assert mo.should_repack(2, (4096, 4096), 9 << 20)               # every 4-bit weight of >= 2 MB
    assert not mo.should_repack(3, (1536, 576), 497664)             # SmolLM2's sizes keep the GEMVs
    assert not mo.should_repack(8, (4096, 4096), 17 << 20)          # Q8_0: not a Marlin type


# -- GPU ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:
        pytest.skip(f"no CUDA device ({e})")
    return cupy


@pytest.fixture(scope="module")
def mo(cp):
    from ggml_py.cuda import marlin_ops
    marlin_ops._module()
    return marlin_ops


def _device_weight(cp, t, raw, shape, name="w"):
    from ggml_py.cuda.quant_ops import DeviceWeight
    d = cp.asarray(raw)
    return DeviceWeight(t, tuple(shape), d, int(raw.size), name)


def _marlin(cp, mo, t, raw, shape):
    mw = mo.repack(_device_weight(cp, t, raw, shape))
    cp.cuda.get_current_stream().synchronize()
    return mw


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gpu_repack_matches_numpy(cp, mo, t):
    seed = _seed()
    rng = np.random.default_rng(seed)
    for shape in _shapes(t):
        raw = rng.integers(0, 256, tensor_nbytes(t, shape), dtype=np.uint8)
        mw = _marlin(cp, mo, t, raw, shape)
        assert np.array_equal(cp.asnumpy(mw.data), mq.repack(raw, t, shape)), f"{TYPES[t]} {shape} seed {seed}"


M_LIST = (1, 2, 3, 8, 16, 17, 64, 100, 512)


def _weights(cp, mo, rng, t, shapes):
    """Quantized random weights of these shapes: their float64 dequantization and MarlinWeights."""
    raws = [_raw(rng, t, s) for s in shapes]
    refs = [dequantize(r, t, s).astype(np.float64) for r, s in zip(raws, shapes)]
    return refs, [_marlin(cp, mo, t, r, s) for r, s in zip(raws, shapes)]


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm(cp, mo, t):
    seed = _seed()
    rng = np.random.default_rng(seed)
    for shape in _shapes(t)[1:] + [(4096 + 64 * 3 + 5, 2048)]:
        raw = _raw(rng, t, shape)
        ref_w = dequantize(raw, t, shape).astype(np.float64)
        mw = _marlin(cp, mo, t, raw, shape)
        for M in M_LIST:
            a = rng.standard_normal((M, shape[1])).astype(np.float32)
            ref = a.astype(np.float64) @ ref_w.T
            for a_dtype in ("f32", "f16"):
                p = mo.plan_gemm(mw, M, a_dtype=a_dtype)
                out = cp.full((M, shape[0]), np.nan, cp.float32)
                ad = cp.asarray(a if a_dtype == "f32" else a.astype(np.float16))
                p(ad, [out])
                e = _nmse(cp.asnumpy(out), ref)
                assert e <= NMSE, f"{TYPES[t]} {shape} M={M} {a_dtype} slabs={p.slabs} seed {seed}: nmse {e:.3g}"


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm_configs_and_slabs(cp, mo, t):
    """Every compiled tile height and forced k-splits (partials + tickets), twice in a row."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    shape = (333, 1024 if t != 12 else 2048)
    raw = _raw(rng, t, shape)
    ref_w = dequantize(raw, t, shape).astype(np.float64)
    mw = _marlin(cp, mo, t, raw, shape)
    for config in list(mo.CONFIGS) + (list(mo.SWEEP_VARIANTS) if t == 2 else []):
        for M in (1, 5, 33):
            for slabs, kws in ((1, 1), (3, 1), (8, 1), (shape[1] // 32, 1), (1, 8), (2, 4), (3, 2)):
                if kws > 1 and M > 16:
                    continue
                a = rng.standard_normal((M, shape[1])).astype(np.float32)
                p = mo.plan_gemm(mw, M, a_dtype="f16", config=config, slabs=slabs, kws=kws)
                for _ in range(2):
                    out = cp.full((M, shape[0]), np.nan, cp.float32)
                    p(cp.asarray(a.astype(np.float16)), [out])
                    e = _nmse(cp.asnumpy(out), a.astype(np.float64) @ ref_w.T)
                    assert e <= NMSE, f"{TYPES[t]} config {config} M={M} slabs={slabs} kws={kws} seed {seed}: {e:.3g}"


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm_warpgroup(cp, mo, t):
    """The warpgroup (wgmma) kernels, sm_90 only: every tile height x M (padding rows, several row
    tiles) x f32 / f16 A x (tiles a CTA, slabs) -- one slab (stores), several (partials + tickets),
    twice in a row (the tickets reset) -- for one weight, q/k/v-style groups and the residual add."""
    if not mo.wg_available():
        pytest.skip("the warpgroup kernels need an sm_90 GPU")
    seed = _seed()
    rng = np.random.default_rng(seed)
    K = 1024
    shapes = [(333, K), (64, K), (130, K)]
    refs, ws = _weights(cp, mo, rng, t, shapes)
    for variant in ("w16", "w32", "w64"):
        for M in (1, 9, 16, 17, 40, 64, 100):
            a = rng.standard_normal((M, K)).astype(np.float32)
            a64 = a.astype(np.float16).astype(np.float64)
            units = K // 32 // mo._VARIANTS[variant][3]          # slabs are whole stages of groups
            for split in (None, (1, 1), (2, 1), (3, 2), (1, 5), (6, units)):
                tpc, slabs = split or (None, None)
                a_dtype = "f16" if split is None or split[1] > 1 else "f32"
                ad = cp.asarray(a.astype(np.float16) if a_dtype == "f16" else a)
                p = mo.plan_gemm(ws, M, a_dtype=a_dtype, config=variant, slabs=slabs, kws=tpc)
                for _ in range(2):
                    outs = [cp.full((M, s[0]), np.nan, cp.float32) for s in shapes]
                    p(ad, outs)
                    for o, r in zip(outs, refs):
                        e = _nmse(cp.asnumpy(o), a64 @ r.T)
                        assert e <= NMSE, (f"{TYPES[t]} {variant} M={M} {a_dtype} tpc={p.tpc} slabs={p.slabs} "
                                           f"seed {seed}: {e:.3g}")
            for slabs in (1, 4):
                r0 = rng.standard_normal((M, shapes[1][0])).astype(np.float32)
                out = cp.asarray(r0)
                mo.plan_gemm([ws[1]], M, residual=True, a_dtype="f16", config=variant, slabs=slabs, kws=1)(
                    cp.asarray(a.astype(np.float16)), [out], resid=out)
                e = _nmse(cp.asnumpy(out), a64 @ refs[1].T + r0)
                assert e <= NMSE, f"{TYPES[t]} {variant} residual M={M} slabs={slabs} seed {seed}: {e:.3g}"
    if t == 2:
        # the A window's descriptor: with its two strides swapped the tensor cores read another matrix
        a = rng.standard_normal((16, K)).astype(np.float16)
        out = cp.zeros((16, shapes[1][0]), cp.float32)
        mo.plan_gemm([ws[1]], 16, a_dtype="f16", config="w16_x", slabs=1, kws=1)(cp.asarray(a), [out])
        assert _nmse(cp.asnumpy(out), a.astype(np.float64) @ refs[1].T) > 1e-2


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_mixed_input_tile_placement(t):
    """(CPU) the x64 producer's addressing against the layout's specification: each lane's 16-byte word
    of the raw stage (at q * 1024 + ks * 512 + 16 lane: group q, k-step ks), dequant_word's register
    order, stmatrix's rows (lane l: row l % 8 of matrix l / 8, at marlin.cu's address formula) and
    the 128-byte swizzle must put the code of (column n, k) where a K-major swizzled tile has it:
    row n at n * 128, 8-k chunk c at (c ^ (n % 8)) * 16."""
    rng = np.random.default_rng(_seed())
    N, K = 128, 256                                  # two tiles, four stages of 64 k
    buf = mq.repack(_raw(rng, t, (N, K)), t, (N, K))
    lay = mq.MarlinLayout(t, N, K)
    codes, _ = mq._read(buf, lay)                    # (n, k) -- the specification
    words = buf[:lay.qw_bytes].view(np.uint32)
    for s in range(K // 64):
        tile = np.full(128 * 128, 0xFF, np.uint8)    # the B stage's bytes, one code per f16 (low byte)
        for u in range(2):
            # the raw stage's codes run of tile u: bytes ((u * K / 16) + 2 g) * 512 .. + 2048, g = 2 s
            run = words[((u * (K // 16)) + 4 * s) * 128:((u * (K // 16)) + 4 * s) * 128 + 512]
            for q in range(2):
                for ks in range(2):
                    for w in range(4):
                        wv = run[q * 256 + ks * 128 + np.arange(32) * 4 + w]          # each lane's word w
                        nib = [(wv >> (4 * i)) & 0xF for i in range(8)]
                        # dequant_word: b0 = nibbles (0, 4), b1 = (1, 5), b2 = (2, 6), b3 = (3, 7);
                        # stmatrix takes (b0, b2, b1, b3): matrix mi holds nibble pair p = (0, 2, 1, 3)[mi]
                        for mi, p in enumerate((0, 2, 1, 3)):
                            for lane in range(32):
                                src = 8 * mi + lane // 4                         # the lane giving the row's address
                                n = u * 64 + w * 16 + (src & 7) + 8 * (mi & 1)
                                c = 4 * q + 2 * ks + (mi >> 1)
                                addr = n * 128 + ((c ^ (n & 7)) << 4) + 2 * (2 * (lane % 4))
                                tile[addr] = nib[p][lane]
                                tile[addr + 2] = nib[p + 4][lane]
        for n in range(N):
            for k in range(64):
                got = tile[n * 128 + (((k // 8) ^ (n % 8)) << 4) + (k % 8) * 2]
                assert got == codes[n, 64 * s + k], (TYPES[t], s, n, k)


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm_mixed_input(cp, mo, t):
    """marlin_<type>_x64, sm_90 only: warpgroups that stage A and dequantize the weights into shared
    memory, a consumer that runs wgmma with both operands there. M with padding rows and several row tiles, f16 and
    f32 A, a q/k/v-style group whose CTAs straddle two weights and a partial last tile, K shorter and
    longer than the rings (2 or 4, and 16 stages), twice in a row, and the residual add."""
    if not mo.wg_available():
        pytest.skip("the warpgroup kernels need an sm_90 GPU")
    seed = _seed()
    rng = np.random.default_rng(seed)
    for K in (256 if t == 12 else 128, 1024):
        shapes = [(333, K), (64, K), (130, K)]
        refs, ws = _weights(cp, mo, rng, t, shapes)
        for M in (1, 16, 17, 40, 64, 100):
            a = rng.standard_normal((M, K)).astype(np.float32)
            a64 = a.astype(np.float16).astype(np.float64)
            for a_dtype in ("f16", "f32"):
                ad = cp.asarray(a.astype(np.float16) if a_dtype == "f16" else a)
                p = mo.plan_gemm(ws, M, a_dtype=a_dtype, config="x64")
                for _ in range(2):
                    outs = [cp.full((M, s[0]), np.nan, cp.float32) for s in shapes]
                    p(ad, outs)
                    for o, r in zip(outs, refs):
                        e = _nmse(cp.asnumpy(o), a64 @ r.T)
                        assert e <= NMSE, f"{TYPES[t]} x64 K={K} M={M} {a_dtype} seed {seed}: {e:.3g}"
            r0 = rng.standard_normal((M, shapes[1][0])).astype(np.float32)
            out = cp.asarray(r0)
            mo.plan_gemm([ws[1]], M, residual=True, a_dtype="f16", config="x64")(
                cp.asarray(a.astype(np.float16)), [out], resid=out)
            e = _nmse(cp.asnumpy(out), a64 @ refs[1].T + r0)
            assert e <= NMSE, f"{TYPES[t]} x64 residual K={K} M={M} seed {seed}: {e:.3g}"
            if K >= 1024:                            # k-splits of uneven slabs (16 stages in 3), residual too
                p = mo.plan_gemm(ws, M, a_dtype="f16", config="x64", slabs=3)
                assert p.slabs == 3
                for _ in range(2):                   # twice: the tickets reset themselves
                    outs = [cp.full((M, s[0]), np.nan, cp.float32) for s in shapes]
                    p(cp.asarray(a.astype(np.float16)), outs)
                    for o, r in zip(outs, refs):
                        e = _nmse(cp.asnumpy(o), a64 @ r.T)
                        assert e <= NMSE, f"{TYPES[t]} x64 slabs=3 K={K} M={M} seed {seed}: {e:.3g}"
                out = cp.asarray(r0)
                mo.plan_gemm([ws[1]], M, residual=True, a_dtype="f16", config="x64", slabs=3)(
                    cp.asarray(a.astype(np.float16)), [out], resid=out)
                e = _nmse(cp.asnumpy(out), a64 @ refs[1].T + r0)
                assert e <= NMSE, f"{TYPES[t]} x64 slabs=3 residual K={K} M={M} seed {seed}: {e:.3g}"


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * x * (1.0 + 0.044715 * x * x)))


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm_epilogues(cp, mo, t):
    seed = _seed()
    rng = np.random.default_rng(seed)
    K = 512
    shapes = [(200, K), (64, K), (77, K)]
    refs, ws = _weights(cp, mo, rng, t, shapes)
    for M in (1, 4, 12, 20):
        a = rng.standard_normal((M, K)).astype(np.float32)
        ad = cp.asarray(a)
        # q/k/v: three weights, three outputs
        for slabs in (None, 2, 16):
            p = mo.plan_gemm(ws, M, slabs=slabs)
            outs = [cp.full((M, s[0]), np.nan, cp.float32) for s in shapes]
            p(ad, outs)
            for o, r in zip(outs, refs):
                e = _nmse(cp.asnumpy(o), a.astype(np.float64) @ r.T)
                assert e <= NMSE, f"group M={M} slabs={slabs} seed {seed}: {e:.3g}"
        # gate/up + glu
        up_raw = _raw(rng, t, shapes[0])
        up = _marlin(cp, mo, t, up_raw, shapes[0])
        up_ref = dequantize(up_raw, t, shapes[0]).astype(np.float64)
        for glu, act in (("swiglu", _silu), ("geglu", _gelu)):
            for slabs in (None, 3, 16):
                p = mo.plan_gemm([ws[0], up], M, glu=glu, slabs=slabs)
                out = cp.full((M, shapes[0][0]), np.nan, cp.float32)
                p(ad, [out])
                ref = act(a.astype(np.float64) @ refs[0].T) * (a.astype(np.float64) @ up_ref.T)
                e = _nmse(cp.asnumpy(out), ref)
                assert e <= NMSE, f"{glu} M={M} slabs={slabs} seed {seed}: {e:.3g}"
        # residual, in place (out is resid)
        for slabs in (None, 1, 16):
            r0 = rng.standard_normal((M, shapes[1][0])).astype(np.float32)
            out = cp.asarray(r0)
            mo.plan_gemm([ws[1]], M, residual=True, slabs=slabs)(ad, [out], resid=out)
            e = _nmse(cp.asnumpy(out), a.astype(np.float64) @ refs[1].T + r0)
            assert e <= NMSE, f"residual M={M} slabs={slabs} seed {seed}: {e:.3g}"


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm_norm_and_rope(cp, mo, t):
    """The decode kernels' folds: the rms_norm of A (with and without a weight) and the ropes of
    q and k (all or part of the head rotating), through plan_gemm and through quant_ops'
    grouped-launch entry (plan_mul_mat_group), against rms_norm -> matmul -> rope in float64."""
    from ggml_py.cuda import quant_ops as qo
    from tests.test_cuda_quant import _rope_ref
    seed = _seed()
    rng = np.random.default_rng(seed)
    K, d = 512, 64
    shapes = [(256, K), (128, K), (128, K)]
    refs, ws = _weights(cp, mo, rng, t, shapes)
    nw = rng.uniform(0.5, 1.5, K).astype(np.float32)
    for M in (1, 3, 12):
        a = (rng.standard_normal((M, K)) * 3.0).astype(np.float32)
        a64 = a.astype(np.float64)
        an = a64 / np.sqrt((a64 * a64).mean(1, keepdims=True) + 1e-5)
        pos = rng.integers(0, 4000, M).astype(np.int32)
        for use_w, n_rot, norm in ((True, d, 1e-5), (False, 32, 1e-5), (True, d, None)):
            spec = {"members": (0, 1), "head_dim": d, "n_rot": n_rot, "base": 100000.0, "freq_scale": 0.5}
            for via_group in ((False, True) if M <= qo.DECODE_MAX_N else (False,)):
                if via_group:
                    gp = qo.plan_mul_mat_group(ws, M, rope=spec, norm=norm)
                    assert gp is not None, f"{TYPES[t]} M={M}: no grouped Marlin launch"
                    bind = lambda x, outs, p, w: gp.bind(x, outs, None, pos=p, norm_w=w)   # noqa: E731
                else:
                    plan = mo.plan_gemm(ws, M, norm=norm, rope=spec)
                    bind = lambda x, outs, p, w: plan.bind(x, outs, None, pos=p, norm_w=w)  # noqa: E731
                outs = [cp.full((M, s[0]), np.nan, cp.float32) for s in shapes]
                bind(cp.asarray(a), outs, cp.asarray(pos), cp.asarray(nw) if use_w else None)()
                if not via_group:                  # the positions read before PDL's wait: the same bits
                    again = [cp.full((M, s[0]), np.nan, cp.float32) for s in shapes]
                    plan.bind(cp.asarray(a), again, None, pos=cp.asarray(pos),
                              norm_w=cp.asarray(nw) if use_w else None, early=True)()
                    for o, o2 in zip(outs, again):
                        np.testing.assert_array_equal(cp.asnumpy(o), cp.asnumpy(o2))
                h = a64 if norm is None else (an * nw if use_w else an)
                for g, (o, r) in enumerate(zip(outs, refs)):
                    want = h @ r.T
                    if g in spec["members"]:
                        want = _rope_ref(want, pos, d, n_rot, spec["base"], spec["freq_scale"])
                    e = _nmse(cp.asnumpy(o), want)
                    assert e <= NMSE, (f"{TYPES[t]} M={M} norm={norm} w={use_w} n_rot={n_rot} group={via_group} "
                                       f"member {g} seed {seed}: {e:.3g}")
    # a norm folded into gate/up + swiglu
    up_raw = _raw(rng, t, shapes[0])
    up = _marlin(cp, mo, t, up_raw, shapes[0])
    up_ref = dequantize(up_raw, t, shapes[0]).astype(np.float64)
    for M in (1, 5):
        a = rng.standard_normal((M, K)).astype(np.float32)
        a64 = a.astype(np.float64)
        h = a64 / np.sqrt((a64 * a64).mean(1, keepdims=True) + 1e-6) * nw
        out = cp.full((M, shapes[0][0]), np.nan, cp.float32)
        mo.plan_gemm([ws[0], up], M, glu="swiglu", norm=1e-6)(cp.asarray(a), [out], norm_w=cp.asarray(nw))
        ref = _silu(h @ refs[0].T) * (h @ up_ref.T)
        e = _nmse(cp.asnumpy(out), ref)
        assert e <= NMSE, f"{TYPES[t]} norm + swiglu M={M} seed {seed}: {e:.3g}"
    with pytest.raises(ValueError):
        mo.plan_gemm(ws, 40, norm=1e-5)                  # no fold in the M > 16 kernels


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_gemm_kv_fold(cp, mo, t):
    """A q/k/v decode launch that also writes k and v into cache pages: the rows at the tokens'
    slots are the k / v outputs rounded as kv_store rounds them, with the positions beside;
    slots outside the cache are skipped (slots and positions read after PDL's wait, or before it with
    early=True); plans that cannot fold refuse."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    K, hd = 512, 64
    shapes = [(256, K), (128, K), (128, K)]
    ws = [_marlin(cp, mo, t, _raw(rng, t, s), s) for s in shapes]
    n_pages, page = 5, 4
    for M in (1, 3, 12):
        for dt, early in ((np.float16, False), (np.float32, False), (np.float16, True), (np.float32, True)):
            kc = cp.zeros((n_pages, page, 2, hd), dt)
            vc = cp.zeros((n_pages, page, 2, hd), dt)
            pc = cp.full((n_pages, page), -1, cp.int32)
            slots = rng.permutation(n_pages * page)[:M].astype(np.int32)
            slots[0] = n_pages * page + 3 if M > 1 else slots[0]          # outside: skipped
            kpos = rng.integers(0, 1000, M).astype(np.int32)
            p = mo.plan_gemm(ws, M, rope={"head_dim": hd, "n_rot": hd, "base": 10000.0, "freq_scale": 1.0,
                                          "members": (0, 1)}, norm=1e-5)
            assert p.kv_fold_ok
            a = cp.asarray(rng.standard_normal((M, K)).astype(np.float32))
            outs = [cp.empty((M, s[0]), cp.float32) for s in shapes]
            pos = cp.asarray(rng.integers(0, 1000, M).astype(np.int32))
            p.bind(a, outs, pos=pos, kv=(kc, vc, pc, cp.asarray(slots), cp.asarray(kpos)), early=early)()
            kh, vh, ph = (cp.asnumpy(c).reshape(n_pages * page, -1) for c in (kc, vc, pc))
            ko, vo = cp.asnumpy(outs[1]), cp.asnumpy(outs[2])
            ok = slots < n_pages * page
            np.testing.assert_array_equal(kh[slots[ok]], ko[ok].astype(dt))
            np.testing.assert_array_equal(vh[slots[ok]], vo[ok].astype(dt))
            np.testing.assert_array_equal(ph[slots[ok], 0], kpos[ok])
            rest = np.setdiff1d(np.arange(n_pages * page), slots[ok])
            assert not kh[rest].any() and not vh[rest].any() and (ph[rest] == -1).all()
    a = cp.zeros((1, K), cp.float32)
    outs = [cp.empty((1, s[0]), cp.float32) for s in shapes]
    kv = (kc, vc, pc, cp.asarray(slots), cp.asarray(kpos))
    split = mo.plan_gemm(ws, 1, slabs=2)
    assert not split.kv_fold_ok and not mo.plan_gemm(ws[:2], 1, slabs=1).kv_fold_ok
    with pytest.raises(ValueError, match="KV-cache"):
        split.bind(a, outs, kv=kv)
    one = mo.plan_gemm(ws, 1, slabs=1)
    with pytest.raises(ValueError, match="cache rows"):
        one.bind(a, outs, kv=(cp.zeros((n_pages, page, 1, hd), kc.dtype),) + kv[1:])
    with pytest.raises(ValueError, match="one float type"):
        one.bind(a, outs, kv=(kc, vc.astype(cp.float64)) + kv[2:])
    with pytest.raises(ValueError, match="slots"):
        one.bind(a, outs, kv=kv[:3] + (cp.zeros(1, cp.int64),) + kv[4:])


@pytest.mark.parametrize("t", TYPES, ids=TYPES.get)
def test_get_rows_and_dequant16(cp, mo, t):
    seed = _seed()
    rng = np.random.default_rng(seed)
    shape = (130, 512)
    raw = _raw(rng, t, shape, quantized=False)
    ref = dequantize(raw, t, shape)
    mw = _marlin(cp, mo, t, raw, shape)
    ids = np.array([0, 129, 5, 64, 63, 200, -3], np.int32)
    out = cp.full((ids.size, shape[1]), np.nan, cp.float32)
    mo.plan_get_rows(mw, cp.asarray(ids), out)()
    want = ref[np.clip(ids, 0, shape[0] - 1)]
    assert np.array_equal(cp.asnumpy(out), want), f"get_rows {TYPES[t]} seed {seed}"
    for n0, rows in ((64, 40), (0, 130), (128, 2)):
        w16 = cp.full((rows, shape[1]), np.nan, cp.float16)
        mo.plan_dequant16(mw, w16, n0, rows)()
        got = cp.asnumpy(w16).astype(np.float64)
        e = _nmse(got, ref[n0:n0 + rows].astype(np.float64))       # f16 arithmetic, as the GEMM
        assert e <= 1e-6, f"dequant16 {TYPES[t]} rows {n0}+{rows} seed {seed}: {e:.3g}"


def test_engine_mul_mat_and_graph(cp, mo, monkeypatch):
    """quant_ops.upload_weight repacks (GGFLAT_MARLIN=all); mul_mat on the decode path and the
    prefill path; get_rows; and a captured CUDA graph replayed with new x (tickets reset)."""
    from ggml_py import WeightSource
    from ggml_py.cuda import quant_ops as qo
    monkeypatch.setenv("GGFLAT_MARLIN", "all")
    seed = _seed()
    rng = np.random.default_rng(seed)
    for t in TYPES:
        shape = (300, 1024)
        raw = _raw(rng, t, shape)
        ref_w = dequantize(raw, t, shape).astype(np.float64)
        w = qo.upload_weight(WeightSource("w", t, shape, raw))
        assert isinstance(w, mo.MarlinWeight)
        for n in (1, 7, 64, 65, 300):
            need = qo.mul_mat_scratch_bytes(w, n)
            scratch = cp.empty(need, cp.uint8) if need else None
            x = rng.standard_normal((n, shape[1])).astype(np.float32)
            out = cp.full((n, shape[0]), np.nan, cp.float32)
            qo.mul_mat(w, cp.asarray(x), out, None, scratch)
            e = _nmse(cp.asnumpy(out), x.astype(np.float64) @ ref_w.T)
            assert e <= NMSE, f"{TYPES[t]} n={n} seed {seed}: {e:.3g}"
        stream = cp.cuda.Stream(non_blocking=True)
        x = cp.zeros((1, shape[1]), cp.float32)
        out = cp.empty((1, shape[0]), cp.float32)
        p = mo.plan_gemm(w, 1, slabs=5)
        run = p.bind(x, [out], stream)
        with stream:
            run()
        stream.synchronize()
        stream.begin_capture()
        run()
        graph = stream.end_capture()
        for _ in range(3):
            xh = rng.standard_normal((1, shape[1])).astype(np.float32)
            with stream:
                x.set(xh)
                out.fill(cp.nan)
                graph.launch(stream)
            stream.synchronize()
            e = _nmse(cp.asnumpy(out), xh.astype(np.float64) @ ref_w.T)
            assert e <= NMSE, f"{TYPES[t]} graph replay seed {seed}: {e:.3g}"
