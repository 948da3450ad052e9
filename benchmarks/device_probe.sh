#!/usr/bin/env bash
# One device call (carry .whl): where a Marlin launch's time goes (probe variants, the read floor with
# grid-strided vs warp-blocked streams) and a per-kernel profile of one 8B decode step.
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
( python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 & )
timeout 60 python3 benchmarks/bench_floor.py --mb 9.4,33 2>&1 | tee $OUT/floor.md | grep "|"
timeout 150 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1,16 --sweep 2>&1 | tee $OUT/micro.md | grep -E "sweep|probe"
while pgrep -f make_synthetic >/dev/null; do sleep 2; done
timeout 240 $NCU --clock-control none --cache-control none --metrics gpu__time_duration.sum --print-summary per-kernel python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 2 -r 1 > $OUT/ncu_decode.txt 2>&1; echo "ncu rc $?"
grep -E "^\s+[a-z_0-9]+.*\(|gpu__time_duration|Invocations" $OUT/ncu_decode.txt | head -5
