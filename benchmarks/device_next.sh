#!/usr/bin/env bash
# Everything that waits for the H100, in one device call of under 10 minutes (carry .whl):
#   bash benchmarks/device_next.sh
# Written in session 11, when no device machine could be started. In order of what it decides, each
# step time-boxed so that the later ones still run if one hangs; every result lands in $OUT:
#   1. wgmma_rate.txt   x64's consumer shape alone (session 10's question: tensor pipe or one chain?)
#   2. tests.log        the GPU tests of the attention prefetch and q-first builds, and the tiny
#                       models through the grouped/prefetching decode
#   3. ab.md            tg128 of the synthetic 8B, interleaved: main, GGFLAT_ATTN_PF=16,
#                       GGFLAT_ATTN_PF=16 + GGFLAT_ATTN_QFIRST=1 (ROUNDS rounds, default 3)
#   4. points.txt       x64 with the engine's f32 activations against m2 (session 9's item 3)
#   5. trace.txt        the decode timeline, PDL on, main against both switches (is o's loop shorter?)
# ROUNDS, SKIP_TRACE=1 and SKIP_POINTS=1 shorten it. The trace builds compile marlin.cu again (~1-2
# minutes), so the trace runs only where 160 s are left; a second call on the warm machine can take it.
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
T0=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - T0) )); }          # seconds of the call's 10 minutes still free
SYNTH=
if [ ! -s /tmp/llama8b-q4_0.gguf ]; then
  python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 &
  SYNTH=$!
fi
timeout 30 python3 benchmarks/wgmma_rate.py > $OUT/wgmma_rate.txt 2>&1
cat $OUT/wgmma_rate.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_attention.py tests/test_backend_ops.py \
  -k "prefetch or tiny_model_grouped or fused_decode or graph_decode_replay" > $OUT/tests.log 2>&1
grep -E "passed|failed|Error" $OUT/tests.log | tail -4
[ -n "$SYNTH" ] && wait $SYNTH
CONFIGS="- GGFLAT_ATTN_PF=16 GGFLAT_ATTN_PF=16,GGFLAT_ATTN_QFIRST=1"
envof() { [ "$1" = "-" ] && echo "" || echo "$1" | tr ',' ' '; }
for r in $(seq ${ROUNDS:-3}); do
  for c in $CONFIGS; do
    [ "$(left)" -lt 60 ] && break 2
    v=$(env $(envof "$c") timeout 100 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 2>&1 \
        | grep tg128 | awk -F'|' '{print $(NF-1)}')
    echo "round $r $c: $v"
  done
done | tee $OUT/ab.md
if [ "${SKIP_POINTS:-0}" != 1 ] && [ "$(left)" -gt 60 ]; then
  timeout 50 python3 benchmarks/bench_points.py --type Q4_0 --a f32 64x4096x14336:x64:default 64x4096x14336:m2:default \
    64x14336x4096:x64:default 64x14336x4096:m2:default 2>&1 | tee $OUT/points.txt
fi
if [ "${SKIP_TRACE:-0}" != 1 ]; then
  for c in - GGFLAT_ATTN_PF=16,GGFLAT_ATTN_QFIRST=1; do
    [ "$(left)" -lt 160 ] && { echo "(no time left for the trace: SKIP_POINTS=1 ROUNDS=2 make room)"; break; }
    echo "== $c PDL=1"
    env $(envof "$c") GGFLAT_PDL=1 timeout 150 python3 benchmarks/trace_decode.py -m /tmp/llama8b-q4_0.gguf 2>&1 | tail -24
  done | tee $OUT/trace.txt
fi
echo "used $(( $(date +%s) - T0 )) s"
