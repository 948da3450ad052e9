"""Non-linear 4-bit types: IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks).

A 4-bit index selects one of 16 int8 levels (``kvalues_iq4nl``, ggml-common.h) that
are spaced to fit a bell-shaped weight distribution; the level is then scaled.
Dequantizers mirror ``dequantize_row_iq4_nl`` / ``dequantize_row_iq4_xs``
(ggml-quants.c) bit for bit.  The table lookup (np.take) costs ~1 ns/element,
the largest share of the time here.
"""
from __future__ import annotations

import numpy as np

from .layout import QK_K, Field, QuantFormat

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV_F32 = KVALUES_IQ4NL.astype(np.float32)
_SH_04 = np.array([0, 4], np.uint8)

IQ4_NL = QuantFormat("IQ4_NL", 20, 32, 18, (
    Field("d", "float16", 1, "block scale"),
    Field("qs", "uint8", 16, "4-bit level indices: low nibble of qs[j] = element j, high = element j+16"),
), doc="x = d * kvalues_iq4nl[q], q in 0..15")

IQ4_XS = QuantFormat("IQ4_XS", 23, QK_K, 136, (
    Field("d", "float16", 1, "super-block scale"),
    Field("scales_h", "uint16", 1, "bits 2ib..2ib+1 = high 2 bits of sub-block ib's 6-bit scale"),
    Field("scales_l", "uint8", 4, "low 4 bits of the scales: byte ib/2, nibble ib%2"),
    Field("qs", "uint8", 128, "level indices: byte 16ib+j low nibble -> element 32ib+j, high -> 32ib+16+j"),
), doc="x = d*(ls - 32) * kvalues_iq4nl[q], 8 sub-blocks of 32")


def dequantize_iq4_nl(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_iq4_nl: y = d * kvalues_iq4nl[q]
    n = blocks.shape[0]
    q = np.empty((n, 2, 16), np.uint8)
    np.right_shift(blocks["qs"].reshape(n, 1, 16), _SH_04.reshape(2, 1), out=q)
    q &= 0x0F
    np.take(_KV_F32, q.reshape(n, 32), out=out)
    out *= blocks["d"].astype(np.float32)[:, None]


def dequantize_iq4_xs(blocks: np.ndarray, out: np.ndarray) -> None:
    # dequantize_row_iq4_xs: y = (d * (ls - 32)) * kvalues_iq4nl[q]
    n = blocks.shape[0]
    q = np.empty((n, 8, 2, 16), np.uint8)
    np.right_shift(blocks["qs"].reshape(n, 8, 1, 16), _SH_04.reshape(2, 1), out=q)
    q &= 0x0F
    np.take(_KV_F32, q.reshape(n, QK_K), out=out)
    ls = ((blocks["scales_l"].reshape(n, 4, 1) >> _SH_04.reshape(2)) & 0x0F).reshape(n, 8)
    hi = (blocks["scales_h"].reshape(n, 1) >> (2 * np.arange(8, dtype=np.uint16))) & 3
    ls |= hi.astype(np.uint8) << 4
    dl = blocks["d"].astype(np.float32)[:, None] * (ls.astype(np.int8) - np.int8(32)).astype(np.float32)
    o = out.reshape(n, 8, 32)
    o *= dl[:, :, None]


FORMATS = (IQ4_NL, IQ4_XS)
DEQUANTIZERS = {IQ4_NL.type_id: dequantize_iq4_nl, IQ4_XS.type_id: dequantize_iq4_xs}
QUANTIZERS: dict = {}
