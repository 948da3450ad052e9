"""A driver for Nsight Compute: each case's Marlin launch (default plan) run twice, nothing else.

    ncu --clock-control none -k regex:marlin_q --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        python benchmarks/ncu_marlin.py [--cases MxKxN,...] [--type Q4_0] [--a f32|f16]

ncu's default cache control flushes the caches before every profiled launch, so each one reads its
weights from DRAM, like a decode step; gpu__time_duration is then the kernel alone, without the
launch gap that bench_marlin.py's graph replays include. With ``--copies 3`` and ``ncu --cache-control
none --launch-skip 3``, the profiled launch finds A in L2 and its weights in DRAM, as a decode step does.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="1x4096x14336,1x4096x4096,16x4096x14336,64x4096x14336,1x14336x4096")
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--a", default="f32")
    ap.add_argument("--glu", action="store_true", help="gate/up pair of (N, K) with swiglu")
    ap.add_argument("--config", help="a kernel variant of marlin_ops._VARIANTS instead of the default")
    ap.add_argument("--copies", type=int, default=1,
                    help="launch over this many copies of the weights in turn (3 copies of 33 MB overflow the "
                         "L2: with --cache-control none and --launch-skip copies, the profiled launch reads its "
                         "weights from DRAM while A stays in L2, as in a decode step)")
    args = ap.parse_args(argv)
    os.environ.setdefault("GGFLAT_PDL", "0")
    import cupy as cp
    from benchmarks.bench_cuda_quant import random_weight
    from benchmarks.bench_marlin import TYPES
    from ggml_py.cuda import marlin_ops as mo
    tid = TYPES[args.type]
    for case in args.cases.split(","):
        M, K, N = (int(x) for x in case.split("x"))
        sets = [[mo.repack(random_weight(cp, tid, N, K, 1 + i + 2 * c)) for i in range(2 if args.glu else 1)]
                for c in range(max(1, args.copies))]
        a = cp.random.standard_normal((M, K), dtype=cp.float32)
        if args.a == "f16":
            a = a.astype(cp.float16)
        out = cp.empty((M, N), cp.float32)
        plans = [mo.MarlinPlan(ws, M, a_dtype=args.a, glu="swiglu" if args.glu else None, config=args.config)
                 for ws in sets]
        calls = [p.bind(a, [out], cp.cuda.get_current_stream()) for p in plans]
        for _ in range(2):
            for call in calls:
                call()
        p = plans[0]
        cp.cuda.Device().synchronize()
        print(f"{case}: {p.kernel_name} grid {p.grid} kws {p.kws} slabs {p.slabs} cluster {p.cluster} "
              f"smem {p.smem} weight MB {p.weight_bytes / 1e6:.1f}", flush=True)


if __name__ == "__main__":
    main()
