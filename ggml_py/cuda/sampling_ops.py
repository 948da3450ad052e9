"""Launch wrapper of the sorting-free sampling kernels (sampling.cu): ``ops.sample`` on the GPU.

    prepare_sample(logits, params, state, history, out, stream, cluster=None, row_stride=None) -> step
    sample(...)                                   -- prepare_sample(...)(), for one-off use
    supported(n_vocab, history_width) -> bool     -- what CupyBackend.supports asks
    choose_cluster(n_rows, n_vocab) -> int        -- CTAs per row

Arrays are CuPy arrays: logits (n, V) f32 with contiguous rows (``row_stride`` elements apart,
default its own stride; 0 broadcasts one row to every row: tests and benchmarks draw many samples
from one distribution that way); params (n, 8) f32, state (n, 8) i32, history (n, W) i32 or None,
out (n,) i32, all C-contiguous (layouts: ggml_py/sample_ref.py). Nothing here allocates or
synchronises; everything per run (parameters, seed, counter, history) is read from device memory,
so the step can be captured into a CUDA graph and replayed with new inputs.

Geometry: a row is split over a cluster of C CTAs (C in 1, 2, 4, 8, 16; clusters need sm_90), each
holding ceil(V / C) logits (rounded up to a multiple of 4) in dynamic shared memory, 512 threads.
C is the smallest size whose slice fits and whose n * C CTAs fill the GPU, else the largest that
fits, never below 4096 logits per CTA: one row of 128k gets 8 SMs, 64 rows 4 each
(GGFLAT_SAMPLE_CLUSTER caps C). A vocabulary larger than 8 slices of the largest shared memory
(~450k on an H100) is not supported: the model then samples on the host.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable

import numpy as np

Step = Callable[[], Any]

THREADS = 512
MAX_HISTORY = 1024                 # SMP_MAX_HISTORY in sampling.cu
CLUSTERS = (1, 2, 4, 8, 16)        # 16: a non-portable cluster size (H100), given at launch
STATIC_SMEM = 9 * 1024             # sampling.cu's static shared memory (8048 B) with some room
MIN_SLICE_16 = 12288               # logits per CTA below which 16 CTAs are not used (measured: 8 CTAs
                                   # reach 24 us at 128k; 16 pay off for the 262k vocabulary)
DEFAULT_SMEM_OPTIN = 227 * 1024    # an H100's largest dynamic shared memory per block
DEFAULT_SMS = 132
MIN_SLICE = 4096                   # logits per CTA below which choose_cluster does not split a row

# A simulated device for host-side tests: when set, a launch becomes
# ``SIMULATOR(logits, params, state, history, out, row_stride) -> step``.
SIMULATOR: Callable[..., Step] | None = None

_functions: dict[str, Any] = {}
_smem_set: dict[str, int] = {}
_info: list[tuple[int, int, int]] = []


def device_info() -> tuple[int, int, int]:
    """(largest dynamic shared memory per block, multiprocessors, compute capability) of the
    current device; an H100's values without one."""
    if not _info:
        try:
            import cupy
            dev = cupy.cuda.Device()
            attrs = dev.attributes
            _info.append((int(attrs["MaxSharedMemoryPerBlockOptin"]), int(attrs["MultiProcessorCount"]),
                          int(dev.compute_capability)))
        except Exception:                       # no CuPy / no GPU: host-side sizing only
            return DEFAULT_SMEM_OPTIN, DEFAULT_SMS, 90
    return _info[0]


def slice_len(n_vocab: int, cluster: int) -> int:
    """Logits per CTA: ceil(V / C) rounded up to a multiple of 4 (a float4 per thread and step)."""
    return -(-(-(-n_vocab // cluster)) // 4) * 4


def _clusters() -> tuple[int, ...]:
    return CLUSTERS if device_info()[2] >= 90 else (1,)


def _fits(n_vocab: int, cluster: int) -> bool:
    return 4 * slice_len(n_vocab, cluster) <= device_info()[0] - STATIC_SMEM


def supported(n_vocab: int, history_width: int = 0) -> bool:
    """Whether one row of ``n_vocab`` logits fits a cluster and the history is short enough."""
    if SIMULATOR is not None:
        return n_vocab >= 1 and 0 <= history_width <= MAX_HISTORY
    return n_vocab >= 1 and 0 <= history_width <= MAX_HISTORY and any(_fits(n_vocab, c) for c in _clusters())


def choose_cluster(n_rows: int, n_vocab: int) -> int:
    """CTAs per row (GGFLAT_SAMPLE_CLUSTER=1|2|4|8 caps it where the row still fits: debugging, tuning)."""
    fits = [c for c in _clusters() if _fits(n_vocab, c)]
    if not fits:
        raise ValueError(f"sample: a vocabulary of {n_vocab} does not fit {max(_clusters())} CTAs' shared memory")
    cap = os.environ.get("GGFLAT_SAMPLE_CLUSTER", "").strip()
    if cap.isdigit():
        fits = [c for c in fits if c <= max(1, int(cap))] or fits[:1]
    # splitting a row below MIN_SLICE logits costs more in cluster barriers than it saves
    useful = [c for c in fits if c == fits[0] or -(-n_vocab // c) >= (MIN_SLICE_16 if c == 16 else MIN_SLICE)] \
        or fits[:1]
    n_sm = device_info()[1]
    for c in useful:
        if n_rows * c >= 0.9 * n_sm:    # 16 rows x 8 CTAs (128 of 132 SMs) beat 16 x 16: 57 vs 72 us at 262k
            return c
    return useful[-1]


def _function(name: str, smem: int) -> Any:
    """Kernel ``name`` as a callable (grid, block, args, shared_mem, stream), allowed ``smem`` bytes
    of dynamic shared memory (set at plan time, never during a capture)."""
    from .compile import load_module

    raw = load_module("sampling").get_function(name)
    if int(raw.shared_size_bytes) > STATIC_SMEM:        # the slice budget assumes this much
        raise RuntimeError(f"sampling.cu's {name} uses {raw.shared_size_bytes} B of static shared memory, "
                           f"sampling_ops.STATIC_SMEM allows {STATIC_SMEM}")
    # the default 48 KB limit covers static + dynamic shared memory: opt in above it
    if smem + int(raw.shared_size_bytes) > 48 * 1024 and _smem_set.get(name, 0) < smem:
        raw.max_dynamic_shared_size_bytes = smem
        _smem_set[name] = smem
    fn = _functions.get(name)
    if fn is None:
        from .compile import kernel_callable
        fn = _functions[name] = kernel_callable(raw)
    return fn


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def prepare_sample(logits: Any, params: Any, state: Any, history: Any | None, out: Any, stream: Any,
                   cluster: int | None = None, row_stride: int | None = None) -> Step:
    """out[r] = a token drawn from row r of ``logits`` (see ops.sample); a zero-argument step."""
    _check(logits.ndim == 2, f"sample: logits must be (n, V), got {logits.shape}")
    n, V = (int(s) for s in logits.shape)
    _check(V >= 1, "sample: empty vocabulary")
    _check(tuple(params.shape) == (n, 8) and np.dtype(params.dtype) == np.float32, f"sample: params must be ({n}, 8) f32")
    _check(tuple(state.shape) == (n, 8) and np.dtype(state.dtype) == np.int32, f"sample: state must be ({n}, 8) i32")
    _check(tuple(out.shape) == (n,) and np.dtype(out.dtype) == np.int32, f"sample: out must be ({n},) i32")
    W = 0
    if history is not None:
        _check(history.ndim == 2 and int(history.shape[0]) == n and np.dtype(history.dtype) == np.int32,
               f"sample: history must be ({n}, W) i32")
        W = int(history.shape[1])
        _check(W <= MAX_HISTORY, f"sample: a history of {W} tokens is longer than {MAX_HISTORY}")
    _check(np.dtype(logits.dtype) == np.float32 and (V == 1 or logits.strides[1] == 4),
           "sample: logits must be float32 with contiguous rows")
    if row_stride is None:
        row_stride = int(logits.strides[0]) // 4 if n > 1 else V
    if n == 0:
        return _nothing
    if SIMULATOR is not None:
        return SIMULATOR(logits, params, state, history, out, int(row_stride))
    c = choose_cluster(n, V) if cluster is None else int(cluster)
    _check(c in _clusters(), f"sample: cluster size {c} not available (have {_clusters()})")
    sl = slice_len(V, c)
    smem = 4 * sl
    _check(_fits(V, c), f"sample: {V} logits do not fit {c} CTAs' shared memory")
    fn = _function(f"sample_c{c}", smem)
    hist = history if history is not None else state          # never read when W == 0
    args = (logits, np.int64(row_stride), params, state, hist, np.int32(W), out, np.int32(V), np.int32(sl))
    if c == 16:                        # the cluster size is a launch attribute (cuLaunchKernelEx)
        import cupy
        from .launch import launcher
        _check(hasattr(fn, "ptr"), "sample: 16-CTA clusters need the CUDA driver function")
        cs = stream if stream is not None else cupy.cuda.get_current_stream()
        return launcher(fn, (n * c,), (THREADS,), args, smem, cs, programmatic=False, cluster=(16, 1, 1))
    return partial(fn, (n * c,), (THREADS,), args, smem, stream)


def _nothing() -> None:
    return None


def sample(logits: Any, params: Any, state: Any, history: Any | None, out: Any, stream: Any,
           cluster: int | None = None, row_stride: int | None = None) -> None:
    prepare_sample(logits, params, state, history, out, stream, cluster, row_stride)()
