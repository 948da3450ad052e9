"""Every op of ``ggml_py.ops`` on the CuPy backend against the NumPy backend (after llama.cpp's
test-backend-ops): each case builds a tiny graph, runs it on both backends and compares the
outputs by normalised MSE, ``nmse = sum((a - b)^2) / sum(b^2)`` (a NaN always fails):

- 1e-7   float32 elementwise math (RoPE, GELU and softmax included: the kernels follow the
         reference's order of roundings, so only expf/tanhf ulps differ, ~1e-14);
- 1e-6   quantized ``mul_mat`` for one row (decode: f32 activations against the blocks),
         attention with f32 KV (only the summation order differs);
- 5e-4   quantized ``mul_mat`` of many rows (prefill: f16 tiles through the tensor cores),
         attention with f16 KV;
- 2e-3   whole models (logits of a prefill and of decode steps replayed as a CUDA graph).

Two targets run the same cases:
- ``gpu``: ``CupyBackend`` on a CUDA device (skipped cleanly without CuPy or a GPU);
- ``sim``: ``CupyBackend``'s host logic on a NumPy stand-in device (``SimDevice`` below:
  kernels are emulated, CUDA-graph capture records and replays). It runs everywhere, CI
  included, and checks what the GPU run cannot isolate: buffer liveness (the arena is
  poisoned with NaN), in-place reuse, the add+rms_norm fusion, the grouped decode GEMV
  regions (reordering, lifetimes, what each level fuses), input/output copies, the
  first-eager-then-captured runs, re-capture when the KV storage changes.

How to add an op: write its constructor in ``ggml_py/ops.py`` (the docstring is the spec),
its NumPy reference in ``ggml_py/backend_numpy.py``, its kernel in ``ggml_py/cuda/<family>.cu``
with a ``prepare_<op>`` wrapper in ``<family>_ops.py``, a ``CupyBackend._<op>`` that emits the
step (and ``supports``), an emulation in ``SIM_KERNELS`` below, and a case here with shapes
that include 1 row, odd sizes and a prefill-sized batch.

``python -m tests.test_backend_ops --perf`` times decode steps (eager vs CUDA-graph replay).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from ggml_py import Graph, WeightSource, ops
from ggml_py.backend_numpy import NumpyBackend
from kvcache import KVCacheSpec
from tests.conftest import nmse

F32_TOL = 1e-7
DECODE_TOL = 1e-6
PREFILL_TOL = 5e-4
F16_KV_TOL = 5e-4
MODEL_TOL = 2e-3
FLT_MAX = float(np.finfo(np.float32).max)
FLT_TINY = float(np.finfo(np.float32).tiny)
REFERENCE_DIR = Path(__file__).parent / "reference"


def assert_close(a, b, tol=F32_TOL, what=""):
    e = nmse(a, b)
    assert e <= tol, f"{what} nmse {e:.3g} > {tol:.1g}"


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def f32_source(name: str, data: np.ndarray) -> WeightSource:
    data = np.ascontiguousarray(data, np.float32)
    return WeightSource(name, 0, data.shape, data.reshape(-1).view(np.uint8))


def random_blocks(rng, type_id: int, rows: int, cols: int) -> np.ndarray:
    """(rows, row_bytes) uint8 of valid random blocks of ``type_id``: codes uniform, f16 scales small."""
    from quant_formats import get_format, random_blocks as quant_random_blocks

    fmt = get_format(type_id)
    if fmt.name == "F32":
        return rand(rng, rows, cols, scale=0.1).view(np.uint8)
    if fmt.name == "F16":
        return rand(rng, rows, cols, scale=0.1).astype(np.float16).view(np.uint8)
    if fmt.name == "BF16":
        return (rand(rng, rows, cols, scale=0.1).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return quant_random_blocks(rng, type_id, (rows, cols), 0.005, 0.015)


# =====================================================================================================
# The simulated device: CupyBackend's host logic on NumPy arrays
# =====================================================================================================

def _sim_silu(x):
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


def _sim_gelu(x):
    t = x * x * np.float32(0.044715) + np.float32(1)
    t = np.tanh(t * x * np.float32(0.79788456080286535587989211986876))
    return (t + np.float32(1)) * x * np.float32(0.5)


def _sim_binop(op):
    return np.add if int(op) == 0 else np.multiply


def _sim_binary_same(a, b, y, n, op):
    _sim_binop(op)(a.reshape(-1), b.reshape(-1), out=y.reshape(-1))


def _sim_binary_row(a, b, y, n, nb, op):
    _sim_binop(op)(a.reshape(-1, int(nb)), b.reshape(int(nb)), out=y.reshape(-1, int(nb)))


def _sim_binary_bcast(a, b, y, n, s1, s2, s3, t0, t1, t2, t3, op):
    s = (int(n) // int(s1 * s2 * s3), int(s1), int(s2), int(s3))
    bb = np.lib.stride_tricks.as_strided(b.reshape(-1), s, tuple(4 * int(t) for t in (t0, t1, t2, t3)))
    _sim_binop(op)(a.reshape(s), bb, out=y.reshape(s))


def _sim_rms(x2, w, y2, eps):
    d = x2.shape[1]
    ms = np.square(x2).sum(1, dtype=np.float32) / np.float32(d)
    sc = (np.float32(1) / np.sqrt(ms + np.float32(eps)))[:, None]
    r = x2 * sc
    if w is not None:
        r = r * w
    y2[...] = r


def _sim_rms_norm(x, w, y, rows, x2, w2, y2, d, eps):
    if x2 is not None:                     # the second tensor first: a y2 overlapping x would show
        _sim_rms(x2.reshape(-1, int(d)), w2, y2.reshape(-1, int(d)), eps)
    _sim_rms(x.reshape(-1, int(d)), w, y.reshape(-1, int(d)), eps)


def _sim_add_rms_norm(a, b, s, w, y, d, eps):
    t = a + b
    s[...] = t
    _sim_rms(t.reshape(-1, int(d)), w, y.reshape(-1, int(d)), eps)


def _sim_soft_max(x, mask, y, ncols, scale, s1, s2, m0, m1, m2, mj):
    shp = (x.size // int(ncols * s1 * s2), int(s1), int(s2), int(ncols))
    z = x.reshape(shp) * np.float32(scale)
    if mask is not None:
        z = z + np.lib.stride_tricks.as_strided(mask.reshape(-1), shp, tuple(4 * int(m) for m in (m0, m1, m2, mj)))
    mx = np.maximum(z.max(-1, keepdims=True), np.float32(-FLT_MAX))
    with np.errstate(invalid="ignore"):
        e = np.exp(z - mx)
    sm = np.maximum(e.sum(-1, keepdims=True), np.float32(FLT_TINY))
    y.reshape(shp)[...] = e / sm


def _sim_rope(x, y, H, x2, y2, H2, pos, d, n_rot, ts, fs, neox):
    if x2 is not None:                     # the second tensor first: a y2 overlapping x would show
        _sim_rope1(x2, pos, y2, n_rot, ts, fs, neox)
    _sim_rope1(x, pos, y, n_rot, ts, fs, neox)


def _sim_rope1(x, pos, y, n_rot, ts, fs, neox):
    n_rot, half = int(n_rot), int(n_rot) // 2
    theta = pos.astype(np.float32)
    th = np.empty((pos.shape[0], half), np.float32)
    for i in range(half):
        th[:, i] = theta * np.float32(fs)
        theta = theta * np.float32(ts)
    c = np.cos(th.astype(np.float64)).astype(np.float32)[:, None, :]
    s = np.sin(th.astype(np.float64)).astype(np.float32)[:, None, :]
    src = x.copy()
    if neox:
        a, b = src[..., :half], src[..., half:n_rot]
        y[..., :half], y[..., half:n_rot] = a * c - b * s, a * s + b * c
    else:
        a, b = src[..., 0:n_rot:2], src[..., 1:n_rot:2]
        y[..., 0:n_rot:2], y[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    y[..., n_rot:] = src[..., n_rot:]


SIM_KERNELS = {
    "binary_same_f32": _sim_binary_same,
    "binary_row_f32": _sim_binary_row,
    "binary_bcast_f32": _sim_binary_bcast,
    "scale_f32": lambda x, y, s, n: np.multiply(x, s, out=y),
    "silu_f32": lambda x, y, n: np.copyto(y, _sim_silu(x)),
    "gelu_f32": lambda x, y, n: np.copyto(y, _sim_gelu(x)),
    "swiglu_f32": lambda g, u, y, n: np.copyto(y, _sim_silu(g) * u),
    "geglu_f32": lambda g, u, y, n: np.copyto(y, _sim_gelu(g) * u),
    "rms_norm_f32": _sim_rms_norm,
    "add_rms_norm_f32": _sim_add_rms_norm,
    "soft_max_f32": _sim_soft_max,
    "rope_f32": _sim_rope,
    "get_rows_f32": lambda a, ids, y, R, C: np.copyto(y, a[np.clip(ids, 0, int(R) - 1)]),
    "argmax_f32": lambda x, y, ncols: np.copyto(y, np.where(np.isfinite(x.reshape(-1, int(ncols)).max(-1)),
                                                            np.argmax(x.reshape(-1, int(ncols)), -1), -1)),
}


class _SimWeight:
    def __init__(self, ws: WeightSource) -> None:
        from quant_formats import dequantize
        raw = np.ascontiguousarray(ws.data).reshape(-1).view(np.uint8)
        self.f32 = np.asarray(dequantize(raw, ws.ggml_type, tuple(ws.shape)), np.float32)
        self.ggml_type = int(ws.ggml_type)
        self.shape = tuple(ws.shape)
        self.nbytes = raw.nbytes


class _SimQuant:
    """quant_ops' interface (DESIGN.md) on NumPy."""

    def __init__(self, dev: "SimDevice") -> None:
        self.dev = dev

    def upload_weight(self, ws):
        return _SimWeight(ws)

    def get_rows(self, w, ids, out, stream):
        a = w.f32 if isinstance(w, _SimWeight) else w
        self.dev.exec(lambda: np.take(a, np.clip(ids, 0, a.shape[0] - 1), 0, out=out))

    def mul_mat_scratch_bytes(self, w, n):
        return 4096

    def weight_span(self, w):
        return (id(w) * 16, w.nbytes)                      # (a stand-in address, the weight's bytes)

    def mul_mat(self, w, x, out, stream, scratch):
        self.dev.exec(lambda: np.matmul(x, (w.f32 if isinstance(w, _SimWeight) else w).T, out=out))


class _SimGroupPlan:
    """quant_ops.GroupPlan on NumPy: the same outputs, computed member by member."""

    def __init__(self, dev, ws, n, glu, rope, norm, residual):
        self.dev, self.ws, self.n, self.glu, self.rope = dev, ws, n, glu, rope
        self.norm, self.residual = norm, residual

    def bind(self, x, outs, stream, pos=None, norm_w=None, resid=None, early=False):
        assert x.shape[0] == self.n and len(outs) == (1 if self.glu else len(self.ws))
        assert (pos is not None) == bool(self.rope) and (resid is not None) == self.residual
        assert isinstance(early, bool)
        self.dev.group_binds.append((pos is not None, early))

        def run():
            h = x
            if self.norm is not None:
                h = np.empty_like(x)
                _sim_rms(x, norm_w, h, self.norm)
            ys = [h @ w.f32.T for w in self.ws]
            if self.residual:
                ys[0] = ys[0] + resid
            if self.glu:
                outs[0][...] = (_sim_silu if self.glu == "swiglu" else _sim_gelu)(ys[0]) * ys[1]
                return
            for g, (o, y) in enumerate(zip(outs, ys)):
                if self.rope and g in self.rope["members"]:
                    from ggml_py.cuda.elementwise_ops import rope_theta_scale
                    d, n_rot = self.rope["head_dim"], self.rope["n_rot"]
                    y3 = y.reshape(self.n, -1, d)
                    _sim_rope1(y3, pos, o.reshape(y3.shape), n_rot, rope_theta_scale(self.rope["base"], n_rot),
                               self.rope["freq_scale"], False)
                else:
                    o[...] = y
        return lambda: self.dev.exec(run)


class _SimQuantPlanned(_SimQuant):
    """... with quant_ops' plan-time entry points (plan_get_rows, plan_mul_mat(...).bind,
    plan_mul_mat_group(...).bind)."""

    GROUP_MAX = 3
    DECODE_MAX_N = 8

    def plan_mul_mat_group(self, ws, n, *, glu=None, rope=None, norm=None, residual=False):
        self.dev.group_calls.append((len(ws), glu, None if rope is None else tuple(rope["members"])))
        if not 1 <= n <= self.DECODE_MAX_N or not (1 if residual else 2) <= len(ws) <= (1 if residual else 3):
            return None
        from ggml_py.cuda.quant_ops import GROUP_TYPES
        if len({w.shape[1] for w in ws}) != 1 or (glu and ws[0].shape != ws[1].shape):
            return None
        if len({w.ggml_type for w in ws}) != 1 or ws[0].ggml_type not in GROUP_TYPES:
            return None                            # as quant_ops: one type, one with grouped kernels
        return _SimGroupPlan(self.dev, list(ws), n, glu, rope, norm, residual)

    def plan_get_rows(self, w, ids, out, stream):
        return partial(self.get_rows, w, ids, out, stream)

    def plan_mul_mat(self, w, n, scratch):
        outer = self

        class _Plan:
            def bind(self, x, out, stream):
                assert x.shape[0] == n
                return partial(outer.mul_mat, w, x, out, stream, scratch)
        return _Plan()


def reference_attention(q, kc, vc, pc, bt, L, qpos, scale, window, softcap):
    """Attention over a paged cache in float64 (the op's docstring, written out): (n, H * dv)."""
    n, H, dk = q.shape
    P, Hkv, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    G = H // Hkv
    if L == 0:
        return np.zeros((n, H * dv))
    j = np.arange(L)
    pages = bt[j // P]
    K = kc[pages, j % P].astype(np.float64)                  # (L, Hkv, dk)
    V = vc[pages, j % P].astype(np.float64)
    kpos = pc[pages, j % P].astype(np.int64)
    s = scale * np.einsum("nhd,lhd->hnl", q.astype(np.float64), np.repeat(K, G, axis=1))
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    vis = kpos[None, :] <= qpos[:, None].astype(np.int64)
    if window:
        vis &= qpos[:, None].astype(np.int64) - kpos[None, :] < window
    s = np.where(vis[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1), 0.0)
    return np.einsum("hnl,lhd->nhd", p, np.repeat(V, G, axis=1)).reshape(n, H * dv)


class _SimAttention:
    def __init__(self, dev: "SimDevice") -> None:
        self.dev = dev

    def kv_store(self, k, v, slots, pos, kc, vc, pc, stream):
        def store():
            cap = pc.size
            kc.reshape(cap, *kc.shape[2:])[slots] = k
            vc.reshape(cap, *vc.shape[2:])[slots] = v
            pc.reshape(cap)[slots] = pos
        self.dev.exec(store)

    def attention_scratch_bytes(self, n, H, dv, max_kv):
        return 64 * max_kv

    def attention(self, q, kc, vc, pc, bt, kv_len, q_pos, out, scale, window, softcap, stream, scratch):
        assert scratch.size >= self.attention_scratch_bytes(q.shape[0], q.shape[1], vc.shape[3], len(bt) * pc.shape[1])
        def attend():
            out[...] = reference_attention(q, kc, vc, pc, bt, int(kv_len[0]), q_pos, scale, window, softcap)
        self.dev.exec(attend)


class _SimAttentionPlanned(_SimAttention):
    def plan_kv_store(self, *args):
        return partial(self.kv_store, *args)

    def plan_attention(self, *args, prefetch=None):
        self.dev.attn_prefetch.append(prefetch)
        return partial(self.attention, *args)


class SimDevice:
    """CudaDevice's methods on NumPy. Work is queued while a capture is open and replayed by
    ``launch_graph``, as a CUDA graph would; fresh device buffers are poisoned with NaN."""

    def __init__(self, planned: bool = True) -> None:
        self.capturing: list | None = None
        self.group_calls: list = []                 # plan_mul_mat_group requests (len(ws), glu, rope members)
        self.group_binds: list = []                 # GroupPlan.bind calls: (with positions, early)
        self.attn_prefetch: list = []               # plan_attention's prefetch spans, in call order
        self.n_captures = 0
        self.n_graph_launches = 0
        self.quant = _SimQuantPlanned(self) if planned else _SimQuant(self)
        self.attn = _SimAttentionPlanned(self) if planned else _SimAttention(self)

    def exec(self, fn) -> None:
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()

    def alloc(self, nbytes):
        return np.full(max(int(nbytes), 1), 0xFF, np.uint8)        # every float32 in it is NaN

    def upload(self, a):
        return np.array(a, copy=True)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype)

    def pinned(self, nbytes):
        return np.zeros(max(int(nbytes), 1), np.uint8)

    def to_host(self, a):
        return np.array(a)

    def free_bytes(self):
        return 1 << 40

    def new_stream(self):
        return "sim-stream"

    def h2d(self, dst, src, nbytes, stream):
        return lambda: self.exec(lambda: np.copyto(dst[:nbytes], src[:nbytes]))

    def d2h(self, dst, src, nbytes, stream):
        return lambda: self.exec(lambda: np.copyto(dst, src))

    def synchronize(self, stream=None):
        assert self.capturing is None, "synchronize inside a capture"

    def begin_capture(self, stream):
        assert self.capturing is None
        self.capturing = []

    def end_capture(self, stream):
        g, self.capturing = self.capturing, None
        self.n_captures += 1
        return g

    def launch_graph(self, g, stream):
        self.n_graph_launches += 1
        for f in g:
            f()

    def quant_ops(self):
        return self.quant

    def attention_ops(self):
        return self.attn


def make_sim_backend(planned: bool = True, **kw):
    """A CupyBackend on SimDevice; planned=False offers only DESIGN.md's plain quant/attention calls."""
    from ggml_py.backend_cupy import CupyBackend
    from ggml_py.cuda import elementwise_ops as ew

    dev = SimDevice(planned)

    def launch(name, grid, block, args, shared_mem):
        fn = SIM_KERNELS[name]
        return lambda: dev.exec(partial(fn, *args))

    class SimBackend(CupyBackend):
        def plan(self, graph):
            ew.SIMULATOR = launch                  # only while planning: kernels are bound at plan time
            try:
                return super().plan(graph)
            finally:
                ew.SIMULATOR = None

    return SimBackend(device=dev, **kw)


# =====================================================================================================
# Targets
# =====================================================================================================

def _gpu_reason() -> str | None:
    from ggml_py.backend_cupy import unavailable_reason
    return unavailable_reason()


def make_gpu_backend(**kw):
    reason = _gpu_reason()
    if reason is not None:
        pytest.skip(f"no GPU for the cupy backend: {reason}")
    from ggml_py.backend_cupy import CupyBackend
    return CupyBackend(**kw)


TARGETS = {"sim": make_sim_backend, "gpu": make_gpu_backend}


@pytest.fixture(params=["sim", "gpu"])
def target(request):
    """A factory of CupyBackends on the simulated device or the GPU."""
    return TARGETS[request.param]


@pytest.fixture
def gpu():
    return make_gpu_backend


def _poison(be) -> None:
    """Fill the backend's shared arena with NaN bytes (catches reads of buffers nothing wrote)."""
    buf = be._shared.get("arena")
    if buf is not None:
        buf.fill(0xFF)


def compare(g: Graph, inputs: dict, make, weights: dict | None = None, tol=F32_TOL, runs: int = 3,
            be=None, exact: tuple[str, ...] = ()) -> dict:
    """Run ``g`` on NumPy and on a target backend (``runs`` times: eager, captured, replayed) and compare."""
    ref_be = NumpyBackend()
    if weights:
        ref_be.load_weights(weights)
    ref = ref_be.run(ref_be.plan(g), inputs)
    be = be or make()
    if weights:
        be.load_weights(weights)
    plan = be.plan(g)
    _poison(be)
    for _ in range(runs):
        out = be.run(plan, inputs)
        for name, r in ref.items():
            assert out[name].dtype == r.dtype, (name, out[name].dtype, r.dtype)
            assert out[name].shape == r.shape, (name, out[name].shape, r.shape)
            if name in exact:
                np.testing.assert_array_equal(out[name], r, err_msg=name)
            else:
                assert_close(out[name], r, tol, what=name)
    return {"plan": plan, "backend": be, "out": out, "ref": ref}


# =====================================================================================================
# Pure host logic
# =====================================================================================================

@pytest.mark.parametrize("a,b,want", [
    ((5, 7), (5, 7), ("same",)), ((5, 7), (7,), ("row", 7)), ((5, 7), (1,), ("row", 1)),
    ((4, 1, 6), (1, 6), ("row", 6)), ((3, 4, 9), (4, 9), ("row", 36)),
    ((5, 7), (5, 1), ("bcast", (1, 1, 5, 7), (0, 0, 1, 0))),
    ((3, 4, 9), (1, 4, 1), ("bcast", (1, 3, 4, 9), (0, 0, 1, 0))),
    ((2, 3, 4, 5), (2, 1, 4, 1), ("bcast", (2, 3, 4, 5), (4, 0, 1, 0))),
])
def test_broadcast_layout(a, b, want):
    from ggml_py.cuda.elementwise_ops import broadcast_layout
    assert broadcast_layout(a, b) == want


def test_broadcast_layout_refuses():
    from ggml_py.cuda.elementwise_ops import broadcast_layout
    with pytest.raises(ValueError):
        broadcast_layout((5, 7), (6,))
    with pytest.raises(ValueError):
        broadcast_layout((2, 3, 4, 5, 6), (3, 1, 5, 1))      # 5 alternating dims


def test_arena_layout_reuses_and_coalesces():
    from ggml_py.backend_cupy import _ArenaLayout
    ar = _ArenaLayout()
    a, b, c = ar.alloc(1000), ar.alloc(256), ar.alloc(5000)
    assert (a, b, c) == (0, 1024, 1280)
    ar.release(a, 1000)
    ar.release(b, 256)
    assert ar.alloc(1200) == 0                  # the two freed blocks merged
    ar.release(c, 5000)                         # the top goes back
    assert ar.end == 1280 and ar.peak == 1280 + 5120


def test_unavailable_reason_is_one_line():
    r = _gpu_reason()
    assert r is None or ("\n" not in r and r)


def test_get_backend_cupy_names_the_reason():
    from engine.errors import GGFlatError
    from ggml_py import get_backend
    if _gpu_reason() is None:
        assert get_backend("cupy").name == "cupy"
    else:
        with pytest.raises(GGFlatError, match="the cupy backend needs CuPy and a CUDA GPU: "):
            get_backend("cupy")


# =====================================================================================================
# Elementwise ops
# =====================================================================================================

UNARY = {"silu": ops.silu, "gelu": ops.gelu, "scale": lambda t: ops.scale(t, -0.37)}


@pytest.mark.parametrize("shape", [(1, 576), (7, 33), (3, 5, 17), (1,), (512, 1536)])
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(target, name, shape):
    rng = np.random.default_rng(1)
    x = rand(rng, *shape, scale=3.0)
    if x.size > 1:
        x.reshape(-1)[0] = -120.0                      # exp(-x) overflows: silu must give -0, not NaN
    g = Graph()
    g.output("y", UNARY[name](g.input("x", shape)))
    compare(g, {"x": x}, target)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(1, 1536), (5, 67), (512, 1536)])
def test_glu(target, name, shape):
    rng = np.random.default_rng(2)
    g = Graph()
    op = ops.swiglu if name == "swiglu" else ops.geglu
    g.output("y", op(g.input("g", shape), g.input("u", shape)))
    compare(g, {"g": rand(rng, *shape, scale=2.0), "u": rand(rng, *shape)}, target)


BROADCASTS = [((5, 7), (5, 7)), ((5, 7), (7,)), ((5, 7), (5, 1)), ((3, 4, 9), (4, 9)), ((3, 4, 9), (1, 4, 1)),
              ((2, 3), (1,)), ((1, 576), (576,)), ((512, 1536), (1536,)), ((2, 3, 4, 5), (2, 1, 4, 1))]


@pytest.mark.parametrize("a_shape,b_shape", BROADCASTS)
def test_add_mul_broadcast(target, a_shape, b_shape):
    rng = np.random.default_rng(3)
    g = Graph()
    ta, tb = g.input("a", a_shape), g.input("b", b_shape)
    g.output("s", ops.add(ta, tb))
    g.output("p", ops.mul(ta, tb))
    compare(g, {"a": rand(rng, *a_shape), "b": rand(rng, *b_shape)}, target)


def test_weight_operands_and_inplace_chain(target):
    """Bias and scale from 1-D weights; a chain whose intermediates die at once (written in place)."""
    rng = np.random.default_rng(4)
    x, bias, w = rand(rng, 6, 10), rand(rng, 10), rand(rng, 10)
    g = Graph()
    t = ops.add(g.input("x", (6, 10)), g.weight("bias", (10,), "F32"))
    t = ops.silu(ops.scale(ops.mul(t, g.weight("w", (10,), "F32")), 0.5))
    g.output("y", ops.add(t, ops.gelu(t)))
    r = compare(g, {"x": x}, target, {"bias": f32_source("bias", bias), "w": f32_source("w", w)})
    assert r["backend"].weight_nbytes() == 80
    assert r["plan"].buffer_bytes <= 2 * 256          # two live (6, 10) buffers at most


def test_f16_input_is_rounded(target):
    g = Graph()
    g.output("y", ops.scale(g.input("x", (1, 4), "f16"), 1.0))
    x = np.array([[1.0001, 3.14159265, 65519.0, 1e-8]], np.float64)
    out = compare(g, {"x": x}, target)["out"]
    np.testing.assert_array_equal(out["y"], x.astype(np.float16).astype(np.float32))


def test_reshape_is_a_view(target):
    rng = np.random.default_rng(5)
    x = rand(rng, 4, 6)
    g = Graph()
    g.output("r", ops.reshape(ops.reshape(g.input("x", (4, 6)), (2, 3, 4)), (24,)))
    g.output("s", ops.scale(ops.reshape(g.input("y", (4, 6)), (8, 3)), 2.0))
    r = compare(g, {"x": x, "y": x}, target)
    assert not any(t is not None and t.op == "reshape" for t in r["plan"].step_node)


# -- normalisation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 576), (7, 4, 64), (2, 33), (5, 1), (3, 8192), (512, 2048)])
@pytest.mark.parametrize("with_w", [False, True])
def test_rms_norm(target, shape, with_w):
    rng = np.random.default_rng(6)
    g = Graph()
    wt = g.weight("w", (shape[-1],), "F32") if with_w else None
    g.output("y", ops.rms_norm(g.input("x", shape), 1e-6, wt))
    w = {"w": f32_source("w", rand(rng, shape[-1]))} if with_w else None
    compare(g, {"x": rand(rng, *shape, scale=5.0)}, target, w)


@pytest.mark.parametrize("shape", [(1, 576), (7, 256), (512, 2048)])
def test_add_rms_norm_fused(target, shape):
    """x = a + b; h = rms_norm(x) * w (one kernel), then x is used again (the residual stream)."""
    rng = np.random.default_rng(7)
    d = shape[-1]
    g = Graph()
    a, b = g.input("a", shape), g.input("b", shape)
    o = ops.scale(a, 1.5)                              # dies at the add: the add may write over it
    x = ops.add(o, b)
    h = ops.rms_norm(x, 1e-5, g.weight("w", (d,), "F32"))
    g.output("y", ops.add(ops.gelu(h), x))
    x2 = ops.add(ops.scale(b, 0.25), h)                # a last add + norm whose sum dies at the norm
    g.output("z", ops.rms_norm(x2, 1e-5))
    r = compare(g, {"a": rand(rng, *shape), "b": rand(rng, *shape)}, target, {"w": f32_source("w", rand(rng, d))})
    assert r["plan"].n_fused == 2


@pytest.mark.parametrize("n", [1, 7, 512])
def test_pair_fusions(target, n):
    """gemma's layer head: q/k rms_norms (one launch), then q/k ropes (one launch); a rope pair at
    other positions or parameters stays two launches."""
    rng = np.random.default_rng(17)
    H, Hkv, hd = 8, 2, 64
    g = Graph()
    pos, pos2 = g.input("pos", (n,), "i32"), g.input("pos2", (n,), "i32")
    q = ops.reshape(ops.scale(g.input("q", (n, H * hd)), 1.0), (n, H, hd))
    k = ops.reshape(ops.scale(g.input("k", (n, Hkv * hd)), 1.0), (n, Hkv, hd))
    q = ops.rms_norm(q, 1e-6, g.weight("qn", (hd,), "F32"))
    k = ops.rms_norm(k, 1e-6, g.weight("kn", (hd,), "F32"))
    g.output("q", ops.rope(q, pos, hd, 1e6, 1.0, ops.ROPE_NEOX))
    g.output("k", ops.rope(k, pos, hd, 1e6, 1.0, ops.ROPE_NEOX))
    g.output("q2", ops.rope(q, pos2, hd, 1e6, 1.0, ops.ROPE_NEOX))       # other positions
    g.output("k2", ops.rope(k, pos2, 32, 1e4, 0.5, ops.ROPE_NORMAL))     # other parameters
    w = {"qn": f32_source("qn", rand(rng, hd)), "kn": f32_source("kn", rand(rng, hd))}
    inputs = {"q": rand(rng, n, H * hd), "k": rand(rng, n, Hkv * hd),
              "pos": rng.integers(0, 5000, n).astype(np.int32), "pos2": rng.integers(0, 50, n).astype(np.int32)}
    r = compare(g, inputs, target, w)
    assert r["plan"].n_fused == 2


def test_pair_fusion_refused_when_dependent(target):
    """An rms_norm of (a reshape of) the previous rms_norm's result cannot run in the same launch."""
    rng = np.random.default_rng(18)
    g = Graph()
    a = ops.rms_norm(ops.scale(g.input("x", (3, 4, 16)), 2.0), 1e-5)
    g.output("b", ops.rms_norm(ops.reshape(a, (2, 6, 16)), 1e-5))
    r = compare(g, {"x": rand(rng, 3, 4, 16)}, target)
    assert r["plan"].n_fused == 0


# -- soft_max -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,mask_shape", [((5, 11), None), ((1, 49), None), ((5, 11), (5, 11)),
                                              ((3, 6, 13), (6, 13)), ((2, 4, 9), (1, 9)), ((3, 7, 33), (3, 1, 33)),
                                              ((3, 7, 33), (7, 1)), ((1, 32000), None), ((2, 8, 64, 129), (64, 129))])
def test_soft_max(target, shape, mask_shape):
    rng = np.random.default_rng(8)
    g = Graph()
    mask_t = g.input("m", mask_shape) if mask_shape else None
    g.output("y", ops.soft_max(g.input("x", shape), mask_t, scale=0.7))
    inputs = {"x": rand(rng, *shape, scale=4.0)}
    if mask_shape:
        m = np.where(rng.random(mask_shape) < 0.3, -np.inf, 0.0).astype(np.float32)
        m[..., 0] = 0.0
        inputs["m"] = m
    compare(g, inputs, target)


def test_soft_max_all_masked_row_is_zero(target):
    g = Graph()
    g.output("y", ops.soft_max(g.input("x", (3, 4)), g.input("m", (3, 4))))
    m = np.zeros((3, 4), np.float32)
    m[1] = -np.inf
    out = compare(g, {"x": np.ones((3, 4), np.float32), "m": m}, target)["out"]
    np.testing.assert_array_equal(out["y"][1], 0)


# -- rope -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [ops.ROPE_NORMAL, ops.ROPE_NEOX])
@pytest.mark.parametrize("n,H,d,n_rot,base,fs", [(5, 3, 64, 64, 10000.0, 1.0), (4, 2, 16, 8, 10000.0, 1.0),
                                                  (3, 4, 10, 6, 1e6, 0.25), (1, 9, 64, 64, 100000.0, 1.0),
                                                  (512, 8, 128, 128, 500000.0, 1.0), (7, 4, 256, 256, 1e6, 0.125)])
def test_rope(target, mode, n, H, d, n_rot, base, fs):
    rng = np.random.default_rng(9)
    pos = rng.integers(0, 300, n).astype(np.int32)
    pos[: min(n, 3)] = [100000, 65537, 4095][: min(n, 3)]      # large positions: ggml's float32 angles
    g = Graph()
    g.output("y", ops.rope(g.input("x", (n, H, d)), g.input("pos", (n,), "i32"), n_rot, base, fs, mode))
    r = compare(g, {"x": rand(rng, n, H, d), "pos": pos}, target)
    # the angles are ggml's float32 ones, exactly: the GPU may differ only where a double cos/sin
    # rounds to the other float (about 1 in 10^8 values)
    diff = np.abs(r["out"]["y"] - r["ref"]["y"])
    assert (diff > 1e-6).mean() < 1e-3


def test_rope_negative_and_huge_positions(target):
    rng = np.random.default_rng(10)
    g = Graph()
    g.output("y", ops.rope(g.input("x", (3, 1, 8)), g.input("pos", (3,), "i32"), 8, 10000.0, 1.0, ops.ROPE_NEOX))
    compare(g, {"x": rand(rng, 3, 1, 8), "pos": np.array([-3, 2_000_000, 5], np.int32)}, target)


# -- get_rows of activations, argmax -----------------------------------------------------------------------------------

@pytest.mark.parametrize("R,C,n", [(13, 40, 4), (1, 1, 1), (600, 576, 64)])
def test_get_rows_of_activations(target, R, C, n):
    rng = np.random.default_rng(11)
    g = Graph()
    g.output("rows", ops.get_rows(g.input("a", (R, C)), g.input("ids", (n,), "i32")))
    ids = rng.integers(0, R, n).astype(np.int32)
    ids[0] = R - 1
    compare(g, {"a": rand(rng, R, C), "ids": ids}, target, exact=("rows",))


def test_get_rows_id_out_of_range(target):
    g = Graph()
    g.output("y", ops.get_rows(g.input("a", (4, 3)), g.input("ids", (2,), "i32")))
    be = target()
    plan = be.plan(g)
    for bad in (4, -1):
        with pytest.raises(ValueError, match="outside"):
            be.run(plan, {"a": np.zeros((4, 3)), "ids": np.array([0, bad])})


@pytest.mark.parametrize("shape", [(1, 49152), (7, 33), (64, 512), (3, 1), (2, 262144)])
def test_argmax(target, shape):
    rng = np.random.default_rng(12)
    x = rand(rng, *shape)
    want = np.argmax(x, -1)
    if shape[1] > 8:
        x[0, 5] = x[0, shape[1] - 2] = x.max() + 1                    # a tie: the lower index wins
        want[0] = 5
    if shape[0] > 4 and shape[1] > 8:
        x[1, :] = -np.inf                                             # not finite: -1 ...
        x[2, 3] = np.nan
        x[3, 7] = np.inf
        x[4, :] = -np.inf                                             # ... but -inf entries are fine
        x[4, 6] = -1e30
        want[1:5] = [-1, -1, -1, 6]
    g = Graph()
    g.output("ids", ops.argmax(g.input("x", shape)))
    out = compare(g, {"x": x}, target, exact=("ids",))["out"]["ids"]
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, want)


def test_argmax_of_logits_in_a_graph(target):
    """The greedy decode tail: logits = mul_mat(...) stays on the device, only ids come back."""
    rng = np.random.default_rng(13)
    g = Graph()
    x = ops.rms_norm(g.input("x", (2, 64)), 1e-5)
    g.output("ids", ops.argmax(ops.mul(x, g.input("w", (1, 64)))))
    compare(g, {"x": rand(rng, 2, 64), "w": rand(rng, 1, 64)}, target, exact=("ids",))


# =====================================================================================================
# Quantized weights (through quant_ops)
# =====================================================================================================

def _all_qtypes():
    from quant_formats import FORMATS
    return [FORMATS[t].name for t in sorted(FORMATS)]


def _skip_unsupported(be, type_name: str) -> None:
    try:
        qo = be.dev.quant_ops()
    except ImportError as e:
        pytest.skip(f"quant_ops not available: {e}")
    from ggml_py.backend_cupy import _quant_supports
    if not _quant_supports(qo, type_name):
        pytest.skip(f"quant_ops does not support {type_name}")


@pytest.mark.parametrize("n", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("qtype", _all_qtypes())
def test_mul_mat_and_get_rows_quant(target, qtype, n):
    import gguf
    tid = int(gguf.GGMLQuantizationType[qtype])
    rng = np.random.default_rng(14 + n)
    M, K = (129, 512) if n < 512 else (1024, 2048)
    be = target()
    _skip_unsupported(be, qtype)
    if isinstance(be.dev, SimDevice) and n > 7:
        pytest.skip("the simulated device multiplies with NumPy: large n checks nothing more")
    data = random_blocks(rng, tid, M, K)
    ws = WeightSource("w", tid, (M, K), data.reshape(-1).view(np.uint8))
    g = Graph()
    w = g.weight("w", (M, K), qtype)
    ids = rng.integers(0, M, n).astype(np.int32)
    ids[0] = M - 1
    g.output("rows", ops.get_rows(w, g.input("ids", (n,), "i32")))
    g.output("mm", ops.mul_mat(w, g.input("x", (n, K))))
    tol = DECODE_TOL if n == 1 else PREFILL_TOL
    ref_be = NumpyBackend()
    ref_be.load_weights({"w": ws})
    ref_plan = ref_be.plan(g)
    be.load_weights({"w": ws})
    plan = be.plan(g)
    for _ in range(3):
        inputs = {"ids": ids, "x": rand(rng, n, K)}
        ref = ref_be.run(ref_plan, inputs)
        out = be.run(plan, inputs)
        assert_close(out["rows"], ref["rows"], F32_TOL, "get_rows")
        assert_close(out["mm"], ref["mm"], tol, f"mul_mat n={n}")
    assert be.weight_nbytes() >= data.nbytes


@pytest.mark.parametrize("n,M,K", [(1, 333, 64), (9, 5, 1000), (512, 256, 576)])
def test_mul_mat_of_activations(target, n, M, K):
    be = target()
    _skip_unsupported(be, "F32")
    rng = np.random.default_rng(15)
    g = Graph()
    g.output("y", ops.mul_mat(g.input("w", (M, K)), g.input("x", (n, K))))
    compare(g, {"w": rand(rng, M, K), "x": rand(rng, n, K)}, lambda: be, tol=DECODE_TOL if n == 1 else PREFILL_TOL)


# -- grouped decode GEMVs: q/k/v (+ their ropes) and gate/up (+ swiglu/geglu) as one launch each -----------

GROUP_QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q5_1"]     # Q5_1: no grouped kernels


def _block_graph(n, qtype, d=256, H=4, Hkv=2, ff=512, n_rot=None, mode=ops.ROPE_NORMAL, glu="swiglu",
                 gate_out=False, v_type=None, bias=False):
    """A llama layer with attention left out (o reads q): norm, q/k/v (ropes on q, k), o + residual,
    norm, gate/up, glu, down + residual, and a last norm."""
    g = Graph()
    hd = d // H
    x, pos = g.input("x", (n, d)), g.input("pos", (n,), "i32")
    h = ops.rms_norm(x, 1e-5, g.weight("an", (d,), "F32"))
    q = ops.mul_mat(g.weight("wq", (H * hd, d), qtype), h)
    if bias:
        q = ops.add(q, g.weight("bq", (H * hd,), "F32"))
    k = ops.mul_mat(g.weight("wk", (Hkv * hd, d), qtype), h)
    v = ops.mul_mat(g.weight("wv", (Hkv * hd, d), v_type or qtype), h)
    q = ops.rope(ops.reshape(q, (n, H, hd)), pos, n_rot or hd, 10000.0, 1.0, mode)
    k = ops.rope(ops.reshape(k, (n, Hkv, hd)), pos, n_rot or hd, 10000.0, 1.0, mode)
    g.output("q", q)
    g.output("k", k)
    g.output("v", v)
    x1 = ops.add(ops.mul_mat(g.weight("wo", (d, d), qtype), ops.reshape(q, (n, d))), x)
    h2 = ops.rms_norm(x1, 1e-5, g.weight("fn", (d,), "F32"))
    gate = ops.mul_mat(g.weight("wg", (ff, d), qtype), h2)
    up = ops.mul_mat(g.weight("wu", (ff, d), qtype), h2)
    if gate_out:
        g.output("gate", gate)                         # a second reader: the glu cannot absorb gate
    f = (ops.swiglu if glu == "swiglu" else ops.geglu)(gate, up)
    x2 = ops.add(ops.mul_mat(g.weight("wd", (d, ff), qtype), f), x1)
    g.output("y", ops.rms_norm(x2, 1e-5, g.weight("on", (d,), "F32")))
    return g


def _block_weights(rng, g):
    """Quantized Gaussians (0.05 sd): activations stay O(1), so the f16 prefill path cannot overflow."""
    import gguf
    from quant_formats import quantize
    ws = {}
    for name, t in g.weights.items():
        if t.ndim == 1:
            ws[name] = f32_source(name, 1 + rand(rng, *t.shape, scale=0.1))
        else:
            tid = int(gguf.GGMLQuantizationType[t.dtype])
            raw = np.ascontiguousarray(quantize(rand(rng, *t.shape, scale=0.05), tid)).reshape(-1).view(np.uint8)
            ws[name] = WeightSource(name, tid, t.shape, raw)
    return ws


def _fusions(plan, *kinds):
    return tuple(plan.fusions.get(k, 0) for k in kinds)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("qtype", GROUP_QTYPES)
def test_grouped_mul_mat(target, qtype, n, level):
    """Level 1: q/k/v + both ropes as one launch, gate/up + swiglu as another. Level 2 also: the
    norms before them inside those launches, the residual adds inside the o and down launches.
    Prefill (n > 8) and types without grouped kernels unfused."""
    be = target(fuse_mm=level)
    _skip_unsupported(be, qtype)
    rng = np.random.default_rng(30 + n)
    g = _block_graph(n, qtype)
    pos = rng.integers(0, 3000, n).astype(np.int32)
    inputs = {"x": rand(rng, n, 256), "pos": pos}
    r = compare(g, inputs, lambda: be, _block_weights(rng, g), tol=DECODE_TOL if n <= 8 else PREFILL_TOL)
    from ggml_py.cuda.quant_ops import GROUP_TYPES
    import gguf
    fused = n <= 8 and int(gguf.GGMLQuantizationType[qtype]) in GROUP_TYPES
    got = _fusions(r["plan"], "mm_group", "mm_glu", "mm_add", "mm_norm")
    ops_run = [t.op for t in r["plan"].step_node]
    if not fused:
        assert got == (0, 0, 0, 0) and len(ops_run) == 12, (got, ops_run)
    elif level == 1:   # norm, qkv+ropes, o, add+norm, glu, down, add+norm
        assert got == (1, 1, 0, 0) and len(ops_run) == 7, (got, ops_run)
    else:              # norm+qkv+ropes, o+add, norm+glu, down+add, norm
        assert got == (1, 1, 2, 2) and len(ops_run) == 5, (got, ops_run)
    assert ("rope" in ops_run) == (not fused)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("case", ["partial-rope", "neox", "geglu", "gate-is-output", "v-other-type", "bias"])
def test_grouped_mul_mat_variants(target, case, level):
    """What the grouping takes along and what it leaves: partial rotary dims (fused, the rest pass),
    neox ropes (not fused: their pairs straddle rows), geglu, a gate read elsewhere (gate/up grouped
    without the glu), a v of another type (q/k grouped alone, their norm then runs on its own: v
    reads it too), a bias between q and its rope."""
    be = target(fuse_mm=level)
    _skip_unsupported(be, "Q4_1")
    rng = np.random.default_rng(40)
    n = 3
    kw = {"partial-rope": dict(n_rot=32), "neox": dict(mode=ops.ROPE_NEOX), "geglu": dict(glu="geglu"),
          "gate-is-output": dict(gate_out=True), "v-other-type": dict(v_type="Q8_0"), "bias": dict(bias=True)}[case]
    g = _block_graph(n, "Q4_1", **kw)
    inputs = {"x": rand(rng, n, 256), "pos": rng.integers(0, 3000, n).astype(np.int32)}
    r = compare(g, inputs, lambda: be, _block_weights(rng, g), tol=DECODE_TOL)
    want = {"partial-rope": (1, 1, 0, 2), "neox": (1, 1, 1, 2), "geglu": (1, 1, 0, 2),
            "gate-is-output": (2, 0, 0, 2), "v-other-type": (1, 1, 0, 1), "bias": (1, 1, 1, 2)}[case]
    ops_run = [t.op for t in r["plan"].step_node]
    got = _fusions(r["plan"], "mm_group", "mm_glu") + (ops_run.count("rope"),)
    got += r["plan"].fusions.get("mm_norm", 0),
    if level == 1:
        want = want[:3] + (0,)
    assert got == want, (r["plan"].fusions, ops_run)
    assert r["plan"].fusions.get("mm_add", 0) == (2 if level == 2 else 0)


# =====================================================================================================
# KV cache and attention (through attention_ops)
# =====================================================================================================

def _attn_graph(n, H, Hkv, dk, dv, max_pages, scale, window=0, softcap=0.0):
    g = Graph()
    kv = g.kv_layer(0, Hkv, dk, dv)
    pos = g.input("pos", (n,), "i32")
    st = ops.kv_store(kv, g.input("k", (n, Hkv, dk)), g.input("v", (n, Hkv, dv)), g.input("slots", (n,), "i32"), pos)
    a = ops.attention(g.input("q", (n, H, dk)), kv, g.input("bt", (max_pages,), "i32"),
                      g.input("kv_len", (1,), "i32"), pos, scale, window, softcap, after=(st,))
    g.output("a", a)
    return g


def _slots(bt, page_size, start, n):
    j = np.arange(start, start + n)
    return (bt[j // page_size] * page_size + j % page_size).astype(np.int32)


ATTN_CASES = [
    # n0 (prefill), steps, H, Hkv, dk, dv, page, window, softcap
    (37, 3, 8, 8, 64, 64, 16, 0, 0.0),
    (7, 4, 9, 3, 64, 64, 16, 0, 0.0),        # SmolLM2's heads
    (64, 2, 8, 2, 128, 128, 16, 0, 0.0),
    (20, 3, 4, 1, 256, 256, 16, 5, 0.0),     # gemma-like head size and a window
    (45, 2, 8, 2, 64, 32, 32, 7, 30.0),      # dv != dk, softcap
    (300, 2, 4, 2, 64, 64, 16, 0, 0.0),      # a longer prefill
]


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "n{}-H{}-{}-d{}-{}-w{}-c{}".format(
    c[0], c[2], c[3], c[4], c[5], c[7], c[8]))
def test_kv_store_and_attention(target, kv_dtype, case):
    """Prefill (store in the same graph), then decode steps replayed as a graph, over a scrambled
    block table; outputs and the cache's pages both match the NumPy backend's."""
    n0, steps, H, Hkv, dk, dv, P, window, softcap = case
    be = target()
    try:
        be.dev.attention_ops()
    except ImportError as e:
        pytest.skip(f"attention_ops not available: {e}")
    rng = np.random.default_rng(16 + n0)
    need = -(-(n0 + steps) // P)
    n_pages, max_pages = need + 5, need + 2
    spec = KVCacheSpec(1, Hkv, dk, dv, n_pages, P, kv_dtype)
    ref_be = NumpyBackend()
    kv_ref, kv = ref_be.alloc_kv(spec), be.alloc_kv(spec)
    bt = rng.permutation(n_pages)[:max_pages].astype(np.int32)
    scale = 1 / math.sqrt(dk)
    tol = F16_KV_TOL if kv_dtype == "f16" else DECODE_TOL
    plans = {}
    for start, n in [(0, n0)] + [(n0 + i, 1) for i in range(steps)]:
        if n not in plans:
            g = _attn_graph(n, H, Hkv, dk, dv, max_pages, scale, window, softcap)
            plans[n] = (ref_be.plan(g), be.plan(g))
        pos = np.arange(start, start + n, dtype=np.int32)
        inputs = {"q": rand(rng, n, H, dk), "k": rand(rng, n, Hkv, dk), "v": rand(rng, n, Hkv, dv),
                  "slots": _slots(bt, P, start, n), "pos": pos, "bt": bt,
                  "kv_len": np.array([start + n], np.int32)}
        ref = ref_be.run(plans[n][0], inputs, kv_ref)["a"]
        out = be.run(plans[n][1], inputs, kv)["a"]
        assert_close(out, ref, tol, f"attention at {start}+{n}")
    host = kv.to_numpy()
    np.testing.assert_array_equal(host.pos[0], kv_ref.pos[0])
    np.testing.assert_array_equal(host.k[0], kv_ref.k[0])
    np.testing.assert_array_equal(host.v[0], kv_ref.v[0])


def _qkv_attn_graph(n, d, H, Hkv, hd, max_pages, qtype):
    """norm -> q/k/v (ropes on q, k) -> kv_store of k, v -> attention of q: a llama layer's first half."""
    g = Graph()
    kv = g.kv_layer(0, Hkv, hd, hd)
    x, pos = g.input("x", (n, d)), g.input("pos", (n,), "i32")
    h = ops.rms_norm(x, 1e-5, g.weight("an", (d,), "F32"))
    q = ops.mul_mat(g.weight("wq", (H * hd, d), qtype), h)
    k = ops.mul_mat(g.weight("wk", (Hkv * hd, d), qtype), h)
    v = ops.mul_mat(g.weight("wv", (Hkv * hd, d), qtype), h)
    q = ops.rope(ops.reshape(q, (n, H, hd)), pos, hd, 10000.0, 1.0, ops.ROPE_NORMAL)
    k = ops.rope(ops.reshape(k, (n, Hkv, hd)), pos, hd, 10000.0, 1.0, ops.ROPE_NORMAL)
    st = ops.kv_store(kv, k, ops.reshape(v, (n, Hkv, hd)), g.input("slots", (n,), "i32"), pos)
    g.output("a", ops.attention(q, kv, g.input("bt", (max_pages,), "i32"), g.input("kv_len", (1,), "i32"), pos,
                                1 / math.sqrt(hd), after=(st,)))
    return g


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_kv_store_folded_into_qkv(gpu, monkeypatch, qtype, kv_dtype):
    """With the q/k/v weights repacked for Marlin, a decode step's kv_store runs inside the q/k/v
    launch (fusions["mm_kv_store"]): the cache's pages and the attention output are bit for bit
    those of the unfolded launches (GGFLAT_MARLIN_KVFOLD=0), and close to the NumPy backend's;
    a prefill (n > 16) keeps its own kv_store."""
    monkeypatch.setenv("GGFLAT_MARLIN", "all")
    d, H, Hkv, hd, P = 256, 4, 2, 64, 16
    rng = np.random.default_rng(52)
    steps = [(0, 20), (20, 1), (21, 3), (24, 1)]
    need = -(-sum(n for _, n in steps) // P)
    n_pages, max_pages = need + 3, need + 1
    spec = KVCacheSpec(1, Hkv, hd, hd, n_pages, P, kv_dtype)
    bt = rng.permutation(n_pages)[:max_pages].astype(np.int32)
    g0 = _qkv_attn_graph(1, d, H, Hkv, hd, max_pages, qtype)
    weights = _block_weights(rng, g0)
    ref_be = NumpyBackend()
    ref_be.load_weights(weights)
    kv_ref = ref_be.alloc_kv(spec)
    runs = {}
    for fold in ("1", "0"):
        monkeypatch.setenv("GGFLAT_MARLIN_KVFOLD", fold)
        be = gpu()
        be.load_weights(weights)
        kv = be.alloc_kv(spec)
        outs = []
        for start, n in steps:
            g = _qkv_attn_graph(n, d, H, Hkv, hd, max_pages, qtype)
            plan = be.plan(g)
            want = 1 if (fold == "1" and n <= 16) else 0
            assert plan.fusions.get("mm_kv_store", 0) == want, (fold, n, plan.fusions)
            assert [t.op for t in plan.step_node].count("kv_store") == 1 - want
            inputs = {"x": rand(rng, n, d) if fold == "1" else runs["1"][2][len(outs)], "pos":
                      np.arange(start, start + n, dtype=np.int32), "slots": _slots(bt, P, start, n), "bt": bt,
                      "kv_len": np.array([start + n], np.int32)}
            for _ in range(2):                  # eager, then captured (the same step again: same bytes)
                out = be.run(plan, inputs, kv)["a"]
            outs.append((inputs, out))
        runs[fold] = (kv.to_numpy(), [o for _, o in outs], [i["x"] for i, _ in outs])
        if fold == "1":
            for inputs, out in outs:
                ref = ref_be.run(ref_be.plan(_qkv_attn_graph(inputs["x"].shape[0], d, H, Hkv, hd, max_pages, qtype)),
                                 inputs, kv_ref)["a"]
                assert_close(out, ref, F16_KV_TOL if kv_dtype == "f16" else DECODE_TOL, "attention")
    (c1, o1, _), (c0, o0, _) = runs["1"], runs["0"]
    for a, b in zip(o1, o0):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c1.pos[0], c0.pos[0])
    np.testing.assert_array_equal(c1.k[0], c0.k[0])
    np.testing.assert_array_equal(c1.v[0], c0.v[0])


def test_attention_input_checks(target):
    be = target()
    try:
        be.dev.attention_ops()
    except ImportError as e:
        pytest.skip(f"attention_ops not available: {e}")
    spec = KVCacheSpec(1, 2, 16, 16, 4, 16, "f16")
    kv = be.alloc_kv(spec)
    plan = be.plan(_attn_graph(1, 2, 2, 16, 16, 2, 0.25))
    ok = {"q": np.zeros((1, 2, 16)), "k": np.zeros((1, 2, 16)), "v": np.zeros((1, 2, 16)),
          "slots": np.array([3]), "pos": np.array([3]), "bt": np.array([0, 1]), "kv_len": np.array([4])}
    be.run(plan, ok, kv)
    for key, bad, msg in [("slots", [64], "slot 64 outside"), ("kv_len", [33], "kv_len 33 outside"),
                          ("bt", [7, 1], "names page 7")]:
        with pytest.raises(ValueError, match=msg):
            be.run(plan, {**ok, key: np.array(bad)}, kv)
    with pytest.raises(ValueError, match="storage from alloc_kv"):
        be.run(plan, ok, None)


# =====================================================================================================
# CUDA graphs: eager first, then captured and replayed; re-captured for another KV storage
# =====================================================================================================

def _decode_like_graph(n_layers=4, d=64, n=1):
    """Elementwise-only stand-in for a decode step (no quant/attention modules needed)."""
    g = Graph()
    x = g.input("x", (n, d))
    pos = g.input("pos", (n,), "i32")
    for il in range(n_layers):
        h = ops.rms_norm(x, 1e-5, g.weight(f"n{il}", (d,), "F32"))
        q = ops.rope(ops.reshape(h, (n, 4, d // 4)), pos, d // 4, 10000.0, 1.0, ops.ROPE_NORMAL)
        x = ops.add(ops.reshape(q, (n, d)), x)
        h = ops.rms_norm(x, 1e-5, g.weight(f"f{il}", (d,), "F32"))
        x = ops.add(ops.swiglu(h, ops.scale(h, 0.5)), x)
    g.output("y", ops.rms_norm(x, 1e-5))
    g.output("ids", ops.argmax(x))
    return g


def test_graph_capture_and_replay(target, monkeypatch):
    monkeypatch.delenv("GGFLAT_CUDA_GRAPHS", raising=False)
    rng = np.random.default_rng(20)
    g = _decode_like_graph()
    weights = {f"{k}{il}": f32_source(f"{k}{il}", 1 + rand(rng, 64, scale=0.1)) for il in range(4) for k in "nf"}
    ref_be = NumpyBackend()
    ref_be.load_weights(weights)
    ref_plan = ref_be.plan(g)
    be = target()
    be.load_weights(weights)
    plan = be.plan(g)
    assert plan.n_fused >= 4
    for step in range(5):
        inputs = {"x": rand(rng, 1, 64), "pos": np.array([step * 37], np.int32)}
        ref, out = ref_be.run(ref_plan, inputs), be.run(plan, inputs)
        assert_close(out["y"], ref["y"])
        np.testing.assert_array_equal(out["ids"], ref["ids"])
        assert (plan.cuda_graph is None) == (step == 0), "eager first, captured from the second run on"
    assert plan.graph_error is None
    if isinstance(be.dev, SimDevice):
        assert be.dev.n_captures == 1 and be.dev.n_graph_launches == 4


def test_graphs_off_by_env(target, monkeypatch):
    monkeypatch.setenv("GGFLAT_CUDA_GRAPHS", "0")
    rng = np.random.default_rng(21)
    g = _decode_like_graph(2)
    weights = {f"{k}{il}": f32_source(f"{k}{il}", rand(rng, 64)) for il in range(2) for k in "nf"}
    be = target()
    assert not be.cuda_graphs
    be.load_weights(weights)
    plan = be.plan(g)
    for step in range(3):
        be.run(plan, {"x": rand(rng, 1, 64), "pos": np.array([step], np.int32)})
    assert plan.cuda_graph is None


@pytest.mark.parametrize("graph_io", [True, False])
def test_kv_storage_switch_recaptures(target, graph_io):
    """A graph captured against one cache must not write into it when the plan runs with another."""
    be = target(graph_io=graph_io)
    try:
        be.dev.attention_ops()
    except ImportError as e:
        pytest.skip(f"attention_ops not available: {e}")
    rng = np.random.default_rng(22)
    spec = KVCacheSpec(1, 2, 16, 16, 4, 16, "f32")
    ref_be = NumpyBackend()
    g = _attn_graph(1, 4, 2, 16, 16, 4, 0.25)
    ref_plan, plan = ref_be.plan(g), be.plan(g)
    caches = [(ref_be.alloc_kv(spec), be.alloc_kv(spec)) for _ in range(2)]
    bt = np.arange(4, dtype=np.int32)
    for step in range(8):
        c = (step // 3) % 2                              # three steps on cache 0, three on 1, ...
        t = sum(1 for s in range(step) if (s // 3) % 2 == c)
        inputs = {"q": rand(rng, 1, 4, 16), "k": rand(rng, 1, 2, 16), "v": rand(rng, 1, 2, 16),
                  "slots": np.array([t], np.int32), "pos": np.array([t], np.int32), "bt": bt,
                  "kv_len": np.array([t + 1], np.int32)}
        ref = ref_be.run(ref_plan, inputs, caches[c][0])["a"]
        out = be.run(plan, inputs, caches[c][1])["a"]
        assert_close(out, ref, DECODE_TOL, f"step {step}")
    for r, k in caches:
        np.testing.assert_array_equal(k.to_numpy().pos[0], r.pos[0])


def test_run_errors(target):
    g = Graph()
    g.output("y", ops.scale(g.input("x", (2, 3)), 2.0))
    be = target()
    plan = be.plan(g)
    with pytest.raises(ValueError, match="missing input 'x'"):
        be.run(plan, {})
    with pytest.raises(ValueError, match="expected shape"):
        be.run(plan, {"x": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="no input"):
        be.run(plan, {"x": np.zeros((2, 3)), "z": 1})
    with pytest.raises(ValueError, match="not made by this backend"):
        be.run(NumpyBackend().plan(g), {"x": np.zeros((2, 3))})


# =====================================================================================================
# Whole models: tiny random llama and gemma3 GGUFs, and the real SmolLM2 when given
# =====================================================================================================

TINY = dict(n_layer=2, d=256, n_ff=512, n_head=4, n_head_kv=2, vocab=512)


def write_tiny_model(path: Path, arch: str, seed: int = 0, qtype: str | None = None) -> Path:
    """A random-weight GGUF of the llama or gemma3 architecture (types Q4_0, Q4_1, Q8_0, Q4_K; every
    matrix ``qtype`` when given: then q/k/v and gate/up group on the GPU, as in SmolLM2's Q4_1)."""
    import gguf
    from quant_formats import quantize

    Q = gguf.GGMLQuantizationType
    c = TINY
    rng = np.random.default_rng(seed)
    d, hd = c["d"], c["d"] // c["n_head"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch} (RANDOM WEIGHTS, tests only)")
    w.add_block_count(c["n_layer"])
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(c["n_ff"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(c["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    if arch == "gemma3":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_freq_base(1e6)
        w.add_sliding_window(4)                         # layer 0 sliding, layer 1 global
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)
    else:
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(hd)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"\u2581t{i}" for i in range(c["vocab"] - len(toks))]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(c["vocab"] - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (c["vocab"] - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(name, rows, cols, qt, scale=0.08):
        if qtype is not None:
            qt = Q[qtype]
        a = rand(rng, rows, cols, scale=scale)
        w.add_tensor(name, quantize(a, int(qt)), raw_dtype=qt)

    def vec(name, n, mean=1.0):
        w.add_tensor(name, (mean + rand(rng, n, scale=0.1)).astype(np.float32))

    mat("token_embd.weight", c["vocab"], d, Q.Q8_0, 0.5 if arch == "llama" else 0.05)
    for il in range(c["n_layer"]):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", d)
        mat(p + "attn_q.weight", c["n_head"] * hd, d, Q.Q4_0)
        mat(p + "attn_k.weight", c["n_head_kv"] * hd, d, Q.Q4_1)
        mat(p + "attn_v.weight", c["n_head_kv"] * hd, d, Q.Q8_0)
        mat(p + "attn_output.weight", d, c["n_head"] * hd, Q.Q4_K)
        vec(p + "ffn_norm.weight", d)
        mat(p + "ffn_gate.weight", c["n_ff"], d, Q.Q4_K)
        mat(p + "ffn_up.weight", c["n_ff"], d, Q.Q4_0)
        mat(p + "ffn_down.weight", d, c["n_ff"], Q.Q4_1)
        if arch == "gemma3":
            vec(p + "attn_q_norm.weight", hd)
            vec(p + "attn_k_norm.weight", hd)
            vec(p + "post_attention_norm.weight", d)
            vec(p + "post_ffw_norm.weight", d)
    vec("output_norm.weight", d)
    if arch == "llama":
        mat("output.weight", c["vocab"], d, Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_models")
    return {arch: write_tiny_model(d / f"tiny-{arch}.gguf", arch, seed=i) for i, arch in enumerate(("llama", "gemma3"))}


def _greedy_graph_plan(model, n_tokens: int, max_pages: int):
    """The decode graph ending in argmax instead of logits (what Model.forward(greedy=True) plans)."""
    g = model.arch.build_graph(model.config, model.weight_table, n_tokens, 1, max_pages)
    logits = g.outputs.pop("logits")
    g.output("argmax", ops.argmax(logits))
    return model.backend.plan(g)


def _step_inputs(seq, tokens):
    tokens = np.asarray(tokens, np.int32)
    n = tokens.shape[0]
    start = seq.length
    slots = seq.reserve(n)
    return {"tokens": tokens, "pos": np.arange(start, start + n, dtype=np.int32), "slots": slots,
            "block_table": seq.block_table(), "kv_len": np.array([seq.length], np.int32),
            "out_ids": np.array([n - 1], np.int32)}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_model_sim_plain_interfaces(tiny_models, arch):
    """The backend also works with quant/attention modules that offer only DESIGN.md's plain calls."""
    test_tiny_model(partial(make_sim_backend, planned=False), tiny_models, arch, "f16")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
def test_tiny_model(target, tiny_models, arch, kv_dtype):
    """Prefill 7 tokens (all logits), then decode steps (graph replay): logits agree with NumPy."""
    from engine.model import Model

    be = target()
    try:
        be.dev.quant_ops(), be.dev.attention_ops()
    except ImportError as e:
        pytest.skip(f"quant/attention ops not available: {e}")
    path = str(tiny_models[arch])
    ref = Model.load(path, NumpyBackend())
    m = Model.load(path, be)
    caches = [mm.new_cache(64, kv_dtype=kv_dtype) for mm in (ref, m)]
    seqs = [c.new_sequence() for c in caches]
    prompt = [1, 300, 301, 17, 499, 260, 42]
    lr = ref.prefill(caches[0], seqs[0], prompt, all_logits=True)
    lg = m.prefill(caches[1], seqs[1], prompt, all_logits=True)
    assert_close(lg, lr, MODEL_TOL, f"{arch} prefill")
    tok = int(np.argmax(lr[-1]))
    for step in range(6):
        lr = ref.forward(caches[0], seqs[0], [tok])
        lg = m.forward(caches[1], seqs[1], [tok])
        assert_close(lg, lr, MODEL_TOL, f"{arch} decode step {step}")
        tok = int(np.argmax(lr[-1]))
    decode_plan = m._plans[(1, 1, seqs[1].max_pages)]
    assert decode_plan.cuda_graph is not None and decode_plan.graph_error is None
    assert decode_plan.n_fused >= 2 * TINY["n_layer"]

    # the greedy tail: argmax on the device gives NumPy's id wherever the top two are not tied
    gplan = _greedy_graph_plan(m, 1, seqs[1].max_pages)
    for step in range(3):
        inputs_r = _step_inputs(seqs[0], [tok])
        inputs_g = _step_inputs(seqs[1], [tok])
        lr = ref.backend.run(ref._plan(1, 1, seqs[0].max_pages), inputs_r, caches[0].storage)["logits"][-1]
        gid = m.backend.run(gplan, inputs_g, caches[1].storage)["argmax"]
        top2 = np.sort(lr)[-2:]
        if top2[1] - top2[0] > 1e-3 * max(1.0, abs(top2[1])):
            assert int(gid[0]) == int(np.argmax(lr))
        tok = int(np.argmax(lr))


@pytest.fixture(scope="module")
def tiny_uniform_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_uniform")
    return {"llama": write_tiny_model(d / "tiny-llama-q4_1.gguf", "llama", seed=3, qtype="Q4_1"),
            "gemma3": write_tiny_model(d / "tiny-gemma3-q4_k.gguf", "gemma3", seed=4, qtype="Q4_K")}


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_model_grouped(target, tiny_uniform_models, arch, level, monkeypatch):
    """One type for every matrix: decode steps (and a 7-token prefill) run q/k/v and gate/up grouped
    (llama: with both ropes; level 2: with their norms, and o/down with their residual adds); a
    12-token prefill stays unfused. Logits agree with NumPy throughout."""
    from engine.model import Model

    monkeypatch.setenv("GGFLAT_ATTN_PF", "16")          # decode attention prefetches o's weights
    be = target(fuse_mm=level)
    try:
        be.dev.quant_ops(), be.dev.attention_ops()
    except ImportError as e:
        pytest.skip(f"quant/attention ops not available: {e}")
    path = str(tiny_uniform_models[arch])
    ref, m = Model.load(path, NumpyBackend()), Model.load(path, be)
    caches = [mm.new_cache(64, kv_dtype="f16") for mm in (ref, m)]
    L = TINY["n_layer"]
    for n0 in (12, 7):
        seqs = [c.new_sequence() for c in caches]
        prompt = [1] + [260 + (17 * i) % 250 for i in range(n0 - 1)]
        lr = ref.prefill(caches[0], seqs[0], prompt, all_logits=True)
        lg = m.prefill(caches[1], seqs[1], prompt, all_logits=True)
        assert_close(lg, lr, MODEL_TOL, f"{arch} prefill {n0}")
        f = m._plans[(n0, n0, seqs[1].max_pages)].fusions
        want = (0, 0) if n0 > 8 else (L, L)
        assert (f.get("mm_group", 0), f.get("mm_glu", 0)) == want, (n0, f)
        tok = int(np.argmax(lr[-1]))
        for step in range(4):
            lr = ref.forward(caches[0], seqs[0], [tok])
            lg = m.forward(caches[1], seqs[1], [tok])
            assert_close(lg, lr, MODEL_TOL, f"{arch} decode step {step} after {n0}")
            tok = int(np.argmax(lr[-1]))
        plan = m._plans[(1, 1, seqs[1].max_pages)]
        assert plan.cuda_graph is not None and plan.graph_error is None
        assert (plan.fusions.get("mm_group", 0), plan.fusions.get("mm_glu", 0)) == (L, L), plan.fusions
        if arch == "llama":       # level 2: every down and all but the last o (its rows are picked first)
            want = (2 * L - 1, 2 * L - 1) if level == 2 else (0, 0)
            assert _fusions(plan, "mm_add", "mm_norm") == want, plan.fusions
        n_rope = sum(1 for t in plan.step_node if t is not None and t.op == "rope")
        assert n_rope == (0 if arch == "llama" else L)              # gemma: q/k norms sit between
        # each decode attention asks L2 for its layer's o projection (the GEMM after it)
        assert plan.n_prefetch == L, plan.n_prefetch
        spans = getattr(be.dev, "attn_prefetch", None)
        if spans is not None:
            o_bytes = {be._w[f"blk.{i}.attn_output.weight"].nbytes for i in range(L)}
            assert len(spans) >= L and all(s is not None and s[1] in o_bytes for s in spans), spans
        # the positions are the graph's input: every grouped launch may read them before PDL's wait
        binds = getattr(be.dev, "group_binds", None)
        if binds is not None:
            assert binds and all(early for _, early in binds), binds
            assert any(with_pos for with_pos, _ in binds) == (arch == "llama")
        for sq in seqs:
            sq.clear()


@pytest.mark.skipif(not os.environ.get("GGFLAT_TEST_MODEL_SMOLLM2"), reason="GGFLAT_TEST_MODEL_SMOLLM2 not set")
def test_smollm2_matches_numpy(gpu):
    """The real SmolLM2: prefill logits within 2e-3 NMSE and the first 16 greedy ids equal NumPy's."""
    from engine.model import Model

    path = os.environ["GGFLAT_TEST_MODEL_SMOLLM2"]
    ref = Model.load(path, NumpyBackend())
    m = Model.load(path, gpu())
    with open(REFERENCE_DIR / "smollm2" / "greedy.jsonl", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:
        ids = case["prompt_ids"]
        runs = []
        for mm in (ref, m):
            cache = mm.new_cache(256)
            seq = cache.new_sequence()
            logits = mm.prefill(cache, seq, ids)
            first = logits[-1]
            toks = []
            for _ in range(16):
                toks.append(int(np.argmax(logits[-1])))
                logits = mm.forward(cache, seq, [toks[-1]])
            runs.append((first, toks))
        assert_close(runs[1][0], runs[0][0], MODEL_TOL, f"prefill of {case['prompt'][:30]!r}")
        assert runs[1][1] == runs[0][1], f"greedy ids differ for {case['prompt'][:30]!r}"


# =====================================================================================================
# perf mode: python -m tests.test_backend_ops --perf
# =====================================================================================================

def _time_runs(be, plan, make_inputs, kv, n: int) -> float:
    """Median wall time of one run (inputs copied in, outputs out, synchronised), in ms."""
    ts = []
    for i in range(n):
        inputs = make_inputs(i)
        t0 = time.perf_counter()
        be.run(plan, inputs, kv)
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def _perf_model(path: str, label: str, rows: list, n_steps: int = 100) -> None:
    from engine.model import Model
    from ggml_py.backend_cupy import CupyBackend

    for mode, kw in [("eager", dict(cuda_graphs=False)), ("graph", dict(cuda_graphs=True, graph_io=True)),
                     ("graph, io outside", dict(cuda_graphs=True, graph_io=False))]:
        m = Model.load(path, CupyBackend(**kw))
        cache = m.new_cache(1024)
        seq = cache.new_sequence()
        m.prefill(cache, seq, list(range(1, 33)))
        plan = m._plan(1, 1, seq.max_pages)

        def make_inputs(i):
            if seq.length >= seq.capacity - 1:
                seq.truncate(32)
            return _step_inputs(seq, [5 + i % 100])
        for i in range(5):                                        # warm-up, capture
            m.backend.run(plan, make_inputs(i), cache.storage)
        ms = _time_runs(m.backend, plan, make_inputs, cache.storage, n_steps)
        gplan = _greedy_graph_plan(m, 1, seq.max_pages)
        for i in range(5):
            m.backend.run(gplan, make_inputs(i), cache.storage)
        ms_g = _time_runs(m.backend, gplan, make_inputs, cache.storage, n_steps)
        if kw["cuda_graphs"] and (plan.cuda_graph is None or gplan.cuda_graph is None):
            mode += " (NOT captured)"
            print(f"{label} {mode}: {plan.graph_error} / {gplan.graph_error}")
        rows.append((label, mode, len(plan.steps), ms, 1e3 / ms, ms_g))


def _perf_elementwise(rows: list) -> None:
    from ggml_py.backend_cupy import CupyBackend

    rng = np.random.default_rng(0)
    L, d = 30, 576
    g = _decode_like_graph(L, d)
    weights = {f"{k}{il}": f32_source(f"{k}{il}", rand(rng, d)) for il in range(L) for k in "nf"}
    for mode, kw in [("eager", dict(cuda_graphs=False)), ("graph", dict(cuda_graphs=True))]:
        be = CupyBackend(**kw)
        be.load_weights(weights)
        plan = be.plan(g)
        mk = lambda i: {"x": rand(rng, 1, d), "pos": np.array([i], np.int32)}
        for i in range(5):
            be.run(plan, mk(i))
        ms = _time_runs(be, plan, mk, None, 200)
        if kw["cuda_graphs"] and plan.cuda_graph is None:
            mode += " (NOT captured)"
            print(f"elementwise {mode}: {plan.graph_error}")
        rows.append((f"elementwise-only {L} layers d={d}", mode, len(plan.steps), ms, 1e3 / ms, float("nan")))


def _perf_kernels(rows: list) -> None:
    """GB/s of the elementwise kernels at prefill sizes (bytes: each input read once, output written once)."""
    import cupy as cp
    from ggml_py.cuda import elementwise_ops as ew

    st = cp.cuda.Stream(non_blocking=True)
    rng = cp.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape, dtype=cp.float32)
    n, d, ff = 512, 4096, 14336
    a, b, o = f(n, ff), f(n, ff), cp.empty((n, ff), cp.float32)
    x, w, y, y2 = f(n, d), f(d), cp.empty((n, d), cp.float32), cp.empty((n, d), cp.float32)
    q, qo = f(n, 32, 128), cp.empty((n, 32, 128), cp.float32)
    k, ko = f(n, 8, 128), cp.empty((n, 8, 128), cp.float32)
    pos = cp.arange(n, dtype=cp.int32)
    sm, smo = f(32, 512, 512), cp.empty((32, 512, 512), cp.float32)
    lg, ids = f(64, 128256), cp.empty(64, cp.int32)
    cases = [
        ("add (512, 14336) same", ew.prepare_binary("add", a, b, o, st), 3 * a.nbytes),
        ("add (512, 4096) + row", ew.prepare_binary("add", x, w, y, st), 2 * x.nbytes),
        ("silu (512, 14336)", ew.prepare_unary("silu", a, o, st), 2 * a.nbytes),
        ("swiglu (512, 14336)", ew.prepare_glu("swiglu", a, b, o, st), 3 * a.nbytes),
        ("rms_norm*w (512, 4096)", ew.prepare_rms_norm(x, w, y, 1e-5, st), 2 * x.nbytes),
        ("add+rms_norm (512, 4096)", ew.prepare_add_rms_norm(x, y, y, w, y2, 1e-5, st), 4 * x.nbytes),
        ("rope q+k (512, 32+8, 128)", ew.prepare_rope(q, pos, qo, 128, 5e5, 1.0, False, st, x2=k, out2=ko),
         2 * (q.nbytes + k.nbytes)),
        ("soft_max (32, 512, 512)", ew.prepare_soft_max(sm, None, smo, 0.1, st), 2 * sm.nbytes),
        ("argmax (64, 128256)", ew.prepare_argmax(lg, ids, st), lg.nbytes),
    ]
    for name, step, nbytes in cases:
        for _ in range(3):
            step()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        reps = 50
        e0.record(st)
        for _ in range(reps):
            step()
        e1.record(st)
        e1.synchronize()
        us = cp.cuda.get_elapsed_time(e0, e1) * 1e3 / reps
        rows.append((name, us, nbytes / us / 1e3))


def _perf_prefill(path: str, label: str, rows: list, n: int = 512) -> None:
    from engine.model import Model
    from ggml_py.backend_cupy import CupyBackend

    m = Model.load(path, CupyBackend())
    cache = m.new_cache(2048)
    toks = [5 + i % 400 for i in range(n)]
    ts = []
    for _ in range(4):
        seq = cache.new_sequence()
        t0 = time.perf_counter()
        m.prefill(cache, seq, toks)
        ts.append(time.perf_counter() - t0)
        seq.clear()
    ms = 1e3 * float(np.median(ts[1:]))
    rows.append((label, f"prefill {n}", 0, ms, n * 1e3 / ms, float("nan")))


def main(argv: list[str]) -> None:
    if "--perf" not in argv:
        print(__doc__)
        return
    reason = _gpu_reason()
    if reason is not None:
        print(f"no GPU: {reason}")
        return
    import tempfile
    krows: list = []
    _perf_kernels(krows)
    print(f"| {'kernel':30s} | us/launch | GB/s   |")
    print(f"|{'-' * 32}|-----------|--------|")
    for name, us, gbs in krows:
        print(f"| {name:30s} | {us:9.1f} | {gbs:6.0f} |")
    rows: list = []
    _perf_elementwise(rows)
    try:
        from ggml_py.cuda import attention_ops, quant_ops  # noqa: F401
        have_models = True
    except ImportError as e:
        print(f"(model timings skipped: {e})")
        have_models = False
    if have_models:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in ("llama", "gemma3"):
                p = write_tiny_model(Path(tmp) / f"tiny-{arch}.gguf", arch)
                _perf_model(str(p), f"tiny {arch}", rows)
            sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
            try:
                from make_synthetic import write_synthetic
                p = Path(tmp) / "smollm2-q4_1.gguf"
                write_synthetic(str(p), "smollm2-135m", "Q4_1")
                _perf_model(str(p), "synthetic SmolLM2-135M Q4_1", rows)
                _perf_prefill(str(p), "synthetic SmolLM2-135M Q4_1", rows)
            except Exception as e:                                 # report, keep the table
                print(f"(synthetic SmolLM2 timing failed: {type(e).__name__}: {e})")
    print()
    print(f"| {'model':38s} | {'mode':18s} | steps | ms/token | tok/s  | ms/token greedy |")
    print(f"|{'-' * 40}|{'-' * 20}|-------|----------|--------|-----------------|")
    for label, mode, steps, ms, tps, ms_g in rows:
        print(f"| {label:38s} | {mode:18s} | {steps:5d} | {ms:8.3f} | {tps:6.0f} | {ms_g:15.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
