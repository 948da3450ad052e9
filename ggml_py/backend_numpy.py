"""The NumPy reference backend: every op of ``ggml_py.ops`` as a few NumPy calls.

This backend *is* the specification the GPU backend is tested against, so it
keeps the math simple (float32 everywhere, weights dequantized once to f32) and
spends its cleverness only on Python overhead:

- ``plan`` turns a graph into a flat list of zero-argument callables, most of
  them ``functools.partial(np.<ufunc>, a, b, out)`` bound to *static* arrays:
  every activation lives in a buffer chosen once at plan time (buffers are
  reused when their tensor dies, as ggml-alloc does; ``add``/``mul``/``scale``
  write in place over a dying operand), inputs are copied into their own
  buffers, and ``reshape`` is a view made at plan time, so it costs nothing at
  run time. ``run`` is then ``for f in steps: f()`` -- about 1 us of Python
  per NumPy call, no string dispatch, no shape checks.
- Only the KV cache and what depends on ``kv_len`` (attention) is resolved at
  run time.

Numerics (after ggml-cpu/ops.cpp):
- ``mul_mat``: ``x @ w.T`` in float32 through BLAS sgemm on the dequantized weight.
- ``rms_norm``: squares in float32 summed in float64 (ggml sums in ``ggml_float`` =
  double), ``mean`` rounded to float, ``scale = 1/sqrtf(mean + eps)`` in float,
  ``y = x * scale * w`` -- the same sequence of roundings as
  ``ggml_compute_forward_rms_norm_f32`` except the order of the double sum.
- ``rope``: ``theta_scale = powf(base, -2.0f/n_rot)``, ``theta`` starts at ``(float)p``
  and is multiplied by ``theta_scale`` once per pair in float32 (as
  ``ggml_rope_cache_init`` does; a closed-form ``p * base^(-2i/n)`` differs in the
  last bits, which matters at large positions), times ``freq_scale`` in float;
  cos/sin of that float32 angle, correctly rounded. Tables are cached per
  (n_rot, base, freq_scale) up to the largest position seen.
- ``soft_max``/``attention``: float32, max-subtracted; a row with nothing visible
  gives zeros. Attention folds ``scale`` into the queries and normalises after
  the ``P @ V`` product (flash-attention order); f16 KV is upcast exactly (with a
  bit trick, NumPy's own cast being slow). It works on blocks of queries and
  skips the key columns no query of a block can see (the causal triangle, the
  window), and clamps probabilities below exp(-87) to it -- float32 subnormals
  would make the BLAS product ~15x slower, and they weigh < 1e-37 of the max.
- ``gelu``: the exact tanh formula in float32 (ggml's CPU path may use an f16
  table; that difference is far below the test thresholds).

Not thread-safe: a plan owns its buffers, and the attention scratch is shared by
all plans of one backend.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np

from engine.errors import GGFlatError
from quant_formats import dequantize

from .backend import Backend, Plan, WeightSource, bind_leaves, liveness, stage_inputs
from .graph import Graph, Tensor
from .ops import ROPE_NEOX, ROPE_NORMAL

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
FLT_TINY = float(np.finfo(np.float32).tiny)
POS_EMPTY = np.iinfo(np.int32).max       # stored position of a never-written slot: visible to no query

_ROPE_TABLE_MAX = 1 << 20                # positions beyond this get cos/sin computed per run, not tabled
_ATTN_BLOCK = 1 << 19                    # score elements per query block (2 MiB of f32)

Step = Callable[[], Any]


# -- weights ------------------------------------------------------------------------

def _weight_f32(ws: WeightSource) -> np.ndarray:
    """A weight as float32 (NumPy shape ``ws.shape``): F32 stays a zero-copy view of the
    file's bytes (copied only if misaligned), every other type is dequantized by the
    project's reference, ``quant_formats.dequantize``."""
    raw = np.ascontiguousarray(ws.data).reshape(-1).view(np.uint8)
    try:
        w = dequantize(raw, ws.ggml_type, tuple(int(d) for d in ws.shape))
    except GGFlatError as e:
        raise type(e)(f"weight {ws.name!r}: {e}") from None
    return np.require(w, F32, ["C", "A"])


# -- KV storage ---------------------------------------------------------------------------

class NumpyKVStorage:
    """A paged KV cache's arrays, one set per layer (layout: ``kvcache.paged``).

    k[layer]:   (n_pages, page_size, n_kv_heads, head_dim_k)  float16 or float32
    v[layer]:   (n_pages, page_size, n_kv_heads, head_dim_v)
    pos[layer]: (n_pages, page_size) int32, POS_EMPTY (int32 max) where nothing was written
    """

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        dt = {"f16": np.float16, "f32": np.float32}[spec.dtype]
        geo = (spec.n_pages, spec.page_size, spec.n_kv_heads)
        self.k = [np.zeros(geo + (spec.head_dim_k,), dt) for _ in range(spec.n_layers)]
        self.v = [np.zeros(geo + (spec.head_dim_v,), dt) for _ in range(spec.n_layers)]
        self.pos = [np.full(geo[:2], POS_EMPTY, np.int32) for _ in range(spec.n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v + self.pos)


# -- f16 -> f32 ---------------------------------------------------------------------------

_F16_SCALE = np.float32(2.0 ** 112)


def _f16_to_f32_bits(h: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """out[...] = h as float32, exactly; out and tmp (int32) have h's shape, all contiguous.

    NumPy's own half->float cast is a scalar loop unless NumPy was built for F16C
    (~2 ns/element here, the biggest cost of f16-KV attention). Instead, for
    finite halves: (bits & 0x7fff) << 13 read as a float32 is the value times
    2^-112 (for subnormal halves too), then the sign bit is OR-ed back: five
    vectorised integer/float passes, ~3x faster. Inf/NaN halves take the slow path.
    """
    m = out.view(np.int32)
    np.copyto(tmp, h.view(np.int16))                  # sign-extended
    np.bitwise_and(tmp, 0x7FFF, out=m)
    if m.size and int(m.max()) >= 0x7C00:             # inf or nan somewhere
        np.copyto(out, h)
        return
    np.left_shift(m, 13, out=m)
    np.multiply(out, _F16_SCALE, out=out)
    np.bitwise_and(tmp, np.int32(-(1 << 31)), out=tmp)
    np.bitwise_or(m, tmp, out=m)


def _f16_trick_works() -> bool:
    """The bit trick multiplies float32 subnormals: wrong if the FPU flushes them (DAZ)."""
    h = np.array([0.0, -0.0, 5.96e-8, -6.1e-5, 1.0, -65504.0, 3.14159, 1e-7], np.float16)
    out, tmp = np.empty(h.shape, F32), np.empty(h.shape, np.int32)
    _f16_to_f32_bits(h, out, tmp)
    ref = h.astype(F32)
    return bool(np.array_equal(out.view(np.int32), ref.view(np.int32)))


class _Scratch:
    """Grow-only flat buffers shared by all attention nodes (they run one at a time)."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        n = math.prod(shape)
        b = self._bufs.get(key)
        if b is None or b.size < n:
            b = self._bufs[key] = np.empty(max(n, 1024), np.float32)
        return b[:n].view(dtype).reshape(shape)          # 4-byte dtypes only (f32, i32)


# -- RoPE tables ------------------------------------------------------------------------

def rope_cos_sin(pos: np.ndarray, n_rot: int, base: float, freq_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of theta(p, i) for positions ``pos`` (N,), i in [0, n_rot/2): (N, n_rot/2) f32 each.

    Follows ggml_rope_cache_init's float32 arithmetic (see the module docstring).
    """
    # powf(base, -2.0f/n_rot), correctly rounded as glibc's powf is (NumPy's float32
    # power is not: it is 1 ulp off for base 1e4, n_rot 64, which shifts every angle)
    ts = F32(math.pow(float(F32(base)), float(F32(-2.0) / F32(n_rot))))
    fs = F32(freq_scale)
    theta = np.asarray(pos).astype(F32)
    th = np.empty((theta.shape[0], n_rot // 2), F32)
    for i in range(n_rot // 2):
        np.multiply(theta, fs, out=th[:, i])
        theta = theta * ts
    th64 = th.astype(np.float64)             # cos/sin of the float32 angle, rounded once
    return np.cos(th64).astype(F32), np.sin(th64).astype(F32)


# -- the plan --------------------------------------------------------------------------

class NumpyPlan(Plan):
    def __init__(self, graph: Graph, backend: "NumpyBackend") -> None:
        super().__init__(graph)
        self.backend = backend
        self.steps: list[Step] = []
        self.step_node: list[Tensor] = []                 # the node each step belongs to (errors)
        self.inputs: list[tuple[str, tuple[int, ...], str, np.ndarray]] = []   # name, shape, dtype, buffer
        self.outputs: list[tuple[str, np.ndarray]] = []
        self.kv_layers: dict[int, tuple[int, int, int]] = {}   # layer -> (Hkv, dk, dv)
        self.kvref: list[Any] = [None]                    # the storage of the current run
        self.kv_checked: Any = None                       # the last storage whose geometry was checked
        self.buffer_bytes = 0                             # activation buffers this plan holds


class _Builder:
    """Plan-time state: static values of tensors, the buffer pool, liveness."""

    def __init__(self, plan: NumpyPlan, live: list[Tensor]) -> None:
        self.plan = plan
        self.vals: dict[int, np.ndarray] = {}
        self.pool: dict[int, list[np.ndarray]] = {}      # element count -> free f32 buffers
        self.owned: dict[int, np.ndarray] = {}            # root tensor index -> its pooled buffer
        # root: tensor index -> the tensor whose storage it uses; last: root -> position of its last reader
        self.root, self.last = liveness(plan.graph, live)
        self.scratch: list[np.ndarray] = []
        self.rope_memo: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}   # per-run cos/sin, shared by rope nodes
        self.pos = 0
        self.node: Tensor | None = None
        self._outs = {t.index for t in plan.graph.outputs.values()}

    def val(self, t: Tensor) -> np.ndarray:
        return self.vals[t.index]

    def emit(self, *fs: Step) -> None:
        for f in fs:
            self.plan.steps.append(f)
            self.plan.step_node.append(self.node)

    def _take(self, n: int) -> np.ndarray:
        free = self.pool.get(n)
        if free:
            return free.pop()
        self.plan.buffer_bytes += 4 * n
        return np.empty(n, F32)

    def out(self, node: Tensor, inplace: tuple[Tensor, ...] = ()) -> np.ndarray:
        """The f32 output buffer of ``node``; may take over a dying operand's buffer."""
        n = math.prod(node.shape)
        buf = None
        for s in inplace:
            r = self.root.get(s.index, s.index)
            if r in self.owned and self.last.get(r) == self.pos and self.owned[r].size == n:
                buf = self.owned.pop(r)
                break
        if buf is None:
            buf = self._take(n) if n else np.empty(0, F32)
        if n:
            self.owned[node.index] = buf
        a = buf.reshape(node.shape)
        self.vals[node.index] = a
        return a

    def temp(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 scratch array valid while this node's steps run."""
        n = math.prod(shape)
        buf = self._take(n)
        self.scratch.append(buf)
        return buf.reshape(shape)

    def finish_node(self) -> None:
        for b in self.scratch:
            self.pool.setdefault(b.size, []).append(b)
        self.scratch.clear()
        for s in self.node.src:
            r = self.root.get(s.index, s.index)
            if self.last.get(r) == self.pos and r in self.owned:
                b = self.owned.pop(r)
                self.pool.setdefault(b.size, []).append(b)
        # a node nobody reads (a kv_store token, say) frees its buffer at once
        r = self.root[self.node.index]
        if r not in self.last and r in self.owned and self.node.index not in self._outs:
            b = self.owned.pop(r)
            self.pool.setdefault(b.size, []).append(b)


# -- the backend ---------------------------------------------------------------------------

class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self) -> None:
        self._w: dict[str, np.ndarray] = {}
        self._rope: dict[tuple[int, float, float], tuple[np.ndarray, np.ndarray]] = {}
        self._scratch = _Scratch()
        self._fast_f16 = _f16_trick_works()
        self._ops: dict[str, Callable[[_Builder, Tensor], None]] = {
            "get_rows": self._get_rows, "mul_mat": self._mul_mat, "add": self._add, "mul": self._mul,
            "scale": self._scale, "silu": self._silu, "gelu": self._gelu, "swiglu": self._swiglu,
            "geglu": self._geglu, "reshape": self._reshape, "rms_norm": self._rms_norm,
            "soft_max": self._soft_max, "rope": self._rope_op, "kv_store": self._kv_store,
            "attention": self._attention, "argmax": self._argmax, "sample": self._sample,
        }

    # -- memory -------------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, WeightSource]) -> None:
        """Dequantize every weight once to float32 (F32 tensors stay zero-copy views)."""
        held = {}
        for name, ws in weights.items():
            held[name] = _weight_f32(ws)
        self._w.update(held)

    def weight_nbytes(self) -> int:
        return sum(w.nbytes for w in self._w.values())

    def alloc_kv(self, spec: Any) -> NumpyKVStorage:
        return NumpyKVStorage(spec)

    # -- planning ---------------------------------------------------------------------------
    def supports(self, node: Tensor) -> bool:
        if node.is_leaf:
            return True
        if node.op == "rope" and node.params.get("mode") not in (ROPE_NORMAL, ROPE_NEOX):
            return False
        return node.op in self._ops

    def plan(self, graph: Graph) -> NumpyPlan:
        live = graph.live_nodes()
        for t in live:
            if not self.supports(t):
                raise ValueError(f"numpy backend does not support op {t.op!r} ({t}, graph {graph.name!r})")
        plan = NumpyPlan(graph, self)
        b = _Builder(plan, live)
        for name, t in graph.inputs.items():
            dt = np.int32 if t.dtype == "i32" else F32        # f16 inputs are rounded, then held as f32
            buf = np.zeros(t.shape, dt)
            b.vals[t.index] = buf
            plan.inputs.append((name, t.shape, t.dtype, buf))
        vals, kv_layers = bind_leaves(graph, live, {n: (w.shape, w) for n, w in self._w.items()}, "numpy")
        b.vals.update(vals)
        plan.kv_layers.update(kv_layers)
        for i, t in enumerate(live):
            b.pos, b.node = i, t
            self._ops[t.op](b, t)
            b.finish_node()
        for name, t in graph.outputs.items():
            plan.outputs.append((name, b.vals[t.index]))
        return plan

    # -- running -------------------------------------------------------------------------------
    def run(self, plan: Plan, inputs: Mapping[str, np.ndarray], kv: Any = None) -> dict[str, np.ndarray]:
        if not isinstance(plan, NumpyPlan) or plan.backend is not self:
            raise ValueError("run: the plan was not made by this backend")
        stage_inputs(plan.graph.name, plan.inputs, inputs)
        if plan.kv_layers:
            plan.kvref[0] = kv if kv is not None and kv is plan.kv_checked else self._check_kv(plan, kv)
        steps = plan.steps
        i = -1
        try:
            with np.errstate(all="ignore"):       # exp/tanh overflowing to inf is intended
                for i, f in enumerate(steps):
                    f()
        except Exception as e:
            if 0 <= i < len(steps):
                e.add_note(f"(numpy backend, while computing {plan.step_node[i]} in graph {plan.graph.name!r})")
            raise
        finally:
            plan.kvref[0] = None
        return {name: np.array(a, dtype=np.int32 if a.dtype == np.int32 else F32) for name, a in plan.outputs}

    def _check_kv(self, plan: NumpyPlan, kv: Any) -> NumpyKVStorage:
        if kv is not None and not isinstance(kv, NumpyKVStorage) and isinstance(getattr(kv, "storage", None),
                                                                                  NumpyKVStorage):
            kv = kv.storage                       # a PagedKVCache was passed
        if not isinstance(kv, NumpyKVStorage):
            raise ValueError(f"graph {plan.graph.name!r} reads the KV cache: run() needs the storage "
                             f"from alloc_kv, got {type(kv).__name__}")
        for layer, (hkv, dk, dv) in plan.kv_layers.items():
            if layer >= len(kv.k):
                raise ValueError(f"graph uses KV layer {layer}, the cache has {len(kv.k)} layers")
            if kv.k[layer].shape[2:] != (hkv, dk) or kv.v[layer].shape[2:] != (hkv, dv):
                raise ValueError(f"KV layer {layer}: cache holds (heads, dk, dv) = "
                                 f"{kv.k[layer].shape[2:] + kv.v[layer].shape[3:]}, graph wants {(hkv, dk, dv)}")
        plan.kv_checked = kv
        return kv

    # -- ops ---------------------------------------------------------------------------------------
    # Each takes the builder and the node, allocates the node's output and emits its steps.

    @staticmethod
    def _reshape(b: _Builder, t: Tensor) -> None:
        b.vals[t.index] = b.val(t.src[0]).reshape(t.shape)    # a view, fixed at plan time

    @staticmethod
    def _get_rows(b: _Builder, t: Tensor) -> None:
        a, ids = b.val(t.src[0]), b.val(t.src[1])
        y = b.out(t)
        rows = a.shape[0]
        if y.size == 0:
            return

        def check() -> None:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= rows:
                raise ValueError(f"get_rows: id {lo if lo < 0 else hi} outside [0, {rows})")
        b.emit(check, partial(np.take, a, ids, 0, y, "clip"))

    @staticmethod
    def _mul_mat(b: _Builder, t: Tensor) -> None:
        w, x = b.val(t.src[0]), b.val(t.src[1])
        y = b.out(t)
        if y.size:
            b.emit(partial(np.matmul, x, w.T, y))                # BLAS sgemm, transposed weight

    @staticmethod
    def _binary(ufunc: Any, b: _Builder, t: Tensor) -> None:
        x, z = b.val(t.src[0]), b.val(t.src[1])
        y = b.out(t, inplace=(t.src[0], t.src[1]))
        if y.size:
            b.emit(partial(ufunc, x, z, y))

    def _add(self, b: _Builder, t: Tensor) -> None:
        self._binary(np.add, b, t)

    def _mul(self, b: _Builder, t: Tensor) -> None:
        self._binary(np.multiply, b, t)

    @staticmethod
    def _scale(b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        y = b.out(t, inplace=(t.src[0],))
        if y.size:
            b.emit(partial(np.multiply, x, F32(t.params["s"]), y))

    @staticmethod
    def _silu_steps(x: np.ndarray, y: np.ndarray) -> list[Step]:
        # y = x / (1 + exp(-x)); y must not alias x
        return [partial(np.negative, x, y), partial(np.exp, y, y), partial(np.add, y, F32(1), y),
                partial(np.divide, x, y, y)]

    @staticmethod
    def _gelu_steps(x: np.ndarray, y: np.ndarray) -> list[Step]:
        # y = 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))   -- ggml_gelu_f32's factorisation
        return [partial(np.multiply, x, x, y), partial(np.multiply, y, F32(0.044715), y),
                partial(np.add, y, F32(1), y), partial(np.multiply, y, x, y),
                partial(np.multiply, y, F32(0.79788456080286535587989211986876), y), partial(np.tanh, y, y),
                partial(np.add, y, F32(1), y), partial(np.multiply, y, x, y), partial(np.multiply, y, F32(0.5), y)]

    def _silu(self, b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        y = b.out(t)
        if y.size:
            b.emit(*self._silu_steps(x, y))

    def _gelu(self, b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        y = b.out(t)
        if y.size:
            b.emit(*self._gelu_steps(x, y))

    def _swiglu(self, b: _Builder, t: Tensor) -> None:
        g, u = b.val(t.src[0]), b.val(t.src[1])
        y = b.out(t)
        if y.size:
            b.emit(*self._silu_steps(g, y), partial(np.multiply, y, u, y))

    def _geglu(self, b: _Builder, t: Tensor) -> None:
        g, u = b.val(t.src[0]), b.val(t.src[1])
        y = b.out(t)
        if y.size:
            b.emit(*self._gelu_steps(g, y), partial(np.multiply, y, u, y))

    @staticmethod
    def _rms_norm(b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        y = b.out(t)
        if y.size == 0:
            return
        d = t.shape[-1]
        x2, y2 = x.reshape(-1, d), y.reshape(-1, d)
        s64 = np.empty(x2.shape[0], np.float64)            # sum of squares, ggml_float
        m = np.empty((x2.shape[0], 1), F32)                # mean, then scale = 1/sqrt(mean + eps)
        m1 = m.reshape(-1)
        b.emit(partial(np.square, x2, y2),                 # x*x in float (y is scratch here)
               partial(np.add.reduce, y2, 1, np.float64, s64),
               partial(np.divide, s64, float(d), m1),      # (float)(sum / ne00)
               partial(np.add, m1, F32(t.params["eps"]), m1),
               partial(np.sqrt, m1, m1),
               partial(np.divide, F32(1), m1, m1),
               partial(np.multiply, x2, m, y2))
        if len(t.src) > 1:
            b.emit(partial(np.multiply, y2, b.val(t.src[1]), y2))

    @staticmethod
    def _soft_max(b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        y = b.out(t)
        if y.size == 0:
            return
        mx = np.empty(t.shape[:-1] + (1,), F32)
        sm = np.empty(t.shape[:-1] + (1,), F32)
        b.emit(partial(np.multiply, x, F32(t.params["scale"]), y))
        if len(t.src) > 1:
            b.emit(partial(np.add, y, b.val(t.src[1]), y))
        b.emit(partial(np.maximum.reduce, y, -1, None, mx, True),
               partial(np.maximum, mx, F32(-FLT_MAX), out=mx),   # an all -inf row: subtract a finite max
               partial(np.subtract, y, mx, y), partial(np.exp, y, y),
               partial(np.add.reduce, y, -1, None, sm, True),
               partial(np.maximum, sm, F32(FLT_TINY), out=sm),   # ... and its zero sum gives 0/tiny = 0
               partial(np.divide, y, sm, y))

    @staticmethod
    def _argmax(b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        y = b.out(t).view(np.int32)                        # an i32 view of a pooled 4-byte buffer
        b.vals[t.index] = y
        if y.size:
            idx = np.empty(y.shape, np.intp)               # np.argmax writes only intp
            mx = np.empty(y.shape, F32)
            bad = np.empty(y.shape, np.bool_)
            b.emit(partial(np.argmax, x, -1, idx), partial(np.copyto, y, idx, "same_kind"),
                   partial(np.maximum.reduce, x, -1, None, mx),     # NaN propagates
                   partial(np.isfinite, mx, out=bad), partial(np.logical_not, bad, out=bad),
                   partial(np.copyto, y, np.int32(-1), "same_kind", bad))   # max not finite: -1

    @staticmethod
    def _sample(b: _Builder, t: Tensor) -> None:
        from .sample_ref import sample_rows        # the GPU kernel's algorithm and Philox stream
        x, prm, st = (b.val(s) for s in t.src[:3])
        hist = b.val(t.src[3]) if len(t.src) > 3 else None
        y = b.out(t).view(np.int32)
        b.vals[t.index] = y
        if y.size:
            b.emit(partial(sample_rows, x, prm, st, hist, y))

    # -- rope ----------------------------------------------------------------------------
    def _rope_tables(self, key: tuple[int, float, float], need: int) -> tuple[np.ndarray, np.ndarray]:
        tab = self._rope.get(key)
        if tab is None or tab[0].shape[0] < need:
            size = max(4096, 1 << (need - 1).bit_length())
            tab = self._rope[key] = rope_cos_sin(np.arange(size), *key)
        return tab

    def _rope_op(self, b: _Builder, t: Tensor) -> None:
        x = b.val(t.src[0])
        p = b.val(t.src[1])
        y = b.out(t)
        if y.size == 0:
            return
        n, h, d = t.shape
        n_rot = t.params["n_rot"]
        key = (n_rot, t.params["base"], t.params["freq_scale"])
        half = n_rot // 2

        # cos/sin of this run's positions: gathered once per run per (positions, key)
        memo = b.rope_memo
        mk = (t.src[1].index,) + key
        if mk not in memo:
            cos = np.empty((n, 1, half), F32)
            sin = np.empty((n, 1, half), F32)
            c2, s2 = cos.reshape(n, half), sin.reshape(n, half)

            def prep() -> None:
                lo, hi = int(p.min()), int(p.max())
                if 0 <= lo and hi < _ROPE_TABLE_MAX:
                    ct, st = self._rope_tables(key, hi + 1)
                    np.take(ct, p, 0, c2, "clip")
                    np.take(st, p, 0, s2, "clip")
                else:                                   # negative or huge positions: no table
                    c2[...], s2[...] = rope_cos_sin(p, *key)
            b.emit(prep)
            memo[mk] = (cos, sin)
        cos, sin = memo[mk]

        if t.params["mode"] == ROPE_NORMAL:           # pairs (x[2i], x[2i+1])
            x0, x1, y0, y1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2], y[..., 0:n_rot:2], y[..., 1:n_rot:2]
        else:                                         # neox: pairs (x[i], x[i + n_rot/2])
            x0, x1, y0, y1 = x[..., :half], x[..., half:n_rot], y[..., :half], y[..., half:n_rot]
        tmp = b.temp((n, h, half))
        b.emit(partial(np.multiply, x0, cos, y0), partial(np.multiply, x1, sin, tmp),
               partial(np.subtract, y0, tmp, y0),    # a cos - b sin
               partial(np.multiply, x0, sin, y1), partial(np.multiply, x1, cos, tmp),
               partial(np.add, y1, tmp, y1))         # a sin + b cos
        if n_rot < d:
            b.emit(partial(np.copyto, y[..., n_rot:], x[..., n_rot:]))

    # -- KV cache and attention ------------------------------------------------------------------
    @staticmethod
    def _kv_store(b: _Builder, t: Tensor) -> None:
        kv, k, v, slots, pos = t.src
        layer = kv.params["layer"]
        K, V, S, P = b.val(k), b.val(v), b.val(slots), b.val(pos)
        b.out(t)
        kvref = b.plan.kvref
        if K.shape[0] == 0:
            return

        def store() -> None:
            st = kvref[0]
            kc, vc, pc = st.k[layer], st.v[layer], st.pos[layer]
            cap = pc.size
            lo, hi = int(S.min()), int(S.max())
            if lo < 0 or hi >= cap:
                raise ValueError(f"kv_store: slot {lo if lo < 0 else hi} outside the cache's [0, {cap})")
            kc.reshape(cap, *kc.shape[2:])[S] = K     # cast to the storage dtype (f16: round to nearest)
            vc.reshape(cap, *vc.shape[2:])[S] = V
            pc.reshape(cap)[S] = P
        b.emit(store)

    def _attention(self, b: _Builder, t: Tensor) -> None:
        q_t, kv_t, bt_t, len_t, qpos_t = t.src[:5]
        layer = kv_t.params["layer"]
        n, H, dk = q_t.shape
        Hkv = kv_t.shape[0]
        dv = kv_t.params["head_dim_v"]
        G = H // Hkv
        window, softcap = t.params["window"], t.params["softcap"]
        qscale = t.params["scale"] / softcap if softcap > 0 else t.params["scale"]
        Q, BT, KL, QP = b.val(q_t), b.val(bt_t), b.val(len_t), b.val(qpos_t)
        out = b.out(t)
        if n == 0:
            return
        out4 = out.reshape(n, Hkv, G, dv)
        q_by_kv = Q.reshape(n, Hkv, G, dk).transpose(1, 0, 2, 3)   # GQA: head h = kv head h // G
        kvref, scratch = b.plan.kvref, self._scratch
        max_slots = BT.shape[0]
        fast_f16 = self._fast_f16

        def gather(arr: np.ndarray, pages: np.ndarray, first: int, L: int, key: str) -> np.ndarray:
            """The sequence's first L slots of ``arr`` (n_pages, P, ...) as float32 or int32 (L, ...).

            first >= 0: the pages are first, first+1, ... -- a view, no gather copy."""
            src = arr[first:first + pages.shape[0]] if first >= 0 else np.take(arr, pages, 0)
            src = src.reshape((-1,) + arr.shape[2:])[:L]
            if arr.dtype != np.float16:
                return src
            dst = scratch.get(key, src.shape, F32)
            if fast_f16:
                _f16_to_f32_bits(src, dst, scratch.get("i32", src.shape, np.int32))
            else:
                np.copyto(dst, src)
            return dst

        def attend() -> None:
            st = kvref[0]
            kc, vc, pc = st.k[layer], st.v[layer], st.pos[layer]
            n_pages, psz = pc.shape
            L = int(KL[0])
            if not 0 < L <= max_slots * psz:
                if L == 0:
                    out.fill(0)
                    return
                raise ValueError(f"attention: kv_len {L} outside [0, {max_slots * psz}] "
                                 f"(block table of {max_slots} pages of {psz})")
            n_pg = -(-L // psz)
            pages = BT[:n_pg]
            first = int(pages[0])
            if not (n_pg == 1 or int(pages[-1]) - first == n_pg - 1 and (np.diff(pages) == 1).all()):
                first = -1                                     # scattered pages: gather them
            lo, hi = (first, first + n_pg - 1) if first >= 0 else (int(pages.min()), int(pages.max()))
            if lo < 0 or hi >= n_pages:
                raise ValueError(f"attention: block table names page {lo if lo < 0 else hi}, "
                                 f"the cache has {n_pages}")
            K = gather(kc, pages, first, L, "k")               # (L, Hkv, dk) f32
            V = gather(vc, pages, first, L, "v")               # (L, Hkv, dv) f32
            kpos = gather(pc, pages, first, L, "")             # (L,) i32
            qs = scratch.get("q", (Hkv, n, G, dk), F32)       # scaled queries grouped by kv head
            np.multiply(q_by_kv, F32(qscale), out=qs)
            qs3 = qs.reshape(Hkv, n * G, dk)
            Kt = K.transpose(1, 2, 0)                          # (Hkv, dk, L)
            Vt = V.transpose(1, 0, 2)                          # (Hkv, L, dv)
            nb = max(1, min(n, _ATTN_BLOCK // (H * L)))        # query rows per block
            for i0 in range(0, n, nb):
                i1 = min(n, i0 + nb)
                r = i1 - i0
                qp = QP[i0:i1, None].astype(np.int64)
                vis = kpos <= qp                               # (r, L) causal by stored position
                if window:
                    vis &= kpos > qp - window
                c0, c1, masked = 0, L, not vis.all()
                if masked:                                     # skip key columns no query here sees
                    cols = np.flatnonzero(vis.any(axis=0))     # (the causal triangle, the window)
                    if cols.size == 0:
                        out4[i0:i1] = 0
                        continue
                    c0, c1 = int(cols[0]), int(cols[-1]) + 1
                    vis = vis[:, c0:c1]
                    masked = not vis.all()
                Lb = c1 - c0
                s = scratch.get("s", (Hkv, r * G, Lb), F32)
                np.matmul(qs3[:, i0 * G:i1 * G], Kt[:, :, c0:c1], out=s)   # (Hkv, r*G, Lb) = scale * q.k
                if softcap > 0:
                    np.tanh(s, out=s)
                    np.multiply(s, F32(softcap), out=s)
                if masked:
                    s4 = s.reshape(Hkv, r, G, Lb)
                    np.add(s4, np.where(vis, F32(0), F32(-np.inf))[None, :, None, :], out=s4)
                mx = s.max(axis=-1, keepdims=True)
                np.maximum(mx, F32(-FLT_MAX), out=mx)          # nothing visible: a finite max
                np.subtract(s, mx, out=s)
                # exp(x < -87.3) is a float32 subnormal, which makes the P @ V sgemm ~15x
                # slower; such weights are < 1e-38 of the max, so clamp them to exp(-87)...
                np.maximum(s, F32(-87.0), out=s)
                np.exp(s, out=s)
                if masked:                                     # ... and zero the masked ones again
                    np.multiply(s4, vis.astype(F32)[None, :, None, :], out=s4)
                den = s.sum(axis=-1, keepdims=True)
                np.maximum(den, F32(FLT_TINY), out=den)        # nothing visible: 0 / tiny = 0
                o = np.matmul(s, Vt[:, c0:c1])                 # (Hkv, r*G, dv), unnormalised
                np.divide(o.reshape(Hkv, r, G, dv).transpose(1, 0, 2, 3),
                          den.reshape(Hkv, r, G, 1).transpose(1, 0, 2, 3), out=out4[i0:i1])
        b.emit(attend)
