"""Type-id -> format table, size arithmetic, and the chunked dequantize / quantize drivers.

Shapes here are NumPy order (ggml ``ne`` reversed): ``shape[-1]`` is ne0, the
contiguous row, and must be a multiple of the format's block_elems.  A tensor of
any rank is one flat run of ``prod(shape) / block_elems`` blocks.
"""
from __future__ import annotations

import operator
from typing import Callable

import numpy as np

from engine.errors import GGFlatError, UnknownTypeError

from . import floats, iquants, kquants, legacy
from .layout import QuantFormat

_FAMILIES = (floats, legacy, kquants, iquants)

FORMATS: dict[int, QuantFormat] = {f.type_id: f for fam in _FAMILIES for f in fam.FORMATS}
_DEQUANTIZERS: dict[int, Callable[[np.ndarray, np.ndarray], None]] = {
    k: v for fam in _FAMILIES for k, v in fam.DEQUANTIZERS.items()}
_QUANTIZERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    k: v for fam in _FAMILIES for k, v in fam.QUANTIZERS.items()}
assert set(_DEQUANTIZERS) == set(FORMATS)

# Every type id ggml knows (ggml.h enum ggml_type, == gguf.GGMLQuantizationType), so that
# a known-but-unsupported type gets its name in the error.  Ids 4, 5, 31-33, 36-38 were
# removed from ggml and are treated as unknown.
_GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

# Elements per dequantize chunk: large enough that the per-chunk Python overhead is small,
# small enough that the chunk's uint8 temporaries are still in cache when the cast reads
# them (measured on one EPYC core: 2**15 -> 2**17 gains ~20%, 2**19 loses ~20% on Q5_0/Q6_K).
CHUNK_ELEMS = 1 << 17


def _type_id(type_id) -> int:
    if isinstance(type_id, bool):
        raise UnknownTypeError(f"unknown ggml type id {type_id!r}")
    try:
        return operator.index(type_id)
    except TypeError:
        raise UnknownTypeError(f"unknown ggml type id {type_id!r}") from None


def get_format(type_id: int) -> QuantFormat:
    """The format of ggml type ``type_id``; UnknownTypeError if unknown or unsupported."""
    tid = _type_id(type_id)
    fmt = FORMATS.get(tid)
    if fmt is not None:
        return fmt
    if tid in _GGML_TYPE_NAMES:
        raise UnknownTypeError(f"ggml type {_GGML_TYPE_NAMES[tid]} ({tid}) is not supported")
    raise UnknownTypeError(f"unknown ggml type id {tid}")


def type_name(type_id: int) -> str:
    """ggml name of a type id ("Q4_K"), for any id ggml knows; never raises ("type 99" otherwise)."""
    try:
        tid = _type_id(type_id)
    except UnknownTypeError:
        return f"type {type_id!r}"
    return _GGML_TYPE_NAMES.get(tid, f"type {tid}")


def _dim(v, what: str) -> int:
    try:
        d = operator.index(v)
    except TypeError:
        raise GGFlatError(f"{what} must be an integer, got {v!r}") from None
    if d < 0:
        raise GGFlatError(f"{what} must be >= 0, got {d}")
    return d


def row_nbytes(type_id: int, ne0: int) -> int:
    """Bytes in one row of ``ne0`` elements (ggml_row_size)."""
    fmt = get_format(type_id)
    ne0 = _dim(ne0, "row length")
    if ne0 % fmt.block_elems:
        raise GGFlatError(f"row length {ne0} is not a multiple of the {fmt.name} block size {fmt.block_elems}")
    return ne0 // fmt.block_elems * fmt.block_bytes


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of NumPy ``shape`` (last dim = ne0); exact Python-int arithmetic."""
    shape = _shape(shape)
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    return n_rows * row_nbytes(type_id, shape[-1])


def _shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise GGFlatError(f"shape must be a sequence of integers, got {shape!r}") from None
    if not dims:
        raise GGFlatError("shape must have at least one dimension")
    return tuple(_dim(s, "shape dimension") for s in dims)


def _as_bytes(raw) -> np.ndarray:
    """Any buffer or array -> 1-D uint8 view (a copy only for a non-contiguous array)."""
    if isinstance(raw, np.ndarray):
        if not raw.flags.c_contiguous:
            raw = np.ascontiguousarray(raw)
        return raw.reshape(-1).view(np.uint8) if raw.dtype != np.uint8 else raw.reshape(-1)
    try:
        return np.frombuffer(raw, dtype=np.uint8)
    except TypeError:
        raise GGFlatError("raw tensor data must be a bytes-like object or NumPy array, "
                          f"got {type(raw).__name__}") from None


def dequantize(raw, type_id: int, shape: tuple[int, ...], *, out: np.ndarray | None = None) -> np.ndarray:
    """Decode a tensor's raw bytes into a float32 array of NumPy ``shape``.

    raw: uint8 array (any shape, C-contiguous) or bytes-like of exactly
    ``tensor_nbytes(type_id, shape)`` bytes.  F32 returns a view of ``raw``
    (read-only if raw is); every other type returns a new array.  ``out``: an
    optional C-contiguous float32 array of prod(shape) elements to decode into
    (e.g. a reused or pinned buffer; fresh pages cost ~1 ns/element to fault in).
    """
    fmt = get_format(type_id)
    shape = _shape(shape)
    nbytes = tensor_nbytes(fmt.type_id, shape)
    buf = _as_bytes(raw)
    if buf.size != nbytes:
        raise GGFlatError(f"{fmt.name} tensor of shape {shape} needs {nbytes} bytes, got {buf.size}")
    blocks = buf.view(fmt.np_dtype)                       # (n_blocks,) structured
    n_blocks = blocks.shape[0]
    if out is None:
        if fmt.type_id == floats.F32.type_id:
            return buf.view(np.float32).reshape(shape)
        out = np.empty(shape, np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
              and out.flags.writeable and out.size == n_blocks * fmt.block_elems):
        raise GGFlatError(f"out must be a writable C-contiguous float32 array of {n_blocks * fmt.block_elems} elements")
    flat = out.reshape(n_blocks, fmt.block_elems)
    fn = _DEQUANTIZERS[fmt.type_id]
    step = max(1, CHUNK_ELEMS // fmt.block_elems)
    for s in range(0, n_blocks, step):
        fn(blocks[s:s + step], flat[s:s + step])
    return out.reshape(shape)


# Elements per quantize chunk (the K-quant searches make ~20 passes over their chunk).
QUANT_CHUNK_ELEMS = 1 << 16


def quantize(x: np.ndarray, type_id: int) -> np.ndarray:
    """Encode float32 ``x`` (..., n), n a multiple of block_elems, as uint8 (..., row_nbytes(type_id, n))."""
    fmt = get_format(type_id)
    fn = _QUANTIZERS.get(fmt.type_id)
    if fn is None:
        have = ", ".join(FORMATS[t].name for t in sorted(_QUANTIZERS))
        raise GGFlatError(f"quantizing to {fmt.name} is not supported (supported: {have})")
    x = np.asarray(x)
    if x.ndim == 0:
        raise GGFlatError("quantize needs an array with at least one dimension")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise GGFlatError(f"quantize needs a real-valued array, got dtype {x.dtype}")
    row_bytes = row_nbytes(fmt.type_id, x.shape[-1])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if fmt.block_elems > 1 and not np.isfinite(x).all():
        raise GGFlatError(f"cannot quantize NaN or Inf values to {fmt.name}")
    out_shape = (*x.shape[:-1], row_bytes)
    blocks = x.reshape(-1, fmt.block_elems)
    n_blocks = blocks.shape[0]
    if n_blocks == 0:
        return np.empty(out_shape, np.uint8)
    out = np.empty((n_blocks, fmt.block_bytes), np.uint8)
    step = max(1, QUANT_CHUNK_ELEMS // fmt.block_elems)
    for s in range(0, n_blocks, step):
        out[s:s + step] = fn(blocks[s:s + step]).reshape(-1, fmt.block_bytes)
    return out.reshape(out_shape)
