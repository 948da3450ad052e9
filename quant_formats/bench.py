"""Throughput of the NumPy (de)quantizers on one core: ``python -m quant_formats.bench [-n ELEMS]``.

Prints one line per type: dequantize M elements/s and input GB/s (best of 3, into a
reused output buffer so page faults are not counted), and quantize M elements/s
where a quantizer exists.  Random blocks with finite f16 scales; Gaussian input.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from . import FORMATS, dequantize, quantize, registry


def _random_raw(fmt, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.integers(0, 256, size=n_blocks * fmt.block_bytes, dtype=np.uint8)
    blk = raw.view(fmt.np_dtype)
    for f in fmt.fields:
        if f.dtype == "float16":
            blk[f.name] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
    return raw


def _best(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1 << 23, help="elements per type (default 2**23)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.n // 256 * 256
    out = np.empty(n, np.float32)
    x = rng.standard_normal(min(n, 1 << 20)).astype(np.float32).reshape(-1, 256)
    print(f"{'type':7s} {'bpw':>6s} {'dequant M/s':>12s} {'GB/s in':>8s} {'quant M/s':>10s}")
    for tid, fmt in sorted(FORMATS.items()):
        raw = _random_raw(fmt, n // fmt.block_elems, rng)
        dt = _best(lambda: dequantize(raw, tid, (n,), out=out))
        q = ""
        if tid in registry._QUANTIZERS:
            q = f"{x.size / _best(lambda: quantize(x, tid), reps=1) / 1e6:10.1f}"
        print(f"{fmt.name:7s} {fmt.bits_per_weight:6.3f} {n / dt / 1e6:12.0f} {raw.size / dt / 1e9:8.2f} {q:>10s}")


if __name__ == "__main__":
    main()
