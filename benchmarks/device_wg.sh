#!/usr/bin/env bash
# One device call (carry .whl): the warpgroup (wgmma) kernels' test, then timed points against
# the mma.sync kernels on the issue's shapes (POINTS overrides the list).
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
timeout 300 python3 -m pytest -x -q tests/test_marlin.py -k "warpgroup" 2>&1 | tail -15 | tee $OUT/wg_test.txt
P="${POINTS:-16x4096x14336:d2:default 16x4096x14336:w16:default 32x4096x14336:m2:default 32x4096x14336:w32:default 64x4096x14336:m2:default 64x4096x14336:w64:default 64x14336x4096:m2:default 64x14336x4096:w64:default 64x4096x4096:m2:default 64x4096x4096:w64:default 16x4096x4096:w16:default 128x4096x14336:w64:default}"
timeout 240 python3 benchmarks/bench_points.py --type "${TYPE:-Q4_0}" $P 2>&1 | tee $OUT/wg_points.txt
if [ -n "${NCU_CASES:-}" ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for c in $NCU_CASES; do
    shape=${c%%:*}; cfg=${c#*:}
    timeout 120 $NCU --clock-control none -k regex:marlin_q --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
      python3 benchmarks/ncu_marlin.py --cases $shape --a f16 --config $cfg > $OUT/ncu_$cfg.txt 2>&1
    grep -E "Duration|DRAM Throughput|Issued Warp|Eligible Warps|hmma|inst_executed|Achieved Active|Warp Cycles Per Issued" $OUT/ncu_$cfg.txt | head -12
    grep "issue_stalled" $OUT/ncu_$cfg.txt | awk '$NF+0 > 0.05 {print $1, $NF}' | sed "s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//"
  done
fi
