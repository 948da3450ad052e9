#!/usr/bin/env bash
# One device session in two calls (64 MiB travel per call; SmolLM2 is 98 MB):
#   call 1: bash benchmarks/device_run.sh part1   (carry .whl .devmodels/a)
#   call 2: bash benchmarks/device_run.sh part2   (carry .whl .devmodels/b)  -- within 30 s of call 1
# .devmodels/{a,b} hold `split -b 50000000 -d SmolLM2-135M-Instruct.Q4_1.gguf smol.part`.
set -u
source benchmarks/device_setup.sh || exit 1
M=/tmp/ggflat-cache/models
SMOL=$M/SmolLM2-135M-Instruct.Q4_1.gguf
case "$1" in
part1)
  cp .devmodels/a/smol.part00 /tmp/smol.part00
  ( python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 & )
  python3 -m pytest -q -p no:cacheprovider tests/test_backend_ops.py tests/test_cuda_quant.py \
      tests/test_cuda_attention.py tests/test_cuda_compile.py 2>&1 | tee $OUT/gpu_tests.log | tail -25
  wait; sleep 1; while pgrep -f make_synthetic >/dev/null; do sleep 2; done; cat $OUT/synth.log
  ;;
part2)
  cat /tmp/smol.part00 .devmodels/b/smol.part01 > $SMOL && md5sum $SMOL
  export GGFLAT_TEST_MODEL_SMOLLM2=$SMOL GGFLAT_TEST_BACKEND=cupy
  python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_backend_ops.py::test_smollm2_matches_numpy \
      -k "smollm2 or prefill_equals" 2>&1 | tee $OUT/model_tests.log | tail -15
  python3 -m cli.main generate -m $SMOL --backend cupy -p "The capital of France is" --temp 0 -n 32
  python3 -m cli.main bench -m $SMOL --backend cupy -p 512 -n 128 -r 5 | tee $OUT/bench_smol.md
  ls -la /tmp/llama8b-q4_0.gguf
  python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 512 -n 128 -r 3 | tee $OUT/bench_8b.md
  python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -d 8192 -r 3 | tee $OUT/bench_8b_d8192.md
  ;;
esac
