"""Phases of every Marlin decode launch inside a replayed decode step (CuPy backend, H100): a
measurement build of marlin.cu (GGFLAT_MARLIN_TRACE=1, MARLIN_TRACE) has each warp record
%globaltimer at its start, when its A window is ready, at the end of its streaming loop and at its
end. One decode step is replayed after warm-up and, per kind of launch (weight rows x K, tiles,
grid), averaged over the layers:
  prologue  = last warp's A-window-ready - first warp's start
  loop      = last loop end - last A-window-ready
  tail      = last end - last loop end (reductions, epilogue)
  span      = last end - first start; and the gap from the previous traced launch's end (< 0: overlap)

    python benchmarks/trace_decode.py -m model.gguf
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--warm", type=int, default=6, help="decode tokens before the traced one")
    args = ap.parse_args(argv)
    os.environ["GGFLAT_MARLIN_TRACE"] = "1"
    os.environ["GGFLAT_ATTN_TRACE"] = "1"
    import cupy as cp
    from engine.model import Model
    from ggml_py.cuda import attention_ops as ao
    from ggml_py.cuda import marlin_ops as mo
    model = Model.load(args.model, "cupy")
    cache = model.new_cache(args.warm + 8)
    seq = cache.new_sequence()
    rng = np.random.default_rng(0)
    for t in rng.integers(0, model.n_vocab, args.warm):
        model.forward(cache, seq, [int(t)])
    mod = mo._module()
    n_ptr = mod.get_global("marlin_trace_n")
    counter = cp.ndarray((1,), cp.uint32, memptr=n_ptr)
    counter[...] = 0
    amods = [m for opts, m in ao.modules.items() if "-DATTN_TRACE=1" in opts]
    acount = [cp.ndarray((1,), cp.uint32, memptr=m.get_global("attn_trace_n")) for m in amods]
    for c in acount:
        c[...] = 0
    cp.cuda.Device().synchronize()
    model.forward(cache, seq, [int(rng.integers(0, model.n_vocab))])
    cp.cuda.Device().synchronize()
    n = int(counter.get()[0])
    attn = [cp.ndarray((int(c.get()[0]), 8), cp.uint64, memptr=m.get_global("attn_trace_buf")).get().astype(np.int64)
            for m, c in zip(amods, acount)]
    attn = np.concatenate(attn) if attn else np.zeros((0, 8), np.int64)
    buf = cp.ndarray((n, 16), cp.uint64, memptr=mod.get_global("marlin_trace_buf")).get().astype(np.int64)
    print(f"{n} warp records")
    t0 = buf[:, 0].min()
    ts = buf[:, :4] - t0
    d = np.diff(np.unique(ts[:, 0]))
    print(f"globaltimer: smallest step between distinct start stamps {d[d > 0].min() if d.size else 0} ns")
    key = [(int(r[4] >> 32), int(r[4] & 0xffffffff), int(r[5] >> 32), int(r[5] & 0xffffffff),
            int(r[7] >> 32), int((r[7] >> 8) & 0xffffff)) for r in buf]
    # the finer stamps (words 8-13), in the order a warp passes them; 0 where a warp did not
    fine = {"wait": 8, "A first": 14, "A staged": 9, "norm": 10, "rope": 11, "ready": 1, "loop end": 2, "k-reduced": 12,
            "ticket": 13, "end": 3}
    launches = []                                      # (kind, start, ready, loop_end, end)
    by = defaultdict(list)
    for i, k in enumerate(key):
        by[k].append(i)
    for k, idx in by.items():
        idx = sorted(idx, key=lambda i: ts[i, 0])
        group = [idx[0]]
        for a, b in zip(idx, idx[1:]):
            if ts[b, 0] - ts[a, 0] > 20_000:          # the same shape in the next layer
                launches.append((k, ts[group][:, :4], buf[group]))
                group = []
            group.append(b)
        launches.append((k, ts[group][:, :4], buf[group]))
    launches.sort(key=lambda x: x[1][:, 0].min())
    stats = defaultdict(lambda: defaultdict(list))
    prev_end = None
    timeline = defaultdict(lambda: defaultdict(list))
    prev = None
    for k, r, raw in launches:
        start, ready, lend, end = r[:, 0].min(), r[:, 1].max(), r[:, 2].max(), r[:, 3].max()
        if prev is not None:                       # every point from the previous traced launch's end
            timeline[k]["first start"].append(raw[:, 0].min() - prev)
            w = raw[:, 8][raw[:, 8] > 0]
            if w.size:
                timeline[k]["first wait"].append(w.min() - prev)
            for name, w in fine.items():
                v = raw[:, w]
                v = v[v > 0]
                if v.size:
                    timeline[k][name].append(v.max() - prev)
        prev = raw[:, 3].max()
        s = stats[k]
        s["prologue"].append(ready - start)
        s["loop"].append(lend - ready)
        s["tail"].append(end - lend)
        s["span"].append(end - start)
        s["loop end spread"].append(r[:, 2].max() - r[:, 2].min())
        if prev_end is not None:
            s["gap before"].append(start - prev_end)
        prev_end = end
    names = {}
    for k in stats:
        N0, K, glu, t3, gx, gy = k
        names[k] = f"{'gate/up ' if glu else ''}{N0}x{K} tiles {t3} grid {gx}x{gy}"
    cols = ["prologue", "loop", "tail", "span", "loop end spread", "gap before"]
    print("| launch (weight rows x K) | launches | " + " | ".join(cols) + " |  (us, mean over the step)")
    print("|---|---:|" + "---:|" * len(cols))
    for k, s in sorted(stats.items(), key=lambda kv: -np.mean(kv[1]["span"]) * len(kv[1]["span"])):
        vals = " | ".join(f"{np.mean(s[c]) / 1e3:.2f}" if s[c] else "" for c in cols)
        print(f"| {names[k]} | {len(s['span'])} | {vals} |")
    total = max(r[:, 3].max() for _, r, _ in launches) - min(r[:, 0].min() for _, r, _ in launches)
    print(f"first traced start to last traced end: {total / 1e3:.1f} us")
    print()
    print("From the previous traced launch's end: its first warp's start and wait's return, then when the last")
    print("warp passes each point (us, mean over the step; o's previous launch is q/k/v, attention between):")
    cols2 = ["first start", "first wait"] + list(fine)
    print("| launch | " + " | ".join(cols2) + " |")
    print("|---|" + "---:|" * len(cols2))
    for k, tl in sorted(timeline.items(), key=lambda kv: -np.mean(stats[kv[0]]["span"]) * len(stats[kv[0]]["span"])):
        print(f"| {names[k]} | " + " | ".join(f"{np.mean(tl[c]) / 1e3:.2f}" if tl.get(c) else "" for c in cols2) + " |")
    # each warp's own phases (its stamps minus its own previous stamp), median and 90th percentile over
    # the warps of every launch of a kind: a phase long in every warp is the code's, long only at the
    # top is a few stragglers'
    steps = [("wait", 0, 8), ("A first", 8, 14), ("A rest", 14, 9), ("A staged->ready", 9, 1),
             ("loop", 1, 2), ("tail", 2, 3)]
    print()
    print("Each warp's phases (us, median / 90th percentile over the warps):")
    print("| launch | " + " | ".join(n for n, _, _ in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for k, tl in sorted(timeline.items(), key=lambda kv: -np.mean(stats[kv[0]]["span"]) * len(stats[kv[0]]["span"])):
        raw = np.concatenate([b for kk, _, b in launches if kk == k])
        cells = []
        for _, a, b in steps:
            ok = (raw[:, a] > 0) & (raw[:, b] > 0)
            d = (raw[ok, b] - raw[ok, a]) / 1e3
            cells.append(f"{np.median(d):.2f} / {np.percentile(d, 90):.2f}" if d.size else "")
        print(f"| {names[k]} | " + " | ".join(cells) + " |")
    attention_table(attn, launches)


def attention_table(attn, launches) -> None:
    """The decode attention launches (ATTN_TRACE records: start, q staged, first tile, loop end, end per
    block) on the same clock: from the end of the Marlin launch before each (q/k/v) to the start of
    the one after it (o)."""
    if not len(attn):
        print("\nno attention records (not the tensor-core decode kernel?)")
        return
    attn = attn[np.argsort(attn[:, 0])]
    groups, cur = [], [0]
    for i in range(1, len(attn)):
        if attn[i, 0] - attn[cur[-1], 0] > 20_000:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    ends = sorted(raw[:, 3].max() for _, _, raw in launches)
    starts = sorted(raw[:, 0].min() for _, _, raw in launches)
    cols = ["first start", "last start", "q staged", "first tile", "loop end", "end", "next launch starts"]
    vals = {c: [] for c in cols}
    per = {c: [] for c in ("start->q", "q->first tile", "tiles", "loop end->end")}
    for idx in groups:
        a = attn[idx]
        prev = [e for e in ends if e <= a[:, 0].min()]
        if not prev:
            continue
        p = prev[-1]
        work = a[(a[:, 6] >> 32).astype(np.int32) >= 0]                # blocks with keys (tiles >= 0)
        vals["first start"].append(a[:, 0].min() - p)
        vals["last start"].append(a[:, 0].max() - p)
        for c, w in (("q staged", 1), ("first tile", 2), ("loop end", 3)):
            v = work[:, w][work[:, w] > 0]
            if v.size:
                vals[c].append(v.max() - p)
        vals["end"].append(a[:, 4].max() - p)
        nxt = [s for s in starts if s > a[:, 0].min()]
        if nxt:
            vals["next launch starts"].append(nxt[0] - p)
        ok = (work[:, 1] > 0) & (work[:, 2] > 0) & (work[:, 3] > 0)
        w = work[ok]
        per["start->q"] += list(w[:, 1] - w[:, 0])
        per["q->first tile"] += list(w[:, 2] - w[:, 1])
        per["tiles"] += list(w[:, 3] - w[:, 2])
        per["loop end->end"] += list(w[:, 4] - w[:, 3])
    nwork = int(np.mean([((attn[idx][:, 6] >> 32).astype(np.int32) >= 0).sum() for idx in groups]))
    print()
    print(f"Decode attention ({len(groups)} launches, {len(attn) // max(1, len(groups))} blocks each, {nwork} with keys): "
          "us after the previous traced launch's end (the last block passing each point)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    print("| " + " | ".join(f"{np.mean(vals[c]) / 1e3:.2f}" if vals[c] else "" for c in cols) + " |")
    print("A block's phases (us, median / max): " + ", ".join(
        f"{k} {np.median(v) / 1e3:.2f} / {np.max(v) / 1e3:.2f}" for k, v in per.items() if v))


if __name__ == "__main__":
    main()
