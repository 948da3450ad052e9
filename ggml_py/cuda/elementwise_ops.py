"""Launch wrappers for ``elementwise.cu``: add/mul (broadcast), scale, silu, gelu, swiglu,
geglu, rms_norm (+weight, and fused with the residual add before it), soft_max (+mask,
scale), rope (normal/neox, ggml's theta arithmetic), get_rows of activations, argmax.

Every op comes twice (DESIGN.md in this folder):

- ``prepare_<op>(..., stream) -> step``: checks shapes, picks the kernel and the launch
  geometry once and returns a zero-argument callable with every argument bound. The
  backend calls these at plan time; a run is then ``for step in steps: step()``, and
  the steps can be captured into a CUDA graph (nothing per-run is a Python value).
- ``<op>(..., stream)``: ``prepare_<op>(...)()``, for one-off use.

Arrays are CuPy arrays, C-contiguous, float32 (ids/positions int32); outputs are
preallocated; nothing here allocates or synchronises. Shapes are in NumPy order.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import numpy as np

Step = Callable[[], Any]

_BLOCK = 256                 # threads of the flat elementwise kernels
_MAX_GRID = 4096             # grid-stride beyond this many blocks (an H100 holds ~1000 at once)

# A simulated device for host-side tests (tests/test_backend_ops.py): when set, kernels are
# "launched" through ``SIMULATOR(name, grid, block, args, shared_mem) -> step``.
SIMULATOR: Callable[..., Step] | None = None

_functions: dict[str, Any] = {}


def _function(name: str) -> Any:
    """The compiled kernel ``name`` as a callable (grid, block, args, shared_mem, stream)."""
    fn = _functions.get(name)
    if fn is None:
        from .compile import kernel_callable, load_module

        fn = _functions[name] = kernel_callable(load_module("elementwise").get_function(name))
    return fn


def launch(name: str, grid: int, block: int, args: tuple, stream: Any, shared_mem: int = 0) -> Step:
    """A bound launch of kernel ``name`` (scalars in ``args`` must be NumPy scalars of the C type)."""
    if SIMULATOR is not None:
        return SIMULATOR(name, grid, block, args, shared_mem)
    return partial(_function(name), (int(grid),), (int(block),), args, int(shared_mem), stream)


def _nothing() -> None:
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _flat_grid(n: int) -> int:
    return max(1, min(_cdiv(n, _BLOCK), _MAX_GRID))


def _row_threads(d: int, per_thread: int = 4, cap: int = 1024) -> int:
    """Threads for a one-block-per-row kernel: a power of two in [32, cap], ~per_thread elements each."""
    t = 32
    while t < cap and t * per_thread < d:
        t *= 2
    return t


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _same_shape(op: str, *arrays: Any) -> None:
    s = arrays[0].shape
    for a in arrays[1:]:
        _check(a.shape == s, f"{op}: shapes differ: {s} vs {a.shape}")


# -- broadcast layouts ------------------------------------------------------------------------------

def broadcast_layout(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple:
    """How ``b`` broadcasts over ``a`` (NumPy rules, ``b`` contiguous):

    ("same",)                         b has a's element layout
    ("row", nb)                       b[i % nb]: b is a trailing block of a (a bias over rows)
    ("bcast", (s0..s3), (t0..t3))     a collapsed to 4 dims, b's element strides (0 = broadcast)

    Raises ValueError when ``b`` does not broadcast or needs more than 4 collapsed dims.
    """
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    _check(len(b_shape) <= len(a_shape), f"broadcast: {b_shape} has more dims than {a_shape}")
    b_full = (1,) * (len(a_shape) - len(b_shape)) + b_shape
    dims: list[list] = []                     # [size, is_broadcast] after dropping size-1 dims of a
    for da, db in zip(a_shape, b_full):
        _check(db in (1, da), f"broadcast: {b_shape} does not broadcast to {a_shape}")
        if da == 1:
            continue
        bc = db == 1
        if dims and dims[-1][1] == bc:
            dims[-1][0] *= da
        else:
            dims.append([da, bc])
    if not dims or not any(bc for _, bc in dims):
        return ("same",)
    if all(bc for _, bc in dims[:-1]) and (not dims[-1][1] or len(dims) == 1):
        nb = 1 if dims[-1][1] else dims[-1][0]          # all-broadcast: b is one value
        return ("row", nb)
    _check(len(dims) <= 4, f"broadcast of {b_shape} over {a_shape} needs {len(dims)} > 4 collapsed dims")
    sizes = [d for d, _ in dims]
    strides, acc = [], 1
    for d, bc in reversed(dims):
        strides.append(0 if bc else acc)
        if not bc:
            acc *= d
    strides.reverse()
    pad = 4 - len(dims)
    return ("bcast", tuple([1] * pad + sizes), tuple([0] * pad + strides))


# -- binary -------------------------------------------------------------------------------------------

_BINARY_OPS = {"add": 0, "mul": 1}


def prepare_binary(op: str, a: Any, b: Any, out: Any, stream: Any) -> Step:
    """out = a (op) b, b broadcast to a's shape; out has a's shape and may alias a, or b if b has a's shape."""
    code = np.int32(_BINARY_OPS[op])
    _check(out.shape == a.shape, f"{op}: out {out.shape} != a {a.shape}")
    n = int(a.size)
    if n == 0:
        return _nothing
    lay = broadcast_layout(a.shape, b.shape)
    grid = _flat_grid(n)
    if lay[0] == "same":
        return launch("binary_same_f32", grid, _BLOCK, (a, b, out, np.int64(n), code), stream)
    if lay[0] == "row":
        return launch("binary_row_f32", grid, _BLOCK, (a, b, out, np.int64(n), np.int64(lay[1]), code), stream)
    s, t = lay[1], lay[2]
    args = (a, b, out, np.int64(n), np.int64(s[1]), np.int64(s[2]), np.int64(s[3]),
            np.int64(t[0]), np.int64(t[1]), np.int64(t[2]), np.int64(t[3]), code)
    return launch("binary_bcast_f32", grid, _BLOCK, args, stream)


def add(a: Any, b: Any, out: Any, stream: Any) -> None:
    prepare_binary("add", a, b, out, stream)()


def mul(a: Any, b: Any, out: Any, stream: Any) -> None:
    prepare_binary("mul", a, b, out, stream)()


# -- unary and gated ------------------------------------------------------------------------------------

def prepare_scale(x: Any, out: Any, s: float, stream: Any) -> Step:
    _same_shape("scale", x, out)
    n = int(x.size)
    if n == 0:
        return _nothing
    return launch("scale_f32", _flat_grid(n), _BLOCK, (x, out, np.float32(s), np.int64(n)), stream)


def prepare_unary(op: str, x: Any, out: Any, stream: Any) -> Step:
    """op: "silu" | "gelu" (tanh form); out may alias x."""
    _check(op in ("silu", "gelu"), f"unknown unary op {op!r}")
    _same_shape(op, x, out)
    n = int(x.size)
    if n == 0:
        return _nothing
    return launch(f"{op}_f32", _flat_grid(n), _BLOCK, (x, out, np.int64(n)), stream)


def prepare_glu(op: str, gate: Any, up: Any, out: Any, stream: Any) -> Step:
    """op: "swiglu" (silu(gate) * up) | "geglu" (gelu(gate) * up); out may alias gate or up."""
    _check(op in ("swiglu", "geglu"), f"unknown gated op {op!r}")
    _same_shape(op, gate, up, out)
    n = int(gate.size)
    if n == 0:
        return _nothing
    return launch(f"{op}_f32", _flat_grid(n), _BLOCK, (gate, up, out, np.int64(n)), stream)


def scale(x: Any, out: Any, s: float, stream: Any) -> None:
    prepare_scale(x, out, s, stream)()


def silu(x: Any, out: Any, stream: Any) -> None:
    prepare_unary("silu", x, out, stream)()


def gelu(x: Any, out: Any, stream: Any) -> None:
    prepare_unary("gelu", x, out, stream)()


def swiglu(gate: Any, up: Any, out: Any, stream: Any) -> None:
    prepare_glu("swiglu", gate, up, out, stream)()


def geglu(gate: Any, up: Any, out: Any, stream: Any) -> None:
    prepare_glu("geglu", gate, up, out, stream)()


# -- rms_norm ---------------------------------------------------------------------------------------------

def prepare_rms_norm(x: Any, w: Any | None, out: Any, eps: float, stream: Any,
                     x2: Any | None = None, w2: Any | None = None, out2: Any | None = None) -> Step:
    """out = x / sqrt(mean(x^2, last dim) + eps) [* w]; one block per row; out may alias x.

    x2/w2/out2: a second tensor of the same last dim normed in the same launch (gemma's q and k
    norms); out2 may alias x2 but must not overlap x (nor out overlap x2)."""
    _same_shape("rms_norm", x, out)
    d = int(x.shape[-1]) if x.ndim else 1
    if w is not None:
        _check(tuple(w.shape) == (d,), f"rms_norm: weight {w.shape} does not match last dim {d}")
    rows = int(x.size) // d if d else 0
    rows2 = 0
    if x2 is not None:
        _same_shape("rms_norm", x2, out2)
        _check(x2.ndim and int(x2.shape[-1]) == d, f"rms_norm: paired tensor {x2.shape} has another last dim")
        if w2 is not None:
            _check(tuple(w2.shape) == (d,), f"rms_norm: weight {w2.shape} does not match last dim {d}")
        rows2 = int(x2.size) // d if d else 0
    if rows + rows2 == 0 or d == 0:
        return _nothing
    return launch("rms_norm_f32", rows + rows2, _row_threads(d),
                  (x, w, out, np.int32(rows), x2, w2, out2, np.int32(d), np.float32(eps)), stream)


def prepare_add_rms_norm(a: Any, b: Any, s_out: Any, w: Any | None, out: Any, eps: float, stream: Any) -> Step:
    """s_out = a + b (same shapes) and out = rms_norm(s_out) [* w], in one pass.

    s_out may alias a or b; out may alias whichever of them s_out does not."""
    _same_shape("add_rms_norm", a, b, s_out, out)
    d = int(a.shape[-1]) if a.ndim else 1
    if w is not None:
        _check(tuple(w.shape) == (d,), f"rms_norm: weight {w.shape} does not match last dim {d}")
    rows = int(a.size) // d if d else 0
    if rows == 0 or d == 0:
        return _nothing
    return launch("add_rms_norm_f32", rows, _row_threads(d),
                  (a, b, s_out, w, out, np.int32(d), np.float32(eps)), stream)


def rms_norm(x: Any, w: Any | None, out: Any, eps: float, stream: Any) -> None:
    prepare_rms_norm(x, w, out, eps, stream)()


# -- soft_max -----------------------------------------------------------------------------------------------

def prepare_soft_max(x: Any, mask: Any | None, out: Any, scale: float, stream: Any) -> Step:
    """out = softmax(x * scale + mask) over the last dim (x up to 4-D; mask broadcasts to x);
    all -inf rows give zeros; out may alias x."""
    _same_shape("soft_max", x, out)
    _check(1 <= x.ndim <= 4, f"soft_max: x must have 1 to 4 dims, got {x.shape}")
    ncols = int(x.shape[-1])
    rows = int(x.size) // ncols if ncols else 0
    if rows == 0:
        return _nothing
    lead = (1,) * (4 - x.ndim) + tuple(int(d) for d in x.shape)     # (s0, s1, s2, ncols)
    m = [0, 0, 0, 0]
    if mask is not None:
        _check(mask.ndim <= x.ndim, f"soft_max: mask {mask.shape} has more dims than x {x.shape}")
        ms = (1,) * (4 - mask.ndim) + tuple(int(d) for d in mask.shape)
        acc = 1
        for k in range(3, -1, -1):
            _check(ms[k] in (1, lead[k]), f"soft_max: mask {mask.shape} does not broadcast to {x.shape}")
            m[k] = 0 if ms[k] == 1 and lead[k] != 1 else acc
            acc *= ms[k]
    args = (x, mask, out, np.int32(ncols), np.float32(scale), np.int32(lead[1]), np.int32(lead[2]),
            np.int64(m[0]), np.int64(m[1]), np.int64(m[2]), np.int64(m[3]))
    return launch("soft_max_f32", rows, _row_threads(ncols), args, stream)


# -- rope -------------------------------------------------------------------------------------------------------

def rope_theta_scale(base: float, n_rot: int) -> np.float32:
    """powf(base, -2.0f/n_rot) correctly rounded, as ggml_rope_cache_init (and the NumPy reference) use it."""
    f32 = np.float32
    return f32(math.pow(float(f32(base)), float(f32(-2.0) / f32(n_rot))))


def prepare_rope(x: Any, pos: Any, out: Any, n_rot: int, base: float, freq_scale: float, neox: bool,
                 stream: Any, x2: Any | None = None, out2: Any | None = None) -> Step:
    """Rotary embedding of x (n, H, d) at positions pos (n,) i32; the first n_rot dims rotate
    (normal: pairs (2i, 2i+1); neox: pairs (i, i + n_rot/2)), the rest pass; out may alias x.

    x2/out2 (n, H2, d): a second tensor at the same positions in the same launch (q and k);
    out2 may alias x2 but must not overlap x (nor out overlap x2)."""
    _same_shape("rope", x, out)
    _check(x.ndim == 3, f"rope: x must be (n, heads, dim), got {x.shape}")
    n, h, d = (int(s) for s in x.shape)
    h2 = 0
    if x2 is not None:
        _same_shape("rope", x2, out2)
        _check(x2.ndim == 3 and int(x2.shape[0]) == n and int(x2.shape[2]) == d,
               f"rope: paired tensor {x2.shape} does not match {x.shape}")
        h2 = int(x2.shape[1])
    _check(tuple(pos.shape) == (n,), f"rope: pos must be ({n},), got {pos.shape}")
    _check(0 < n_rot <= d and n_rot % 2 == 0, f"rope: bad n_rot {n_rot} for head dim {d}")
    if n == 0 or h + h2 == 0:
        return _nothing
    half = n_rot // 2
    threads = _row_threads((h + h2) * half, per_thread=1, cap=256)
    args = (x, out, np.int32(h), x2, out2, np.int32(h2), pos, np.int32(d), np.int32(n_rot),
            rope_theta_scale(base, n_rot), np.float32(freq_scale), np.int32(1 if neox else 0))
    return launch("rope_f32", n, threads, args, stream, shared_mem=4 * n_rot)


# -- get_rows, argmax ---------------------------------------------------------------------------------------------

def prepare_get_rows(a: Any, ids: Any, out: Any, stream: Any) -> Step:
    """out[r] = a[ids[r]] for an activation a (R, C) f32 and ids (n,) i32 (clamped into [0, R))."""
    _check(a.ndim == 2 and ids.ndim == 1, f"get_rows: a must be 2-D and ids 1-D, got {a.shape}, {ids.shape}")
    n, c = int(ids.shape[0]), int(a.shape[1])
    _check(tuple(out.shape) == (n, c), f"get_rows: out {out.shape} != {(n, c)}")
    if n == 0 or c == 0:
        return _nothing
    _check(a.shape[0] > 0, "get_rows: a has no rows")
    return launch("get_rows_f32", n, _row_threads(c, per_thread=4, cap=256),
                  (a, ids, out, np.int32(a.shape[0]), np.int64(c)), stream)


def prepare_argmax(x: Any, out: Any, stream: Any) -> Step:
    """out[r] = index of the maximum of row r of x (n, V) f32 (lowest index on ties), i32; -1 where
    that maximum is not finite (NaN, +inf, all -inf)."""
    _check(x.ndim == 2, f"argmax: x must be 2-D, got {x.shape}")
    n, v = (int(s) for s in x.shape)
    _check(tuple(out.shape) == (n,), f"argmax: out {out.shape} != {(n,)}")
    if n == 0:
        return _nothing
    return launch("argmax_f32", n, _row_threads(v, per_thread=8), (x, out, np.int64(v)), stream)


def soft_max(x: Any, mask: Any | None, out: Any, scale: float, stream: Any) -> None:
    prepare_soft_max(x, mask, out, scale, stream)()


def rope(x: Any, pos: Any, out: Any, n_rot: int, base: float, freq_scale: float, neox: bool, stream: Any) -> None:
    prepare_rope(x, pos, out, n_rot, base, freq_scale, neox, stream)()


def get_rows(a: Any, ids: Any, out: Any, stream: Any) -> None:
    prepare_get_rows(a, ids, out, stream)()


def argmax(x: Any, out: Any, stream: Any) -> None:
    prepare_argmax(x, out, stream)()
