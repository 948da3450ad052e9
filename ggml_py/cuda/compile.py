"""Compile this folder's ``.cu`` files with NVRTC (through CuPy) and cache the modules.

``load_module("quant")`` compiles ``ggml_py/cuda/quant.cu`` once per process (per
set of options); CuPy keeps its own on-disk cache of the compiled code, so later
processes skip NVRTC too.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_OPTIONS = ("-std=c++17",)

_modules: dict[tuple[str, tuple[str, ...]], object] = {}


def cu_path(name: str) -> Path:
    return HERE / f"{name}.cu"


def load_module(name: str, options: tuple[str, ...] = ()):
    """The ``cupy.RawModule`` of ``<name>.cu`` compiled with ``DEFAULT_OPTIONS + options``."""
    import cupy

    opts = DEFAULT_OPTIONS + tuple(options)
    key = (name, opts)
    mod = _modules.get(key)
    if mod is None:
        src = source_text(name)
        # the name_expressions-free RawModule compiles lazily on first get_function;
        # touching compile() here surfaces NVRTC errors at plan time, not mid-graph.
        mod = cupy.RawModule(code=src, options=opts, backend="nvrtc")
        mod.compile()
        _modules[key] = mod
    return mod


def kernel_callable(raw):
    """A ``cupy.RawKernel`` as a callable ``(grid, block, args, shared_mem, stream)``: its driver
    function (``raw.kernel``, which takes the stream directly and has the ``ptr`` that
    ``launch.launcher`` needs), or a wrapper that launches on ``stream`` (None: the current one)."""
    try:
        from cupy.cuda.function import Function
        fn = raw.kernel
        if isinstance(fn, Function):
            return fn
    except (AttributeError, ImportError):
        pass

    def fn(grid, block, args, shared_mem, stream, _raw=raw):
        if stream is None:
            _raw(grid, block, args, shared_mem=shared_mem)
        else:
            with stream:
                _raw(grid, block, args, shared_mem=shared_mem)
    return fn


COMMON = '#include "common.cuh"'


def source_text(name: str) -> str:
    """``<name>.cu`` with ``common.cuh`` spliced in place of its include line: NVRTC compiles a
    string (no include path needed), and CuPy's cache, keyed by that string, sees header edits."""
    src = cu_path(name).read_text(encoding="utf-8")
    if COMMON in src:
        src = src.replace(COMMON, (HERE / "common.cuh").read_text(encoding="utf-8"), 1)
    return src


def source_digest(name: str) -> str:
    return hashlib.sha256(source_text(name).encode("utf-8")).hexdigest()[:16]
