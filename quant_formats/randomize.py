"""Random, valid blocks of a quant type: for tests and random-weight benchmark models.

Quant codes are uniform random bytes; every f16 field (scales, mins) is drawn
uniformly from [lo, hi], so dequantized values stay finite and small.
"""
from __future__ import annotations

import numpy as np

from .registry import get_format, tensor_nbytes


def random_blocks(rng: np.random.Generator, type_id: int, shape: tuple[int, int],
                  lo: float = 0.005, hi: float = 0.015) -> np.ndarray:
    """(rows, row_bytes) uint8 of random valid blocks for a tensor of ``shape`` (NumPy order)."""
    fmt = get_format(type_id)
    rows = shape[0]
    raw = rng.integers(0, 256, tensor_nbytes(type_id, shape), dtype=np.uint8)
    blk = raw.view(fmt.np_dtype)
    for f in fmt.fields:
        if f.dtype == "float16":
            blk[f.name] = rng.uniform(lo, hi, blk[f.name].shape).astype(np.float16)
    return raw.reshape(rows, -1)
