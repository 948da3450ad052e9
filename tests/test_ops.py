"""Every op of ``ggml_py.ops`` on the NumPy backend against a direct NumPy formula.

Each expectation here is written from the op's docstring, in float64, without
calling backend code; results are compared with ggml test-backend-ops'
normalised MSE, ``nmse = sum((a - b)^2) / sum(b^2)``: 1e-7 for float32 math,
5e-4 where f16 KV storage rounds the keys and values (a NaN always fails).

How to add an op: add its constructor to ``ggml_py/ops.py``, implement it in
``NumpyBackend`` (and ``supports``), then add a case here with the formula
written out independently.
"""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from engine.errors import GGFlatError, UnknownTypeError
from ggml_py import Graph, WeightSource, ops
from ggml_py import backend_numpy
from ggml_py.backend_numpy import NumpyBackend, NumpyKVStorage
from ggml_py.graph import Tensor
from kvcache import KVCacheSpec
from tests.conftest import nmse

Q = gguf.GGMLQuantizationType
F32_TOL = 1e-7
F16_KV_TOL = 5e-4


def assert_close(a, b, tol=F32_TOL):
    e = nmse(a, b)
    assert e <= tol, f"nmse {e:.3g} > {tol:.1g}"


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def weight_source(name: str, data: np.ndarray, qtype: Q) -> tuple[WeightSource, np.ndarray]:
    """A WeightSource holding ``data`` quantized to ``qtype``, and its dequantized f64 value."""
    q = gguf.quants.quantize(data, qtype)
    raw = np.ascontiguousarray(q).reshape(-1).view(np.uint8)
    deq = gguf.quants.dequantize(q, qtype).astype(np.float64).reshape(data.shape)
    return WeightSource(name, int(qtype), data.shape, raw), deq


def f32_source(name: str, data: np.ndarray) -> WeightSource:
    return WeightSource(name, int(Q.F32), data.shape, np.ascontiguousarray(data, np.float32).reshape(-1).view(np.uint8))


def run1(g: Graph, inputs: dict, weights: dict | None = None, kv=None, backend=None) -> dict:
    be = backend or NumpyBackend()
    if weights:
        be.load_weights(weights)
    return be.run(be.plan(g), inputs, kv)


# -- elementwise -----------------------------------------------------------------------------

def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


UNARY = {
    "silu": (ops.silu, lambda x: x * _sig(x)),
    "gelu": (ops.gelu, _gelu),
    "scale": (lambda t: ops.scale(t, -0.37), lambda x: -0.37 * x),
}


@pytest.mark.parametrize("shape", [(1, 576), (7, 33), (3, 5, 17), (1,)])
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, shape):
    rng = np.random.default_rng(1)
    op, ref = UNARY[name]
    x = rand(rng, *shape, scale=3.0)
    if x.size > 1:
        x.reshape(-1)[0] = -120.0                    # exp(-x) overflows: silu must give -0, not NaN
    g = Graph()
    g.output("y", op(g.input("x", shape)))
    y = run1(g, {"x": x})["y"]
    assert y.dtype == np.float32 and y.shape == shape
    assert_close(y, ref(x.astype(np.float64)))


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(1, 1536), (5, 67)])
def test_glu(name, shape):
    rng = np.random.default_rng(2)
    gate, up = rand(rng, *shape, scale=2.0), rand(rng, *shape)
    g = Graph()
    op = ops.swiglu if name == "swiglu" else ops.geglu
    g.output("y", op(g.input("g", shape), g.input("u", shape)))
    y = run1(g, {"g": gate, "u": up})["y"]
    g64, u64 = gate.astype(np.float64), up.astype(np.float64)
    act = g64 * _sig(g64) if name == "swiglu" else _gelu(g64)
    assert_close(y, act * u64)


@pytest.mark.parametrize("a_shape,b_shape", [((5, 7), (5, 7)), ((5, 7), (7,)), ((5, 7), (5, 1)),
                                             ((3, 4, 9), (4, 9)), ((3, 4, 9), (1, 4, 1)), ((2, 3), (1,))])
def test_add_mul_broadcast(a_shape, b_shape):
    rng = np.random.default_rng(3)
    a, b = rand(rng, *a_shape), rand(rng, *b_shape)
    g = Graph()
    ta, tb = g.input("a", a_shape), g.input("b", b_shape)
    g.output("s", ops.add(ta, tb))
    g.output("p", ops.mul(ta, tb))
    out = run1(g, {"a": a, "b": b})
    assert_close(out["s"], a.astype(np.float64) + b)
    assert_close(out["p"], a.astype(np.float64) * b)


def test_add_mul_weight_operand():
    rng = np.random.default_rng(4)
    x, bias, w = rand(rng, 6, 10), rand(rng, 10), rand(rng, 10)
    g = Graph()
    y = ops.mul(ops.add(g.input("x", (6, 10)), g.weight("bias", (10,), "F32")), g.weight("w", (10,), "F32"))
    g.output("y", y)
    out = run1(g, {"x": x}, {"bias": f32_source("bias", bias), "w": f32_source("w", w)})
    assert_close(out["y"], (x.astype(np.float64) + bias) * w)


def test_f16_input_is_rounded():
    x = np.array([[1.0001, 3.14159265, 65519.0, 1e-8]], np.float64)
    g = Graph()
    g.output("y", ops.scale(g.input("x", (1, 4), "f16"), 1.0))
    y = run1(g, {"x": x})["y"]
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))


# -- reshape ---------------------------------------------------------------------------------

def test_reshape_is_a_free_view():
    rng = np.random.default_rng(5)
    x = rand(rng, 4, 6)
    g = Graph()
    r = ops.reshape(ops.reshape(g.input("x", (4, 6)), (2, 3, 4)), (24,))
    g.output("r", r)
    g.output("s", ops.scale(ops.reshape(g.input("y", (4, 6)), (8, 3)), 2.0))
    be = NumpyBackend()
    plan = be.plan(g)
    assert not any(t.op == "reshape" for t in plan.step_node), "reshape must not cost a step at run time"
    out = be.run(plan, {"x": x, "y": x})
    np.testing.assert_array_equal(out["r"], x.reshape(24))
    np.testing.assert_array_equal(out["s"], 2 * x.reshape(8, 3))


# -- normalisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 576), (7, 33), (3, 4, 16), (2, 1)])
@pytest.mark.parametrize("with_w", [False, True])
def test_rms_norm(shape, with_w):
    rng = np.random.default_rng(6)
    x = rand(rng, *shape, scale=5.0)
    w = rand(rng, shape[-1])
    eps = 1e-6
    g = Graph()
    wt = g.weight("w", (shape[-1],), "F32") if with_w else None
    g.output("y", ops.rms_norm(g.input("x", shape), eps, wt))
    y = run1(g, {"x": x}, {"w": f32_source("w", w)} if with_w else None)["y"]
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    if with_w:
        ref = ref * w
    assert_close(y, ref)


def test_rms_norm_eps_matters_for_zero_rows():
    g = Graph()
    g.output("y", ops.rms_norm(g.input("x", (2, 8)), 1e-5))
    x = np.zeros((2, 8), np.float32)
    x[1] = 1e-3
    y = run1(g, {"x": x})["y"]
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_allclose(y[1], 1e-3 / np.sqrt(1e-6 + 1e-5), rtol=1e-6)


# -- soft_max ----------------------------------------------------------------------------------------

def _softmax64(z):
    z = np.asarray(z, np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


@pytest.mark.parametrize("shape,mask_shape", [((5, 11), None), ((1, 49), None), ((5, 11), (5, 11)),
                                              ((3, 6, 13), (6, 13)), ((2, 4, 9), (1, 9))])
def test_soft_max(shape, mask_shape):
    rng = np.random.default_rng(7)
    x = rand(rng, *shape, scale=4.0)
    g = Graph()
    mask_t = g.input("m", mask_shape) if mask_shape else None
    g.output("y", ops.soft_max(g.input("x", shape), mask_t, scale=0.7))
    inputs = {"x": x}
    z = 0.7 * x.astype(np.float64)
    if mask_shape:
        m = np.where(rng.random(mask_shape) < 0.3, -np.inf, 0.0).astype(np.float32)
        m[..., 0] = 0.0
        inputs["m"] = m
        z = z + m
    y = run1(g, inputs)["y"]
    assert_close(y, _softmax64(z))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)


def test_soft_max_all_masked_row_is_zero():
    g = Graph()
    g.output("y", ops.soft_max(g.input("x", (3, 4)), g.input("m", (3, 4))))
    m = np.zeros((3, 4), np.float32)
    m[1] = -np.inf
    y = run1(g, {"x": np.ones((3, 4), np.float32), "m": m})["y"]
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[1], 0)
    np.testing.assert_allclose(y[0], 0.25, rtol=1e-6)


# -- get_rows and mul_mat from weights of several ggml types ------------------------------------

QTYPES = [Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q8_0]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_get_rows_and_mul_mat_from_weight(qtype):
    rng = np.random.default_rng(8)
    R, C, n = 37, 96, 5
    data = rand(rng, R, C)
    ws, deq = weight_source("w", data, qtype)
    ids = np.array([3, 0, 36, 3, 17], np.int32)
    x = rand(rng, n, C)
    g = Graph()
    w = g.weight("w", (R, C), qtype.name)
    g.output("rows", ops.get_rows(w, g.input("ids", (n,), "i32")))
    g.output("mm", ops.mul_mat(w, g.input("x", (n, C))))
    be = NumpyBackend()
    out = run1(g, {"ids": ids, "x": x}, {"w": ws}, backend=be)
    assert_close(out["rows"], deq[ids], 1e-12)            # dequantization is exact arithmetic
    assert_close(out["mm"], x.astype(np.float64) @ deq.T)
    assert be.weight_nbytes() == R * C * 4


def test_mul_mat_and_get_rows_of_activations():
    rng = np.random.default_rng(9)
    a, x = rand(rng, 13, 40), rand(rng, 3, 40)
    ids = np.array([12, 1, 1, 0], np.int32)
    g = Graph()
    ta = g.input("a", (13, 40))
    g.output("mm", ops.mul_mat(ta, g.input("x", (3, 40))))
    g.output("rows", ops.get_rows(ta, g.input("ids", (4,), "i32")))
    out = run1(g, {"a": a, "x": x, "ids": ids})
    assert_close(out["mm"], x.astype(np.float64) @ a.astype(np.float64).T)
    np.testing.assert_array_equal(out["rows"], a[ids])


def test_mul_mat_single_row_and_odd_sizes():
    rng = np.random.default_rng(10)
    for n, M, K in [(1, 1, 1), (1, 333, 65), (9, 5, 1000)]:
        w, x = rand(rng, M, K), rand(rng, n, K)
        g = Graph()
        g.output("y", ops.mul_mat(g.weight("w", (M, K), "F32"), g.input("x", (n, K))))
        y = run1(g, {"x": x}, {"w": f32_source("w", w)})["y"]
        assert_close(y, x.astype(np.float64) @ w.astype(np.float64).T)


def test_tied_embedding_is_stored_once():
    rng = np.random.default_rng(11)
    V, d = 50, 32
    ws, deq = weight_source("tok", rand(rng, V, d), Q.Q8_0)
    g = Graph()
    emb = g.weight("tok", (V, d), "Q8_0")
    x = ops.get_rows(emb, g.input("ids", (2,), "i32"))
    g.output("logits", ops.mul_mat(g.weight("tok", (V, d), "Q8_0"), x))
    be = NumpyBackend()
    out = run1(g, {"ids": np.array([4, 49], np.int32)}, {"tok": ws}, backend=be)
    assert be.weight_nbytes() == V * d * 4
    assert_close(out["logits"], deq[[4, 49]] @ deq.T)


def test_bad_weights_are_named():
    be = NumpyBackend()
    short = np.zeros(10, np.uint8)                                  # Q8_0 (4, 32) needs 4 * 34 bytes
    with pytest.raises(GGFlatError, match="blk.3.ffn_up.weight"):
        be.load_weights({"blk.3.ffn_up.weight": WeightSource("blk.3.ffn_up.weight", int(Q.Q8_0), (4, 32), short)})
    with pytest.raises(UnknownTypeError, match="'odd'"):
        be.load_weights({"odd": WeightSource("odd", 9999, (4, 32), short)})
    g = Graph()
    g.output("y", ops.mul_mat(g.weight("w", (3, 32), "F32"), g.input("x", (1, 32))))
    be.load_weights({"w": f32_source("w", np.zeros((4, 32), np.float32))})
    with pytest.raises(ValueError, match="'w'"):                    # the graph wants another shape
        be.plan(g)


def test_get_rows_id_out_of_range():
    g = Graph()
    g.output("y", ops.get_rows(g.input("a", (4, 3)), g.input("ids", (2,), "i32")))
    be = NumpyBackend()
    plan = be.plan(g)
    for bad in (4, -1):
        with pytest.raises(ValueError, match="outside"):
            be.run(plan, {"a": np.zeros((4, 3)), "ids": np.array([0, bad])})


# -- rope ---------------------------------------------------------------------------------------

def _rope_ref(x, pos, n_rot, base, freq_scale, mode):
    """Textbook RoPE in float64: theta(p, i) = p * freq_scale * base^(-2i/n_rot)."""
    x = x.astype(np.float64)
    y = x.copy()
    half = n_rot // 2
    i = np.arange(half)
    theta = pos[:, None].astype(np.float64) * freq_scale * base ** (-2.0 * i / n_rot)   # (n, half)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if mode == ops.ROPE_NORMAL:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        y[..., 0:n_rot:2], y[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:n_rot]
        y[..., :half], y[..., half:n_rot] = a * c - b * s, a * s + b * c
    return y


def _rope_graph(n, H, d, n_rot, base, fs, mode):
    g = Graph()
    g.output("y", ops.rope(g.input("x", (n, H, d)), g.input("pos", (n,), "i32"), n_rot, base, fs, mode))
    return g


@pytest.mark.parametrize("mode", [ops.ROPE_NORMAL, ops.ROPE_NEOX])
@pytest.mark.parametrize("n,H,d,n_rot,base,fs", [(5, 3, 64, 64, 10000.0, 1.0), (4, 2, 16, 8, 10000.0, 1.0),
                                                  (3, 4, 10, 6, 1e6, 0.25), (1, 9, 64, 64, 100000.0, 1.0)])
def test_rope(mode, n, H, d, n_rot, base, fs):
    rng = np.random.default_rng(12)
    x = rand(rng, n, H, d)
    pos = rng.integers(0, 300, n).astype(np.int32)
    y = run1(_rope_graph(n, H, d, n_rot, base, fs, mode), {"x": x, "pos": pos})["y"]
    assert_close(y, _rope_ref(x, pos, n_rot, base, fs, mode))
    np.testing.assert_array_equal(y[..., n_rot:], x[..., n_rot:])   # the rest passes untouched


def test_rope_follows_ggml_float32_angles_at_large_positions():
    """ggml builds theta by repeated float32 multiplication (ggml_rope_cache_init);
    at position 10^5 that differs visibly from the closed form, and we follow ggml."""
    n, H, d, base = 4, 2, 64, 10000.0          # (NumPy's float32 power is 1 ulp off for this pair)
    rng = np.random.default_rng(13)
    x = rand(rng, n, H, d)
    pos = np.array([100000, 65537, 7, 0], np.int32)
    y = run1(_rope_graph(n, H, d, d, base, 1.0, ops.ROPE_NORMAL), {"x": x, "pos": pos})["y"]
    ts = np.float32(float(np.float32(base)) ** float(np.float32(-2.0) / np.float32(d)))   # powf, correctly rounded
    ref = np.empty((n, H, d), np.float64)
    for r in range(n):
        theta = np.float32(pos[r])
        for i in range(d // 2):
            c, s = math.cos(float(theta)), math.sin(float(theta))
            a, b = x[r, :, 2 * i].astype(np.float64), x[r, :, 2 * i + 1].astype(np.float64)
            ref[r, :, 2 * i], ref[r, :, 2 * i + 1] = a * c - b * s, a * s + b * c
            theta = np.float32(theta * ts)
    assert_close(y, ref, 1e-12)


def test_rope_positions_beyond_table_and_negative():
    rng = np.random.default_rng(14)
    x = rand(rng, 3, 1, 8)
    pos = np.array([-3, 2_000_000, 5], np.int32)
    y = run1(_rope_graph(3, 1, 8, 8, 10000.0, 1.0, ops.ROPE_NEOX), {"x": x, "pos": pos})["y"]
    assert_close(y[[0, 2]], _rope_ref(x, pos, 8, 10000.0, 1.0, ops.ROPE_NEOX)[[0, 2]])
    assert np.isfinite(y).all()


# -- KV cache and attention ----------------------------------------------------------------------

def _dense_attention(q, k, v, kpos, qpos, scale, window=0, softcap=0.0):
    """softmax(mask(scale q.k)) v in float64; q (n, H, dk), k (L, Hkv, dk), v (L, Hkv, dv)."""
    n, H, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[2]
    G = H // Hkv
    kk = np.repeat(k.astype(np.float64), G, axis=1)                  # (L, H, dk): head h reads h // G
    vv = np.repeat(v.astype(np.float64), G, axis=1)
    s = scale * np.einsum("nhd,lhd->hnl", q.astype(np.float64), kk)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    visible = kpos[None, :].astype(np.int64) <= qpos[:, None]
    if window:
        visible &= qpos[:, None].astype(np.int64) - kpos[None, :] < window
    s = np.where(visible[None], s, -np.inf)
    p = _softmax64(s)
    return np.einsum("hnl,lhd->nhd", p, vv).reshape(n, H * dv)


def _attn_graph(n, H, Hkv, dk, dv, max_pages, scale, window=0, softcap=0.0, store=True):
    g = Graph()
    q = g.input("q", (n, H, dk))
    kv = g.kv_layer(0, Hkv, dk, dv)
    after = ()
    if store:
        after = (ops.kv_store(kv, g.input("k", (n, Hkv, dk)), g.input("v", (n, Hkv, dv)),
                              g.input("slots", (n,), "i32"), g.input("pos", (n,), "i32")),)
    a = ops.attention(q, kv, g.input("bt", (max_pages,), "i32"), g.input("kv_len", (1,), "i32"),
                      g.input("qpos", (n,), "i32"), scale, window, softcap, after=after)
    g.output("a", a)
    return g


def _scrambled_table(rng, n_pages, max_pages):
    bt = np.zeros(max_pages, np.int32)
    bt[:] = rng.permutation(n_pages)[:max_pages]
    return bt


def _slots(bt, page_size, start, n):
    j = np.arange(start, start + n)
    return (bt[j // page_size] * page_size + j % page_size).astype(np.int32)


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
@pytest.mark.parametrize("Hkv,G", [(2, 1), (3, 3), (1, 4)])
def test_attention_prefill_then_decode(kv_dtype, Hkv, G):
    """Prefill n>1 with the store in the same graph, then decode steps, over a scrambled
    block table of 16-slot pages, kv_len below the table's capacity; vs dense attention."""
    rng = np.random.default_rng(15 + Hkv * G)
    H, dk, dv, P = Hkv * G, 32, 24, 16
    n_pages, max_pages = 12, 8                   # the sequence may use 8 of 12 pages
    spec = KVCacheSpec(1, Hkv, dk, dv, n_pages, P, kv_dtype)
    be = NumpyBackend()
    kv = be.alloc_kv(spec)
    bt = _scrambled_table(rng, n_pages, max_pages)
    scale = 1 / math.sqrt(dk)
    n0, steps = 37, 3                            # 37 prompt tokens span 3 pages, then 3 decode steps
    Ks, Vs = rand(rng, n0 + steps, Hkv, dk), rand(rng, n0 + steps, Hkv, dv)
    rnd = (lambda a: a.astype(np.float16).astype(np.float32)) if kv_dtype == "f16" else (lambda a: a)
    pos = np.arange(n0 + steps, dtype=np.int32)

    prefill = be.plan(_attn_graph(n0, H, Hkv, dk, dv, max_pages, scale))
    decode = be.plan(_attn_graph(1, H, Hkv, dk, dv, max_pages, scale))
    for start, n, plan in [(0, n0, prefill)] + [(n0 + i, 1, decode) for i in range(steps)]:
        q = rand(rng, n, H, dk)
        sl = slice(start, start + n)
        out = be.run(plan, {"q": q, "k": Ks[sl], "v": Vs[sl], "slots": _slots(bt, P, start, n), "pos": pos[sl],
                            "bt": bt, "kv_len": np.array([start + n], np.int32), "qpos": pos[sl]}, kv)["a"]
        L = start + n
        ref = _dense_attention(q, rnd(Ks[:L]), rnd(Vs[:L]), pos[:L], pos[sl], scale)
        assert_close(out, ref, F32_TOL)          # against the rounded K/V the cache holds
        ref_exact = _dense_attention(q, Ks[:L], Vs[:L], pos[:L], pos[sl], scale)
        assert_close(out, ref_exact, F16_KV_TOL if kv_dtype == "f16" else F32_TOL)


def _filled_cache(rng, be, Hkv, dk, dv, n_pages, P, L, kv_dtype, max_pages, kpos=None):
    """A one-layer cache whose sequence holds L tokens (K, V, positions) through a scrambled table."""
    kv = be.alloc_kv(KVCacheSpec(1, Hkv, dk, dv, n_pages, P, kv_dtype))
    bt = _scrambled_table(rng, n_pages, max_pages)
    K, V = rand(rng, L, Hkv, dk), rand(rng, L, Hkv, dv)
    kpos = np.arange(L, dtype=np.int32) if kpos is None else kpos
    sl = _slots(bt, P, 0, L)
    kv.k[0].reshape(-1, Hkv, dk)[sl] = K                              # layout of kvcache.paged
    kv.v[0].reshape(-1, Hkv, dv)[sl] = V
    kv.pos[0].reshape(-1)[sl] = kpos
    dt = np.float16 if kv_dtype == "f16" else np.float32
    return kv, bt, K.astype(dt).astype(np.float32), V.astype(dt).astype(np.float32), kpos


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 20.0), (7, 30.0)])
def test_attention_window_and_softcap(window, softcap):
    rng = np.random.default_rng(16)
    Hkv, G, dk, dv, P, L, n = 2, 4, 16, 16, 16, 45, 45
    be = NumpyBackend()
    kv, bt, K, V, kpos = _filled_cache(rng, be, Hkv, dk, dv, 6, P, L, "f32", 4)
    q = rand(rng, n, Hkv * G, dk, scale=3.0)                          # large scores so softcap bites
    g = _attn_graph(n, Hkv * G, Hkv, dk, dv, 4, 0.5, window, softcap, store=False)
    out = run1(g, {"q": q, "bt": bt, "kv_len": np.array([L], np.int32), "qpos": kpos}, kv=kv, backend=be)["a"]
    assert_close(out, _dense_attention(q, K, V, kpos, kpos, 0.5, window, softcap))


@pytest.mark.parametrize("block", [None, 1])
def test_attention_masks_by_stored_position(monkeypatch, block):
    """Slots need not be in position order (eviction reorders them); a query that sees
    nothing gets zeros (alone in its query block, too); unwritten slots inside kv_len
    are never visible."""
    if block:
        monkeypatch.setattr(backend_numpy, "_ATTN_BLOCK", block)
    rng = np.random.default_rng(17)
    Hkv, G, dk, dv, P, L = 1, 3, 8, 8, 16, 20
    kpos = rng.permutation(np.arange(10, 30)).astype(np.int32)
    be = NumpyBackend()
    kv, bt, K, V, _ = _filled_cache(rng, be, Hkv, dk, dv, 4, P, L, "f16", 3, kpos)
    qpos = np.array([5, 10, 19, 29, 1000], np.int32)
    q = rand(rng, 5, Hkv * G, dk)
    g = _attn_graph(5, Hkv * G, Hkv, dk, dv, 3, 0.3, store=False)
    plan = be.plan(g)
    out = be.run(plan, {"q": q, "bt": bt, "kv_len": np.array([L], np.int32), "qpos": qpos}, kv)["a"]
    np.testing.assert_array_equal(out[0], 0)                          # position 5 precedes every key
    assert_close(out, _dense_attention(q, K, V, kpos, qpos, 0.3), 1e-7)
    # two more slots exist in the table's pages but were never written: kv_len may cover them
    out2 = be.run(plan, {"q": q, "bt": bt, "kv_len": np.array([L + 2], np.int32), "qpos": qpos}, kv)["a"]
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
def test_attention_query_blocks(monkeypatch, kv_dtype):
    """Long prefills are processed in query blocks; the blocks must agree with one pass."""
    monkeypatch.setattr(backend_numpy, "_ATTN_BLOCK", 2000)
    rng = np.random.default_rng(18)
    Hkv, G, dk, dv, P, L = 3, 3, 16, 8, 16, 70
    be = NumpyBackend()
    kv, bt, K, V, kpos = _filled_cache(rng, be, Hkv, dk, dv, 8, P, L, kv_dtype, 5)
    q = rand(rng, L, Hkv * G, dk)
    g = _attn_graph(L, Hkv * G, Hkv, dk, dv, 5, 0.25, window=9, store=False)
    out = run1(g, {"q": q, "bt": bt, "kv_len": np.array([L], np.int32), "qpos": kpos}, kv=kv, backend=be)["a"]
    assert_close(out, _dense_attention(q, K, V, kpos, kpos, 0.25, 9))


def test_attention_empty_and_bad_kv_len():
    rng = np.random.default_rng(19)
    be = NumpyBackend()
    kv, bt, *_ = _filled_cache(rng, be, 1, 4, 4, 2, 16, 3, "f32", 2)
    plan = be.plan(_attn_graph(1, 2, 1, 4, 4, 2, 1.0, store=False))
    inp = {"q": rand(rng, 1, 2, 4), "bt": bt, "kv_len": np.array([0], np.int32), "qpos": np.array([3], np.int32)}
    np.testing.assert_array_equal(be.run(plan, inp, kv)["a"], 0)
    with pytest.raises(ValueError, match="kv_len"):
        be.run(plan, dict(inp, kv_len=np.array([33], np.int32)), kv)
    with pytest.raises(ValueError, match="page"):
        be.run(plan, dict(inp, kv_len=np.array([3], np.int32), bt=np.array([7, 0], np.int32)), kv)


def test_kv_store_layout_and_dtype():
    rng = np.random.default_rng(20)
    Hkv, dk, dv, P = 2, 4, 3, 4
    be = NumpyBackend()
    spec = KVCacheSpec(2, Hkv, dk, dv, 5, P, "f16")
    kv = be.alloc_kv(spec)
    assert isinstance(kv, NumpyKVStorage) and len(kv.k) == 2
    assert kv.k[1].shape == (5, P, Hkv, dk) and kv.k[1].dtype == np.float16
    assert kv.v[1].shape == (5, P, Hkv, dv) and kv.pos[1].shape == (5, P) and kv.pos[1].dtype == np.int32
    n = 3
    g = Graph()
    layer = g.kv_layer(1, Hkv, dk, dv)
    ops.kv_store(layer, g.input("k", (n, Hkv, dk)), g.input("v", (n, Hkv, dv)), g.input("slots", (n,), "i32"),
                 g.input("pos", (n,), "i32"))                       # a side effect: live without an output
    k, v = rand(rng, n, Hkv, dk), rand(rng, n, Hkv, dv)
    slots = np.array([19, 0, 6], np.int32)
    run1(g, {"k": k, "v": v, "slots": slots, "pos": np.array([7, 8, 9], np.int32)}, kv=kv, backend=be)
    for i, s in enumerate(slots):
        np.testing.assert_array_equal(kv.k[1][s // P, s % P], k[i].astype(np.float16))
        np.testing.assert_array_equal(kv.v[1][s // P, s % P], v[i].astype(np.float16))
        assert kv.pos[1][s // P, s % P] == 7 + i
    assert not kv.k[0].any()                                        # the other layer is untouched
    with pytest.raises(ValueError, match="slot"):
        run1(g, {"k": k, "v": v, "slots": np.array([20, 0, 1]), "pos": np.zeros(3, np.int32)}, kv=kv, backend=be)


def test_f16_bit_conversion_is_exact():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out, tmp = np.empty(h.shape, np.float32), np.empty(h.shape, np.int32)
    backend_numpy._f16_to_f32_bits(h, out, tmp)                     # inf/nan present: the slow path
    ref = h.astype(np.float32)
    np.testing.assert_array_equal(out.view(np.int32), ref.view(np.int32))
    finite = h[np.isfinite(h)]
    out, tmp = np.empty(finite.shape, np.float32), np.empty(finite.shape, np.int32)
    backend_numpy._f16_to_f32_bits(finite, out, tmp)                # the bit trick
    np.testing.assert_array_equal(out.view(np.int32), finite.astype(np.float32).view(np.int32))


# -- plans are reusable ----------------------------------------------------------------------

def _block_graph(n, d, H, f):
    g = Graph()
    x = g.input("x", (n, d))
    pos = g.input("pos", (n,), "i32")
    h = ops.rms_norm(x, 1e-5, g.weight("n", (d,), "F32"))
    q = ops.rope(ops.reshape(ops.mul_mat(g.weight("wq", (d, d), "Q8_0"), h), (n, H, d // H)), pos, d // H, 10000.0)
    x = ops.add(ops.reshape(q, (n, d)), x)
    u = ops.mul_mat(g.weight("wu", (f, d), "F16"), x)
    y = ops.add(ops.mul_mat(g.weight("wd", (d, f), "Q4_0"), ops.swiglu(ops.scale(u, 0.5), u)), x)
    g.output("y", y)
    g.output("h", h)                                                # an early value kept to the end
    return g


def _block_ref(x, pos, w, d, H):
    x = x.astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * w["n"]
    q = _rope_ref((h @ w["wq"].T).reshape(len(x), H, d // H), pos, d // H, 10000.0, 1.0, ops.ROPE_NORMAL)
    x = q.reshape(len(x), d) + x
    u = x @ w["wu"].T
    gte = 0.5 * u
    return (gte * _sig(gte) * u) @ w["wd"].T + x, h


def test_plan_once_run_many_fresh_results():
    rng = np.random.default_rng(21)
    n, d, H, f = 6, 64, 4, 96
    srcs, w = {}, {}
    for name, shape, qt in [("n", (d,), Q.F32), ("wq", (d, d), Q.Q8_0), ("wu", (f, d), Q.F16), ("wd", (d, f), Q.Q4_0)]:
        srcs[name], w[name] = weight_source(name, rand(rng, *shape, scale=0.2), qt)
    be = NumpyBackend()
    be.load_weights(srcs)
    plan = be.plan(_block_graph(n, d, H, f))
    runs = [(rand(rng, n, d), rng.integers(0, 50, n).astype(np.int32)) for _ in range(3)]
    kept = []
    for x, pos in runs + runs[:1]:
        out = be.run(plan, {"x": x, "pos": pos})
        y_ref, h_ref = _block_ref(x, pos, w, d, H)
        assert_close(out["y"], y_ref)
        assert_close(out["h"], h_ref)
        kept.append(out)
    np.testing.assert_array_equal(kept[0]["y"], kept[3]["y"])        # same inputs, same bits
    assert not np.array_equal(kept[0]["y"], kept[1]["y"])
    kept[1]["y"][:] = 0                                              # outputs are the caller's copies
    assert_close(be.run(plan, {"x": runs[0][0], "pos": runs[0][1]})["y"], kept[0]["y"], 0)


def test_buffer_reuse_in_a_long_chain():
    """Many ops with values that live long and short: pooled/in-place buffers must not clobber."""
    rng = np.random.default_rng(22)
    x0 = rand(rng, 3, 20)
    g = Graph()
    x = g.input("x", (3, 20))
    keep = ops.scale(x, 2.0)                                         # read again at the very end
    ref_keep = 2.0 * x0.astype(np.float64)
    y, ref = x, x0.astype(np.float64)
    for i in range(40):
        if i % 3 == 0:
            y, ref = ops.add(y, keep), ref + ref_keep
        elif i % 3 == 1:
            y, ref = ops.mul(ops.silu(y), ops.scale(y, 0.1)), (ref * _sig(ref)) * (0.1 * ref)
        else:
            y, ref = ops.rms_norm(ops.reshape(y, (6, 10)), 1e-6), ref.reshape(6, 10)
            ref = ref / np.sqrt(np.mean(ref * ref, -1, keepdims=True) + 1e-6)
            y, ref = ops.reshape(y, (3, 20)), ref.reshape(3, 20)
    g.output("y", ops.add(y, keep))
    out = run1(g, {"x": x0})
    assert_close(out["y"], ref + ref_keep)


# -- errors -----------------------------------------------------------------------------------

def test_unsupported_op_is_named():
    g = Graph()
    x = g.input("x", (2, 2))
    bad = g._add(Tensor(g, "frobnicate", (2, 2), "f32", (x,)))
    g.output("y", bad)
    be = NumpyBackend()
    assert not be.supports(bad)
    with pytest.raises(ValueError, match="frobnicate"):
        be.plan(g)


def test_dead_unsupported_op_is_fine():
    g = Graph()
    x = g.input("x", (2, 2))
    g._add(Tensor(g, "frobnicate", (2, 2), "f32", (x,)))             # not live: never computed
    g.output("y", ops.scale(x, 3.0))
    assert run1(g, {"x": np.ones((2, 2))})["y"].tolist() == [[3.0, 3.0], [3.0, 3.0]]


def test_input_errors():
    g = Graph()
    g.output("y", ops.get_rows(g.input("a", (4, 3)), g.input("ids", (2,), "i32")))
    be = NumpyBackend()
    plan = be.plan(g)
    a, ids = np.zeros((4, 3), np.float32), np.array([1, 2], np.int32)
    with pytest.raises(ValueError, match="missing input 'ids'"):
        be.run(plan, {"a": a})
    with pytest.raises(ValueError, match=r"input 'a': expected shape \(4, 3\), got \(3, 4\)"):
        be.run(plan, {"a": a.T, "ids": ids})
    with pytest.raises(ValueError, match="'ids'"):
        be.run(plan, {"a": a, "ids": np.array([1.5, 2.0])})             # floats for an i32 input
    with pytest.raises(ValueError, match="typo"):
        be.run(plan, {"a": a, "ids": ids, "typo": ids})
    out = be.run(plan, {"a": a.astype(np.float64), "ids": ids.astype(np.int64)})   # casts are fine
    assert out["y"].dtype == np.float32


def test_missing_weight_and_kv_errors():
    g = Graph()
    g.output("y", ops.mul_mat(g.weight("blk.0.attn_q.weight", (4, 4), "Q8_0"), g.input("x", (1, 4))))
    be = NumpyBackend()
    with pytest.raises(KeyError, match="blk.0.attn_q.weight"):
        be.plan(g)
    g2 = _attn_graph(1, 2, 1, 4, 4, 2, 1.0, store=False)
    plan = be.plan(g2)
    inp = {"q": np.zeros((1, 2, 4)), "bt": np.zeros(2, np.int32), "kv_len": np.array([1], np.int32),
           "qpos": np.zeros(1, np.int32)}
    with pytest.raises(ValueError, match="KV"):
        be.run(plan, inp)
    wrong = be.alloc_kv(KVCacheSpec(1, 2, 4, 4, 2, 16, "f16"))       # 2 kv heads, graph wants 1
    with pytest.raises(ValueError, match="layer 0"):
        be.run(plan, inp, wrong)
