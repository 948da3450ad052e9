"""The original 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each dequantizer mirrors ggml's ``dequantize_row_*`` (ggml-quants.c) and does the
same float32 operations in the same order, so results are bit-identical to ggml
and to ``gguf.quants``.  In every 4-bit type byte ``qs[j]`` holds element ``j`` in
its low nibble and element ``j + 16`` in its high nibble.

Where the time goes (one core, chunks of 128K elements): the two
nibble extractions into a (n, 32) uint8 buffer run NumPy inner loops of only 16
elements (~0.3 ns/elem each); the u8->f32 cast and the per-block scale multiply
are the rest.  Everything else is whole-array uint8 arithmetic.

Quantizers delegate to ``gguf.quants.quantize``, whose implementations follow
ggml's ``quantize_row_*_ref`` bit for bit.
"""
from __future__ import annotations

import numpy as np

from .layout import Field, QuantFormat

_D = Field("d", "float16", 1, "block scale (delta)")
_M = Field("m", "float16", 1, "block minimum")
_QS4 = Field("qs", "uint8", 16, "4-bit quants: low nibble of qs[j] = element j, high nibble = element j+16")
_QH = Field("qh", "uint8", 4, "5th bit of each quant: bit i of the little-endian u32 = element i")

Q4_0 = QuantFormat("Q4_0", 2, 32, 18, (_D, _QS4), doc="x = d * (q - 8), q in 0..15")
Q4_1 = QuantFormat("Q4_1", 3, 32, 20, (_D, _M, _QS4), doc="x = d * q + m, q in 0..15")
Q5_0 = QuantFormat("Q5_0", 6, 32, 22, (_D, _QH, _QS4), doc="x = d * (q - 16), q = nibble | qh_bit << 4 in 0..31")
Q5_1 = QuantFormat("Q5_1", 7, 32, 24, (_D, _M, _QH, _QS4), doc="x = d * q + m, q = nibble | qh_bit << 4 in 0..31")
Q8_0 = QuantFormat("Q8_0", 8, 32, 34, (_D, Field("qs", "int8", 32, "signed 8-bit quants")),
                   doc="x = d * q, q in -128..127")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) uint8 quants in element order (low nibbles first)."""
    q = np.empty((qs.shape[0], 32), np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    return q


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) qh bytes -> (n, 32) uint8 holding 16 where element i has its 5th bit set."""
    h = np.unpackbits(qh, axis=1, bitorder="little")  # bit i of the u32 -> column i
    h <<= 4
    return h


def dequantize_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_q4_0: y = (q - 8) * d
    q = _nibbles(blocks["qs"]).view(np.int8)
    q -= 8
    out[...] = q
    out *= blocks["d"].astype(np.float32)[:, None]


def dequantize_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_q4_1: y = q * d + m  (two roundings, no FMA)
    out[...] = _nibbles(blocks["qs"])
    out *= blocks["d"].astype(np.float32)[:, None]
    out += blocks["m"].astype(np.float32)[:, None]


def dequantize_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_q5_0: y = ((nibble | hbit << 4) - 16) * d
    q = _nibbles(blocks["qs"])
    q |= _high_bits(blocks["qh"])
    q8 = q.view(np.int8)
    q8 -= 16
    out[...] = q8
    out *= blocks["d"].astype(np.float32)[:, None]


def dequantize_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_q5_1: y = (nibble | hbit << 4) * d + m
    q = _nibbles(blocks["qs"])
    q |= _high_bits(blocks["qh"])
    out[...] = q
    out *= blocks["d"].astype(np.float32)[:, None]
    out += blocks["m"].astype(np.float32)[:, None]


def dequantize_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_q8_0: y = q * d
    out[...] = blocks["qs"]
    out *= blocks["d"].astype(np.float32)[:, None]


def _gguf_quantizer(type_id: int):
    def quantize_blocks(x: np.ndarray) -> np.ndarray:
        # gguf.quants.quantize_blocks follows quantize_row_*_ref (ggml-quants.c) bit for bit.
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize
        # one long row: gguf splits its input into groups of 16 rows, so rows of one block are slow
        return quantize(x.reshape(1, -1), GGMLQuantizationType(type_id)).reshape(x.shape[0], -1)
    quantize_blocks.__name__ = f"quantize_type{type_id}_via_gguf"
    return quantize_blocks


FORMATS = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
DEQUANTIZERS = {
    Q4_0.type_id: dequantize_q4_0, Q4_1.type_id: dequantize_q4_1, Q5_0.type_id: dequantize_q5_0,
    Q5_1.type_id: dequantize_q5_1, Q8_0.type_id: dequantize_q8_0,
}
QUANTIZERS = {f.type_id: _gguf_quantizer(f.type_id) for f in FORMATS}
