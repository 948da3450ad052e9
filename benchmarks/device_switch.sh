#!/usr/bin/env bash
# One device call (carry .whl): an on/off switch of the Marlin path measured every way at once --
#   SWITCH=GGFLAT_MARLIN_KVFOLD bash benchmarks/device_switch.sh     (any 1/0 switch: _WG, _DEC, _KVFOLD, ...)
# TESTK: the test_marlin.py tests to run first (-k expression; empty: none); POINTS: bench_points.py
# points (Q4_0) under both settings; then one 8B decode layer (bench_marlin.py --layer) under both,
# and the synthetic 8B tg128 with the settings interleaved (AB=0 skips it).
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
SW=${SWITCH:?SWITCH=<environment variable> (set to 1 and 0)}
SYNTH=
if [ "${AB:-1}" = 1 ] && [ ! -s /tmp/llama8b-q4_0.gguf ]; then
  python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 &
  SYNTH=$!
fi
if [ -n "${TESTK:-}" ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_marlin.py -k "$TESTK" 2>&1 \
    | tee $OUT/tests.log | grep -E "passed|failed|Error" | tail -8
fi
POINTS="${POINTS:-1x4096x14336:default:default 1x14336x4096:default:default 1x4096x4096:default:default 1x4096x6144:default:default}"
for v in 1 0; do
  echo "$SW=$v"; env $SW=$v timeout 120 python3 benchmarks/bench_points.py --type Q4_0 $POINTS 2>&1
done | tee $OUT/points.txt
for v in 1 0; do
  echo "$SW=$v"; env $SW=$v timeout 100 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1 --layer 2>&1 | tail -7
done | tee $OUT/layer.txt
if [ "${AB:-1}" = 1 ]; then
  [ -n "$SYNTH" ] && wait $SYNTH
  for v in 1 0 1 0; do
    r=$(env $SW=$v timeout 100 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 2>&1 | grep tg128 | awk -F'|' '{print $(NF-1)}')
    echo "$SW=$v: $r"
  done | tee $OUT/ab.md
fi
