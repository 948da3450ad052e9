"""Run the warpgroup kernels on small cases one at a time (synchronising after each), for
compute-sanitizer: python benchmarks/wg_repro.py"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
import cupy as cp
from ggml_py.cuda import marlin_ops as mo
from ggml_py.cuda.quant_ops import DeviceWeight
from quant_formats import quantize, dequantize

rng = np.random.default_rng(0)
CASES = [(2, "w16", 16, (64, 1024), 1, 1, "f16"), (2, "w16", 5, (333, 1024), 2, 1, "f16"),
         (2, "w16", 16, (64, 1024), 1, 2, "f16"), (2, "w16", 16, (64, 1024), 1, 1, "f32"),
         (2, "w64", 64, (333, 1024), 4, 2, "f16"), (12, "w16", 16, (64, 1024), 1, 1, "f16")]
for t, variant, M, shape, tpc, slabs, adt in CASES:
    w = rng.standard_normal(shape).astype(np.float32)
    raw = np.ascontiguousarray(quantize(w, t)).reshape(-1).view(np.uint8)
    mw = mo.repack(DeviceWeight(t, shape, cp.asarray(raw), raw.size, "w"))
    a = rng.standard_normal((M, shape[1])).astype(np.float32)
    ad = cp.asarray(a.astype(np.float16) if adt == "f16" else a)
    p = mo.plan_gemm([mw], M, a_dtype=adt, config=variant, kws=tpc, slabs=slabs)
    out = cp.full((M, shape[0]), np.nan, cp.float32)
    print(t, variant, M, shape, tpc, slabs, adt, "grid", p.grid, "smem", p.smem, flush=True)
    p(ad, [out])
    cp.cuda.Device().synchronize()
    ref = a.astype(np.float16).astype(np.float64) @ dequantize(raw, t, shape).astype(np.float64).T
    o = cp.asnumpy(out)
    print("  nmse", float(((o - ref) ** 2).sum() / (ref ** 2).sum()), flush=True)
