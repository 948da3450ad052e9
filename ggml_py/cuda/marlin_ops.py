"""Marlin-style W4A16 GEMM for Q4_0 / Q4_1 / Q4_K weights (kernels in ``marlin.cu``).

At load, ``repack(dw)`` turns a GGUF-block ``DeviceWeight`` into a ``MarlinWeight``: the same
matrix in the tensor-core layout of ``quant_formats/marlin.py`` (two repack kernels, then the
GGUF copy is dropped: one copy of the weight stays on the GPU).

``plan_gemm(ws, M, a_dtype=...)`` chooses a kernel and a k-split for ``out_g (M, N_g) = A (M, K)
@ W_g.T`` over one to three weights of one type and K (q/k/v), optionally as a gate/up pair
with swiglu/geglu (``glu=``) or with a residual add (``residual=True``); ``.bind(a, outs,
stream, resid=None)`` returns a zero-argument launch (graph-capturable: nothing is allocated
or synchronised at run time; partial sums and self-resetting tickets are allocated at plan time).

Kernel variants: ``marlin_<type>_d<T>[_glu]`` (M <= 16, the default there) put the weights in
the mma's A operand, 8 T rows of A per tile, and can fold in the rms_norm of A (``norm=eps``, the
weight given to ``bind``) and the ropes of q and k (``rope=``); ``marlin_<type>_m<MT>[_glu]``
(M > 16) put them in B, 16 MT rows; ``marlin_<type>_w<NB>`` (sm_90a, NB = 16/32/64 rows, no glu or
folds) put them in wgmma's register A operand and replace m2 for 17..64 rows where that measured
faster (``_wg_choice``; ``GGFLAT_MARLIN_WG=0`` turns it off); ``marlin_<type>_x64`` (sm_90a, the
mixed-input kernel: warp-specialized, the weights dequantized into shared memory for a wgmma with
both operands there, whole K a CTA) for 33..64 rows with f16 A where its 128-column CTAs fill the
GPU (4096 x 14336: 32.6 us against m2's 43.7). Each warp of the mma.sync kernels
computes a rows x 64 tile over (its share of) one k-slab; A may be f32 (the engine's activations:
the kernel converts its window to f16 in shared memory, so decode needs no cast launch) or f16.
``choose_split_dec`` (decode kernels, by rule) and ``choose_split`` (cost model) pick the k-split
inside a CTA (``kws`` warps a tile) and across CTAs (``slabs``, reduced in a thread-block cluster or
through partials and tickets); ``choose_split_wg`` the warpgroup kernels' tiles a CTA and slabs.
``GGFLAT_MARLIN_DEC=0`` sends M <= 16 to the m-kernels and ``GGFLAT_MARLIN_NORM=0`` refuses the
norm fold (A/B measurements). Launches go through ``launch.launcher`` (programmatic
dependent launch, cluster dimensions).

``plan_dequant16`` / ``plan_get_rows``: the repacked weight as f16 rows (the prefill GEMM's
dequantize-to-f16 + cuBLAS path, kept for large M) or f32 rows (embedding lookups).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from quant_formats.marlin import TYPES, MarlinLayout

from .compile import kernel_callable, load_module

_NAMES = {2: "q4_0", 3: "q4_1", 12: "q4_k"}
THREADS = 256
WSTAGE = 1408
SMEM_LIMIT = 225 * 1024          # Hopper's 227 KB per block, less the static shared memory
_MODES = {None: 0, "swiglu": 1, "geglu": 2}


@dataclass(eq=False)
class MarlinWeight:
    """A 4-bit weight in the Marlin layout on the GPU (``data``: cupy.uint8, ``layout.nbytes``)."""
    ggml_type: int
    shape: tuple[int, int]
    data: Any
    nbytes: int
    name: str = ""
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> MarlinLayout:
        return MarlinLayout(self.ggml_type, self.shape[0], self.shape[1])

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]


def eligible(ggml_type: int, shape: tuple[int, ...]) -> bool:
    """Whether a weight of this type and (N, K) shape can be repacked."""
    if int(ggml_type) not in TYPES or len(shape) != 2:
        return False
    qk = 256 if int(ggml_type) == 12 else 32
    return shape[0] >= 1 and shape[1] >= qk and shape[1] % qk == 0


@lru_cache(maxsize=1)
def wg_available() -> bool:
    """Whether the warpgroup kernels (wgmma: sm_90a, Hopper only) can run on this GPU."""
    import cupy
    try:
        return str(cupy.cuda.Device().compute_capability) == "90"
    except Exception:
        return False


def trace_enabled() -> bool:
    """GGFLAT_MARLIN_TRACE=1 builds the decode kernels with per-warp timestamps (marlin.cu MARLIN_TRACE,
    read by benchmarks/trace_decode.py) -- a measurement build."""
    return _env_on("GGFLAT_MARLIN_TRACE", "0")


@lru_cache(maxsize=None)
def _module():
    # sm_90a: the architecture-specific features (wgmma) of the warpgroup kernels; NVRTC takes it over
    # the plain -arch=sm_90 that CuPy adds. Elsewhere those kernels compile to empty bodies, unused.
    opts = ("-arch=sm_90a",) if wg_available() else ()
    opts += ("-DMARLIN_TRACE=1",) if trace_enabled() else ()
    # GGFLAT_MARLIN_PAREPI=0: the one-warp-a-tile store epilogue of before, for A/B runs
    opts += () if _env_on("GGFLAT_MARLIN_PAREPI", "1") else ("-DMARLIN_PAR_EPI=0",)
    # GGFLAT_MARLIN_AGATE=0|2|3: other gates of the decode kernel's weight stages (marlin.cu), for A/B runs
    agate = os.environ.get("GGFLAT_MARLIN_AGATE", "1").strip()
    opts += (f"-DMARLIN_AGATE={agate}",) if agate in ("0", "2", "3") else ()
    if (X_STAGES, X_RAW_STAGES) != (6, 8):
        opts += (f"-DMARLIN_XST={X_STAGES}", f"-DMARLIN_XRS={X_RAW_STAGES}")
    opts += ("-DMARLIN_XTRACE=1",) if _env_on("GGFLAT_MARLIN_XTRACE", "0") else ()
    # GGFLAT_MARLIN_XONLY=1: a module of the x64 and repack kernels only (measurement scripts: seconds to build)
    opts += ("-DMARLIN_XONLY=1",) if _env_on("GGFLAT_MARLIN_XONLY", "0") else ()
    return load_module("marlin", opts)


_fns: dict[tuple[str, bool], Any] = {}


def _function(name: str, smem: int = 0) -> Any:
    """Kernel ``name`` as a callable (grid, block, args, shared_mem, stream); for the GEMM kernels
    (smem > 48 KB allowed) the pair (callable, registers per thread)."""
    big = smem > 48 * 1024
    key = (name, big)
    got = _fns.get(key)
    if got is None:
        raw = _module().get_function(name)
        if big:
            raw.max_dynamic_shared_size_bytes = SMEM_LIMIT
        try:
            regs = int(raw.attributes["num_regs"])
        except Exception:
            regs = 128
        got = _fns[key] = (kernel_callable(raw), regs)
    return got if big else got[0]


def _grid1(n: int, block: int = 256) -> tuple[int]:
    return (max(1, -(-n // block)),)


# -- repacking -------------------------------------------------------------------------------------

def repack(dw, stream=None) -> MarlinWeight:
    """A ``DeviceWeight`` of GGUF blocks (Q4_0/Q4_1/Q4_K, 2-D) -> a ``MarlinWeight``. The caller
    drops ``dw`` afterwards; both exist only during this call."""
    import cupy
    t = int(dw.ggml_type)
    n, k = (int(d) for d in dw.shape)
    lay = MarlinLayout(t, n, k)
    out = cupy.zeros(lay.nbytes, cupy.uint8)
    cs = cupy.cuda.get_current_stream() if stream is None else stream
    nthreads = lay.nt * (k // 16) * 32
    _function("marlin_repack_codes")(_grid1(nthreads), (256,), (dw.data, out, np.int32(t), np.int32(n), np.int32(k)),
                                     0, cs)
    nthreads = lay.nt * 64 * lay.groups
    _function("marlin_repack_scales")(_grid1(nthreads), (256,),
                                      (dw.data, out, np.int32(t), np.int32(n), np.int32(k),
                                       np.int64(lay.gs_offset), np.int64(lay.ss_offset)), 0, cs)
    return MarlinWeight(t, (n, k), out, lay.nbytes, getattr(dw, "name", ""))


# -- the GEMM ----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def sm_count() -> int:
    import cupy
    try:
        return int(cupy.cuda.Device().attributes["MultiProcessorCount"])
    except Exception:
        return 132


def _env_on(name: str, default: str = "1") -> bool:
    """An on/off switch of the environment: off for 0, false, no, off."""
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off")


def dec_enabled() -> bool:
    """GGFLAT_MARLIN_DEC=0 sends M <= 16 to the mma-B kernels (m1) instead of the decode kernels."""
    return _env_on("GGFLAT_MARLIN_DEC")


def wg_enabled() -> bool:
    """GGFLAT_MARLIN_WG=0 keeps 17..64 rows on the mma.sync kernels (m2) everywhere (A/B measurements)."""
    return _env_on("GGFLAT_MARLIN_WG")


def kv_fold_enabled() -> bool:
    """GGFLAT_MARLIN_KVFOLD=0 keeps the KV-cache write a launch of its own (A/B measurements)."""
    return _env_on("GGFLAT_MARLIN_KVFOLD")


def early_enabled() -> bool:
    """GGFLAT_MARLIN_EARLY=0 makes bind ignore ``early`` (every read after PDL's wait; A/B measurements)."""
    return _env_on("GGFLAT_MARLIN_EARLY")


def _config(M: int) -> str:
    """The default kernel variant (without _glu) for M rows of A. Above 16 rows m2 (32-row tiles,
    128 registers: two CTAs a SM) in as many row tiles as needed: at 64 rows it measured faster than
    m4's 64-row tiles (254 registers, one CTA a SM): 4096 x 14336 43.4 against 47.7 us, 14336 x 4096
    52.9 against 66.0 (H100, 2026-11-24)."""
    if M <= 16 and dec_enabled():
        return "d1" if M <= 8 else "d2"
    return "m1" if M <= 16 else "m2"


# compiled kernels (marlin.cu): name suffix -> (rows of A per tile, glu, pipeline stages, groups per
# stage, decode kernel?). m<MT>: mma with the weights as B, 16 MT rows; d<T>: the decode kernel,
# weights as A, 8 T rows. The variants with _s exist for Q4_0 only (benchmarks' sweeps).
_VARIANTS = {"m1": (16, False, 4, 2, False), "m1_glu": (16, True, 4, 1, False), "m2": (32, False, 4, 1, False),
             "m2_glu": (32, True, 4, 1, False), "m4": (64, False, 4, 1, False),
             "d1": (8, False, 4, 2, True), "d1_glu": (8, True, 4, 1, True),
             "d2": (16, False, 4, 2, True), "d2_glu": (16, True, 4, 1, True),
             "m1_s4g1": (16, False, 4, 1, False), "m1_s6g1": (16, False, 6, 1, False),
             "m1_s8g1": (16, False, 8, 1, False), "m1_s3g2": (16, False, 3, 2, False),
             "m1_s4g4": (16, False, 4, 4, False), "m2_s4g2": (32, False, 4, 2, False),
             "m4_s3g2": (64, False, 3, 2, False),
             "d1_s3g2": (8, False, 3, 2, True), "d1_s6g1": (8, False, 6, 1, True), "d1_s3g4": (8, False, 3, 4, True),
             "d1_probe1": (8, False, 4, 2, True), "d1_probe2": (8, False, 4, 2, True),
             "w16": (16, False, 8, 2, False), "w32": (32, False, 6, 4, False), "w64": (64, False, 6, 4, False),
             "w16_x": (16, False, 8, 2, False), "x64": (64, False, 4, 2, False)}
# the warpgroup kernels (wgmma, sm_90a): no glu, no folds; w16_x (Q4_0) swaps the A window's LBO and SBO
# (a test that the descriptor's layout is the one that matters)
WG_VARIANTS = ("w16", "w32", "w64", "w16_x", "x64")
# warpgroups a CTA (marlin.cu MARLIN_WG_TYPE): as many as 64K registers hold without spills
WG_NWG = {"w16": 4, "w32": 2, "w64": 2, "w16_x": 4}
# the mixed-input kernel marlin_<type>_x64 (marlin.cu X_ST, X_RS): a raw-loading warp, an A warpgroup,
# two dequantizing warpgroups and a consumer warpgroup (X_THREADS); two 64-column tiles a CTA over the
# whole K, no slabs. GGFLAT_MARLIN_XST / _XRS: other ring depths, for measurement runs
X_STAGES = int(os.environ.get("GGFLAT_MARLIN_XST", "6"))
X_RAW_STAGES = int(os.environ.get("GGFLAT_MARLIN_XRS", "8"))
X_MIN_CTAS = 0.75                      # (of the SMs) the fewest CTAs for which the plan picks x64
X_MIN_SLAB_STAGES = 32                  # the fewest stages of a slab for which the plan picks x64 with slabs
X_THREADS = 544                        # warpgroups: consumer, two dequantizing, A; and a raw-loading warp
SWEEP_VARIANTS = tuple(k for k in _VARIANTS if "_s" in k)
PROBE_VARIANTS = ("d1_probe1", "d1_probe2")    # Q4_0, benchmarks only: arithmetic / A window left out
CONFIGS = ("d1", "d2", "m1", "m2", "m4")          # the default variants (every type)
_RED_COST = 0.15                       # cost of one partial row of one slab, in groups (fitted)
_RED_CLUSTER = 0.02                    # the same through a cluster's shared memory
_RED_CTA = 0.3                         # per k-warp of a reduction inside a CTA


MAX_CLUSTER = 16                       # slabs reduced through a thread-block cluster (H100: 16, non-portable)
CLUSTER_SIZES = (2, 4, 8, 16)          # (10 CTAs measured 2x slower than 8: 64x4096x4096 52.7 vs 27.6 us)
CLUSTER_MIN_ROWS = 8                   # clusters only for tiles of more rows than this


def cluster_enabled() -> bool:
    return _env_on("GGFLAT_MARLIN_CLUSTER")


_DEC_SCALE_BYTES = {2: 128, 3: 256, 12: 384}       # a group's scale bytes in the decode kernel's ring


def _smem_bytes(variant: str, rows: int, kw: int, cluster: bool = False, kws: int = 1, ggml_type: int = 2) -> int:
    nb, glu, stages, gps, dec = _VARIANTS[variant]
    if variant in WG_VARIANTS:
        # a tile's layout runs of one stage (marlin.cu StageRuns)
        stage = gps * (1024 + (256 if ggml_type == 3 else 128)) + (256 if ggml_type == 12 else 0)
        if variant == "x64":                      # A and B rings, the raw ring of two tiles, 1024 alignment
            return X_STAGES * (64 * 128 + 128 * 128) + X_RAW_STAGES * 2 * stage + 1024
        return WG_NWG[variant] * stages * stage + 1024 + nb * kw * 2     # (the window is 1024-aligned)
    nwt = 2 if glu else 1
    if dec:
        ngc = kw // 32
        ring = (8 * stages * gps * (1024 + _DEC_SCALE_BYTES[ggml_type]) * nwt + rows * (kw + 8) * 2
                + rows * ngc * 4 * (1 if ggml_type == 2 else 2) + 512 + 32)
    else:
        ring = 8 * stages * gps * WSTAGE * nwt + rows * (kw + 8) * 2 + 16
    return max(ring, nwt * 8 * rows * 64 * 4) if (cluster or kws > 1) else ring


def _ctas_per_sm(regs: int, smem: int) -> int:
    """CTAs of 256 threads an H100 SM holds: 64K registers (allocated 256 a warp), 228 KB shared."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // 8
    by_smem = (228 * 1024) // (smem + 1024)
    return max(1, min(by_regs, by_smem))


def choose_split(tiles: int, m_tiles: int, groups: int, rows: int, variant: str, regs: int,
                 sms: int, ggml_type: int = 2) -> tuple[int, int]:
    """(kws, slabs): the k-split inside a CTA (kws warps per tile, reduced in shared memory; 8 // kws
    tiles a CTA) and across CTAs (slabs, reduced in a cluster or through global partials).

    Cost, in units of one warp's group: the groups a warp streams times the waves of CTAs (a wave
    = one CTA per SM for up to 16 rows: one CTA of 8 warps already draws an SM's share of the
    bandwidth; above 16 rows, where the mma-B kernels are bound by instruction latency, every CTA
    resident at once: 64 x 4096 x 14336 on m2 k1s4, two CTAs a SM, 43.4 us against k1s2's 47.9),
    plus the reductions: per partial row and slab 0.15 through global memory, 0.02 through a
    cluster's shared memory; (0.3 + 0.05 rows) per k-warp for the reduction inside a CTA.
    Among the splits whose CTAs are all resident at once (or the first that fits in shared memory).
    Fitted to the sweeps of benchmarks/bench_marlin.py --sweep and bench_points.py (H100, 2026-11-24)."""
    best, best_cost = None, None
    for kws in (1, 2, 4, 8):
        if kws > 1 and rows > 16:
            continue
        per_slab = -(-tiles // (8 // kws)) * m_tiles
        found = False
        for s in range(1, groups + 1):
            if s * kws > groups:
                break
            kw = -(-groups // s) * 32
            smem = _smem_bytes(variant, rows, kw, _use_cluster(s, rows, kws), kws, ggml_type)
            if smem > SMEM_LIMIT:
                continue
            ctas = per_slab * s
            resident = _ctas_per_sm(regs, smem)
            if found and ctas > sms * resident:
                if rows > 16:                      # (more slabs shrink the A window: more may fit)
                    continue
                break                              # more CTAs than fit at once: only worse from here
            found = True
            red = 0.0 if s == 1 else (_RED_CLUSTER if _use_cluster(s, rows, kws) else _RED_COST) * rows * s
            # a wave: one CTA a SM -- or, above 16 rows (the mma-B kernels, latency-bound: two resident
            # CTAs of half the work each finish sooner than one), as many CTAs as are resident at once
            waves = -(-ctas // (sms * (resident if rows > 16 else 1)))
            cost = (groups / (s * kws)) * waves + red + (_RED_CTA + 0.05 * rows) * kws * (kws > 1)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = (kws, s), cost
    return best or (1, groups)


def _wg_kw(groups: int, slabs: int, gps: int) -> int:
    """The widest A window (k) of a warpgroup kernel's slabs: slabs of whole stages (gps groups)."""
    units = groups // gps
    return -(-units // slabs) * gps * 32


def choose_split_wg(tiles: int, m_tiles: int, groups: int, variant: str, sms: int,
                    ggml_type: int = 2) -> tuple[int, int]:
    """(tiles a CTA, slabs) for the warpgroup kernels: the fewest slabs whose A window fits (every slab
    more costs partials and a reduction: 64 x 4096 x 4096 on w64, 4 slabs 15.8 us, 8 slabs 24.9), then
    the fewest tiles a CTA that keep the CTAs to one a SM (H100, 2026-11-24, bench_points.py)."""
    gps = _VARIANTS[variant][3]
    for s in range(1, groups // gps + 1):
        if _smem_bytes(variant, 0, _wg_kw(groups, s, gps), ggml_type=ggml_type) <= SMEM_LIMIT:
            break
    else:
        raise ValueError(f"Marlin: no split of K fits {variant}'s A window in shared memory")
    tpc = max(1, -(-tiles * s * m_tiles // sms))
    return min(tpc, tiles), s


def x64_slabs(tiles: int, m_tiles: int, groups: int, sms: int) -> int:
    """x64's k-split: as many slabs as bring its CTAs (two tiles each) up to the SMs, each slab at least
    8 stages (64 k a stage) so the rings fill. 64 x 14336 x 4096 (32 CTAs a slab), H100, Q4_0: 91.3 /
    57.6 / 36.1 us at 1 / 2 / 4 slabs (2026-11-25)."""
    ctas = -(-tiles // 2) * m_tiles
    return max(1, min(sms // ctas, groups // 2 // 8))


def _wg_choice(tiles: int, groups: int, M: int, ggml_type: int, a_dtype: str = "f32") -> str | None:
    """The warpgroup kernel for 17..64 rows where it measured faster than m2: when its split leaves
    every warpgroup at most one tile (a warpgroup that streams several tiles pays each one's drain,
    partials and ticket in series). H100, Q4_0, f16 A, us (m2 against w32/w64, 2026-11-24): 4096 x 4096
    at 33 / 48 / 64 rows 21.9 / 25.1 / 27.2 against 13.9 / 14.8 / 15.4 (Q4_K 31.0 against 17.3, Q4_1
    27.9 against 15.6; 32 rows, Q4_1: 18.7 against 14.9); 4096 x 6144 a tie (22.0 / 23.4 / 25.6 against
    22.0 / 22.8 / 23.7); 4096 x 14336 and 14336 x 4096 up to 15% slower: those stay on m2, except that
    4096 x 14336 with f16 A at 33..64 rows goes to x64 (2026-11-25)."""
    if not 16 < M <= 64 or not wg_enabled() or not wg_available():
        return None
    # the mixed-input kernel (x64) for 33..64 rows where its 128-column CTAs, times its slabs, fill the
    # GPU and each slab keeps at least X_MIN_SLAB_STAGES stages; f16 A only (its f32 path loads and
    # converts A in line: 58.3 us against m2's 45.6 at 64 x 4096 x 14336). Its time is flat in M
    # (32.5-33.1 us at 17-64 rows, 4096 x 14336), so m2 keeps 17..32 (27.0 at 32). H100, Q4_0, 64 rows
    # (2026-11-25): 4096 x 14336 one slab 32.0 us (m2 43.7); 14336 x 4096 four slabs of 56 stages 36.1
    # (m2 53.2); 4096 x 4096 four slabs of 16 stages 20.0 (w64 15.7)
    if a_dtype == "f16" and M > 32 and groups % 2 == 0:
        slabs = x64_slabs(tiles, 1, groups, sm_count())
        if (-(-tiles // 2) * slabs >= X_MIN_CTAS * sm_count()
                and (slabs == 1 or groups // 2 // slabs >= X_MIN_SLAB_STAGES)):
            return "x64"
    variant = "w32" if M <= 32 else "w64"
    if groups % _VARIANTS[variant][3]:
        return None
    try:
        tpc, _ = choose_split_wg(tiles, 1, groups, variant, sm_count(), ggml_type)
    except ValueError:
        return None
    return variant if tpc <= WG_NWG[variant] else None


def _split_override(N: int, K: int, glu: bool, M: int) -> tuple[int, int] | None:
    """GGFLAT_MARLIN_SPLIT="<N>x<K>[g]=<kws>x<slabs>,...": the split for a weight shape (g: a
    gate/up pair) at M <= 16, instead of the chosen one -- a measurement switch for A/B runs."""
    raw = os.environ.get("GGFLAT_MARLIN_SPLIT", "").strip()
    if not raw or M > 16:
        return None
    want = f"{N}x{K}{'g' if glu else ''}"
    for item in raw.split(","):
        key, _, val = item.partition("=")
        if key.strip() == want:
            try:
                kws, slabs = (int(v) for v in val.lower().split("x"))
            except ValueError:
                from engine.errors import GGFlatError
                raise GGFlatError(f"GGFLAT_MARLIN_SPLIT: {item!r} is not <N>x<K>[g]=<kws>x<slabs>") from None
            return kws, slabs
    return None


def choose_split_dec(tiles: int, m_tiles: int, groups: int, rows: int, variant: str, regs: int,
                     sms: int, ggml_type: int = 2) -> tuple[int, int]:
    """(kws, slabs) for the decode kernels (d1/d2), by rule, from the sweeps of
    benchmarks/bench_marlin.py --sweep on the H100 (2026-11-24, Q4_0, M = 1 and 16):

    - A k-split across CTAs costs 1-1.5 us (partials, a ticket, the last CTA's reload) and more
      than one CTA per SM buys little, so: one wave of at most one CTA per SM, and no split when
      the tiles can fill the GPU -- for 1..8 rows the fewest warps per tile (kws) that give
      >= 3/4 of the SMs a CTA (4096 x 14336: k4s1 15.3 us against 18.3 for the old choice k1s9).
    - Otherwise (N = 4096: 64 tiles) 8 warps a tile and the fewest slabs (a power of two) that
      give >= 3/4 of the SMs a CTA and leave each warp at most 16 groups (14336 x 4096: k8s4 17.0
      us; 4096 x 4096: k8s2 -- k8s1's 64 CTAs measured 8.1 us alone but 15.8 in the decode graph).
    - Gate/up pairs keep choose_split's cost model (MarlinPlan), which measured better in the graph.
    - 9..16 rows: the A window costs each CTA rows x K x 4 bytes of reads, so every CTA serves 8
      tiles (kws = 1) and the slabs (<= 8) fill the SMs (4096 x 4096: k1s8 13.3 us)."""
    def fits(kws: int, s: int) -> bool:
        kw = -(-groups // s) * 32
        return s * kws <= groups and _smem_bytes(variant, rows, kw, _use_cluster(s, rows, kws), kws,
                                                 ggml_type) <= SMEM_LIMIT
    nwt = 2 if _VARIANTS[variant][1] else 1
    if rows <= 8:
        for kws in (1, 2, 4, 8):
            if -(-tiles * kws // 8) * m_tiles >= 0.75 * sms and fits(kws, 1):
                # a gate/up pair streams two weights a warp: more warps a tile while each still streams
                # more than 32 groups and the CTAs stay one wave of two a SM (in the 8B decode graph:
                # 4096 x 14336 pair k4s1 331 t/s, k1s9 347)
                while (kws < 8 and -(-groups // kws) * nwt > 32 and -(-tiles * 2 * kws // 8) * m_tiles <= 2 * sms
                       and fits(2 * kws, 1)):
                    kws *= 2
                return kws, 1
        s = 1                                      # (o in the 8B decode graph: k8s1's 64 CTAs 15.8 us, k8s2)
        while s < 16 and (-(-groups // (8 * s)) > 16 or tiles * s * m_tiles < 0.75 * sms) \
                and 8 * s * 2 <= groups:
            s *= 2
        while s > 1 and not fits(8, s):
            s //= 2
        if fits(8, s):
            return 8, s
    per = -(-tiles // 8) * m_tiles
    s = 1
    while s < 8 and per * s * 2 <= sms and s * 2 <= groups:
        s *= 2
    while s < groups and not fits(1, s):           # a long K: more slabs until the window fits
        s += 1
    return 1, s


def choose_slabs(tiles: int, m_tiles: int, groups: int, rows: int, variant: str, regs: int, sms: int,
                 ggml_type: int = 2) -> int:
    """The slabs of choose_split with one warp per tile (kws = 1)."""
    best, best_cost = None, None
    per_slab = -(-tiles // 8) * m_tiles
    for s in range(1, groups + 1):
        kw = -(-groups // s) * 32
        smem = _smem_bytes(variant, rows, kw, _use_cluster(s, rows, 1), 1, ggml_type)
        if smem > SMEM_LIMIT:
            continue
        ctas = per_slab * s
        if best is not None and ctas > sms * _ctas_per_sm(regs, smem):
            break
        red = 0.0 if s == 1 else (_RED_CLUSTER if _use_cluster(s, rows, 1) else _RED_COST) * rows * s
        cost = (groups / s) * -(-ctas // sms) + red
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best or groups


def _use_cluster(slabs: int, rows: int, kws: int) -> bool:
    """Slabs reduced in a cluster's shared memory: a win from 16 rows up (H100: 4096x14336 M=16
    30.3 -> 24.6 us); a loss for 1-4 rows, where the co-scheduling costs more than the tickets."""
    return (slabs in CLUSTER_SIZES and slabs <= MAX_CLUSTER and rows > CLUSTER_MIN_ROWS and kws == 1
            and cluster_enabled())


class MarlinPlan:
    """out_g (M, N_g) = A (M, K) @ W_g.T for 1-3 MarlinWeights, chosen once.

    slabs: the k-split (default: choose_slabs); config: MT (rows per tile = 16 * MT), or a kernel
    name suffix of _VARIANTS (benchmarks)."""

    def __init__(self, ws, M: int, *, a_dtype: str = "f32", glu: str | None = None, residual: bool = False,
                 slabs: int | None = None, config: int | str | None = None, kws: int | None = None,
                 norm: float | None = None, rope: dict | None = None) -> None:
        import cupy
        ws = tuple(ws)
        if not 1 <= len(ws) <= 3 or not all(isinstance(w, MarlinWeight) for w in ws):
            raise ValueError("plan_gemm: one to three MarlinWeights")
        t, K = ws[0].ggml_type, ws[0].cols
        if any(w.ggml_type != t or w.cols != K for w in ws):
            raise ValueError("plan_gemm: the weights of one launch need one type and one K")
        if glu not in _MODES:
            raise ValueError(f"plan_gemm: unknown glu {glu!r}")
        if glu is not None and (len(ws) != 2 or ws[0].shape != ws[1].shape):
            raise ValueError("plan_gemm: glu needs a (gate, up) pair of one shape")
        if residual and (len(ws) != 1 or glu is not None):
            raise ValueError("plan_gemm: a residual add takes one weight")
        if a_dtype not in ("f32", "f16"):
            raise ValueError(f"plan_gemm: a_dtype must be 'f32' or 'f16', got {a_dtype!r}")
        if K % 4 and norm is not None:
            raise ValueError("plan_gemm: the folded rms_norm needs K % 4 == 0")
        self.ws, self.M, self.K, self.type = ws, int(M), K, t
        self.a_dtype, self.glu, self.residual = a_dtype, glu, bool(residual)
        self.mode = 3 if residual else _MODES[glu]
        if isinstance(config, str):
            variant = config
            if variant not in _VARIANTS or _VARIANTS[variant][1] != (glu is not None):
                raise ValueError(f"no Marlin kernel variant {variant!r}{' with glu' if glu else ''}")
        else:
            base = f"m{int(config)}" if config else _config(self.M)
            if glu is not None and base == "m4":
                base = "m2"                              # no 4-tile glu kernel: more row tiles instead
            variant = f"{base}{'_glu' if glu else ''}"
            if variant not in _VARIANTS:
                raise ValueError(f"no Marlin kernel for config {config!r}{', glu' if glu else ''}")
        if config is None and slabs is None and kws is None and glu is None and norm is None and rope is None:
            nt = sum(-(-w.rows // 64) for w in ws)
            variant = _wg_choice(nt, K // 32, self.M, t, a_dtype) or variant
        tile_rows, _, _, _, self.dec = _VARIANTS[variant]
        if (norm is not None or rope is not None) and not self.dec:
            raise ValueError("plan_gemm: the rms_norm and rope folds exist in the decode kernels (M <= 16) only")
        self.norm = None if norm is None else float(norm)
        self.rope_mask, self.rope_args = 0, (0, 0, np.float32(0), np.float32(0))
        if rope is not None:
            from .elementwise_ops import rope_theta_scale
            d, n_rot = int(rope["head_dim"]), int(rope["n_rot"])
            members = tuple(int(g) for g in rope["members"])
            if glu is not None or residual or not members or any(not 0 <= g < len(ws) for g in members):
                raise ValueError("plan_gemm: rope needs members among the (q/k/v) weights")
            if d <= 0 or d % 2 or n_rot % 2 or not 0 < n_rot <= d or any(ws[g].rows % d for g in members):
                raise ValueError("plan_gemm: rope needs an even head_dim dividing the rotated outputs")
            for g in members:
                self.rope_mask |= 1 << g
            self.rope_args = (d, n_rot, rope_theta_scale(float(rope["base"]), n_rot), np.float32(rope["freq_scale"]))
        self.variant = variant
        self.kernel_name = f"marlin_{_NAMES[t]}_{variant}"
        self.m_tiles = -(-self.M // tile_rows)
        rows = min(self.M, tile_rows)
        tiles = [-(-w.rows // 64) for w in (ws[:1] if glu else ws)]
        self.t_cum = np.cumsum(tiles + [0] * (3 - len(tiles))).tolist()
        T, G = self.t_cum[2], K // 32
        self._kern, regs = _function(self.kernel_name, 200 << 10)
        self.wg = variant in WG_VARIANTS
        self.tpc = 0
        if self.wg:
            # the warpgroup kernels: kws (when given) is the tiles a CTA serves
            if not wg_available():
                raise ValueError(f"Marlin: {variant} needs wgmma (an sm_90 GPU)")
            gps = _VARIANTS[variant][3]
            if G % gps:
                raise ValueError(f"Marlin: {variant} needs K to be a multiple of {32 * gps}")
            if variant == "x64":                        # two tiles a CTA; a k-split where the CTAs are few
                self.tpc = 2
                self.slabs = int(slabs) if slabs else x64_slabs(T, self.m_tiles, G, sm_count())
            elif slabs or kws:
                self.tpc, self.slabs = int(kws or 1), int(slabs or 1)
            else:
                self.tpc, self.slabs = choose_split_wg(T, self.m_tiles, G, variant, sm_count(), t)
            if not 1 <= self.tpc <= max(T, 2 if variant == "x64" else 1) or not 1 <= self.slabs <= G // gps:
                raise ValueError(f"Marlin: {variant} needs 1..{T} tiles a CTA and 1..{G // gps} slabs")
            self.kws, self.cluster = 1, False
            self.smem = _smem_bytes(variant, tile_rows, _wg_kw(G, self.slabs, gps), ggml_type=t)
            if self.smem > SMEM_LIMIT:
                raise ValueError(f"Marlin: {self.smem} bytes of shared memory needed; use more slabs")
            self.grid = (-(-T // self.tpc), self.slabs, self.m_tiles)
        else:
            if slabs or kws:
                self.kws = int(kws or 1)
                self.slabs = (int(slabs) if slabs else
                              choose_slabs(T, self.m_tiles, G, rows, variant, regs, sm_count(), t))
            else:
                # gate/up pairs keep the cost model's split: in the 8B decode graph it measured as the
                # rule's (auto policy 346 t/s both) or better (every weight repacked: 338 against 309)
                choose = choose_split_dec if self.dec and glu is None else choose_split
                self.kws, self.slabs = choose(T, self.m_tiles, G, rows, variant, regs, sm_count(), t)
                forced = _split_override(ws[0].rows, K, glu is not None, self.M)
                if forced:
                    self.kws, self.slabs = forced
            rope_bytes = rows * (self.rope_args[1] // 2) * 8 if self.rope_mask else 0
            if self.rope_mask and self.slabs > 1:
                self.slabs = 1                       # the rope epilogue runs on the store path (whole k range)
            while (self.rope_mask and self.kws < 8
                   and _smem_bytes(variant, rows, G * 32, False, self.kws, t) + rope_bytes > SMEM_LIMIT):
                self.kws *= 2
            if self.kws not in (1, 2, 4, 8) or (self.kws > 1 and rows > 16):
                raise ValueError(f"Marlin: kws must be 1, 2, 4 or 8 (1 above 16 rows), got {self.kws}")
            if not 1 <= self.slabs <= G or self.slabs * self.kws > G:
                raise ValueError(f"Marlin: slabs must be in 1..{G // self.kws}")
            kw = -(-G // self.slabs) * 32
            # slabs reduced in a cluster's shared memory (no partials in global memory, no tickets)
            self.cluster = _use_cluster(self.slabs, rows, self.kws)
            kv_bytes = rows * 8 if self.kv_fold_ok else 0   # a KV fold's slots and positions (early)
            self.smem = _smem_bytes(variant, rows, kw, self.cluster, self.kws, t) + rope_bytes + kv_bytes
            if self.smem > SMEM_LIMIT:
                raise ValueError(f"Marlin: {self.smem} bytes of shared memory needed; use more slabs")
            self.grid = (-(-T // (8 // self.kws)), self.slabs, self.m_tiles)
        nwt = 2 if glu else 1
        self.part = (cupy.empty(nwt * self.slabs * self.M * T * 64, cupy.float32)
                     if self.slabs > 1 and not self.cluster else None)
        self.tickets = cupy.zeros(T * self.m_tiles, cupy.uint32)

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.ws)

    @property
    def kv_fold_ok(self) -> bool:
        """Whether bind can fold the KV-cache write of k (weight 1) and v (weight 2) in: a q/k/v
        launch of the decode kernel over the whole k range (its store path writes the cache)."""
        return self.dec and self.slabs == 1 and len(self.ws) == 3 and self.glu is None and not self.residual

    def __call__(self, a, outs, stream=None, resid=None, pos=None, norm_w=None, kv=None, early=False) -> None:
        self.bind(a, outs, stream, resid, pos, norm_w, kv, early)()

    def bind(self, a, outs, stream=None, resid=None, pos=None, norm_w=None, kv=None,
             early: bool = False) -> Callable[[], None]:
        """A zero-argument launch. pos: (M,) int32 positions when the plan ropes; norm_w: (K,) f32 or
        None when it folds an rms_norm (of a's rows, with norm_w's weights) in; kv: None, or
        (k_cache, v_cache, pos_cache, slots, kv_pos) to also write k and v (outputs 1 and 2) into a
        layer's pages as attention_ops.kv_store does (``kv_fold_ok`` plans). early: the caller's
        promise that no kernel writes pos, slots or kv_pos (a graph's inputs, copied in before its
        first kernel): a decode launch then reads them before PDL's wait, while the kernel before
        it is still running."""
        import cupy
        M, K = self.M, self.K
        want = np.float16 if self.a_dtype == "f16" else np.float32
        if a.dtype != want or a.ndim != 2 or a.shape[0] != M or a.shape[1] != K:
            raise ValueError(f"Marlin: A must be ({M}, {K}) {np.dtype(want).name}, got {a.dtype} {a.shape}")
        if a.strides[1] != a.itemsize or a.strides[0] % 16 or a.data.ptr % 16:
            raise ValueError("Marlin: A rows must be contiguous and 16-byte aligned")
        lda = a.strides[0] // a.itemsize
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        n_out = 1 if self.glu else len(self.ws)
        if len(outs) != n_out:
            raise ValueError(f"Marlin: {n_out} outputs expected, got {len(outs)}")
        for g, o in enumerate(outs):
            N = self.ws[g].rows
            if o.dtype != np.float32 or tuple(o.shape) != (M, N) or not o.flags.c_contiguous:
                raise ValueError(f"Marlin: out[{g}] must be a contiguous ({M}, {N}) float32 array")
        if self.residual:
            if resid is None or resid.dtype != np.float32 or tuple(resid.shape) != (M, self.ws[0].rows) \
                    or not resid.flags.c_contiguous:
                raise ValueError("Marlin: resid must be a contiguous float32 array of out's shape")
        if self.rope_mask and (pos is None or pos.dtype != np.int32 or pos.size < M or not pos.flags.c_contiguous):
            raise ValueError(f"Marlin: pos must be a contiguous int32 array of at least {M} positions")
        if self.norm is not None and norm_w is not None and (
                norm_w.dtype != np.float32 or norm_w.size != K or not norm_w.flags.c_contiguous or norm_w.data.ptr % 16):
            raise ValueError(f"Marlin: norm_w must be a contiguous 16-byte aligned float32 array of {K} values")
        kv_args = self._kv_args(kv)
        cs = stream if stream is not None else cupy.cuda.get_current_stream()
        ws = list(self.ws) + [None] * (3 - len(self.ws))
        os_ = outs + [None] * (3 - len(outs))
        Ns = [0 if w is None else w.rows for w in ws]
        t1, t2, t3 = self.t_cum
        args = (ws[0].data, None if ws[1] is None else ws[1].data, None if ws[2] is None else ws[2].data,
                os_[0], os_[1], os_[2], np.int32(Ns[0]), np.int32(Ns[1]), np.int32(Ns[2]),
                np.int32(t1), np.int32(t2), np.int32(t3), a, np.int32(1 if self.a_dtype == "f16" else 0),
                np.int32(M), np.int32(K), np.int32(lda), resid if self.residual else None, np.int32(self.mode),
                np.int32(self.slabs), np.int32(self.kws), np.int32(1 if self.cluster else 0), self.part, self.tickets,
                pos if self.rope_mask else None, np.int32(self.rope_mask), np.int32(self.rope_args[0]),
                np.int32(self.rope_args[1]), np.float32(self.rope_args[2]), np.float32(self.rope_args[3]),
                norm_w if self.norm is not None else None, np.float32(self.norm or 0.0),
                np.int32(0 if self.norm is None else 1)) + kv_args + (np.int32(1 if early and early_enabled() else 0),)
        kern, grid, smem = self._kern, self.grid, self.smem
        block = (X_THREADS if self.variant == "x64" else 128 * WG_NWG[self.variant] if self.wg else THREADS,)
        if hasattr(kern, "ptr"):            # a driver function: launch with PDL (launch.py)
            from .launch import launcher
            return launcher(kern, grid, block, args, smem, cs, programmatic=True,
                            cluster=(1, self.slabs, 1) if self.cluster else None)
        if self.cluster:
            raise RuntimeError("Marlin: cluster launches need the CUDA driver function (cupy Function)")
        return lambda: kern(grid, block, args, smem, cs)

    def _kv_args(self, kv) -> tuple:
        """The kernel arguments of a folded KV-cache write (or of none)."""
        if kv is None:
            return (None, None, None, None, None, np.int32(0), np.int32(0))
        if not self.kv_fold_ok:
            raise ValueError("Marlin: the KV-cache write folds into a q/k/v decode launch with one k-slab only")
        kc, vc, pc, slots, kpos = kv
        M = self.M
        if kc.dtype != vc.dtype or kc.dtype not in (np.float16, np.float32) or kc.ndim != 4 or vc.ndim != 4:
            raise ValueError("Marlin: the k and v caches must be (pages, page, heads, dim) arrays of one float type")
        cap = kc.shape[0] * kc.shape[1]
        if vc.shape[:2] != kc.shape[:2] or not (kc.flags.c_contiguous and vc.flags.c_contiguous):
            raise ValueError("Marlin: the k and v caches must be contiguous and hold the same slots")
        if kc.shape[2] * kc.shape[3] != self.ws[1].rows or vc.shape[2] * vc.shape[3] != self.ws[2].rows:
            raise ValueError(f"Marlin: cache rows of {kc.shape[2]}x{kc.shape[3]} / {vc.shape[2]}x{vc.shape[3]} do not "
                             f"match the k / v outputs ({self.ws[1].rows} / {self.ws[2].rows})")
        if pc.dtype != np.int32 or pc.size != cap or not pc.flags.c_contiguous:
            raise ValueError(f"Marlin: the position cache must be {cap} contiguous int32")
        for name, x in (("slots", slots), ("kv_pos", kpos)):
            if x.dtype != np.int32 or x.size < M or not x.flags.c_contiguous:
                raise ValueError(f"Marlin: {name} must be a contiguous int32 array of at least {M} values")
        return (kc, vc, pc, slots, kpos, np.int32(1 if kc.dtype == np.float16 else 0), np.int32(cap))


def plan_gemm(ws, M: int, **kw) -> MarlinPlan:
    """A MarlinPlan (cached on the first weight for the default choices)."""
    ws = tuple(ws) if isinstance(ws, (list, tuple)) else (ws,)
    if kw.get("slabs") is None and kw.get("config") is None and kw.get("kws") is None:
        rope = kw.get("rope")
        rkey = None if rope is None else tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                                                       for k, v in rope.items()))
        key = ("gemm", tuple(id(w) for w in ws), int(M), kw.get("a_dtype", "f32"), kw.get("glu"),
               bool(kw.get("residual", False)), kw.get("norm"), rkey)
        p = ws[0]._plans.get(key)
        if p is None:
            p = ws[0]._plans[key] = MarlinPlan(ws, M, **kw)
        return p
    return MarlinPlan(ws, M, **kw)


# -- reading the layout back ----------------------------------------------------------------------

def plan_get_rows(w: MarlinWeight, ids, out, stream=None) -> Callable[[], None]:
    """out (n, K) f32 = rows ids (n,) of w, ids clamped to [0, N)."""
    import cupy
    n = int(ids.shape[0])
    N, K = w.shape
    if out.dtype != np.float32 or tuple(out.shape) != (n, K) or not out.flags.c_contiguous or out.data.ptr % 16:
        raise ValueError(f"get_rows: out must be a contiguous 16-byte aligned ({n}, {K}) float32 array")
    if n == 0:
        return lambda: None
    fn = _function(f"marlin_getrows_{_NAMES[w.ggml_type]}")
    cs = stream if stream is not None else cupy.cuda.get_current_stream()
    args = (w.data, ids, out, np.int32(n), np.int32(N), np.int32(K))
    grid = _grid1(n * (K // 32), 128)
    return lambda: fn(grid, (128,), args, 0, cs)


def plan_dequant16(w: MarlinWeight, out16, n0: int, rows: int, stream=None) -> Callable[[], None]:
    """out16 (rows, K) f16 = rows n0..n0+rows of w (n0 a multiple of 64; the prefill GEMM's tile),
    dequantized in f16 arithmetic as the GEMM does."""
    import cupy
    N, K = w.shape
    if out16.dtype != np.float16 or out16.size < rows * K or out16.data.ptr % 16:
        raise ValueError("dequant16: out must hold rows*K 16-byte aligned float16 values")
    if n0 % 64:
        raise ValueError("dequant16: n0 must be a multiple of 64")
    fn = _function(f"marlin_deq16_{_NAMES[w.ggml_type]}")
    cs = stream if stream is not None else cupy.cuda.get_current_stream()
    args = (w.data, out16, np.int32(N), np.int32(K), np.int32(n0), np.int32(rows))
    grid = (-(-rows // 64), -(-K // 256))
    return lambda: fn(grid, (256,), args, 0, cs)


def enabled() -> str:
    """GGFLAT_MARLIN: "auto" (default: see should_repack), "all", or "off"."""
    raw = os.environ.get("GGFLAT_MARLIN", "auto")
    v = raw.strip().lower() or "auto"
    v = {"0": "off", "false": "off", "no": "off", "1": "all", "on": "all", "yes": "all"}.get(v, v)
    if v not in ("auto", "all", "off"):
        from engine.errors import GGFlatError
        raise GGFlatError(f"GGFLAT_MARLIN={raw!r}: expected auto, all or off")
    return v


# Which weights the default ("auto") repacks: every 4-bit weight of at least MIN_BYTES. Measured
# on the H100 with the synthetic Llama-3-8B Q4_0 (`ggflat bench -p 0 -n 128`, 2026-11-24, session
# 3): with every such weight repacked -- q/k/v with the attention norm and the ropes folded into
# the decode kernel, o and down with the residual add, gate/up with the ffn norm and swiglu --
# tg128 361-365 t/s, against 345 when only the >= 8192-row weights (gate/up, lm head) were
# repacked and 285 with none. Smaller weights (SmolLM2/Gemma-3 sizes, < 2 MB) keep the fused
# GEMVs, whose launches are tuned for them. GGFLAT_MARLIN=all repacks every eligible weight.
MIN_BYTES = 2 << 20


def should_repack(ggml_type: int, shape: tuple[int, ...], nbytes: int) -> bool:
    mode = enabled()
    if mode == "off" or not eligible(ggml_type, tuple(shape)):
        return False
    return mode == "all" or nbytes >= MIN_BYTES


__all__ = ["MarlinWeight", "MarlinPlan", "eligible", "repack", "plan_gemm", "plan_get_rows", "plan_dequant16",
           "should_repack", "enabled", "MIN_BYTES"]
