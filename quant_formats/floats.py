"""Plain float types: F32, F16, BF16 (one value per "block").

Dequantizers take ``blocks`` (n,) of the format's structured dtype and write ``out``
(n, block_elems) float32; quantizers take float32 (n_blocks, block_elems) and return
uint8 (n_blocks, block_bytes).  Same contract in every family module.
"""
from __future__ import annotations

import numpy as np

from .layout import Field, QuantFormat

F32 = QuantFormat("F32", 0, 1, 4, (Field("x", "float32", 1, "IEEE binary32"),), doc="x = x")
F16 = QuantFormat("F16", 1, 1, 2, (Field("x", "float16", 1, "IEEE binary16"),), doc="x = float(x)")
BF16 = QuantFormat("BF16", 30, 1, 2, (Field("x", "uint16", 1, "bfloat16 bits: the top half of a binary32"),),
                   doc="x = bits(x) << 16 as float32")


def dequantize_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[:, 0] = blocks["x"]


def dequantize_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    # GGML_FP16_TO_FP32: exact widening
    out[:, 0] = blocks["x"]


def dequantize_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    # ggml_compute_bf16_to_fp32 (ggml-impl.h): the bf16 bits are the high half of the f32
    u = out.view(np.uint32)
    u[:, 0] = blocks["x"]
    u <<= 16


def quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    # GGML_FP32_TO_FP16: round to nearest even, as NumPy's cast does; |x| > 65504 -> inf as in ggml
    with np.errstate(over="ignore"):
        return x.astype(np.float16).view(np.uint8)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16 (ggml-impl.h): NaN -> quiet NaN keeping sign; else round to nearest even.
    # No u32 overflow: the largest non-NaN pattern is -inf 0xff800000, + 0x8000 stays below 2**32.
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    r = np.where(is_nan, (n >> np.uint32(16)) | np.uint32(64), r)
    return r.astype(np.uint16).view(np.uint8)


DEQUANTIZERS = {F32.type_id: dequantize_f32, F16.type_id: dequantize_f16, BF16.type_id: dequantize_bf16}
QUANTIZERS = {F32.type_id: quantize_f32, F16.type_id: quantize_f16, BF16.type_id: quantize_bf16}
FORMATS = (F32, F16, BF16)
