"""Kernel launches with launch attributes (cuLaunchKernelEx through ctypes), which CuPy's
RawKernel call does not offer.

Used for programmatic dependent launch (PDL, Hopper): a kernel launched with
``programmatic=True`` may start while the kernel before it on the stream is still running --
once every CTA of that kernel has executed ``griddepcontrol.launch_dependents`` (or exited) --
and must execute ``griddepcontrol.wait`` before it touches anything the earlier kernel writes
or reads. The Marlin GEMM uses the gap to start streaming its weights (which nothing writes)
while the previous kernel finishes. Launches made this way are captured into CUDA graphs like
any other (the dependency becomes a programmatic graph edge).

``GGFLAT_PDL=0`` turns the attribute off (plain launches through the same path).
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Any, Callable

import numpy as np

_ATTR_CLUSTER = 4                     # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
_ATTR_PROGRAMMATIC = 6                # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_FUNC_NON_PORTABLE_CLUSTER = 14       # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_ubyte * 64)]


class _Config(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("numAttrs", ctypes.c_uint)]


@lru_cache(maxsize=1)
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.POINTER(ctypes.c_void_p)]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuFuncSetAttribute.restype = ctypes.c_int
    return lib


def pdl_enabled() -> bool:
    return os.environ.get("GGFLAT_PDL", "1").strip().lower() not in ("0", "false", "no", "off")


def _param(a: Any):
    """A ctypes object holding one kernel argument's value."""
    if a is None:
        return ctypes.c_void_p(0)
    if hasattr(a, "data") and hasattr(a.data, "ptr"):       # a cupy array
        return ctypes.c_void_p(int(a.data.ptr))
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.uint32):
        return ctypes.c_uint32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass a cupy array or a numpy scalar")


def launcher(function: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, smem: int, stream: Any,
             programmatic: bool = True, cluster: tuple[int, int, int] | None = None) -> Callable[[], None]:
    """A zero-argument launch of ``function`` (a cupy.cuda.function.Function: ``raw.kernel``) with
    every argument bound now (arrays by their device pointer, kept alive by the closure).
    cluster: thread-block cluster dimensions (each must divide the grid's); more than 8 CTAs
    (up to 16 on H100) are allowed as a non-portable size."""
    lib = _driver()
    g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    b = tuple(int(x) for x in block) + (1,) * (3 - len(block))
    vals = [_param(a) for a in args]
    ptrs = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    attrs = (_Attr * 2)()
    n_attrs = 0
    if programmatic and pdl_enabled():
        attrs[n_attrs].id = _ATTR_PROGRAMMATIC
        attrs[n_attrs].value[0] = 1
        n_attrs += 1
    if cluster is not None and tuple(cluster) != (1, 1, 1):
        cx, cy, cz = (int(c) for c in cluster)
        if g[0] % cx or g[1] % cy or g[2] % cz:
            raise ValueError(f"cluster {cluster} does not divide the grid {g}")
        if cx * cy * cz > 8:
            st = lib.cuFuncSetAttribute(ctypes.c_void_p(int(function.ptr)), _FUNC_NON_PORTABLE_CLUSTER, 1)
            if st != 0:
                raise RuntimeError(f"cuFuncSetAttribute(non-portable cluster size) failed: CUDA driver error {st}")
        attrs[n_attrs].id = _ATTR_CLUSTER
        ctypes.memmove(ctypes.addressof(attrs[n_attrs].value), (ctypes.c_uint * 3)(cx, cy, cz), 12)
        n_attrs += 1
    cfg = _Config(g[0], g[1], g[2], b[0], b[1], b[2], int(smem), ctypes.c_void_p(int(stream.ptr)),
                  ctypes.cast(attrs, ctypes.POINTER(_Attr)), n_attrs)
    fptr = ctypes.c_void_p(int(function.ptr))
    keep = (args, vals, ptrs, attrs, cfg)

    def run(_keep=keep) -> None:
        st = lib.cuLaunchKernelEx(ctypes.byref(cfg), fptr, ptrs, None)
        if st != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {st}")
    return run


__all__ = ["launcher", "pdl_enabled"]
