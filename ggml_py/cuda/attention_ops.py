"""Launch wrappers for ``attention.cu``: paged KV cache writes and attention.

Semantics are exactly those of ``ggml_py.ops.kv_store`` / ``ggml_py.ops.attention`` (the NumPy
backend's ``_kv_store`` / ``_attention`` are the reference). Layouts (NumPy order, see
``kvcache/paged.py``), one layer at a time:

    k_cache     (n_pages, page_size, Hkv, dk)   float16 or float32
    v_cache     (n_pages, page_size, Hkv, dv)   same dtype
    pos_cache   (n_pages, page_size) int32      INT32_MAX where nothing was written
    block_table (max_pages,) int32              kv_len (1,) int32, read on the device
    q           (n, H, dk) float32              q_pos (n,) int32       out (n, H * dv) float32

API (DESIGN.md in this folder), each op twice, as in ``elementwise_ops``:

- ``plan_kv_store(...) -> step`` / ``plan_attention(...) -> step``: check shapes, pick the
  kernels and launch geometry once, return a zero-argument callable with every argument bound
  (``prepare_*`` are the same functions under elementwise_ops' names). A run is then only the
  launches; nothing allocates, synchronises or reads device memory on the host, so the steps
  can be captured into a CUDA graph and replayed with a new ``kv_len``.
- ``kv_store(...)`` / ``attention(...)``: plan (cached by arguments) and launch at once.
- ``attention_scratch_bytes(n, H, dv, max_kv, n_kv_heads=None, page_size=16)``: the scratch the
  decode path needs (0 for prefill-sized ``n``); hand a device buffer of at least that many
  bytes to ``attention`` as ``scratch``.

Two kernel families (attention.cu says how each works):

- decode (``n * H/Hkv <= 8`` query rows per kv head): flash-decoding, grid ``(splits, Hkv)`` +
  a reduce kernel. ``splits`` is fixed at plan time (about two blocks per SM); each launch
  divides the pages below ``kv_len`` evenly among the splits (whole 64-key tiles), so the split
  length follows the sequence while the grid stays the same. On the tensor cores for f16 pages
  (the query rows are the n = 8 side of mma.m16n8k16), with f32 FMAs for f32 pages.
- prefill (everything else): tiled flash attention, 16/32/64 query rows x 64 keys per tile,
  on the tensor cores (mma.sync, f16 operands, f32 accumulation) for f16 pages, with f32 FMAs
  for f32 pages.

Kernels are compiled per (storage dtype, dk, dv, page_size) with ``load_module("attention",
options)``; head dims must be multiples of 8.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Callable

import numpy as np

Step = Callable[[], Any]

LOG2E = 1.4426950408889634

# geometry shared with attention.cu (keep in step)
DEC_NT, DEC_T = 128, 32               # decode (FMA): threads, keys per tile
DTC_T, DTC_R = 64, 8                  # decode (tensor cores): keys per block tile, query rows
SPLIT_KEYS = 64                       # decode splits are whole multiples of this many keys
RED_NT = 256                          # reduce threads
DECODE_MAX_ROWS = 8                   # n * G above this -> prefill kernel
PF_NT, PF_BC = 128, 64                # prefill: threads, keys per tile
SMEM_LIMIT = 227 * 1024               # Hopper's largest dynamic shared memory per block
_DEC_STAGE_BUDGET = 100 * 1024        # decode (FMA) pipeline bytes: leaves room for 2+ blocks per SM
_DEC_TC_STAGE_BUDGET = 110 * 1024     # decode (tensor cores): 3 stages of 64 keys at d=128, 2 blocks/SM

_functions: dict[tuple, Any] = {}
_plans: dict[tuple, Step] = {}
_sm_count: list[int] = []


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms() -> int:
    """Multiprocessors of the current device (132 on an H100 SXM); 132 without a device."""
    if not _sm_count:
        try:
            import cupy
            _sm_count.append(int(cupy.cuda.Device().attributes["MultiProcessorCount"]))
        except Exception:                                    # no CuPy / no GPU: host-side sizing only
            return 132
    return _sm_count[0]


# -- compile-time geometry (mirrors the shared-memory layouts in attention.cu) ----------------------

def _strides(kvb: int, dk: int, dv: int) -> tuple[int, int]:
    return dk + 16 // kvb, dv + 16 // kvb


def decode_stages(kvb: int, dk: int, dv: int) -> int:
    """cp.async pipeline depth of the decode kernel: 2..4 tiles, within ~100 KB."""
    kstr, vstr = _strides(kvb, dk, dv)
    stage = DEC_T * (kstr + vstr) * kvb + DEC_T * 4
    return max(2, min(4, _DEC_STAGE_BUDGET // stage))


def decode_tc_stages(dk: int, dv: int) -> int:
    kstr, vstr = _strides(2, dk, dv)
    stage = DTC_T * (kstr + vstr) * 2 + DTC_T * 4
    return max(2, min(4, _DEC_TC_STAGE_BUDGET // stage))


def decode_tc_smem(dk: int, dv: int, stages: int) -> int:
    kstr, vstr = _strides(2, dk, dv)
    layout = (DTC_R * kstr * 2 + stages * (DTC_T * (kstr + vstr) * 2 + DTC_T * 4)
              + 4 * DTC_R * 24 * 2 + DTC_R * 4)
    merge = DTC_R * kstr * 2 + 2 * 4 * DTC_R * 4 + 4 * DTC_R * dv * 4      # over the stages
    return max(layout, merge)


def reduce_cols_per_block(dv: int) -> int:
    dc = dv // 4
    return next(c for c in (8, 4, 2, 1) if dc % c == 0)


def decode_smem(kvb: int, dk: int, dv: int, rmax: int, stages: int) -> int:
    kstr, vstr = _strides(kvb, dk, dv)
    layout = (stages * DEC_T * (kstr + vstr) * kvb + stages * DEC_T * 4
              + rmax * dk * 4 + rmax * DEC_T * 4 + rmax * 4 + rmax * 4)
    kg = DEC_NT // (dv // 8)
    return max(layout, kg * rmax * dv * 4)


def prefill_smem(kvb: int, dk: int, dv: int, rpt: int) -> int:
    kstr, vstr = _strides(kvb, dk, dv)
    br = 16 * rpt
    return br * (dk + 4) * 4 + PF_BC * (kstr + vstr) * kvb + br * (PF_BC + 8) * 4 + PF_BC * 4 * 2 + br * 4


def prefill_tc_smem(dk: int, dv: int, br: int) -> int:
    kstr, vstr = _strides(2, dk, dv)
    bc = 32 if dv > 128 else 64
    return br * kstr * 2 + bc * (kstr + vstr) * 2 + bc * 4 * 2 + br * 4


def prefill_row_choices(kind: str, dv: int) -> tuple[int, ...]:
    """Query rows per prefill block, largest first (attn_prefill_r4 exists for DV <= 128 only)."""
    if kind == "tc":
        return (64, 32, 16)
    return (64, 32, 16) if dv <= 128 else (32, 16)


def num_splits(hkv: int, max_pages: int, sms: int | None = None, blocks_per_sm: float = 2.0) -> int:
    """Decode splits per kv head: about ``blocks_per_sm`` blocks per multiprocessor in all."""
    target = int(round(blocks_per_sm * (num_sms() if sms is None else sms)))
    return max(1, min(max_pages, _cdiv(target, max(1, hkv))))


def attention_scratch_bytes(n: int, H: int, dv: int, max_kv: int, n_kv_heads: int | None = None,
                            page_size: int = 16, blocks_per_sm: float = 2.0) -> int:
    """Bytes of scratch ``attention`` needs for ``n`` queries of ``H`` heads over at most ``max_kv``
    cached tokens: the decode partials (splits, n*H, dv + 2) f32; 0 when the prefill kernel runs.

    Without ``n_kv_heads`` it assumes the worst case (Hkv = 1, the most splits)."""
    if n <= 0 or n > DECODE_MAX_ROWS:
        return 0
    hkv = n_kv_heads if n_kv_heads else 1
    if n * (H // hkv) > DECODE_MAX_ROWS and n_kv_heads:
        return 0
    max_pages = max(1, _cdiv(max_kv, page_size))
    splits = num_splits(hkv, max_pages, blocks_per_sm=blocks_per_sm)
    return _partials_bytes(splits, n * H, dv)


def _partials_bytes(splits: int, rows: int, dv: int) -> int:
    ml = _cdiv(splits * rows * 2 * 4, 256) * 256
    return ml + splits * rows * dv * 4


# -- kernels ----------------------------------------------------------------------------------------

def _function(kvb: int, dk: int, dv: int, page: int, name: str, smem: int = 0) -> Any:
    """Kernel ``name`` of the module for this geometry, as a callable (grid, block, args, smem, stream)."""
    opts = (f"-DATTN_KV_F16={int(kvb == 2)}", f"-DATTN_DK={dk}", f"-DATTN_DV={dv}",
            f"-DATTN_PAGE={page}", f"-DATTN_DEC_STAGES={decode_stages(kvb, dk, dv)}",
            f"-DATTN_DEC_TC_STAGES={decode_tc_stages(dk, dv)}")
    key = (opts, name)
    fn = _functions.get(key)
    if fn is None:
        from .compile import load_module

        raw = load_module("attention", opts).get_function(name)
        raw.max_dynamic_shared_size_bytes = SMEM_LIMIT if smem > 48 * 1024 else 48 * 1024
        try:
            from cupy.cuda.function import Function
            fn = raw.kernel                     # takes the stream directly (no `with stream`)
            if not isinstance(fn, Function):
                raise AttributeError
        except (AttributeError, ImportError):
            def fn(grid, block, args, shared_mem, stream, _raw=raw):
                with stream if stream is not None else nullcontext():
                    _raw(grid, block, args, shared_mem=shared_mem)
        _functions[key] = fn
    return fn


def _launch(fn: Any, grid: tuple[int, ...], block: int, args: tuple, smem: int, stream: Any) -> Step:
    return partial(fn, tuple(int(g) for g in grid), (int(block),), args, int(smem), stream)


def _nothing() -> None:
    return None


class _Steps:
    """Several launches as one step (``parts`` lets benchmarks time them one by one)."""

    def __init__(self, *parts: Step) -> None:
        self.parts = parts

    def __call__(self) -> None:
        for s in self.parts:
            s()


def _steps(*steps: Step) -> Step:
    return steps[0] if len(steps) == 1 else _Steps(*steps)


# -- checks -----------------------------------------------------------------------------------------

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _arr(a: Any, name: str, dtypes: tuple[str, ...], ndim: int | None = None) -> None:
    _need(hasattr(a, "data") and hasattr(a, "dtype") and hasattr(a, "flags"), f"{name}: expected a CuPy array")
    _need(a.dtype.name in dtypes, f"{name}: dtype {a.dtype} (expected {' or '.join(dtypes)})")
    _need(a.flags.c_contiguous, f"{name}: must be C-contiguous")
    if ndim is not None:
        _need(a.ndim == ndim, f"{name}: expected {ndim} dims, got shape {a.shape}")


def _cache_geometry(k_cache: Any, v_cache: Any, pos_cache: Any) -> tuple[int, int, int, int, int, int]:
    """(n_pages, page_size, Hkv, dk, dv, bytes per element) of one layer's pages."""
    _arr(k_cache, "k_cache", ("float16", "float32"), 4)
    _arr(v_cache, "v_cache", (k_cache.dtype.name,), 4)
    _arr(pos_cache, "pos_cache", ("int32",), 2)
    n_pages, page, hkv, dk = k_cache.shape
    dv = v_cache.shape[3]
    _need(v_cache.shape[:3] == (n_pages, page, hkv), f"v_cache {v_cache.shape} does not match k_cache {k_cache.shape}")
    _need(pos_cache.shape == (n_pages, page), f"pos_cache {pos_cache.shape} does not match k_cache {k_cache.shape}")
    _need(dk % 8 == 0 and dv % 8 == 0, f"head dims ({dk}, {dv}) must be multiples of 8")
    _need(n_pages * page < 2 ** 31, "KV cache of 2^31 slots or more")
    return n_pages, page, hkv, dk, dv, k_cache.dtype.itemsize


# -- kv_store ---------------------------------------------------------------------------------------

def plan_kv_store(k: Any, v: Any, slots: Any, pos: Any, k_cache: Any, v_cache: Any, pos_cache: Any,
                  stream: Any = None) -> Step:
    """Step writing k (n, Hkv, dk) / v (n, Hkv, dv) f32 into the pages at ``slots`` (n,) i32 (cast
    to the storage dtype, f16 rounded to nearest even) and ``pos`` (n,) i32 beside them.
    Slots outside the cache are skipped (the NumPy backend raises; a kernel cannot)."""
    n_pages, page, hkv, dk, dv, kvb = _cache_geometry(k_cache, v_cache, pos_cache)
    _arr(k, "k", ("float32",), 3)
    _arr(v, "v", ("float32",), 3)
    n = k.shape[0]
    _need(k.shape == (n, hkv, dk), f"kv_store: k {k.shape} does not match the cache ({n}, {hkv}, {dk})")
    _need(v.shape == (n, hkv, dv), f"kv_store: v {v.shape} does not match the cache ({n}, {hkv}, {dv})")
    _arr(slots, "slots", ("int32",), 1)
    _arr(pos, "pos", ("int32",), 1)
    _need(slots.shape == (n,) and pos.shape == (n,), "kv_store: slots and pos must be (n,) i32")
    if n == 0:
        return _nothing
    fn = _function(kvb, dk, dv, page, "kv_store")
    args = (k, v, slots, pos, k_cache, v_cache, pos_cache, np.int32(hkv), np.int32(n_pages * page))
    return _launch(fn, (n,), 128, args, 0, stream)


def kv_store(k: Any, v: Any, slots: Any, pos: Any, k_cache: Any, v_cache: Any, pos_cache: Any,
             stream: Any = None) -> None:
    _cached(plan_kv_store, (k, v, slots, pos, k_cache, v_cache, pos_cache), {}, stream)()


# -- attention --------------------------------------------------------------------------------------

def plan_attention(q: Any, k_cache: Any, v_cache: Any, pos_cache: Any, block_table: Any, kv_len: Any,
                   q_pos: Any, out: Any, scale: float, window: int = 0, softcap: float = 0.0,
                   stream: Any = None, scratch: Any = None, *, splits: int | None = None,
                   mode: str | None = None, decode_kernel: str | None = None,
                   prefill_kernel: str | None = None, prefill_rows: int | None = None) -> Step:
    """Step computing ``ops.attention`` into ``out`` (n, H * dv) f32.

    ``scratch``: a device array of at least ``attention_scratch_bytes(...)`` bytes (decode only).
    Tuning/testing knobs: ``splits`` (decode splits per kv head), ``mode`` ("decode" or
    "prefill", default by size), ``decode_kernel`` / ``prefill_kernel`` ("tc": tensor cores,
    the default for f16 pages; "fma": f32 FMA, the only one for f32 pages) and ``prefill_rows`` (query rows per
    block: 16, 32 or 64; default the largest that still gives every SM a block)."""
    n_pages, page, hkv, dk, dv, kvb = _cache_geometry(k_cache, v_cache, pos_cache)
    _arr(q, "q", ("float32",), 3)
    n, H, dk_q = q.shape
    _need(dk_q == dk, f"attention: q head dim {dk_q} != cache head dim {dk}")
    _need(H % hkv == 0, f"attention: {H} query heads not a multiple of {hkv} kv heads")
    _arr(block_table, "block_table", ("int32",), 1)
    _arr(kv_len, "kv_len", ("int32",))
    _need(kv_len.size == 1, "attention: kv_len must be (1,) i32")
    _arr(q_pos, "q_pos", ("int32",), 1)
    _need(q_pos.shape == (n,), f"attention: q_pos must be ({n},) i32")
    _arr(out, "out", ("float32",))
    _need(out.size == n * H * dv, f"attention: out {out.shape} does not hold ({n}, {H * dv})")
    _need(window >= 0, "attention: window must be >= 0")
    max_pages = block_table.shape[0]
    _need(max_pages >= 1, "attention: empty block table")
    if n == 0:
        return _nothing
    G = H // hkv
    R = n * G
    softcap = float(softcap)
    if softcap > 0:
        qscale, cap2 = float(scale) / softcap, softcap * LOG2E
    else:
        qscale, cap2 = float(scale) * LOG2E, 0.0
    common = (np.int32(n), np.int32(H), np.int32(hkv), np.int32(n_pages), np.int32(max_pages))
    tail = (np.float32(qscale), np.float32(cap2), np.int32(min(int(window), 2 ** 31 - 1)))

    if mode is None:
        mode = "decode" if R <= DECODE_MAX_ROWS else "prefill"
    tc_ok = kvb == 2 and dk % 16 == 0 and dv % 16 == 0
    if mode == "decode":
        _need(R <= DECODE_MAX_ROWS, f"attention: decode kernel takes at most {DECODE_MAX_ROWS} rows, got {R}")
        kind = decode_kernel or ("tc" if tc_ok else "fma")
        _need(kind in ("tc", "fma") and (kind == "fma" or tc_ok),
              f"attention: decode kernel {kind!r} not available for this cache ({k_cache.dtype}, dk {dk}, dv {dv})")
        ns = num_splits(hkv, max_pages) if splits is None else max(1, min(int(splits), max_pages))
        need = _partials_bytes(ns, n * H, dv)
        _need(scratch is not None and scratch.nbytes >= need,
              f"attention: decode needs {need} bytes of scratch, got {0 if scratch is None else scratch.nbytes}")
        import cupy
        _need(scratch.flags.c_contiguous, "attention: scratch must be contiguous")
        base = scratch.data
        ml_bytes = _cdiv(ns * n * H * 2 * 4, 256) * 256
        part_ml = cupy.ndarray((ns * n * H * 2,), cupy.float32, memptr=base)
        part_acc = cupy.ndarray((ns * n * H * dv,), cupy.float32, memptr=base + ml_bytes)
        if kind == "tc":
            smem, name = decode_tc_smem(dk, dv, decode_tc_stages(dk, dv)), "attn_decode_tc"
        else:
            rmax = 4 if R <= 4 else 8
            smem, name = decode_smem(kvb, dk, dv, rmax, decode_stages(kvb, dk, dv)), f"attn_decode_r{rmax}"
        _need(smem <= SMEM_LIMIT, f"attention: decode needs {smem} bytes of shared memory")
        f_dec = _function(kvb, dk, dv, page, name, smem)
        f_red = _function(kvb, dk, dv, page, "attn_decode_reduce", ns * 4)
        dec = _launch(f_dec, (ns, hkv), DEC_NT,
                      (q, k_cache, v_cache, pos_cache, block_table, kv_len, q_pos, part_ml, part_acc)
                      + common + (np.int32(ns),) + tail, smem, stream)
        red = _launch(f_red, (n * H, dv // 4 // reduce_cols_per_block(dv)), RED_NT,
                      (part_ml, part_acc, kv_len, out, np.int32(n), np.int32(H), np.int32(hkv),
                       np.int32(max_pages), np.int32(ns)), ns * 4, stream)
        return _steps(dec, red)

    _need(mode == "prefill", f"attention: unknown mode {mode!r}")
    kind = prefill_kernel or ("tc" if tc_ok else "fma")
    _need(kind in ("tc", "fma") and (kind == "fma" or tc_ok),
          f"attention: prefill kernel {kind!r} not available for this cache ({k_cache.dtype}, dk {dk}, dv {dv})")
    choices = prefill_row_choices(kind, dv)
    if prefill_rows is None:
        if kind == "tc":                         # 64 rows (4 warps sharing each K/V tile) won on
            br = min((c for c in choices if c >= R), default=choices[0])   # every shape measured
        else:                                    # FMA: the largest tile that still fills the GPU
            sms = num_sms()
            br = choices[-1]
            for c in choices:
                if _cdiv(R, c) * hkv >= sms:
                    br = c
                    break
    else:
        _need(prefill_rows in choices, f"attention: prefill_rows must be one of {choices}")
        br = prefill_rows
    if kind == "tc":
        smem, name, threads = prefill_tc_smem(dk, dv, br), f"attn_prefill_tc_w{br // 16}", 2 * br
    else:
        smem, name, threads = prefill_smem(kvb, dk, dv, br // 16), f"attn_prefill_r{br // 16}", PF_NT
    _need(smem <= SMEM_LIMIT, f"attention: prefill needs {smem} bytes of shared memory")
    fn = _function(kvb, dk, dv, page, name, smem)
    return _launch(fn, (_cdiv(R, br), hkv), threads,
                   (q, k_cache, v_cache, pos_cache, block_table, kv_len, q_pos, out) + common + tail,
                   smem, stream)


def attention(q: Any, k_cache: Any, v_cache: Any, pos_cache: Any, block_table: Any, kv_len: Any,
              q_pos: Any, out: Any, scale: float, window: int = 0, softcap: float = 0.0,
              stream: Any = None, scratch: Any = None, **knobs: Any) -> None:
    _cached(plan_attention, (q, k_cache, v_cache, pos_cache, block_table, kv_len, q_pos, out),
            dict(scale=float(scale), window=int(window), softcap=float(softcap), scratch=scratch, **knobs),
            stream)()


prepare_kv_store = plan_kv_store
prepare_attention = plan_attention


def _key(a: Any) -> Any:
    if hasattr(a, "data") and hasattr(a, "shape"):
        return ("arr", int(a.data.ptr), a.shape, a.dtype.str, a.nbytes)
    return a


def _cached(planner: Callable[..., Step], arrays: tuple, kwargs: dict, stream: Any) -> Step:
    """One-off calls: reuse the step planned for the same arrays (by address and shape) and scalars."""
    key = (planner.__name__, tuple(_key(a) for a in arrays),
           tuple(sorted((k, _key(v)) for k, v in kwargs.items())), id(stream))
    step = _plans.get(key)
    if step is None:
        if len(_plans) > 1024:
            _plans.clear()
        step = _plans[key] = planner(*arrays, stream=stream, **kwargs)
    return step


def reference_flops(n_pairs: int, H: int, dk: int, dv: int) -> float:
    """FLOPs of attention over ``n_pairs`` visible (query, key) pairs: q.k and p.v, 2 per MAC."""
    return 2.0 * n_pairs * H * (dk + dv)


__all__ = ["kv_store", "plan_kv_store", "prepare_kv_store", "attention", "plan_attention",
           "prepare_attention", "attention_scratch_bytes", "num_splits", "num_sms"]
