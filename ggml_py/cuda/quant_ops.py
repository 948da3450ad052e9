"""Quantized weights on the GPU: upload, get_rows, mul_mat (kernels in ``quant.cu``).

A weight stays in its GGUF form: ``DeviceWeight.data`` is one ``cupy.uint8`` array of the
raw blocks (one host-to-device copy, nothing dequantized); F32 tensors are ``cupy.float32``
arrays of their NumPy shape. The layouts are quant_formats' (its NumPy dequantizers are the
specification); ``quant.cu`` holds one small decoder per type.

``mul_mat``: ``out (n, M) = x (n, K) @ W.T``, f32 in and out.

- n <= 8 (decode, the hot path): one launch of a GEMV kernel ``mmv_<type>_n<N>_r<R>`` that
  reads the blocks directly. A CTA of ``warps`` warps owns R rows; its lanes split the
  rows' items (8 weights each) so every x float4 it loads feeds R rows; f32 accumulation,
  shuffle + shared-memory reduction. N (1, 2, 4 or 8) is the next size up from n.
- n > 8 (prefill): the weight is dequantized to f16 in ``scratch`` (tiles of at most
  ``PREFILL_TILE_BYTES``), x is cast to f16 in ``scratch``, and cuBLAS ``GemmEx`` multiplies
  them with f32 accumulation, writing f32 ``out``. F16 weights skip the dequantization;
  F32 weights (and f32 activation matrices) go straight to an f32 GEMM.

Grouped decode GEMVs (``plan_mul_mat_group``, kernels ``mmvg_<type>_n<N>_r<R>`` for the main
types): the mul_mats of one x (q/k/v; gate/up) as one launch, optionally with the ropes of q
and k, the swiglu/geglu of gate and up, the rms_norm of x, or a residual add folded in; the
CuPy backend's plan decides what to group (``CupyBackend._mm_regions``).

Choices are made once per (type, shape, n) at plan time: ``plan_mul_mat(w, n, scratch)``
returns a callable ``(x, out, stream)``, and its ``bind(x, out, stream)`` a zero-argument
callable whose run-time cost is the launches alone. Nothing here allocates or synchronises
at run time and nothing reads device data on the host, so every call can be captured into
a CUDA graph. The prefill GEMM calls cuBLAS through ctypes (CuPy's wrappers refuse to run
during a capture) with a handle and workspace of its own per (device, stream), made at bind
time: bind on the stream that will run (or capture) the call.

``get_rows`` ids are read on the device and clamped to [0, rows) (the NumPy backend raises
on an out-of-range id; a GPU kernel cannot, and an unchecked id would read out of bounds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable

import numpy as np

from engine.errors import GGFlatError, UnknownTypeError
from quant_formats import get_format, tensor_nbytes, type_name

from . import marlin_ops as marlin
from .compile import load_module

# ggml type id -> kernel-name suffix
_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0",
          10: "q2_k", 11: "q3_k", 12: "q4_k", 13: "q5_k", 14: "q6_k", 30: "bf16"}
SUPPORTED_TYPES = frozenset(_NAMES)
F32, F16, BF16 = 0, 1, 30
_FLOAT_TYPES = (F32, F16, BF16)
# elements per (virtual) block and items per block, as in quant.cu (float types: blocks of 8)
_QK_NI = {F32: (8, 1), F16: (8, 1), BF16: (8, 1), 2: (32, 4), 3: (32, 4), 6: (32, 4), 7: (32, 4),
          8: (32, 4), 10: (256, 32), 11: (256, 32), 12: (256, 32), 13: (256, 32), 14: (256, 32)}
# types with the extra R = 4 GEMV variants (the reference models' types)
_MAIN_TYPES = frozenset({2, 3, 6, 8, 12, 14})
# (N, R) variants compiled for every type; the main types add (1, 4), (4, 4), (8, 4)
_VARIANTS = ((1, 1), (1, 2), (2, 2), (4, 2), (8, 2))
_MAIN_VARIANTS = _VARIANTS + ((1, 4), (4, 4), (8, 4))

DECODE_MAX_N = 8                      # n <= this: GEMV kernels; above: dequantize + cuBLAS
PREFILL_TILE_BYTES = 64 << 20         # at most this much f16 weight is dequantized at a time
_ALIGN = 256

_CUDA_R_32F, _CUDA_R_16F = 0, 2       # cudaDataType_t
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_GEMM_DEFAULT = -1


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# -- weights ------------------------------------------------------------------------------

@dataclass(eq=False)
class DeviceWeight:
    """A weight on the GPU in its GGUF form.

    ggml_type: ggml type id; shape: NumPy order (rows..., K), K = shape[-1];
    data: cupy.uint8 (nbytes,) raw blocks, or cupy.float32 of ``shape`` for F32;
    nbytes: bytes of the tensor (== data.nbytes).
    """
    ggml_type: int
    shape: tuple[int, ...]
    data: Any
    nbytes: int
    name: str = ""
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


def upload_weight(ws) -> DeviceWeight:
    """``ws``: a ``ggml_py.WeightSource``. One host-to-device copy of its bytes; blocks stay raw."""
    import cupy
    tid = int(ws.ggml_type)
    if tid not in SUPPORTED_TYPES:
        get_format(tid)                   # names an unknown id
        raise UnknownTypeError(f"weight {ws.name!r}: the CuPy backend does not support "
                               f"ggml type {type_name(tid)} ({tid})")
    shape = tuple(int(d) for d in ws.shape)
    if not shape:
        raise GGFlatError(f"weight {ws.name!r}: a weight needs at least one dimension")
    nbytes = tensor_nbytes(tid, shape)
    raw = np.ascontiguousarray(ws.data).reshape(-1).view(np.uint8)
    if raw.size != nbytes:
        raise GGFlatError(f"weight {ws.name!r}: {type_name(tid)} {shape} needs {nbytes} bytes, got {raw.size}")
    if tid == F32:
        data = cupy.asarray(raw.view(np.float32).reshape(shape))
    else:
        data = cupy.empty(nbytes, cupy.uint8)
        data.set(raw)
    dw = DeviceWeight(tid, shape, data, nbytes, ws.name)
    if marlin.should_repack(tid, shape, nbytes):
        mw = marlin.repack(dw)          # the GGUF copy is dropped when dw goes
        cupy.cuda.get_current_stream().synchronize()
        return mw
    return dw


def _wtype(w) -> tuple[int, int, int]:
    """(type id, rows M, K) of a DeviceWeight or an f32 activation matrix."""
    if isinstance(w, DeviceWeight):
        return w.ggml_type, w.rows, w.cols
    if w.ndim != 2 or w.dtype != np.float32 or not w.flags.c_contiguous:
        raise ValueError(f"weight matrix must be a C-contiguous 2-D float32 array, got {w.dtype} {w.shape}")
    return F32, int(w.shape[0]), int(w.shape[1])


def _wdata(w):
    return w.data if isinstance(w, DeviceWeight) else w


def weight_span(w) -> tuple[int, int]:
    """(device address, nbytes) of a weight's bytes on the GPU: a DeviceWeight's blocks, a
    MarlinWeight's repacked layout or a dense array (what a kernel may ask L2 to prefetch)."""
    data = w.data if isinstance(w, (DeviceWeight, marlin.MarlinWeight)) else w
    return int(data.data.ptr), int(data.nbytes)


def _kernel(name: str):
    return _module().get_function(name)


@lru_cache(maxsize=None)
def _module():
    return load_module("quant")


def _launch(kern, n_threads: int, args: tuple, block: int = 256) -> Callable[[], None]:
    """A zero-argument launch of ``kern`` over n_threads threads (1-D grid)."""
    return partial(kern, (max(1, -(-n_threads // block)),), (block,), args)


def _runner(steps: list[Callable[[], None]], stream) -> Callable[[], None]:
    """Run ``steps`` (zero-argument callables) on ``stream`` (None: the current stream)."""
    if stream is None:
        def run() -> None:
            for f in steps:
                f()
    else:
        def run() -> None:
            with stream:
                for f in steps:
                    f()
    return run


def _check_act(a, shape: tuple[int, int], what: str, align: int = 4) -> None:
    if a.dtype != np.float32 or tuple(a.shape) != shape or not a.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous float32 array of shape {shape}, "
                         f"got {a.dtype} {tuple(a.shape)}")
    if a.data.ptr % align:
        raise ValueError(f"{what} must be {align}-byte aligned")


# -- get_rows ---------------------------------------------------------------------------------

def get_rows(w, ids, out, stream=None) -> None:
    """out (n, C) f32 = rows ids (n,) i32 of w (R, C) (DeviceWeight of any supported type, or a
    cupy f32 matrix). Ids are clamped to [0, R)."""
    plan_get_rows(w, ids, out, stream)()


def plan_get_rows(w, ids, out, stream=None) -> Callable[[], None]:
    """get_rows bound to its buffers: a zero-argument callable (one launch)."""
    if isinstance(w, marlin.MarlinWeight):
        if ids.dtype != np.int32 or ids.ndim != 1 or not ids.flags.c_contiguous:
            raise ValueError(f"ids must be a contiguous 1-D int32 array, got {ids.dtype} {ids.shape}")
        return _runner([marlin.plan_get_rows(w, ids, out, stream)], None)
    tid, R, C = _wtype(w)
    if ids.dtype != np.int32 or ids.ndim != 1 or not ids.flags.c_contiguous:
        raise ValueError(f"ids must be a contiguous 1-D int32 array, got {ids.dtype} {ids.shape}")
    n = int(ids.shape[0])
    if out.dtype != np.float32 or tuple(out.shape) != (n, C) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, C)}, got {out.dtype} {out.shape}")
    steps = []
    if n and C and R:
        data = _wdata(w)
        qk, ni = _QK_NI[tid]
        vec_ok = C % qk == 0 and out.data.ptr % 16 == 0 and data.data.ptr % 16 == 0
        if vec_ok:
            nb = C // qk
            steps.append(_launch(_kernel(f"getrows_{_NAMES[tid]}"), n * nb * ni,
                                 (data, ids, out, np.int32(n), np.int32(R), np.int32(nb))))
        elif tid in _FLOAT_TYPES:
            kind = {F32: 0, F16: 1, BF16: 2}[tid]
            steps.append(_launch(_kernel("getrows_float_any"), n * C,
                                 (data, ids, out, np.int32(n), np.int32(R), np.int32(C), np.int32(kind))))
        else:
            raise ValueError("get_rows of a quantized weight needs a 16-byte aligned out")
    return _runner(steps, stream)


# -- mul_mat ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Choice:
    """How out (n, M) = x (n, K) @ W.T is computed for one (type, M, K, n)."""
    kind: str                 # "mmv" | "gemm16" | "gemm32" | "empty" (n = 0)
    kernel: str = ""          # mmv: kernel name
    rows_per_cta: int = 1     # mmv: R
    warps: int = 1            # mmv: warps per CTA
    tile_rows: int = 0        # gemm16: weight rows dequantized per tile (0: F16, no dequant)
    scratch: int = 0          # bytes of scratch needed


# GEMV choices, from a sweep on an H100 (benchmarks/bench_cuda_quant.py --sweep): x float4s
# are shared by R rows, so a larger R saves x traffic (the L1 load path, not DRAM, limits
# these kernels); the 4- and 5-bit types like R = 4 at n = 1, the byte-heavier Q8_0 and Q6_K
# R = 2; for n >= 3 R = 4 wins everywhere it is compiled.
_R4_AT_N1 = frozenset({2, 3, 6, 12})              # Q4_0 Q4_1 Q5_0 Q4_K


def _mmv_variant(tid: int, n: int, M: int = 0, items: int = 0) -> tuple[int, int]:
    """(N, R) of the GEMV kernel for n rows of x (M rows of W, ``items`` items a row)."""
    main = tid in _MAIN_TYPES
    if n == 1:
        if tid == 8 and items <= 128 and M >= 16384:
            return 1, 4          # Q8_0 lm heads (short rows, huge M): 95.8 us vs 102.6 at R = 2
        return 1, 4 if tid in _R4_AT_N1 else 2
    if n == 2:
        return 2, 2
    return (4 if n <= 4 else 8), (4 if main else 2)


def _mmv_warps(items: int, M: int, R: int, N: int) -> int:
    """Warps per CTA (they split each row's items): the fewest (a power of two) that put
    8192 warps (N >= 4: 4096, they hold more registers) in the grid of ceil(M / R) CTAs,
    at most 8 and at most the row's steps of 32 items rounded up to a power of two.
    Measured best on the sweep's shapes: K=4096 M=14336 -> 4, K=14336 M=4096 -> 8,
    M=576 -> 8, and 1 for the lm heads (K=576/640, M=49152/262144: 2-3 steps a row, where
    splitting rows over warps costs more than it hides: 2 warps were 12% slower)."""
    steps = -(-items // 32)
    cap = min(8, 1 << max(0, (steps - 1).bit_length()))
    target = 8192 if N <= 2 else 4096
    ctas = -(-M // R)
    w = 1
    while w < cap and ctas * w < target:
        w *= 2
    return w


@lru_cache(maxsize=4096)
def _choose(tid: int, M: int, K: int, n: int, variant: tuple[int, int] | None = None,
            warps: int | None = None) -> _Choice:
    qk, ni = _QK_NI[tid]
    if n == 0:
        return _Choice("empty")
    if K % qk == 0 and (variant is not None or 1 <= n <= DECODE_MAX_N):
        N, R = variant or _mmv_variant(tid, n, M, K // qk * ni)
        allowed = _MAIN_VARIANTS if tid in _MAIN_TYPES else _VARIANTS
        if (N, R) not in allowed or n > N:
            raise ValueError(f"no GEMV variant N={N}, R={R} for {type_name(tid)} and n={n}")
        W = warps or _mmv_warps(K // qk * ni, M, R, N)
        if not 1 <= W <= 8:
            raise ValueError(f"warps must be in 1..8, got {W}")
        return _Choice("mmv", f"mmv_{_NAMES[tid]}_n{N}_r{R}", R, W)
    if tid == F32:
        return _Choice("gemm32")
    x16 = _align(n * K * 2)
    if tid == F16:
        return _Choice("gemm16", tile_rows=0, scratch=x16)
    tile = M if M * K * 2 <= PREFILL_TILE_BYTES else max(64, PREFILL_TILE_BYTES // (K * 2) // 64 * 64)
    tile = min(tile, M)
    return _Choice("gemm16", tile_rows=tile, scratch=x16 + _align(tile * K * 2))


def mul_mat_scratch_bytes(w, n: int) -> int:
    """Bytes of scratch that ``mul_mat(w, x (n, K), ...)`` needs (0 on the GEMV path)."""
    if isinstance(w, marlin.MarlinWeight):
        return _marlin_choice(w, int(n))[1]
    tid, M, K = _wtype(w)
    return _choose(tid, M, K, int(n)).scratch


def mul_mat(w, x, out, stream=None, scratch=None) -> None:
    """out (n, M) f32 = x (n, K) f32 @ W.T; ``scratch``: a cupy array of at least
    ``mul_mat_scratch_bytes(w, n)`` bytes (None when that is 0)."""
    plan_mul_mat(w, int(x.shape[0]), scratch)(x, out, stream)


def plan_mul_mat(w, n: int, scratch=None, *, variant: tuple[int, int] | None = None,
                 warps: int | None = None) -> "MulMatPlan":
    """The mul_mat of ``w`` for n rows of x, chosen once: a callable ``(x, out, stream)``.

    ``variant`` (N, R) and ``warps`` override the GEMV choice (benchmarks)."""
    if isinstance(w, marlin.MarlinWeight):
        key = ("marlin", int(n), None if scratch is None else (scratch.data.ptr, scratch.nbytes))
        p = w._plans.get(key)
        if p is None:
            p = w._plans[key] = MarlinMulMatPlan(w, int(n), scratch)
        return p
    if isinstance(w, DeviceWeight) and variant is None and warps is None:
        key = (int(n), None if scratch is None else (scratch.data.ptr, scratch.nbytes))
        p = w._plans.get(key)
        if p is None:
            p = w._plans[key] = MulMatPlan(w, int(n), scratch)
        return p
    return MulMatPlan(w, int(n), scratch, variant=variant, warps=warps)


class MulMatPlan:
    """out (n, M) = x (n, K) @ W.T for one weight and n: ``plan(x, out, stream)``."""

    def __init__(self, w, n: int, scratch=None, *, variant=None, warps=None) -> None:
        self.w = w
        self.n = n
        self.tid, self.M, self.K = _wtype(w)
        if self.K == 0 or self.M == 0:
            raise ValueError(f"mul_mat of an empty weight {self.M}x{self.K}")
        self.choice = _choose(self.tid, self.M, self.K, n, variant, warps)
        self.scratch = scratch
        if self.choice.scratch:
            if scratch is None or scratch.nbytes < self.choice.scratch:
                have = 0 if scratch is None else scratch.nbytes
                raise ValueError(f"mul_mat {type_name(self.tid)} {self.M}x{self.K}, n={n}: needs "
                                 f"{self.choice.scratch} bytes of scratch, got {have}")
            if not scratch.flags.c_contiguous or scratch.data.ptr % _ALIGN:
                raise ValueError("scratch must be contiguous and 256-byte aligned")
        if self.choice.kind == "mmv":
            self._kern = _kernel(self.choice.kernel)
        elif self.choice.kind == "gemm16":
            self._cast = _kernel("cast_f32_f16")
            if self.tid != F16:
                generic = self.tid in _FLOAT_TYPES and self.K % 8 != 0
                self._deq = _kernel("deq16_float_any" if generic else f"deq16_{_NAMES[self.tid]}")

    @property
    def scratch_bytes(self) -> int:
        return self.choice.scratch

    def __call__(self, x, out, stream=None) -> None:
        self.bind(x, out, stream)()

    def bind(self, x, out, stream=None) -> Callable[[], None]:
        """A zero-argument callable running this mul_mat on these buffers (graph-capturable)."""
        import cupy
        n, M, K = self.n, self.M, self.K
        _check_act(x, (n, K), "x", 16)           # float4 loads (GEMV, f16 cast)
        _check_act(out, (n, M), "out")
        if n == 0:
            return lambda: None
        data = _wdata(self.w)
        c = self.choice
        if c.kind == "mmv":
            if data.data.ptr % 16:
                raise ValueError("mul_mat: the weight matrix must be 16-byte aligned")
            qk, _ = _QK_NI[self.tid]
            args = (data, x, out, np.int32(M), np.int32(K // qk), np.int32(n))
            return _runner([partial(self._kern, (-(-M // c.rows_per_cta),), (32 * c.warps,), args)], stream)
        if c.kind == "gemm32":
            return _runner([_Gemm(data, _CUDA_R_32F, x, _CUDA_R_32F, out, M, n, K, 0, M, stream)], stream)
        # gemm16: scratch = [x16 (n, K) | w16 tile (tile_rows, K)], both f16
        x16 = cupy.ndarray((n, K), cupy.float16, memptr=self.scratch.data)
        total = n * K
        vec = total % 4 == 0
        steps = [_launch(self._cast, total // 4 if vec else total,
                         (x, x16, np.int64(total), np.int32(1 if vec else 0)))]
        if self.tid == F16:
            w16 = data.view(cupy.float16).reshape(M, K)
            steps.append(_Gemm(w16, _CUDA_R_16F, x16, _CUDA_R_16F, out, M, n, K, 0, M, stream))
            return _runner(steps, stream)
        w16 = cupy.ndarray((c.tile_rows, K), cupy.float16, memptr=self.scratch.data + _align(n * K * 2))
        qk, ni = _QK_NI[self.tid]
        generic = self.tid in _FLOAT_TYPES and K % 8 != 0
        rb = tensor_nbytes(self.tid, (1, K))
        for m0 in range(0, M, c.tile_rows):
            rows = min(c.tile_rows, M - m0)
            wt = data[m0:m0 + rows] if self.tid == F32 else data[m0 * rb:(m0 + rows) * rb]
            if generic:
                kind = 0 if self.tid == F32 else 2
                steps.append(_launch(self._deq, rows * K, (wt, w16, np.int64(rows * K), np.int32(kind))))
            else:
                steps.append(_launch(self._deq, rows * (K // qk) * ni,
                                     (wt, w16, np.int32(rows), np.int32(K // qk))))
            steps.append(_Gemm(w16, _CUDA_R_16F, x16, _CUDA_R_16F, out, rows, n, K, m0, M, stream))
        return _runner(steps, stream)


# -- grouped GEMV: mul_mats that share x, as one launch -------------------------------------------

GROUP_MAX = 3                          # weights of one grouped launch (q, k, v)
GROUP_TYPES = _MAIN_TYPES              # ggml types with grouped kernels
# (N, R) variants of the grouped kernels mmvg_<type>_n<N>_r<R>, compiled for _MAIN_TYPES: the
# ones _mmv_variant names for those types (R = 2 only at n <= 2)
_GROUP_VARIANTS = frozenset({(1, 2), (1, 4), (2, 2), (4, 4), (8, 4)})
_GLU_MODES = {"swiglu": 1, "geglu": 2}


# Weights above this many bytes keep their own launches: there a launch is a few percent of the
# kernel, and the single-weight kernels are the tuned big-matrix path. (H100, llama3-8B Q4_0,
# n = 1, per layer with rotating weights: q/k/v 9.4 + 2 x 2.4 MB grouped with the ropes 15.8 us
# against 24.2 for 3 GEMVs + rope; gate/up 2 x 33 MB + swiglu grouped 44.3 us against 47.3,
# down 33 MB + residual 22.3 against 22.7 -- measured once each, so the cap stays.)
GROUP_MAX_WEIGHT_BYTES = 16 << 20
# The rms_norm folded into a group costs every CTA 8 FMAs per item and row of x and the norm
# weight's loads: it pays for the launch it saves only on small groups (SmolLM2 q/k/v 0.35 MB:
# 5.5 -> 3.4 us a layer, gate/up 1.1 MB: 5.4 -> 3.3; llama3-8B q/k/v 14 MB: 15.8 -> 16.4, gate/up
# 66 MB: 44.3 -> 50.4). Groups of more bytes than this keep the norm's own launch.
NORM_FUSE_MAX_BYTES = 4 << 20


def plan_mul_mat_group(ws, n: int, *, glu: str | None = None, rope: dict | None = None,
                       norm: float | None = None, residual: bool = False,
                       max_weight_bytes: int | None = GROUP_MAX_WEIGHT_BYTES,
                       max_norm_bytes: int | None = NORM_FUSE_MAX_BYTES) -> "GroupPlan | None":
    """One launch for several decode mul_mats of the same x (n <= 8): ``outs[g] = x @ ws[g].T``.

    ws: 2 or 3 ``DeviceWeight`` of one type and one K (separate tensors, nothing copied).
    glu: "swiglu" | "geglu": ws = (gate, up) of the same shape and the launch writes only
    ``act(x @ gate.T) * (x @ up.T)`` (ops.swiglu / ops.geglu).
    rope: {"members": (g, ...), "head_dim": d, "n_rot": .., "base": .., "freq_scale": ..}: the
    outputs of those members are rotated (``ops.rope``, normal mode, at the positions given to
    ``bind``) before they are stored, as (n, M_g // d, d) tensors.
    norm: eps: the products are of ``ops.rms_norm(x, eps, norm_w)`` (norm_w given to ``bind``,
    may be None): the kernel folds the norm into its loop (sum of squares of the x it loads,
    x * norm_w, the scale applied to the sums).
    residual: ws is ONE weight and ``out = x @ W.T + resid`` (``ops.add``; resid given to
    ``bind``, of out's shape, and may be out itself).

    Returns None when no grouped kernel fits (other types, mixed types or K, n > 8, a shape
    the rope epilogue cannot pair, a weight over ``max_weight_bytes``, a norm with more than
    ``max_norm_bytes`` of weights): the caller then runs the ops one by one.
    """
    ws = tuple(ws)
    n = int(n)
    if not 1 <= n <= DECODE_MAX_N or not (1 if residual else 2) <= len(ws) <= (1 if residual else GROUP_MAX):
        return None
    if any(isinstance(w, marlin.MarlinWeight) for w in ws):
        return _marlin_group(ws, n, glu, rope, norm, residual)
    if residual and (glu is not None or rope is not None):
        return None
    if not all(isinstance(w, DeviceWeight) and len(w.shape) == 2 for w in ws):
        return None
    if max_weight_bytes is not None and any(w.nbytes > max_weight_bytes for w in ws):
        return None
    if norm is not None and max_norm_bytes is not None and sum(w.nbytes for w in ws) > max_norm_bytes:
        return None
    tid, K = ws[0].ggml_type, ws[0].cols
    if tid not in GROUP_TYPES or any(w.ggml_type != tid or w.cols != K or w.rows == 0 for w in ws):
        return None
    qk, ni = _QK_NI[tid]
    if K % qk:
        return None
    items = K // qk * ni
    M_all = sum(w.rows for w in ws)
    N, R = _mmv_variant(tid, n, M_all, items)
    if (N, R) not in _GROUP_VARIANTS or n > N or R % 2:
        return None
    mode = 0
    if glu is not None:
        if glu not in _GLU_MODES or len(ws) != 2 or ws[0].shape != ws[1].shape or rope is not None:
            return None
        mode = _GLU_MODES[glu]
    rope_mask, rope_args = 0, (0, 0, np.float32(0), np.float32(0))
    if rope is not None:
        d, n_rot = int(rope["head_dim"]), int(rope["n_rot"])
        members = tuple(int(g) for g in rope["members"])
        if (not members or d % 2 or not 0 < n_rot <= d or n_rot % 2
                or any(not 0 <= g < len(ws) or ws[g].rows % d for g in members)):
            return None
        from .elementwise_ops import rope_theta_scale
        for g in members:
            rope_mask |= 1 << g
        rope_args = (d, n_rot, rope_theta_scale(float(rope["base"]), n_rot), np.float32(rope["freq_scale"]))
    # warps: what mmv would take for the largest member alone (a glu CTA holds R/2 rows of
    # each weight: R rows, as mmv's); from the group's total rows, 14336 x 4096 gate/up got 2
    # warps where mmv's 4 are the measured best
    W = _mmv_warps(items, max(w.rows for w in ws), R, N)
    return GroupPlan(ws, n, f"mmvg_{_NAMES[tid]}_n{N}_r{R}", R, W, mode, rope_mask, rope_args,
                     norm, bool(residual))


class GroupPlan:
    """A grouped decode GEMV chosen once (plan_mul_mat_group); ``bind(x, outs, stream, ...)``."""

    def __init__(self, ws, n, kernel, R, warps, mode, rope_mask, rope_args, norm=None, residual=False) -> None:
        self.ws, self.n, self.kernel, self.rows_per_cta, self.warps = ws, n, kernel, R, warps
        self.mode, self.rope_mask, self.rope_args = mode, rope_mask, rope_args
        self.norm, self.residual = norm, residual
        self.K = ws[0].cols
        qk, _ = _QK_NI[ws[0].ggml_type]
        self.nb = self.K // qk
        if mode:
            self.ctas = (-(-ws[0].rows // (R // 2)),)
        else:
            self.ctas = tuple(-(-w.rows // R) for w in ws)
        self._kern = _kernel(kernel)

    @property
    def n_outputs(self) -> int:
        return 1 if self.mode else len(self.ws)

    def bind(self, x, outs, stream=None, pos=None, norm_w=None, resid=None, early=False) -> Callable[[], None]:
        """A zero-argument launch over these buffers (graph-capturable). outs: one (n, M_g) f32
        array per weight (glu: one (n, M)); pos: (n,) int32 positions when the plan ropes;
        norm_w: (K,) f32 or None when it norms; resid: (n, M) f32 when it adds a residual; early:
        accepted for the Marlin group's interface (these kernels read everything after PDL's wait)."""
        n, K = self.n, self.K
        _check_act(x, (n, K), "x", 16)
        outs = list(outs)
        if len(outs) != self.n_outputs:
            raise ValueError(f"grouped mul_mat: {self.n_outputs} outputs expected, got {len(outs)}")
        for g, o in enumerate(outs):
            _check_act(o, (n, self.ws[g].rows), f"out[{g}]")
        for w in self.ws:
            if w.data.data.ptr % 16:
                raise ValueError("mul_mat: the weight matrix must be 16-byte aligned")
        if self.rope_mask:
            if pos is None or pos.dtype != np.int32 or tuple(pos.shape) != (n,) or not pos.flags.c_contiguous:
                raise ValueError(f"grouped mul_mat with rope: pos must be a contiguous ({n},) int32 array")
        if self.norm is not None and norm_w is not None:
            if norm_w.dtype != np.float32 or tuple(norm_w.shape) != (K,) or not norm_w.flags.c_contiguous:
                raise ValueError(f"grouped mul_mat: norm weight must be a contiguous ({K},) float32 array")
            if norm_w.data.ptr % 16:
                raise ValueError("grouped mul_mat: the norm weight must be 16-byte aligned")
        if self.residual:
            if resid is None:
                raise ValueError("grouped mul_mat with a residual: resid is missing")
            _check_act(resid, (n, self.ws[0].rows), "resid")
        ws = list(self.ws) + [None] * (GROUP_MAX - len(self.ws))
        data = [None if w is None else w.data for w in ws]
        os_ = outs + [None] * (GROUP_MAX - len(outs))
        Ms = [0 if w is None else w.rows for w in ws]
        c = list(self.ctas) + [0] * (GROUP_MAX - len(self.ctas))
        c1, c2 = c[0], c[0] + c[1]
        grid = sum(self.ctas)
        d, n_rot, ts, fs = self.rope_args
        args = (data[0], data[1], data[2], os_[0], os_[1], os_[2], np.int32(Ms[0]), np.int32(Ms[1]),
                np.int32(Ms[2]), np.int32(c1), np.int32(c2), x, np.int32(self.nb), np.int32(n),
                np.int32(self.mode), pos if self.rope_mask else None, np.int32(self.rope_mask),
                np.int32(d), np.int32(n_rot), np.float32(ts), np.float32(fs),
                resid if self.residual else None,
                np.int32(0 if self.norm is None else (2 if norm_w is not None else 1)),
                norm_w if self.norm is not None else None, np.float32(self.norm or 0.0))
        return _runner([partial(self._kern, (grid,), (32 * self.warps,), args)], stream)


# -- Marlin weights (marlin_ops): the tensor-core GEMM up to MARLIN_MAX_N rows, above that the
# repacked weight is dequantized to f16 tiles for cuBLAS (measured faster for prefill sizes).

MARLIN_MAX_N = 64


def _marlin_choice(w, n: int) -> tuple[str, int, int]:
    """("marlin" | "gemm16", scratch bytes, tile rows) for n rows of x."""
    if n <= MARLIN_MAX_N:
        return "marlin", 0, 0
    M, K = w.shape
    tile = M if M * K * 2 <= PREFILL_TILE_BYTES else max(64, PREFILL_TILE_BYTES // (K * 2) // 64 * 64)
    tile = min(tile, M)
    return "gemm16", _align(n * K * 2) + _align(tile * K * 2), tile


class MarlinMulMatPlan:
    """mul_mat of one MarlinWeight for n rows of f32 x: ``bind(x, out, stream)``."""

    def __init__(self, w, n: int, scratch=None) -> None:
        self.w, self.n = w, n
        self.M, self.K = w.shape
        self.kind, self.scratch_bytes, self.tile = _marlin_choice(w, n)
        self.scratch = scratch
        if self.scratch_bytes and (scratch is None or scratch.nbytes < self.scratch_bytes):
            raise ValueError(f"mul_mat {w.name or 'weight'}: needs {self.scratch_bytes} bytes of scratch")
        self.gemm = marlin.plan_gemm((w,), n) if self.kind == "marlin" and n else None

    def __call__(self, x, out, stream=None) -> None:
        self.bind(x, out, stream)()

    def bind(self, x, out, stream=None) -> Callable[[], None]:
        import cupy
        n, M, K = self.n, self.M, self.K
        _check_act(x, (n, K), "x", 16)
        _check_act(out, (n, M), "out")
        if n == 0:
            return lambda: None
        if self.kind == "marlin":
            return self.gemm.bind(x, [out], stream)
        x16 = cupy.ndarray((n, K), cupy.float16, memptr=self.scratch.data)
        w16 = cupy.ndarray((self.tile, K), cupy.float16, memptr=self.scratch.data + _align(n * K * 2))
        total = n * K
        steps = [_launch(_kernel("cast_f32_f16"), total // 4, (x, x16, np.int64(total), np.int32(1)))]
        for m0 in range(0, M, self.tile):
            rows = min(self.tile, M - m0)
            steps.append(marlin.plan_dequant16(self.w, w16, m0, rows, stream))
            steps.append(_Gemm(w16, _CUDA_R_16F, x16, _CUDA_R_16F, out, rows, n, K, m0, M, stream))
        return _runner(steps, stream)


class _MarlinGroup:
    """plan_mul_mat_group's answer for MarlinWeights (q/k/v, gate/up + glu, one + residual)."""

    def __init__(self, ws, n: int, glu: str | None, residual: bool, norm: float | None = None,
                 rope: dict | None = None) -> None:
        self.ws, self.n, self.glu, self.residual = ws, n, glu, residual
        self.gemm = marlin.plan_gemm(ws, n, glu=glu, residual=residual, norm=norm, rope=rope)
        self.norm = norm
        self.rope_mask = self.gemm.rope_mask

    @property
    def n_outputs(self) -> int:
        return 1 if self.glu else len(self.ws)

    @property
    def kv_fold_ok(self) -> bool:
        """Whether bind takes kv= (the KV-cache write of k and v folded into this q/k/v launch)."""
        return self.gemm.kv_fold_ok and marlin.kv_fold_enabled()

    def bind(self, x, outs, stream=None, pos=None, norm_w=None, resid=None, kv=None,
             early=False) -> Callable[[], None]:
        """early: see MarlinPlan.bind (positions and KV slots no kernel writes)."""
        n, K = self.n, self.ws[0].cols
        _check_act(x, (n, K), "x", 16)
        return self.gemm.bind(x, list(outs), stream, resid=resid, pos=pos, norm_w=norm_w, kv=kv, early=early)


def _marlin_group(ws, n: int, glu, rope, norm, residual):
    """A grouped Marlin launch, or None (mixed layouts; a rope or norm fold the decode kernels
    cannot do: M > 16, K % 4, a head size the rope cannot pair; GGFLAT_MARLIN_NORM=0)."""
    if not all(isinstance(w, marlin.MarlinWeight) for w in ws):
        return None
    t, K = ws[0].ggml_type, ws[0].cols
    if any(w.ggml_type != t or w.cols != K for w in ws):
        return None
    if glu is not None and (glu not in _GLU_MODES or len(ws) != 2 or ws[0].shape != ws[1].shape):
        return None
    if norm is not None and not marlin._env_on("GGFLAT_MARLIN_NORM"):
        return None
    try:
        return _MarlinGroup(ws, n, glu, bool(residual), norm, rope)
    except ValueError:
        if rope is None and norm is None:
            raise
        return None


class _Cublas:
    """cuBLAS reached through ctypes with a handle of our own, one per (device, stream).

    CuPy's cuBLAS wrappers refuse to run while a stream is being captured, so the prefill
    GEMM calls the library directly. Each handle gets a user workspace (allocated here, at
    plan time) so that cuBLAS never allocates during a capture; one handle per stream keeps
    two streams from sharing a workspace."""

    WORKSPACE = 32 << 20
    _lib = None
    _handles: dict[tuple[int, int], "_Cublas"] = {}

    @classmethod
    def library(cls):
        if cls._lib is None:
            import ctypes
            import os
            from cupy_backends.cuda.libs import cublas as _loaded    # noqa: F401  (loads libcublas)
            lib = None
            for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
                try:
                    lib = ctypes.CDLL(name)
                    break
                except OSError:
                    pass
            if lib is None and os.path.exists("/proc/self/maps"):   # loaded through an rpath
                with open("/proc/self/maps") as f:
                    paths = sorted({ln.split()[-1] for ln in f if "libcublas.so" in ln and "Lt" not in ln})
                if paths:
                    lib = ctypes.CDLL(paths[0])
            if lib is None:
                raise RuntimeError("cannot find libcublas for the prefill GEMM")
            c_int, c_vp = ctypes.c_int, ctypes.c_void_p
            lib.cublasCreate_v2.argtypes = [ctypes.POINTER(c_vp)]
            lib.cublasSetStream_v2.argtypes = [c_vp, c_vp]
            lib.cublasSetWorkspace_v2.argtypes = [c_vp, c_vp, ctypes.c_size_t]
            lib.cublasGemmEx.argtypes = [c_vp, c_int, c_int, c_int, c_int, c_int, c_vp, c_vp, c_int, c_int,
                                         c_vp, c_int, c_int, c_vp, c_vp, c_int, c_int, c_int, c_int]
            for fn in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx):
                fn.restype = c_int
            cls._lib = lib
        return cls._lib

    @classmethod
    def get(cls, stream_ptr: int) -> "_Cublas":
        import cupy
        key = (cupy.cuda.Device().id, int(stream_ptr))
        h = cls._handles.get(key)
        if h is None:
            h = cls._handles[key] = cls(stream_ptr)
        return h

    def __init__(self, stream_ptr: int) -> None:
        import ctypes
        import cupy
        lib = self.library()
        h = ctypes.c_void_p()
        _check_cublas(lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
        self.handle = h
        self.stream = int(stream_ptr)
        self.workspace = cupy.empty(self.WORKSPACE, cupy.uint8)
        self.lib = lib

    def gemm(self, args: tuple) -> None:
        lib = self.lib
        _check_cublas(lib.cublasSetStream_v2(self.handle, self.stream), "cublasSetStream")
        _check_cublas(lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr, self.WORKSPACE),
                      "cublasSetWorkspace")
        _check_cublas(lib.cublasGemmEx(self.handle, *args), "cublasGemmEx")


def _check_cublas(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


class _Gemm:
    """cuBLAS GemmEx: out[:, m0:m0+m] (row-major, row stride ldc) = B (n, k) @ A (m, k).T with
    f32 accumulation (CUBLAS_COMPUTE_32F). In cuBLAS's column-major terms C (m x n, ldc) =
    op(A) op(B) with A the (k x m) matrix transposed (OP_T) and B the (k x n) one (OP_N)."""

    _one = np.ones(1, np.float32)
    _zero = np.zeros(1, np.float32)
    _COMPUTE_32F = 68                  # cublasComputeType_t CUBLAS_COMPUTE_32F

    def __init__(self, a, atype: int, b, btype: int, out, m: int, n: int, k: int, m0: int, ldc: int,
                 stream=None) -> None:
        import cupy
        self.a, self.b, self.out = a, b, out          # keep the arrays alive
        self.args = (_CUBLAS_OP_T, _CUBLAS_OP_N, m, n, k, self._one.ctypes.data, a.data.ptr, atype, k,
                     b.data.ptr, btype, k, self._zero.ctypes.data, out.data.ptr + 4 * m0, _CUDA_R_32F, ldc,
                     self._COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
        sp = (stream if stream is not None else cupy.cuda.get_current_stream()).ptr
        self.blas = _Cublas.get(sp)                   # handle + workspace made now, not in a capture

    def __call__(self) -> None:
        self.blas.gemm(self.args)
