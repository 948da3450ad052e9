"""Where the mixed-input kernel (marlin_<type>_x64) spends a stage: CTA 0's producer and consumer
stamp clock64 at every wait (marlin.cu MARLIN_XTRACE), and this prints the median and p90 of each
step over the stages, in ns (the SM clock from the run's own length), for one shape:

    python benchmarks/xtrace.py --type Q4_0 64x4096x14336
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, event, event, what): the loading warp's lane 0 stamps 0, a dequantizing warpgroup's thread 0
# (the one of its stage) 1-3, the consumer's thread 0 7-9; the same event twice: stage s to s + 1
STEPS = [("L stage", 0, 0, "loader: A of stage s issued to A of stage s+1 issued"),
         ("D empty", 1, 2, "dequant: the stage's slot free -> its raw landed"),
         ("D work", 2, 3, "dequant: raw landed -> B stored"),
         ("A->B", 0, 3, "A of stage s issued -> B of stage s stored"),
         ("B->full", 3, 8, "B stored -> the consumer saw full(s)"),
         ("C wait", 7, 8, "consumer: waited for full(s)"),
         ("C wgmma", 8, 9, "consumer: wgmma issued, stage s-1's done"),
         ("C stage", 7, 7, "consumer: stage s to s+1")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("shapes", nargs="+", help="MxKxN")
    args = ap.parse_args(argv)
    os.environ["GGFLAT_MARLIN_XTRACE"] = "1"
    os.environ["GGFLAT_MARLIN_XONLY"] = "1"          # only the x64 kernels: the build takes seconds
    os.environ.setdefault("GGFLAT_PDL", "0")
    import cupy as cp
    from benchmarks.bench_marlin import TYPES, random_weight
    from ggml_py.cuda import marlin_ops as mo
    tid = TYPES[args.type]
    mod = mo._module()
    for shape in args.shapes:
        M, K, N = (int(x) for x in shape.split("x"))
        w = mo.repack(random_weight(cp, tid, N, K, 1))
        a = cp.random.standard_normal((M, K), dtype=cp.float32).astype(cp.float16)
        out = cp.empty((M, N), cp.float32)
        plan = mo.plan_gemm([w], M, a_dtype="f16", config="x64")
        plan(a, [out])
        buf = cp.ndarray((10, 512), cp.int64, memptr=mod.get_global("marlin_xtrace"))
        buf[...] = 0
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        plan(a, [out])
        end.record()
        end.synchronize()
        ms = cp.cuda.get_elapsed_time(start, end)
        t = buf.get()
        n = min(K // 64, 512)
        t = t[:, :n]
        cycles = t[9, n - 1] - t[7, 0]
        ghz = 1.98                                   # the H100 SXM's boost clock; the run's own is below
        print(f"{args.type} {shape}: {n} stages, {ms * 1e3:.1f} us with the launch, CTA 0: {cycles} cycles "
              f"({cycles / ghz / 1e3:.1f} us at {ghz} GHz)")
        for name, a0, a1, what in STEPS:
            d = (t[a1, 1:] - t[a0, :-1]) if a0 == a1 else (t[a1] - t[a0])
            d = d[2:] if d.size > 4 else d                # past the pipeline's fill
            print(f"  {name:9s} median {np.median(d) / ghz:7.0f} ns  p90 {np.percentile(d, 90) / ghz:7.0f} ns   {what}")


if __name__ == "__main__":
    main()
