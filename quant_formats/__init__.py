"""ggml tensor types: block layouts as data, NumPy reference (de)quantizers.

    from quant_formats import get_format, dequantize, quantize
    fmt = get_format(12)                     # QuantFormat Q4_K: 256 elems in 144 bytes, fields d, dmin, scales, qs
    w = dequantize(raw, 12, (1536, 576))     # NumPy shape: ggml ne = [576, 1536] reversed
    raw2 = quantize(w, 12)                   # uint8 (1536, 576 // 256 * 144)

The dequantizers are bit-identical to ggml's dequantize_row_* (and gguf.quants) and are
the specification that GPU kernels are tested against.  One module per family:
floats (F32 F16 BF16), legacy (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0), kquants (Q2_K..Q6_K),
iquants (IQ4_NL IQ4_XS); layout holds Field/QuantFormat, registry the id table and drivers.
"""
from .layout import Field, QuantFormat
from .randomize import random_blocks
from .registry import FORMATS, dequantize, get_format, quantize, row_nbytes, tensor_nbytes, type_name

__all__ = ["QuantFormat", "Field", "get_format", "FORMATS", "dequantize", "quantize",
           "random_blocks", "row_nbytes", "tensor_nbytes", "type_name"]
