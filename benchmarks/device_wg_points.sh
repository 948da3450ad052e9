#!/usr/bin/env bash
# One device call (carry .whl): the warpgroup kernels' test, then m2 against w64 over 33/48/64 rows and four
# (K, N) shapes, and the Q4_K / Q4_1 checks (RESULTS session 5's table).
source benchmarks/device_setup.sh >/dev/null
timeout 200 python3 -m pytest -x -q tests/test_marlin.py -k "warpgroup" 2>&1 | tail -2
P=""
for M in 33 48 64; do for s in 4096x4096 4096x6144 4096x14336 14336x4096; do P="$P ${M}x$s:m2:default ${M}x$s:w64:default"; done; done
timeout 250 python3 benchmarks/bench_points.py --type Q4_0 $P 2>&1
timeout 100 python3 benchmarks/bench_points.py --type Q4_K 64x4096x4096:m2:default 64x4096x4096:w64:default 64x4096x14336:m2:default 64x4096x14336:w64:default 2>&1
timeout 60 python3 benchmarks/bench_points.py --type Q4_1 64x4096x4096:m2:default 64x4096x4096:w64:default 32x4096x4096:m2:default 32x4096x4096:w32:default 2>&1
