"""Op constructors: each checks shapes, records one node and returns its tensor.

Nothing here computes. Every op states its layout at its declaration (shapes in
NumPy order, see ``ggml_py.graph``); a backend must implement exactly these
semantics, and the NumPy backend (``ggml_py.backend_numpy``) is the reference.

How to add an op: write its constructor here with a docstring that is its
specification, implement it in every backend (``supports`` must say no until it
is), and add cases to ``tests/test_ops.py`` comparing it with a direct NumPy
formula (and, for the GPU, ``tests/test_backend_ops.py``).
"""
from __future__ import annotations

from .graph import Tensor

ROPE_NORMAL = "normal"   # rotate adjacent pairs (x[2i], x[2i+1])       -- llama
ROPE_NEOX = "neox"       # rotate halves (x[i], x[i + n_rot/2])          -- gemma, qwen, ...


def _node(op: str, shape: tuple[int, ...], dtype: str, src: tuple[Tensor, ...], **params) -> Tensor:
    g = src[0].graph
    for s in src:
        if s.graph is not g:
            raise ValueError(f"{op}: operands come from different graphs")
    return g._add(Tensor(g, op, tuple(int(d) for d in shape), dtype, src, params))


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _act(t: Tensor, op: str) -> None:
    _need(t.op not in ("weight", "kv") and t.dtype in ("f32", "f16"), f"{op}: expected an activation, got {t}")


# -- lookups and matrix products ----------------------------------------------

def get_rows(a: Tensor, ids: Tensor) -> Tensor:
    """Rows of ``a`` picked by ``ids``.

    a: (R, C), a weight of any ggml type (dequantized row by row) or an activation
    ids: (n,) i32, each in [0, R)
    -> (n, C) f32
    """
    _need(a.ndim == 2, f"get_rows: a must be 2-D, got {a.shape}")
    _need(ids.ndim == 1 and ids.dtype == "i32", f"get_rows: ids must be 1-D i32, got {ids}")
    return _node("get_rows", (ids.shape[0], a.shape[1]), "f32", (a, ids))


def mul_mat(w: Tensor, x: Tensor) -> Tensor:
    """``x @ w.T`` (ggml's ``mul_mat(w, x)``).

    w: (M, K), a weight of any ggml type or an activation
    x: (n, K) f32
    -> (n, M) f32
    """
    _need(w.ndim == 2 and x.ndim == 2, f"mul_mat: expected 2-D operands, got {w.shape} and {x.shape}")
    _need(w.shape[1] == x.shape[1], f"mul_mat: inner dimensions differ: {w.shape} vs {x.shape}")
    _act(x, "mul_mat")
    return _node("mul_mat", (x.shape[0], w.shape[0]), "f32", (w, x))


# -- elementwise ----------------------------------------------------------------

def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    if len(b) > len(a):
        return False
    return all(db in (1, da) for da, db in zip(a[::-1], b[::-1]))


def add(a: Tensor, b: Tensor) -> Tensor:
    """a + b, ``b`` broadcast to ``a``'s shape (NumPy rules, result has ``a``'s shape). b may be a weight (a bias)."""
    _act(a, "add")
    _need(_broadcastable(a.shape, b.shape), f"add: {b.shape} does not broadcast to {a.shape}")
    return _node("add", a.shape, "f32", (a, b))


def mul(a: Tensor, b: Tensor) -> Tensor:
    """a * b, ``b`` broadcast to ``a``'s shape. b may be a weight (a norm scale)."""
    _act(a, "mul")
    _need(_broadcastable(a.shape, b.shape), f"mul: {b.shape} does not broadcast to {a.shape}")
    return _node("mul", a.shape, "f32", (a, b))


def scale(a: Tensor, s: float) -> Tensor:
    """a * s for a constant s."""
    _act(a, "scale")
    return _node("scale", a.shape, "f32", (a,), s=float(s))


def silu(a: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    _act(a, "silu")
    return _node("silu", a.shape, "f32", (a,))


def gelu(a: Tensor) -> Tensor:
    """GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -- ggml_gelu."""
    _act(a, "gelu")
    return _node("gelu", a.shape, "f32", (a,))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, fused (one pass, one launch on the GPU). (n, F), (n, F) -> (n, F)."""
    _act(gate, "swiglu")
    _need(gate.shape == up.shape, f"swiglu: shapes differ: {gate.shape} vs {up.shape}")
    return _node("swiglu", gate.shape, "f32", (gate, up))


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """gelu(gate) * up (tanh-form GELU), fused. (n, F), (n, F) -> (n, F)."""
    _act(gate, "geglu")
    _need(gate.shape == up.shape, f"geglu: shapes differ: {gate.shape} vs {up.shape}")
    return _node("geglu", gate.shape, "f32", (gate, up))


def argmax(x: Tensor) -> Tensor:
    """Index of the largest value of each row (greedy sampling on the device).

    x: (n, V) f32 -> (n,) i32; ties give the lowest index. A row whose maximum is not
    finite (it holds a NaN or +inf, or every value is -inf) gives -1, so a caller that
    copies only the ids can still refuse non-finite logits as the sampler does.
    """
    _act(x, "argmax")
    _need(x.ndim == 2 and x.shape[1] >= 1, f"argmax: x must be (n, V) with V >= 1, got {x.shape}")
    return _node("argmax", (x.shape[0],), "i32", (x,))


def sample(logits: Tensor, params: Tensor, state: Tensor, history: Tensor | None = None) -> Tensor:
    """A token drawn from each row of ``logits`` with that row's sampling settings (sampling on the
    device: only the ids come back; the GPU kernels are ggml_py/cuda/sampling.cu).

    logits: (n, V) f32; params: (n, 8) f32 [temperature, top_p, log_min_p, repeat_penalty,
    frequency_penalty, presence_penalty, 0, 0]; state: (n, 8) i32 [top_k, seed_lo, seed_hi,
    counter_lo, counter_hi, 0, 0, 0]; history: (n, W) i32, the row's last accepted tokens (-1 or any
    id outside [0, V): empty), or None (no penalties). ``ggml_py.sample_ref.pack_row`` builds a row.
    -> (n,) i32.

    Distribution: engine.sampling's chain (llama.cpp: penalties -> top-k -> top-p -> min-p ->
    temperature; top-p and min-p on the T = 1 penalised distribution, every filter a prefix of
    (logit desc, id asc)); temperature <= 0 is greedy (argmax of the penalised logits, lowest id).
    The draw is a function of (logits, params, seed, counter): ``ggml_py.sample_ref`` (the NumPy
    backend) and the GPU use the same Philox4x32-10 stream and rejection algorithm, so they agree
    except where float rounding differs. A row whose logits are not finite (NaN, +inf, every one
    -inf, before or after the penalties) gives -1; penalties that overflow give -2.
    """
    _act(logits, "sample")
    _need(logits.ndim == 2 and logits.shape[1] >= 1, f"sample: logits must be (n, V) with V >= 1, got {logits.shape}")
    n = logits.shape[0]
    _need(params.shape == (n, 8) and params.dtype == "f32", f"sample: params must be ({n}, 8) f32, got {params}")
    _need(state.shape == (n, 8) and state.dtype == "i32", f"sample: state must be ({n}, 8) i32, got {state}")
    src = (logits, params, state)
    if history is not None:
        _need(history.ndim == 2 and history.shape[0] == n and history.shape[1] >= 1 and history.dtype == "i32",
              f"sample: history must be ({n}, W >= 1) i32, got {history}")
        src += (history,)
    return _node("sample", (n,), "i32", src)


# -- shape ----------------------------------------------------------------------

def reshape(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Same contiguous data, new shape (no copy on any backend)."""
    n_old = 1
    for d in a.shape:
        n_old *= d
    n_new = 1
    for d in shape:
        n_new *= d
    _need(n_old == n_new, f"reshape: {a.shape} has {n_old} elements, {tuple(shape)} has {n_new}")
    return _node("reshape", tuple(shape), a.dtype, (a,))


# -- normalisation ------------------------------------------------------------------

def rms_norm(x: Tensor, eps: float, w: Tensor | None = None) -> Tensor:
    """RMS norm over the last dimension, then (optionally) times ``w``.

    x: (..., d); w: (d,) or None
    y = x / sqrt(mean(x^2) + eps) [* w]     -- ggml_rms_norm followed by ggml_mul
    """
    _act(x, "rms_norm")
    if w is not None:
        _need(w.shape == (x.shape[-1],), f"rms_norm: weight {w.shape} does not match last dim of {x.shape}")
    src = (x,) if w is None else (x, w)
    return _node("rms_norm", x.shape, "f32", src, eps=float(eps))


def soft_max(x: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """softmax(x * scale + mask) over the last dimension (ggml_soft_max_ext).

    x: (..., n); mask: broadcastable to x, f32 with 0 / -inf entries, or None.
    A row that is all -inf gives zeros (not NaN).
    """
    _act(x, "soft_max")
    src = (x,)
    if mask is not None:
        _need(_broadcastable(x.shape, mask.shape), f"soft_max: mask {mask.shape} does not broadcast to {x.shape}")
        src = (x, mask)
    return _node("soft_max", x.shape, "f32", src, scale=float(scale))


# -- positions ----------------------------------------------------------------------

def rope(x: Tensor, pos: Tensor, n_rot: int, base: float, freq_scale: float = 1.0,
         mode: str = ROPE_NORMAL) -> Tensor:
    """Rotary position embedding (ggml_rope_ext without YaRN extrapolation).

    x: (n, H, d); pos: (n,) i32; the first ``n_rot`` of d dims rotate, the rest pass.
    theta(p, i) = p * freq_scale * base^(-2i/n_rot), i in [0, n_rot/2)
    normal: pairs (x[2i], x[2i+1]);  neox: pairs (x[i], x[i + n_rot/2]).
    (a, b) -> (a cos - b sin, a sin + b cos)
    """
    _act(x, "rope")
    _need(x.ndim == 3, f"rope: x must be (n, heads, dim), got {x.shape}")
    _need(pos.shape == (x.shape[0],) and pos.dtype == "i32", f"rope: pos must be ({x.shape[0]},) i32")
    _need(0 < n_rot <= x.shape[2] and n_rot % 2 == 0, f"rope: bad n_rot {n_rot} for head dim {x.shape[2]}")
    _need(mode in (ROPE_NORMAL, ROPE_NEOX), f"rope: unknown mode {mode!r}")
    return _node("rope", x.shape, "f32", (x, pos), n_rot=int(n_rot), base=float(base),
                 freq_scale=float(freq_scale), mode=mode)


# -- KV cache and attention ---------------------------------------------------------------

def kv_store(kv: Tensor, k: Tensor, v: Tensor, slots: Tensor, pos: Tensor) -> Tensor:
    """Write this step's keys and values into the layer's pages.

    kv: the layer (``Graph.kv_layer``); k: (n, Hkv, dk); v: (n, Hkv, dv)
    slots: (n,) i32 physical slot of each token = page * page_size + offset_in_page
    pos: (n,) i32 position of each token, stored beside it (attention masks by stored
    position, so eviction may reorder or drop slots without touching attention)
    -> a (0,)-shaped token that ``attention`` takes in ``after`` to order the write first
    """
    hkv, dk = kv.shape
    dv = kv.params["head_dim_v"]
    n = k.shape[0]
    _need(k.shape == (n, hkv, dk), f"kv_store: k {k.shape} does not match cache ({n}, {hkv}, {dk})")
    _need(v.shape == (n, hkv, dv), f"kv_store: v {v.shape} does not match cache ({n}, {hkv}, {dv})")
    _need(slots.shape == (n,) and slots.dtype == "i32", "kv_store: slots must be (n,) i32")
    _need(pos.shape == (n,) and pos.dtype == "i32", "kv_store: pos must be (n,) i32")
    return _node("kv_store", (0,), "f32", (kv, k, v, slots, pos))


def attention(q: Tensor, kv: Tensor, block_table: Tensor, kv_len: Tensor, q_pos: Tensor,
              scale: float, window: int = 0, softcap: float = 0.0,
              after: tuple[Tensor, ...] = ()) -> Tensor:
    """Attention of this step's queries over a sequence's cached keys and values.

    q: (n, H, dk); kv: the layer; H a multiple of Hkv (GQA: query head h reads kv head h // (H/Hkv))
    block_table: (max_pages,) i32 -- logical slot j of the sequence lives in physical
        slot block_table[j // page_size] * page_size + j % page_size
    kv_len: (1,) i32 -- the sequence has logical slots [0, kv_len)
    q_pos: (n,) i32 -- position of each query
    Query i sees slot j iff pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - pos[j] < window).
    s = scale * q.k (then softcap * tanh(s / softcap) when softcap > 0); softmax over
    the visible slots; out = sum p * v.
    -> (n, H * dv) f32
    """
    _act(q, "attention")
    n, h, dk = q.shape
    hkv, dk_c = kv.shape
    _need(dk == dk_c, f"attention: q head dim {dk} != cache head dim {dk_c}")
    _need(h % hkv == 0, f"attention: {h} query heads not a multiple of {hkv} kv heads")
    _need(block_table.ndim == 1 and block_table.dtype == "i32", "attention: block_table must be 1-D i32")
    _need(kv_len.shape == (1,) and kv_len.dtype == "i32", "attention: kv_len must be (1,) i32")
    _need(q_pos.shape == (n,) and q_pos.dtype == "i32", "attention: q_pos must be (n,) i32")
    _need(window >= 0, "attention: window must be >= 0")
    dv = kv.params["head_dim_v"]
    return _node("attention", (n, h * dv), "f32", (q, kv, block_table, kv_len, q_pos) + tuple(after),
                 scale=float(scale), window=int(window), softcap=float(softcap))
