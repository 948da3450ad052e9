"""The CuPy backend's quantized weight kernels (ggml_py/cuda/quant.cu, quant_ops.py) against
the NumPy reference (quant_formats.dequantize, ``x @ W.T``).

- test_host_decoders: the block decoders of quant.cu compiled as C++ on the CPU (g++,
  -DQUANT_HOST) must reproduce quant_formats.dequantize bit for bit. Needs no GPU.
- everything else needs CuPy and a CUDA device (skipped otherwise): get_rows (exact),
  mul_mat on the decode path (n <= 8, NMSE <= 1e-7) and the prefill path (n > 8, f16 operands,
  f32 accumulation, NMSE <= 5e-4), every supported type, odd row counts, poisoned outputs,
  fresh random data each run (the seed is in every failure message), and a CUDA-graph
  capture/replay of mul_mat.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from quant_formats import dequantize, get_format, quantize, random_blocks, tensor_nbytes
from tests.conftest import build_host_lib

CU = Path(__file__).resolve().parent.parent / "ggml_py" / "cuda" / "quant.cu"

TYPES = [0, 1, 30, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14]          # F32 F16 BF16 Q4_0 .. Q6_K
NAMES = {t: get_format(t).name for t in TYPES}
QUANTIZABLE = {0, 1, 30, 2, 3, 6, 7, 8, 12, 14}               # the rest get random valid blocks
N_LIST = (1, 2, 3, 8, 9, 17, 64, 512)
DECODE_NMSE = 1e-7
PREFILL_NMSE = 5e-4


def _shapes(tid: int) -> list[tuple[int, int]]:
    qk = get_format(tid).block_elems
    if qk == 256:
        return [(1, 256), (37, 512), (129, 1536)]
    if qk == 32:
        return [(1, 32), (33, 96), (191, 576), (300, 1536)]
    return [(5, 8), (33, 96), (130, 576), (9, 36)]            # (9, 36): K % 8 != 0


def _random_weight(rng: np.random.Generator, tid: int, shape: tuple[int, int]) -> np.ndarray:
    """uint8 raw bytes of a random ``shape`` weight: quantized Gaussians where a quantizer
    exists, else random bytes with finite, small f16 scales."""
    if tid in QUANTIZABLE:
        w = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(0.05, 2.0))
        return np.ascontiguousarray(quantize(w, tid)).reshape(-1).view(np.uint8)
    return random_blocks(rng, tid, shape, -0.05, 0.05).reshape(-1)


def _nmse(a: np.ndarray, ref: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    den = float((ref * ref).sum())
    return float(((a - ref) ** 2).sum()) / (den if den > 0 else 1.0)


# -- host: the decoders as plain C++ ------------------------------------------------------

@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    lib = build_host_lib(tmp_path_factory, CU, "QUANT_HOST")
    lib.quant_host_dequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p]
    lib.quant_host_dequant.restype = ctypes.c_int
    return lib


@pytest.mark.parametrize("tid", TYPES, ids=lambda t: NAMES[t])
def test_host_decoders(host_lib, tid):
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    fmt = get_format(tid)
    shape = (7, 512)
    raws = [_random_weight(rng, tid, shape)]
    if tid in (1, 30):                                         # every bit pattern, NaN and Inf too
        raws.append(rng.integers(0, 1 << 16, 7 * 512, dtype=np.uint16).view(np.uint8))
    elif tid != 0:                                             # all quant values, not just likely ones
        raws.append(random_blocks(rng, tid, shape, -0.05, 0.05).reshape(-1))
    for raw in raws:
        ref = np.ascontiguousarray(dequantize(raw, tid, shape))
        out = np.full(shape, np.nan, np.float32)
        bb = fmt.block_bytes * (8 if fmt.block_elems == 1 else 1)
        assert host_lib.quant_host_dequant(tid, raw.ctypes.data, raw.size // bb, out.ctypes.data) == 0
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), f"{fmt.name} seed {seed}"


# -- GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:                                   # no driver / no device
        pytest.skip(f"no CUDA device ({e})")
    return cupy


@pytest.fixture(scope="module")
def qo(cp):
    from ggml_py.cuda import quant_ops
    quant_ops._module()                                      # compile once, up front
    return quant_ops


def _upload(qo, tid, raw, shape, name="w"):
    from ggml_py import WeightSource
    return qo.upload_weight(WeightSource(name, tid, shape, raw))


@pytest.mark.parametrize("tid", TYPES, ids=lambda t: NAMES[t])
def test_upload(cp, qo, tid):
    rng = np.random.default_rng()
    shape = _shapes(tid)[1]
    raw = _random_weight(rng, tid, shape)
    w = _upload(qo, tid, raw, shape)
    assert w.ggml_type == tid and w.shape == shape and w.nbytes == raw.size == w.data.nbytes
    if tid == 0:
        assert w.data.dtype == np.float32 and w.data.shape == shape
        np.testing.assert_array_equal(cp.asnumpy(w.data), raw.view(np.float32).reshape(shape))
    else:
        assert w.data.dtype == np.uint8 and w.data.shape == (raw.size,)
        np.testing.assert_array_equal(cp.asnumpy(w.data), raw)


def test_upload_1d_f32_and_errors(cp, qo):
    from engine.errors import GGFlatError, UnknownTypeError
    from ggml_py import WeightSource
    v = np.random.default_rng().standard_normal(576).astype(np.float32)
    w = qo.upload_weight(WeightSource("norm", 0, (576,), v.view(np.uint8)))
    assert w.data.dtype == np.float32 and w.data.shape == (576,)
    np.testing.assert_array_equal(cp.asnumpy(w.data), v)
    with pytest.raises(UnknownTypeError):
        qo.upload_weight(WeightSource("iq", 20, (4, 32), np.zeros(4 * 18, np.uint8)))   # IQ4_NL
    with pytest.raises(GGFlatError):
        qo.upload_weight(WeightSource("short", 2, (4, 32), np.zeros(10, np.uint8)))


@pytest.mark.parametrize("tid", TYPES, ids=lambda t: NAMES[t])
def test_get_rows(cp, qo, tid):
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    for shape in _shapes(tid):
        raw = _random_weight(rng, tid, shape)
        ref = dequantize(raw, tid, shape)
        w = _upload(qo, tid, raw, shape)
        for n in (1, 3, 17):
            ids = rng.integers(0, shape[0], n).astype(np.int32)
            out = cp.full((n, shape[1]), cp.nan, cp.float32)
            qo.get_rows(w, cp.asarray(ids), out)
            got = cp.asnumpy(out)
            want = ref[ids]
            assert np.isfinite(got).all() or not np.isfinite(want).all(), f"{NAMES[tid]} {shape} n={n} seed {seed}"
            assert np.array_equal(got, want, equal_nan=True), \
                f"{NAMES[tid]} {shape} n={n} seed {seed}: nmse {_nmse(got, want)}"


def test_get_rows_activation_and_clamp(cp, qo):
    rng = np.random.default_rng()
    for C in (64, 37):
        a = rng.standard_normal((11, C)).astype(np.float32)
        ids = np.array([3, 0, 10, 10, -5, 99], np.int32)                # out of range: clamped
        out = cp.full((6, C), cp.nan, cp.float32)
        qo.get_rows(cp.asarray(a), cp.asarray(ids), out)
        np.testing.assert_array_equal(cp.asnumpy(out), a[np.clip(ids, 0, 10)])


def _check_mul_mat(cp, qo, w, ref_w: np.ndarray, tid_name: str, n_list, rng, seed, w_is_array=False):
    M, K = ref_w.shape
    fails = []
    for n in n_list:
        x = rng.standard_normal((n, K)).astype(np.float32)
        ref = x.astype(np.float64) @ ref_w.astype(np.float64).T
        need = qo.mul_mat_scratch_bytes(w, n)
        scratch = cp.empty(max(need, 1), cp.uint8) if need else None
        out = cp.full((n, M), cp.nan, cp.float32)
        qo.mul_mat(w, cp.asarray(x), out, None, scratch)
        got = cp.asnumpy(out)
        kind = qo.plan_mul_mat(w, n, scratch).choice.kind
        thr = DECODE_NMSE if kind in ("mmv", "gemm32") else PREFILL_NMSE
        e = _nmse(got, ref)
        if not e <= thr:
            fails.append(f"{tid_name} {M}x{K} n={n} ({kind}): nmse {e:.3g} > {thr} "
                         f"(unwritten: {int(np.isnan(got).sum())})")
    assert not fails, f"seed {seed}: " + "; ".join(fails)


@pytest.mark.parametrize("tid", TYPES, ids=lambda t: NAMES[t])
def test_mul_mat(cp, qo, tid):
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    for shape in _shapes(tid):
        raw = _random_weight(rng, tid, shape)
        ref_w = dequantize(raw, tid, shape)
        if tid in (1, 30) and not np.isfinite(ref_w).all():
            continue
        w = _upload(qo, tid, raw, shape)
        _check_mul_mat(cp, qo, w, ref_w, NAMES[tid], N_LIST, rng, seed)


def test_mul_mat_activation_matrix(cp, qo):
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    for shape in ((7, 64), (33, 37)):
        a = rng.standard_normal(shape).astype(np.float32)
        _check_mul_mat(cp, qo, cp.asarray(a), a, "f32-act", (1, 4, 9, 64), rng, seed)


def test_mul_mat_variants(cp, qo):
    """Every compiled GEMV variant (N, R) and warp count is right, not only the default ones."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    fails = []
    for tid in TYPES:
        shape = (67, 512) if get_format(tid).block_elems in (1, 256) else (67, 576)
        raw = _random_weight(rng, tid, shape)
        ref_w = dequantize(raw, tid, shape).astype(np.float64)
        if not np.isfinite(ref_w).all():
            continue
        w = _upload(qo, tid, raw, shape)
        variants = qo._MAIN_VARIANTS if tid in qo._MAIN_TYPES else qo._VARIANTS
        for (N, R) in variants:
            for warps in (1, 3, 8):
                n = max(1, N - 1) if N > 2 else N
                x = rng.standard_normal((n, shape[1])).astype(np.float32)
                out = cp.full((n, shape[0]), cp.nan, cp.float32)
                qo.plan_mul_mat(w, n, variant=(N, R), warps=warps)(cp.asarray(x), out)
                e = _nmse(cp.asnumpy(out), x @ ref_w.T)
                if not e <= DECODE_NMSE:
                    fails.append(f"{NAMES[tid]} N={N} R={R} warps={warps} n={n}: {e:.3g}")
    assert not fails, f"seed {seed}: " + "; ".join(fails)


def test_scratch_required(cp, qo):
    rng = np.random.default_rng()
    raw = _random_weight(rng, 2, (64, 256))
    w = _upload(qo, 2, raw, (64, 256))
    assert qo.mul_mat_scratch_bytes(w, 1) == 0
    need = qo.mul_mat_scratch_bytes(w, 64)
    assert need >= 64 * 256 * 2 * 2
    x = cp.zeros((64, 256), cp.float32)
    out = cp.zeros((64, 64), cp.float32)
    with pytest.raises(ValueError):
        qo.mul_mat(w, x, out, None, None)
    with pytest.raises(ValueError):
        qo.mul_mat(w, x, out, None, cp.empty(need - 256, cp.uint8))


@pytest.mark.parametrize("tid,n", [(2, 1), (12, 1), (8, 3), (14, 1), (3, 17)],
                         ids=["Q4_0-n1", "Q4_K-n1", "Q8_0-n3", "Q6_K-n1", "Q4_1-n17-prefill"])
def test_cuda_graph_capture(cp, qo, tid, n):
    """mul_mat bound to its buffers, captured into a CUDA graph, replayed with new x."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    shape = (300, 1024)
    raw = _random_weight(rng, tid, shape)
    ref_w = dequantize(raw, tid, shape).astype(np.float64)
    w = _upload(qo, tid, raw, shape)
    stream = cp.cuda.Stream(non_blocking=True)
    need = qo.mul_mat_scratch_bytes(w, n)
    scratch = cp.empty(need, cp.uint8) if need else None
    x = cp.empty((n, shape[1]), cp.float32)
    out = cp.empty((n, shape[0]), cp.float32)
    run = qo.plan_mul_mat(w, n, scratch).bind(x, out, stream)
    with stream:
        x.set(rng.standard_normal(x.shape).astype(np.float32))
        run()                                                # warm-up outside the capture
    stream.synchronize()
    stream.begin_capture()
    run()
    graph = stream.end_capture()
    thr = DECODE_NMSE if n <= 8 else PREFILL_NMSE
    for _ in range(3):
        xh = rng.standard_normal(x.shape).astype(np.float32)
        with stream:
            x.set(xh)
            out.fill(cp.nan)
            graph.launch(stream)
        stream.synchronize()
        e = _nmse(cp.asnumpy(out), xh.astype(np.float64) @ ref_w.T)
        assert e <= thr, f"{NAMES[tid]} n={n} seed {seed}: replay nmse {e:.3g}"


# -- grouped GEMV (plan_mul_mat_group): several weights of one x in one launch ----------------

def _rope_ref(y: np.ndarray, pos: np.ndarray, d: int, n_rot: int, base: float, fs: float) -> np.ndarray:
    """ops.rope (normal mode) of y (n, M) viewed as (n, M/d, d), ggml's float32 angles (as
    elementwise.cu and the NumPy backend compute them), rotation in float64."""
    from ggml_py.cuda.elementwise_ops import rope_theta_scale
    ts = rope_theta_scale(base, n_rot)
    n = y.shape[0]
    theta = pos.astype(np.float32)
    ang = np.empty((n, n_rot // 2), np.float32)
    for i in range(n_rot // 2):
        ang[:, i] = theta * np.float32(fs)
        theta = theta * ts
    c = np.cos(ang.astype(np.float64)).astype(np.float32).astype(np.float64)[:, None, :]
    s = np.sin(ang.astype(np.float64)).astype(np.float32).astype(np.float64)[:, None, :]
    y3 = y.reshape(n, -1, d).astype(np.float64).copy()
    a, b = y3[..., 0:n_rot:2].copy(), y3[..., 1:n_rot:2].copy()
    y3[..., 0:n_rot:2], y3[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    return y3.reshape(y.shape)


GROUP_TYPES_T = [2, 3, 6, 8, 12, 14]                          # the types with grouped kernels


@pytest.mark.parametrize("tid", GROUP_TYPES_T, ids=lambda t: NAMES[t])
def test_mul_mat_group(cp, qo, tid):
    """q/k/v-like groups (2 and 3 weights, odd row counts, ropes with all or part of the head
    rotating), gate/up + swiglu/geglu, the rms_norm prologue and the residual epilogue, for every
    n of the decode path, poisoned outputs."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    K = 512 if get_format(tid).block_elems == 256 else 576
    d = 64
    fails = []

    def weights(rows):
        raws = [_random_weight(rng, tid, (M, K)) for M in rows]
        return ([_upload(qo, tid, r, (M, K)) for r, M in zip(raws, rows)],
                [dequantize(r, tid, (M, K)).astype(np.float64) for r, M in zip(raws, rows)])

    for n in (1, 2, 3, 5, 8):
        x = rng.standard_normal((n, K)).astype(np.float32)
        xd = cp.asarray(x)
        x64 = x.astype(np.float64)
        pos = rng.integers(0, 5000, n).astype(np.int32)
        # groups: plain (odd rows), q/k/v with ropes on q and k, two with a partial rope on the second
        for rows, rope in [((67, 130, 3), None), ((576, 192, 192), {"members": (0, 1), "n_rot": 64}),
                           ((128, 320), {"members": (1,), "n_rot": 16})]:
            ws, refs = weights(rows)
            spec = None if rope is None else dict(rope, head_dim=d, base=100000.0, freq_scale=0.5)
            gp = qo.plan_mul_mat_group(ws, n, rope=spec)
            assert gp is not None, (NAMES[tid], n, rows)
            outs = [cp.full((n, M), cp.nan, cp.float32) for M in rows]
            gp.bind(xd, outs, None, pos=cp.asarray(pos) if spec else None)()
            for g, (o, w) in enumerate(zip(outs, refs)):
                want = x64 @ w.T
                if spec and g in spec["members"]:
                    want = _rope_ref(want, pos, d, spec["n_rot"], spec["base"], spec["freq_scale"])
                e = _nmse(cp.asnumpy(o), want)
                if not e <= DECODE_NMSE:
                    fails.append(f"{NAMES[tid]} n={n} rows={rows} rope={rope} member {g}: {e:.3g}")
        # the rms_norm prologue (with and without a weight; with a glu and with ropes) ...
        xn = x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + 1e-5)
        nw = rng.uniform(0.5, 1.5, K).astype(np.float32)
        for rows, use_w, rope in [((67, 130, 3), True, None), ((576, 192, 192), False, {"members": (0, 1), "n_rot": 64})]:
            ws, refs = weights(rows)
            spec = None if rope is None else dict(rope, head_dim=d, base=100000.0, freq_scale=1.0)
            gp = qo.plan_mul_mat_group(ws, n, rope=spec, norm=1e-5)
            outs = [cp.full((n, M), cp.nan, cp.float32) for M in rows]
            gp.bind(xd, outs, None, pos=cp.asarray(pos) if spec else None,
                    norm_w=cp.asarray(nw) if use_w else None)()
            h = xn * nw if use_w else xn
            for g, (o, w) in enumerate(zip(outs, refs)):
                want = h @ w.T
                if spec and g in spec["members"]:
                    want = _rope_ref(want, pos, d, spec["n_rot"], spec["base"], spec["freq_scale"])
                e = _nmse(cp.asnumpy(o), want)
                if not e <= DECODE_NMSE:
                    fails.append(f"{NAMES[tid]} n={n} norm rows={rows} member {g}: {e:.3g}")
        # ... and the residual epilogue: into another buffer and over the residual itself
        ws, refs = weights((75,))
        res = rng.standard_normal((n, 75)).astype(np.float32)
        gp = qo.plan_mul_mat_group(ws, n, residual=True)
        for inplace in (False, True):
            rd = cp.asarray(res)
            out = rd if inplace else cp.full((n, 75), cp.nan, cp.float32)
            gp.bind(xd, [out], None, resid=rd)()
            e = _nmse(cp.asnumpy(out), x64 @ refs[0].T + res)
            if not e <= DECODE_NMSE:
                fails.append(f"{NAMES[tid]} n={n} residual inplace={inplace}: {e:.3g}")
        for glu in ("swiglu", "geglu"):
            for M in (1536, 77):
                ws, refs = weights((M, M))
                normed = M == 77                       # the small one with the norm prologue
                gp = qo.plan_mul_mat_group(ws, n, glu=glu, norm=1e-5 if normed else None)
                out = cp.full((n, M), cp.nan, cp.float32)
                gp.bind(xd, [out], None, norm_w=cp.asarray(nw) if normed else None)()
                xx = xn * nw if normed else x64
                gt, up = xx @ refs[0].T, xx @ refs[1].T
                act = gt / (1 + np.exp(-gt)) if glu == "swiglu" else \
                    0.5 * gt * (1 + np.tanh(np.sqrt(2 / np.pi) * gt * (1 + 0.044715 * gt * gt)))
                e = _nmse(cp.asnumpy(out), act * up)
                if not e <= DECODE_NMSE:
                    fails.append(f"{NAMES[tid]} n={n} {glu} M={M}: {e:.3g}")
    assert not fails, f"seed {seed}: " + "; ".join(fails)


def test_mul_mat_group_refusals(cp, qo):
    """None (the caller runs the mul_mats one by one) where no grouped kernel fits."""
    rng = np.random.default_rng()
    up = lambda tid, M, K: _upload(qo, tid, _random_weight(rng, tid, (M, K)), (M, K))
    a, b = up(3, 64, 256), up(3, 32, 256)
    assert qo.plan_mul_mat_group([a, b], 1) is not None
    assert qo.plan_mul_mat_group([a, b], 9) is None                       # prefill
    assert qo.plan_mul_mat_group([a, up(2, 32, 256)], 1) is None           # mixed types
    assert qo.plan_mul_mat_group([a, up(3, 32, 512)], 1) is None           # mixed K
    assert qo.plan_mul_mat_group([up(7, 64, 256), up(7, 32, 256)], 1) is None   # Q5_1: no kernels
    assert qo.plan_mul_mat_group([a, b, a, b], 1) is None                  # more than GROUP_MAX
    assert qo.plan_mul_mat_group([a, b], 1, glu="swiglu") is None          # gate/up shapes differ
    assert qo.plan_mul_mat_group([a, b], 1, rope={"members": (1,), "head_dim": 48, "n_rot": 48,
                                                  "base": 1e4, "freq_scale": 1.0}) is None   # 32 % 48
    assert qo.plan_mul_mat_group([a], 1) is None                           # one weight: only with a residual
    assert qo.plan_mul_mat_group([a], 1, residual=True) is not None
    assert qo.plan_mul_mat_group([a, b], 1, residual=True) is None
    big = up(3, 32, 8192)
    assert qo.plan_mul_mat_group([big, big], 8, norm=1e-5) is not None    # the norm: any K
    assert qo.plan_mul_mat_group([big, big], 1, max_weight_bytes=big.nbytes - 1) is None   # too big to group


def test_mul_mat_group_graph_capture(cp, qo):
    """A grouped launch with ropes bound to its buffers, captured and replayed with new x and positions."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    K, rows, d = 576, (576, 192, 192), 64
    raws = [_random_weight(rng, 3, (M, K)) for M in rows]
    ws = [_upload(qo, 3, r, (M, K)) for r, M in zip(raws, rows)]
    refs = [dequantize(r, 3, (M, K)).astype(np.float64) for r, M in zip(raws, rows)]
    spec = {"members": (0, 1), "head_dim": d, "n_rot": d, "base": 100000.0, "freq_scale": 1.0}
    stream = cp.cuda.Stream(non_blocking=True)
    x, pos = cp.empty((1, K), cp.float32), cp.zeros(1, cp.int32)
    outs = [cp.empty((1, M), cp.float32) for M in rows]
    run = qo.plan_mul_mat_group(ws, 1, rope=spec).bind(x, outs, stream, pos=pos)
    with stream:
        run()
    stream.synchronize()
    stream.begin_capture()
    run()
    graph = stream.end_capture()
    for step in range(3):
        xh = rng.standard_normal((1, K)).astype(np.float32)
        ph = np.array([17 + 1000 * step], np.int32)
        with stream:
            x.set(xh)
            pos.set(ph)
            for o in outs:
                o.fill(cp.nan)
            graph.launch(stream)
        stream.synchronize()
        for g, (o, w) in enumerate(zip(outs, refs)):
            want = xh.astype(np.float64) @ w.T
            if g < 2:
                want = _rope_ref(want, ph, d, d, 100000.0, 1.0)
            e = _nmse(cp.asnumpy(o), want)
            assert e <= DECODE_NMSE, f"seed {seed} step {step} member {g}: {e:.3g}"


def test_mul_mat_group_size_caps():
    """No GPU needed: the byte caps refuse before any kernel is looked up."""
    from ggml_py.cuda import quant_ops as qo
    W = lambda M, K: qo.DeviceWeight(3, (M, K), None, tensor_nbytes(3, (M, K)))
    big = W(14336, 4096)                                        # 33 MB of Q4_1
    assert big.nbytes > qo.GROUP_MAX_WEIGHT_BYTES
    assert qo.plan_mul_mat_group([big, big], 1, glu="swiglu") is None
    assert qo.plan_mul_mat_group([big], 1, residual=True) is None
    q, kv = W(4096, 4096), W(1024, 4096)                        # 14 MB together: grouped, not normed
    assert sum(w.nbytes for w in (q, kv, kv)) > qo.NORM_FUSE_MAX_BYTES
    assert qo.plan_mul_mat_group([q, kv, kv], 1, norm=1e-5) is None
