#!/usr/bin/env bash
# One device call (carry .whl): the launch/streaming floor, Nsight Compute on the Marlin kernels,
# and the Marlin micro rows for M = 1, 16, 64 on the same machine.
set -u
source benchmarks/device_setup.sh || exit 1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 120 python3 benchmarks/bench_floor.py 2>&1 | tee $OUT/floor.md
timeout 60 python3 benchmarks/bench_floor.py --pdl --mb 9.4,33 2>&1 | tee -a $OUT/floor.md
M="gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers"
timeout 150 $NCU --clock-control none -k regex:marlin_q --metrics $M python3 benchmarks/ncu_marlin.py > $OUT/ncu.txt 2>&1; echo ncu rc $?
grep -E "^[0-9]+x|marlin_q|duration|dram__|grid_size|registers|warps_active|occupancy" $OUT/ncu.txt | head -120
timeout 100 $NCU --clock-control none -k regex:read_floor --launch-skip 200 --launch-count 2 --metrics $M python3 benchmarks/bench_floor.py --mb 33 > $OUT/ncu_floor.txt 2>&1
grep -E "read_floor|duration|dram__" $OUT/ncu_floor.txt | head -20
for c in 1x4096x14336 64x4096x14336; do
  timeout 120 $NCU --clock-control none -k regex:marlin_q --launch-skip 1 --launch-count 1 --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy --section SpeedOfLight python3 benchmarks/ncu_marlin.py --cases $c > $OUT/ncu_detail_$c.txt 2>&1
done
timeout 150 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1,16,64 2>&1 | tee $OUT/marlin.md
