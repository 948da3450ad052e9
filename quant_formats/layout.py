"""Block layouts as data: a ``QuantFormat`` per ggml type, a ``Field`` per struct member.

Every ggml tensor type cuts a row into blocks of ``block_elems`` values stored in
``block_bytes`` bytes; blocks never straddle rows, so a tensor is one flat run of
blocks.  The ``fields`` of a format are the members of ggml's ``block_*`` struct
(ggml-common.h) in byte order, little-endian, with no padding; the dequantizers
read them through ``QuantFormat.np_dtype``, a packed NumPy structured dtype built
from these same fields, so the layout written here is the layout that is decoded.

Shape rule, stated once for the package: ggml's ``ne`` is the reversed NumPy shape.
A GGUF tensor with ``ne = [576, 1536]`` is the NumPy array ``(1536, 576)``; ``ne0``
(NumPy's last dim) is the contiguous row, and it must be a multiple of block_elems.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

QK_K = 256  # elements per K-quant super-block (ggml-common.h)

# Field dtypes are NumPy type names; all multi-byte fields are little-endian in GGUF.
_FIELD_DTYPES = ("float32", "float16", "uint8", "int8", "uint16", "uint32")


@dataclass(frozen=True)
class Field:
    """One member of a block struct: ``count`` values of ``dtype`` (a NumPy type name)."""
    name: str
    dtype: str
    count: int
    doc: str

    def __post_init__(self) -> None:
        if self.dtype not in _FIELD_DTYPES:
            raise ValueError(f"field {self.name}: dtype {self.dtype!r} not one of {_FIELD_DTYPES}")
        if self.count < 1:
            raise ValueError(f"field {self.name}: count must be >= 1")

    @property
    def nbytes(self) -> int:
        return np.dtype(self.dtype).itemsize * self.count


@dataclass(frozen=True)
class QuantFormat:
    """A ggml tensor type: ``block_elems`` values in ``block_bytes`` bytes laid out as ``fields``.

    ``doc`` says in one line how a value is rebuilt from the fields.
    """
    name: str           # ggml name, e.g. "Q4_K"
    type_id: int        # ggml type id (== gguf.GGMLQuantizationType value)
    block_elems: int    # values per block (1 for F32/F16/BF16)
    block_bytes: int    # bytes per block
    fields: tuple[Field, ...]
    doc: str

    def __post_init__(self) -> None:
        total = sum(f.nbytes for f in self.fields)
        if total != self.block_bytes:
            raise ValueError(f"{self.name}: fields sum to {total} bytes, block_bytes is {self.block_bytes}")

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems

    @cached_property
    def np_dtype(self) -> np.dtype:
        """Packed structured dtype of one block; ``raw.view(fmt.np_dtype)['qs']`` is a field view."""
        return np.dtype([
            (f.name, np.dtype(f.dtype).newbyteorder("<"), () if f.count == 1 else (f.count,))
            for f in self.fields
        ])

    def field_offset(self, name: str) -> int:
        """Byte offset of field ``name`` inside a block."""
        off = 0
        for f in self.fields:
            if f.name == name:
                return off
            off += f.nbytes
        raise KeyError(name)


def f16_to_f32(a: np.ndarray) -> np.ndarray:
    """ggml's GGML_FP16_TO_FP32: exact widening of IEEE half to float."""
    return a.astype(np.float32)
