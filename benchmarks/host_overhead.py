"""Where a decode step's wall time goes besides the GPU's work (CuPy backend): the same 128-token
decode as ``ggflat bench -n 128`` (logits to the host every token), then with the argmax taken on
the device (4 bytes back), then the step's captured CUDA graph replayed back to back with no host
work between replays -- the GPU's own time a token.

    python benchmarks/host_overhead.py -m model.gguf [-n 128]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args(argv)
    from engine.model import Model
    model = Model.load(args.model, "cupy")
    rng = np.random.default_rng(0)
    cache = model.new_cache(args.n + 32)

    def loop(greedy: bool) -> float:
        seq = cache.new_sequence()
        try:
            toks = rng.integers(0, model.n_vocab, args.n)
            t0 = time.perf_counter()
            for t in toks:
                model.forward(cache, seq, [int(t)], greedy=greedy)
            return (time.perf_counter() - t0) / args.n
        finally:
            seq.clear()

    for greedy in (False, True):                 # plan and capture both graphs
        loop(greedy)
        loop(greedy)
    res = {}
    for _ in range(3):
        for greedy in (False, True):
            res.setdefault(greedy, []).append(loop(greedy))
    be = model.backend
    print(f"logits to the host every token: {min(res[False]) * 1e3:.3f} ms a token ({1 / min(res[False]):.1f} t/s)")
    print(f"argmax on the device:           {min(res[True]) * 1e3:.3f} ms a token ({1 / min(res[True]):.1f} t/s)")
    # the decode graph alone: the last captured plan with one token (the greedy one ran last)
    import cupy as cp
    g = None
    for p in list(getattr(model, "_plans", {}).values())[::-1]:
        if getattr(p, "cuda_graph", None) is not None:
            g = p
            break
    if g is None:
        print("no captured graph found on the model's plans")
        return
    st = g.stream
    reps = 64
    for _ in range(4):
        be.dev.launch_graph(g.cuda_graph, st)
    be.dev.synchronize(st)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record(st)
    for _ in range(reps):
        be.dev.launch_graph(g.cuda_graph, st)
    e1.record(st)
    e1.synchronize()
    print(f"graph replays back to back:     {cp.cuda.get_elapsed_time(e0, e1) / reps:.3f} ms a token "
          f"(the same KV length every replay)")


if __name__ == "__main__":
    main()
