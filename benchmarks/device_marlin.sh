#!/usr/bin/env bash
# One device call for the Marlin GEMM (carry .whl): unit tests, microbenchmark, 8B decode/prefill.
#   bash benchmarks/device_marlin.sh [tests] [micro] [sweep] [model]
set -u
source benchmarks/device_setup.sh || exit 1
what="${*:-tests micro model}"
if [[ " $what " == *" model "* ]]; then
  ( python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 & )
fi
if [[ " $what " == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_marlin.py 2>&1 | tee $OUT/marlin_tests.log | tail -15
fi
if [[ " $what " == *" micro "* ]]; then
  extra=""; [[ " $what " == *" sweep "* ]] && extra="--sweep"
  timeout 300 python3 benchmarks/bench_marlin.py --types Q4_0 --layer $extra --json $OUT/marlin_q4_0.json 2>&1 | tee $OUT/marlin_bench.md
  timeout 120 python3 benchmarks/bench_marlin.py --types Q4_1,Q4_K --ms 1,16,64 2>&1 | tee -a $OUT/marlin_bench.md
fi
if [[ " $what " == *" model "* ]]; then
  while pgrep -f make_synthetic >/dev/null; do sleep 2; done; tail -3 $OUT/synth.log
  timeout 200 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 512 -n 128 -r 3 | tee $OUT/bench_8b.md
  GGFLAT_PDL=0 timeout 100 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 | tee $OUT/bench_8b_nopdl.md
  GGFLAT_MARLIN=off timeout 100 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 512 -n 128 -r 3 | tee $OUT/bench_8b_gguf.md
  timeout 100 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -d 8192 -r 2 | tee $OUT/bench_8b_d8192.md
fi
