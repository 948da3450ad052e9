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
  bytes to ``attention`` as ``scratch``. Its first ``COUNTER_BYTES`` hold the decode's ticket
  counters: planning a decode zeroes them (one async memset on the plan's stream) and every
  launch leaves them zero again, so one scratch buffer can serve every attention call of a
  model, eager or replayed from a CUDA graph -- as long as nothing else writes that region.

Two kernel families (attention.cu says how each works):

- decode (``n * H/Hkv <= 8`` query rows per kv head): flash-decoding in ONE launch, grid
  ``(splits, Hkv)``. ``splits`` (the grid) is fixed at plan time: one wave of blocks (two per
  SM, one for d = 256); how many of them work follows ``kv_len`` on the device
  (``split_geometry``): a split takes at least ``split_keys`` keys (whole 64-key tiles), so a
  short sequence runs on one block per kv head that writes the output directly, a long one on
  every split. The partials are merged in the same launch by the last block to finish (a
  ticket counter in scratch): in one level up to ``flat_max`` splits, else in two (groups of
  ~sqrt(splits), then the groups), so no block merges more than ~sqrt(splits) partials. No
  reduce kernel. On the tensor cores for f16 pages (the query rows are the n = 8 side of
  mma.m16n8k16), the tiles staged by bulk copies (TMA, "tcb", Hopper) or cp.async ("tc"); with
  f32 FMAs for f32 pages.
- prefill (everything else): tiled flash attention, 16/32/64 query rows x 64 keys per tile,
  on the tensor cores (mma.sync, f16 operands, f32 accumulation) for f16 pages, with f32 FMAs
  for f32 pages.

Kernels are compiled per (storage dtype, dk, dv, page_size) with ``load_module("attention",
options)``; head dims must be multiples of 8.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import numpy as np

Step = Callable[[], Any]

LOG2E = 1.4426950408889634

# geometry shared with attention.cu (keep in step)
DEC_NT, DEC_T = 128, 32               # decode (FMA): threads, keys per tile
DTC_T, DTC_R = 64, 8                  # decode (tensor cores): keys per block tile, query rows
SPLIT_KEYS = 64                       # decode splits are whole multiples of this many keys
COUNTER_BYTES = 65536                 # decode ticket counters at the start of scratch (u32, see _counter_words)
COMBINE_GMAX = 64                     # attention.cu: combine groups per kv head at most
DEFAULT_FLAT_MAX = 16                 # decode partials merged in one level up to this many splits, else two
DECODE_MAX_ROWS = 8                   # n * G above this -> prefill kernel
PF_NT, PF_BC = 128, 64                # prefill: threads, keys per tile
SMEM_LIMIT = 227 * 1024               # Hopper's largest dynamic shared memory per block
PREFETCH_KV_MAX = 8 << 20             # decode's L2 prefetch only while a step's keys + values are below this
_DEC_STAGE_BUDGET = 100 * 1024        # decode (FMA) pipeline bytes: leaves room for 2+ blocks per SM
_DEC_TC_STAGE_BUDGET = 110 * 1024     # decode (tensor cores): 3 stages of 64 keys at d=128, 2 blocks/SM

_functions: dict[tuple, Any] = {}
modules: dict[tuple, Any] = {}           # compile options -> the loaded attention module (trace reads)
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
    """Pipeline depth of the tensor-core decode: 2..4 tiles of 64 keys within ~110 KB (two blocks
    per SM); when fewer than 3 fit there (d = 256), as many (up to 3) as one block per SM holds:
    the block is alone on its SM anyway, and deeper is more bytes in flight."""
    kstr, vstr = _strides(2, dk, dv)
    stage = DTC_T * (kstr + vstr) * 2 + DTC_T * 4
    st = _DEC_TC_STAGE_BUDGET // stage
    if st < 3:
        st = max(st, min(3, (SMEM_LIMIT - _decode_tc_fixed(kstr) - 64) // stage))
    return max(2, min(4, st))


def _decode_tc_fixed(kstr: int) -> int:
    """Bytes of the tensor-core decode's shared memory outside the stages: Qs, Pw, qp, mbarriers."""
    return DTC_R * kstr * 2 + 4 * DTC_R * 24 * 2 + DTC_R * 4 + 4 * 8


def combine_bytes(nt: int = DEC_NT) -> int:
    """Shared memory of the fused combine (attention.cu combine_floats): a float4 and a float2 per
    thread, 8 (m, l) pairs."""
    return (6 * nt + 16) * 4


def _counter_words(hkv: int) -> int:
    """Ticket counters of one decode: one per kv head (level 2) + COMBINE_GMAX per kv head (groups)."""
    return hkv * (1 + COMBINE_GMAX)


def decode_tc_smem(dk: int, dv: int, stages: int) -> int:
    kstr, vstr = _strides(2, dk, dv)
    layout = (DTC_R * kstr * 2 + stages * (DTC_T * (kstr + vstr) * 2 + DTC_T * 4)
              + 4 * DTC_R * 24 * 2 + DTC_R * 4 + stages * 8)
    merge = DTC_R * kstr * 2 + 2 * 4 * DTC_R * 4 + 4 * DTC_R * dv * 4 + DTC_R * 4    # over the stages
    return max(layout, merge, DTC_R * kstr * 2 + combine_bytes())


def decode_smem(kvb: int, dk: int, dv: int, rmax: int, stages: int) -> int:
    kstr, vstr = _strides(kvb, dk, dv)
    layout = (stages * DEC_T * (kstr + vstr) * kvb + stages * DEC_T * 4
              + rmax * dk * 4 + rmax * DEC_T * 4 + rmax * 4 + rmax * 4)
    kg = DEC_NT // (dv // 8)
    return max(layout, kg * rmax * dv * 4 + rmax * 4, combine_bytes())


def split_unit(page_size: int) -> int:
    """Pages per split unit: a whole 64-key tile when pages divide 64, else one page."""
    return SPLIT_KEYS // page_size if page_size < SPLIT_KEYS and SPLIT_KEYS % page_size == 0 else 1


def split_min_units(split_keys: int, page_size: int) -> int:
    return max(1, _cdiv(int(split_keys), split_unit(page_size) * page_size))


def split_geometry(kv_len: int, splits: int, min_units: int, page_size: int) -> tuple[int, int]:
    """(splits used, pages per split) of a decode launch at ``kv_len``: attention.cu's
    split_geometry, which the kernels compute from the device's kv_len."""
    unit = split_unit(page_size)
    n_units = _cdiv(_cdiv(max(0, kv_len), page_size), unit)
    ups = max(max(min_units, 1), _cdiv(n_units, splits))
    return max(1, _cdiv(n_units, ups)), ups * unit


def combine_groups(nsplit: int, flat_max: int = DEFAULT_FLAT_MAX) -> tuple[int, int]:
    """(splits per group, groups) of the fused combine: attention.cu decode_combine. One group
    (one level) up to ``flat_max`` splits, else groups of ceil(sqrt(nsplit)) (at most COMBINE_GMAX)."""
    gs = nsplit
    if nsplit > flat_max:
        gs = math.isqrt(nsplit - 1) + 1 if nsplit > 1 else 1
        while _cdiv(nsplit, gs) > COMBINE_GMAX:
            gs += 1
    return gs, _cdiv(nsplit, gs)


def default_split_keys(hkv: int, rows: int, dk: int, dv: int, kvb: int) -> int:
    """Fewest keys a decode split takes (a multiple of 64): below ~this many a sequence is better
    served by fewer, longer splits than by paying for partials and the combine. Measured on an
    H100 (benchmarks/bench_cuda_attention.py --sweep): one 64-key tile per split when a split's
    partial is small (SmolLM2: 3 rows x 64 = 768 bytes), two tiles when it is 2-4 KB (Llama-8B,
    Gemma-3: the combine's reads then cost as much as the extra tile)."""
    return 64 if rows * dv * 4 <= 1024 else 128


def decode_kernel_smem(kind: str, kvb: int, dk: int, dv: int, rows: int) -> tuple[str, int]:
    """(kernel name, dynamic shared memory) of decode kernel ``kind`` ("tc", "tcb", "fma")."""
    if kind in ("tc", "tcb"):
        return f"attn_decode_{kind}", decode_tc_smem(dk, dv, decode_tc_stages(dk, dv))
    rmax = 4 if rows <= 4 else 8
    return f"attn_decode_r{rmax}", decode_smem(kvb, dk, dv, rmax, decode_stages(kvb, dk, dv))


def default_splits(hkv: int, max_pages: int, smem: int = 110 * 1024) -> int:
    """Decode grid (splits per kv head) when the plan names none: one wave of blocks (two per SM,
    one where the kernel's shared memory ``smem`` allows only one)."""
    per_sm = max(1, min(2, (SMEM_LIMIT + 1024) // (smem + 1024)))
    return num_splits(hkv, max_pages, blocks_per_sm=per_sm)


def bulk_copies_ok(page_size: int) -> bool:
    """attn_decode_tcb (bulk copies) exists for this page size (attention.cu DTC_BULK_OK) on this GPU."""
    if not (page_size % 4 == 0 and (DTC_T % page_size == 0 or page_size % DTC_T == 0)):
        return False
    return compute_capability() >= 90


_cc: list[int] = []


def compute_capability() -> int:
    """Compute capability of the current device as major*10+minor (90 for Hopper); 90 without one."""
    if not _cc:
        try:
            import cupy
            _cc.append(int(cupy.cuda.Device().compute_capability))
        except Exception:
            return 90
    return _cc[0]


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
    splits = num_splits(hkv, max_pages, blocks_per_sm=max(2.0, blocks_per_sm))   # >= default_splits
    return _partials_bytes(splits, n * H, dv)


def _partials_bytes(splits: int, rows: int, dv: int) -> int:
    """Decode scratch for ``splits`` splits of ``rows`` = n * H rows: the ticket counters, then
    ml (splits, rows, 2) f32, then acc (splits, rows, dv) f32."""
    ml = _cdiv(splits * rows * 2 * 4, 256) * 256
    return COUNTER_BYTES + ml + splits * rows * dv * 4


# -- kernels ----------------------------------------------------------------------------------------

def trace_enabled() -> bool:
    """GGFLAT_ATTN_TRACE=1: the measurement build (ATTN_TRACE) whose tensor-core decode kernels stamp
    each block's phases into attn_trace_buf (benchmarks/trace_decode.py reads it via ``modules``)."""
    import os
    return os.environ.get("GGFLAT_ATTN_TRACE", "0").strip() == "1"


def qfirst_enabled() -> bool:
    """GGFLAT_ATTN_QFIRST=1 builds the tensor-core decode kernels that issue q's loads before kv_len's
    and the block table's (attention.cu ATTN_QFIRST; off until measured on the H100)."""
    import os
    return os.environ.get("GGFLAT_ATTN_QFIRST", "0").strip() == "1"


def _function(kvb: int, dk: int, dv: int, page: int, name: str, smem: int = 0) -> Any:
    """Kernel ``name`` of the module for this geometry, as a callable (grid, block, args, smem, stream)."""
    opts = (f"-DATTN_KV_F16={int(kvb == 2)}", f"-DATTN_DK={dk}", f"-DATTN_DV={dv}",
            f"-DATTN_PAGE={page}", f"-DATTN_DEC_STAGES={decode_stages(kvb, dk, dv)}",
            f"-DATTN_DEC_TC_STAGES={decode_tc_stages(dk, dv)}")
    opts += ("-DATTN_TRACE=1",) if trace_enabled() else ()
    if qfirst_enabled():
        opts += ("-DATTN_QFIRST=1",)
    key = (opts, name)
    fn = _functions.get(key)
    if fn is None:
        from .compile import load_module

        mod = modules[opts] = load_module("attention", opts)
        raw = mod.get_function(name)
        raw.max_dynamic_shared_size_bytes = SMEM_LIMIT if smem > 48 * 1024 else 48 * 1024
        from .compile import kernel_callable
        fn = _functions[key] = kernel_callable(raw)
    return fn


def _launch(fn: Any, grid: tuple[int, ...], block: int, args: tuple, smem: int, stream: Any) -> Step:
    return partial(fn, tuple(int(g) for g in grid), (int(block),), args, int(smem), stream)


def _nothing() -> None:
    return None


def _zero_counters(counters: Any, words: int, stream: Any) -> None:
    """Zero the decode's ticket counters, once at plan time (async, on the plan's stream; the
    kernel returns them to zero, so replays need nothing). Planned inside a stream capture, the
    memset becomes a node of the graph: harmless, the counters are zero there anyway."""
    import cupy
    st = stream if stream is not None else cupy.cuda.get_current_stream()
    cupy.cuda.runtime.memsetAsync(counters.data.ptr, 0, max(4, words * 4), st.ptr)


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
                   split_keys: int | None = None, flat_max: int | None = None, mode: str | None = None, decode_kernel: str | None = None,
                   prefill_kernel: str | None = None, prefill_rows: int | None = None,
                   prefetch: tuple[int, int] | None = None, prefetch_kv_max: int | None = None) -> Step:
    """Step computing ``ops.attention`` into ``out`` (n, H * dv) f32.

    ``scratch``: a device array of at least ``attention_scratch_bytes(...)`` bytes (decode only).
    Tuning/testing knobs: ``splits`` (decode grid: splits per kv head), ``split_keys`` (fewest
    keys a decode split takes, see ``split_geometry``), ``flat_max`` (most splits whose partials
    one block merges; more are merged in two levels), ``mode`` ("decode" or
    "prefill", default by size), ``decode_kernel`` / ``prefill_kernel`` ("tc": tensor cores,
    the default for f16 pages; decode also "tcb": tensor cores fed by bulk copies, the default
    where it exists (Hopper, pages of 4k slots); "fma": f32 FMA, the only one for f32 pages) and ``prefill_rows`` (query rows per
    block: 16, 32 or 64; default the largest that still gives every SM a block).

    ``prefetch``: ``(device address, nbytes)`` of memory that no kernel writes (the weights of the
    launch that follows: the backend passes the o projection's), which the decode kernel asks L2
    for while it runs (attention.cu ``ATTN_PREFETCH``), unless the step's keys and values exceed
    ``prefetch_kv_max`` bytes (default ``PREFETCH_KV_MAX``). Ignored by prefill and before Hopper."""
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
        bulk_ok = tc_ok and bulk_copies_ok(page)
        kind = decode_kernel or ("tcb" if bulk_ok else "tc" if tc_ok else "fma")
        _need(kind in ("tc", "tcb", "fma") and (kind == "fma" or tc_ok) and (kind != "tcb" or bulk_ok),
              f"attention: decode kernel {kind!r} not available for this cache ({k_cache.dtype}, dk {dk}, dv {dv},"
              f" page {page})")
        _need(_counter_words(hkv) * 4 <= COUNTER_BYTES,
              f"attention: {hkv} kv heads need more than {COUNTER_BYTES} bytes of counters")
        name, smem = decode_kernel_smem(kind, kvb, dk, dv, R)
        ns = default_splits(hkv, max_pages, smem) if splits is None else max(1, min(int(splits), max_pages))
        _need(ns <= COMBINE_GMAX ** 2, f"attention: at most {COMBINE_GMAX ** 2} decode splits")
        fm = DEFAULT_FLAT_MAX if flat_max is None else max(1, int(flat_max))
        sk = default_split_keys(hkv, R, dk, dv, kvb) if split_keys is None else int(split_keys)
        _need(sk >= 1, "attention: split_keys must be >= 1")
        need = _partials_bytes(ns, n * H, dv)
        _need(scratch is not None and scratch.nbytes >= need,
              f"attention: decode needs {need} bytes of scratch, got {0 if scratch is None else scratch.nbytes}")
        import cupy
        _need(scratch.flags.c_contiguous, "attention: scratch must be contiguous")
        base = scratch.data
        ml_bytes = _cdiv(ns * n * H * 2 * 4, 256) * 256
        counters = cupy.ndarray((COUNTER_BYTES // 4,), cupy.uint32, memptr=base)
        part_ml = cupy.ndarray((ns * n * H * 2,), cupy.float32, memptr=base + COUNTER_BYTES)
        part_acc = cupy.ndarray((ns * n * H * dv,), cupy.float32, memptr=base + COUNTER_BYTES + ml_bytes)
        _need(smem <= SMEM_LIMIT, f"attention: decode needs {smem} bytes of shared memory ({ns} splits)")
        f_dec = _function(kvb, dk, dv, page, name, smem)
        _zero_counters(counters, _counter_words(hkv), stream)
        pf_addr, pf_bytes = (0, 0) if prefetch is None else (int(prefetch[0]), max(0, int(prefetch[1])))
        _need(pf_addr % 16 == 0, "attention: prefetch address must be 16-byte aligned")
        pf_kv = PREFETCH_KV_MAX if prefetch_kv_max is None else max(0, int(prefetch_kv_max))
        return _launch(f_dec, (ns, hkv), DEC_NT,
                       (q, k_cache, v_cache, pos_cache, block_table, kv_len, q_pos, part_ml, part_acc, counters, out)
                       + common + (np.int32(ns), np.int32(split_min_units(sk, page)), np.int32(fm)) + tail
                       + (np.uint64(pf_addr), np.uint64(pf_bytes), np.uint64(pf_kv)),
                       smem, stream)

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
