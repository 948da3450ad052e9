"""Where a kernel's warps stall, by region: before its main loop, in it, after it -- from the SASS
page of an Nsight Compute report with the SourceCounters section:

    ncu --section SourceCounters -o rep ...            (on the device)
    ncu --import rep.ncu-rep --page source --csv --print-source sass > src.csv
    python benchmarks/ncu_stalls.py src.csv

The main loop is taken to span the kernel's HMMA/wgmma instructions (the mma.sync and warpgroup
Marlin kernels); prints each region's share of the warp-stall samples, the shares by opcode, and
the instructions with the most samples.
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    rows = list(csv.reader(open(args.csv, newline="")))
    hi = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    hdr, data = rows[hi], rows[hi + 1:]
    i_addr, i_src = hdr.index("Address"), hdr.index("Source")
    i_st = hdr.index("Warp Stall Sampling (All Samples)")
    i_ex = hdr.index("Instructions Executed")
    ins = []
    for r in data:
        if len(r) <= max(i_addr, i_src, i_st, i_ex) or not r[i_addr]:
            continue
        a = int(r[i_addr], 16) if r[i_addr].startswith("0x") else int(r[i_addr])
        ins.append((a, r[i_src], float(r[i_st] or 0), float(r[i_ex] or 0)))
    total = sum(x[2] for x in ins) or 1.0
    mma = [a for a, s, _, _ in ins if "HMMA" in s or "HGMMA" in s]
    lo, hi_a = (min(mma), max(mma)) if mma else (0, -1)
    region, byop = defaultdict(float), defaultdict(float)
    for a, s, st, _ in ins:
        op = re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0] if s else "?"
        byop[op] += st
        # (the loop's head, its waits and copies, sit a little before the first mma and after the last)
        region["in the loop" if lo - 0x400 <= a <= hi_a + 0x300 else ("before" if a < lo else "after")] += st
    print(f"{int(total)} samples: " + ", ".join(f"{k} {v / total:.0%}" for k, v in region.items()))
    print("by opcode: " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(byop.items(), key=lambda kv: -kv[1])[:10]))
    for a, s, st, ex in sorted(ins, key=lambda x: -x[2])[:args.top]:
        print(f"  {a:#x} {st / total:5.1%} executed {ex:8.0f}  {s[:90]}")


if __name__ == "__main__":
    main()
