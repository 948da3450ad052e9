#!/usr/bin/env bash
# One device call (carry .whl): build-time / run-time switches of the Marlin path compared on the
# synthetic 8B, each config an environment assignment list ("-" for none):
#   CONFIGS="- GGFLAT_MARLIN_ACOAL=1 GGFLAT_MARLIN_ACOAL=1,GGFLAT_MARLIN_PREALL=1" bash benchmarks/device_envs.sh
# TESTK / TESTENV / TESTF: tests to run first (-k TESTK; "all" for every test) of TESTF (default
# tests/test_marlin.py) under TESTENV; TRACE=1: trace_decode.py's
# timeline (PDL on and off: TRACE_PDL) under every config (or TRACE_CONFIGS) after tg128 under every config, interleaved, ROUNDS times.
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
SYNTH=
if [ ! -s /tmp/llama8b-q4_0.gguf ]; then
  python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 &
  SYNTH=$!
fi
CONFIGS="${CONFIGS:--}"
envof() { [ "$1" = "-" ] && echo "" || echo "$1" | tr ',' ' '; }
if [ -n "${TESTK:-}" ]; then
  K=(-k "$TESTK"); [ "$TESTK" = all ] && K=()
  env $(envof "${TESTENV:--}") timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider ${TESTF:-tests/test_marlin.py} "${K[@]}" 2>&1 \
    | tee $OUT/tests.log | grep -E "passed|failed|Error" | tail -8
fi
[ -n "$SYNTH" ] && wait $SYNTH
for r in $(seq ${ROUNDS:-2}); do
  for c in $CONFIGS; do
    v=$(env $(envof "$c") timeout 120 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 2>&1 \
        | grep tg128 | awk -F'|' '{print $(NF-1)}')
    echo "$c: $v"
  done
done | tee $OUT/ab.md
if [ "${TRACE:-0}" = 1 ]; then
  for c in ${TRACE_CONFIGS:-$CONFIGS}; do for pdl in ${TRACE_PDL:-0 1}; do
    echo "== $c PDL=$pdl"
    env $(envof "$c") GGFLAT_PDL=$pdl timeout 150 python3 benchmarks/trace_decode.py -m /tmp/llama8b-q4_0.gguf 2>&1 | tail -24
  done; done | tee $OUT/trace.txt
fi
