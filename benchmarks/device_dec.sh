#!/usr/bin/env bash
# One device call (carry .whl): Marlin tests, then the decode-kernel micro rows, sweeps and a profile.
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
what="${*:-tests micro ncu}"
if [[ " $what " == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_marlin.py 2>&1 | tee $OUT/tests.log | tail -8
fi
if [[ " $what " == *" micro "* ]]; then
  timeout 200 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1,4,16,32,64 --layer --sweep 2>&1 | tee $OUT/micro.md | grep -v "^$"
  timeout 60 python3 benchmarks/bench_marlin.py --types Q4_1,Q4_K --ms 1,16 2>&1 | tee $OUT/micro_q41k.md | grep "^|"
fi
if [[ " $what " == *" ncu "* ]]; then
  timeout 100 $NCU --clock-control none -k regex:marlin_q --launch-skip 1 --launch-count 1 --metrics "regex:smsp__warp_issue_stalled_.*_per_warp_active.pct,sm__cycles_active.min,sm__cycles_active.max,sm__cycles_active.avg,smsp__inst_executed.sum,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,launch__occupancy_limit_shared_mem" python3 benchmarks/ncu_marlin.py --cases 1x4096x14336 > $OUT/ncu_d1.txt 2>&1
  grep -E "stalled|cycles_active|inst_exec|duration|dram|registers|occupancy|^1x" $OUT/ncu_d1.txt | awk '$NF+0 > 0.9 || /cycles|inst|duration|^1x|regis|occu/'
fi
