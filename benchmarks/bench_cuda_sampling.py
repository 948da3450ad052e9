"""Timings of the sorting-free sampling kernels (ggml_py/cuda/sampling.cu) against a sort-based
CuPy sampler (argsort + cumsum + search), on a CUDA device.

    python benchmarks/bench_cuda_sampling.py [--batches 1,16,64] [--vocabs 49152,128256,262144]
                                             [--flat] [--clusters] [--quick]

For batch n in {1, 16, 64}, vocabulary V in {49,152; 128,256; 262,144} and the settings top-p
(0.9), top-k + top-p (50, 0.9), min-p (0.1), greedy and llama.cpp's defaults (T 0.8, top-k 40,
top-p 0.95, min-p 0.05): the median time of one sampling call, from CUDA events around replays
of a CUDA graph holding REPS calls (each with its own counters, so the draws, and with them the
rejection rounds, differ) after warm-up; the sort-based baseline the same way (plain launches
where CuPy cannot capture). Logits are language-model-like: 8 strong
tokens 15, 14, ..., 8 above an N(0, 1.5^2) body (top token ~60%, body ~7% of the mass; ``--flat``:
N(0, 1), a nucleus of thousands of tokens).
``--clusters`` also times every cluster size (CTAs per row) for each shape. Prints markdown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {
    "top-p": dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),
    "top-k+top-p": dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.0),
    "min-p": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
    "defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
}
REPS = 20           # calls per captured graph
TIMINGS = 25        # graph replays timed


def make_logits(cp, n: int, V: int, flat: bool, seed: int = 0):
    rs = cp.random.RandomState(seed)
    if flat:
        return rs.standard_normal((n, V), dtype=cp.float32)
    x = rs.standard_normal((n, V), dtype=cp.float32) * cp.float32(1.5)
    rng = np.random.default_rng(seed)
    for r in range(n):
        top = rng.choice(V, 8, replace=False)
        x[r, cp.asarray(top)] += cp.asarray(np.float32(15.0) - np.arange(8, dtype=np.float32))
    return x


def time_calls(cp, calls, stream) -> tuple[float, bool]:
    """(median seconds per call, captured?): the calls captured into one graph and replayed
    (bench_cuda_quant.time_graph), plain launches where capture is refused."""
    from benchmarks.bench_cuda_quant import time_graph
    return time_graph(cp, calls, stream, reps=TIMINGS, quiet=True)


def ours(cp, so, x, setting: dict, stream, cluster=None):
    from ggml_py.sample_ref import pack_row
    n, V = x.shape
    prm, st = pack_row(**setting, seed=1)
    P = cp.asarray(np.tile(prm, (n, 1)))
    out = cp.empty(n, cp.int32)
    calls = []
    for rep in range(REPS):
        S = np.tile(st, (n, 1))
        S[:, 3] = np.arange(n) + rep * n                   # each call its own counters
        calls.append(so.prepare_sample(x, P, cp.asarray(S), None, out, stream, cluster=cluster))
    return time_calls(cp, calls, stream)


def baseline(cp, x, setting: dict, stream):
    """Sort-based sampling as PyTorch/vLLM did it: sort, softmax, cumulative sums, masks, search."""
    n, V = x.shape
    T, k, p, mp = setting["temperature"], setting["top_k"], setting["top_p"], setting["min_p"]
    u = cp.random.RandomState(3).random_sample((n, 1), dtype=cp.float64).astype(cp.float32)
    pos = cp.arange(V, dtype=cp.int32)[None, :]

    def greedy():
        with stream:
            return cp.argmax(x, axis=1)

    def sampled():
        with stream:
            idx = cp.argsort(-x, axis=1)                       # the sort
            xs = cp.take_along_axis(x, idx, 1)
            e = cp.exp(xs - xs[:, :1])                         # T = 1 weights, best first
            keep = cp.ones(xs.shape, cp.bool_)
            if 0 < k < V:
                keep &= pos < k
            if p < 1.0:
                ek = e * keep
                cum = cp.cumsum(ek, axis=1)
                keep &= (cum - ek) < cp.float32(p) * cum[:, -1:]
            if mp > 0.0:
                keep &= xs >= xs[:, :1] + cp.float32(np.log(mp))
            w = cp.exp((xs - xs[:, :1]) / cp.float32(T)) * keep
            cw = cp.cumsum(w, axis=1)
            j = cp.minimum((cw <= u * cw[:, -1:]).sum(axis=1), V - 1)   # the search
            return cp.take_along_axis(idx, j[:, None].astype(cp.int64), 1)
    return time_calls(cp, [greedy if T <= 0 else sampled] * 3, stream)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--vocabs", default="49152,128256,262144")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--flat", action="store_true", help="N(0, 1) logits instead of language-model-like ones")
    ap.add_argument("--clusters", action="store_true", help="also time every cluster size")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    import cupy as cp
    from ggml_py.cuda import sampling_ops as so

    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    print(f"# sampling on {name}; {'flat N(0,1)' if args.flat else 'LM-like'} logits; median of {TIMINGS} "
          f"replays of a graph of {REPS} calls\n")
    stream = cp.cuda.Stream(non_blocking=True)
    batches = [int(b) for b in args.batches.split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    names = args.settings.split(",")
    cols = " | ".join(f"{s} (µs)" for s in names)
    print(f"| batch | vocab | CTAs/row | {cols} | sort-based top-p (µs) | sort-based defaults (µs) |")
    print("|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|")
    for V in vocabs:
        for n in batches:
            x = make_logits(cp, n, V, args.flat)
            c = so.choose_cluster(n, V)
            row = []
            for s in names:
                t, _ = ours(cp, so, x, SETTINGS[s], stream)
                row.append(f"{t * 1e6:.1f}")
            base = []
            if not args.no_baseline:
                for s in ("top-p", "defaults"):
                    t, g = baseline(cp, x, SETTINGS[s], stream)
                    base.append(f"{t * 1e6:.1f}" + ("" if g else " (eager)"))
            else:
                base = ["-", "-"]
            print(f"| {n} | {V} | {c} | " + " | ".join(row) + " | " + " | ".join(base) + " |", flush=True)
            if args.clusters:
                for cc in (1, 2, 4, 8):
                    if cc == c or cc not in so._clusters() or not so._fits(V, cc):
                        continue
                    row = [f"{ours(cp, so, x, SETTINGS[s], stream, cluster=cc)[0] * 1e6:.1f}" for s in names]
                    print(f"| {n} | {V} | {cc} | " + " | ".join(row) + " | | |", flush=True)
            del x


if __name__ == "__main__":
    main()
