#!/usr/bin/env bash
# One device call (carry .whl): bench_points.py over the POINTS given (space-separated).
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
timeout 500 python3 benchmarks/bench_points.py --type "${TYPE:-Q4_0}" $POINTS 2>&1 | tee $OUT/points.txt
