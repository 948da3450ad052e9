"""Time chosen (kernel variant, kws x slabs) points of the Marlin GEMM on one shape each, f16 A
(``--a f32``: the engine's activations), PDL off -- a targeted companion to bench_marlin.py --sweep:

    python benchmarks/bench_points.py --type Q4_0 16x4096x14336:d2:1x4,2x4 64x4096x14336:m2:default
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--a", default="f16", choices=("f16", "f32"), help="A's dtype")
    ap.add_argument("points", nargs="+", help="MxKxN:variant:kwsxslabs[,kwsxslabs...] ('default': the plan's "
                    "choice of variant or split; for the warpgroup variants w16/w32/w64, tiles-a-CTA x slabs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("GGFLAT_PDL", "0")
    import cupy as cp
    from benchmarks.bench_marlin import TYPES, bench_marlin, marlin_weights
    from ggml_py.cuda import marlin_ops as mo
    stream = cp.cuda.Stream(non_blocking=True)
    tid = TYPES[args.type]
    cache = {}
    for pt in args.points:
        shape, variant, splits = pt.split(":")
        M, K, N = (int(x) for x in shape.split("x"))
        if (K, N) not in cache:
            cache.clear()
            cp.get_default_memory_pool().free_all_blocks()
            cache[(K, N)] = marlin_weights(cp, mo, tid, N, K)
        ws = cache[(K, N)]
        res = []
        for sp in splits.split(","):
            kws, slabs = (None, None) if sp == "default" else (int(v) for v in sp.split("x"))
            try:
                t, p = bench_marlin(cp, mo, ws, M, K, stream, a_dtype=args.a, slabs=slabs, kws=kws,
                                    config=None if variant == "default" else variant)
                split = f"t{p.tpc}s{p.slabs}" if p.wg else f"k{p.kws}s{p.slabs}"
                res.append(f"{p.variant} {split}={t * 1e6:.1f}")
            except ValueError as e:
                res.append(f"{sp}=({e})")
        print(f"{args.type} {shape} {variant}{' f32 A' if args.a == 'f32' else ''}: " + " ".join(res), flush=True)


if __name__ == "__main__":
    main()
