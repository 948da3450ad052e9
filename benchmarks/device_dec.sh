#!/usr/bin/env bash
# One device call (carry .whl): Marlin tests (+ the backend-ops suite with every 4-bit weight in
# the Marlin layout), the decode-kernel micro rows, the synthetic Llama-8B with each policy.
#   bash benchmarks/device_dec.sh [tests] [backend] [micro] [sweep] [pdl] [model]
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
what="${*:-tests backend micro model}"
if [[ " $what " == *" model "* ]]; then
  ( python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 & )
fi
if [[ " $what " == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_marlin.py 2>&1 | tee $OUT/tests.log | grep -E "passed|failed|Error|assert" | tail -8
fi
if [[ " $what " == *" backend "* ]]; then
  GGFLAT_MARLIN=all timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_backend_ops.py 2>&1 | tee $OUT/backend.log | grep -E "passed|failed|Error|assert" | tail -8
fi
if [[ " $what " == *" micro "* ]]; then
  extra=""; [[ " $what " == *" sweep "* ]] && extra="--sweep"
  timeout 240 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1,4,16,32,64 --layer $extra 2>&1 | tee $OUT/micro.md | grep -v "^$"
fi
if [[ " $what " == *" pdl "* ]]; then
  timeout 100 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1,16,64 --layer --pdl 2>&1 | tee $OUT/micro_pdl.md | grep "^|"
fi
if [[ " $what " == *" model "* ]]; then
  while pgrep -f make_synthetic >/dev/null; do sleep 2; done; tail -1 $OUT/synth.log
  for pol in auto all; do
    echo "## GGFLAT_MARLIN=$pol"
    GGFLAT_MARLIN=$pol timeout 150 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 512 -n 128 -r 3 2>&1 | grep -E "^\|" | tail -2
  done 2>&1 | tee $OUT/bench_8b.md
fi
