#!/usr/bin/env bash
# One device session in three calls (64 MiB travel per call; SmolLM2 is 98 MB):
#   call 1: bash benchmarks/device_run.sh part1   (carry .whl .devmodels/a)  all GPU unit tests
#   call 2: bash benchmarks/device_run.sh part2   (carry .whl .devmodels/b)  -- within 30 s of call 1:
#           real-model tests and whole-model benchmarks
#   call 3: bash benchmarks/device_run.sh part3   (carry .whl)  kernel microbenchmarks
# .devmodels/{a,b} hold `split -b 50000000 -d SmolLM2-135M-Instruct.Q4_1.gguf smol.part`.
set -u
source benchmarks/device_setup.sh || exit 1
M=/tmp/ggflat-cache/models
SMOL=$M/SmolLM2-135M-Instruct.Q4_1.gguf
case "$1" in
part1)
  cp .devmodels/a/smol.part00 /tmp/smol.part00
  ( python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1 & )
  timeout 500 python3 -m pytest -q -p no:cacheprovider tests/test_backend_ops.py tests/test_cuda_quant.py \
      tests/test_cuda_attention.py tests/test_cuda_compile.py tests/test_marlin.py tests/test_cuda_sampling.py \
      2>&1 | tee $OUT/gpu_tests.log | grep -v Warning | tail -25
  while pgrep -f make_synthetic >/dev/null; do sleep 2; done; cat $OUT/synth.log
  ;;
part2)
  cat /tmp/smol.part00 .devmodels/b/smol.part01 > $SMOL && md5sum $SMOL
  export GGFLAT_TEST_MODEL_SMOLLM2=$SMOL GGFLAT_TEST_BACKEND=cupy
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_backend_ops.py::test_smollm2_matches_numpy \
      -k "smollm2 or prefill_equals" 2>&1 | tee $OUT/model_tests.log | tail -6
  # every 4-bit weight through the Marlin kernels: the reference continuations still hold
  GGFLAT_MARLIN=all timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k "smollm2" \
      2>&1 | tee $OUT/model_tests_marlin.log | tail -4
  python3 -m cli.main generate -m $SMOL --backend cupy -p "The capital of France is" --temp 0 -n 32
  python3 -m cli.main generate -m $SMOL --backend cupy -p "Once upon a time" --seed 7 -n 48
  python3 -m cli.main bench -m $SMOL --backend cupy -p 512 -n 128 -r 5 | tee $OUT/bench_smol.md
  python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 512 -n 128 -r 3 | tee $OUT/bench_8b.md
  GGFLAT_MARLIN=off python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 | tee $OUT/bench_8b_gguf.md
  GGFLAT_MARLIN_KVFOLD=0 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 | tee $OUT/bench_8b_nokvfold.md
  GGFLAT_MARLIN_DEC=0 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 | tee $OUT/bench_8b_nodec.md
  python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -d 8192 -r 3 | tee $OUT/bench_8b_d8192.md
  ;;
part3)
  timeout 330 python3 benchmarks/bench_marlin.py --types Q4_0,Q4_1,Q4_K --layer --json $OUT/marlin.json 2>&1 | tee $OUT/marlin_bench.md
  timeout 100 python3 benchmarks/bench_marlin.py --types Q4_0 --ms 1,16,64 --layer --pdl 2>&1 | tee $OUT/marlin_pdl.md
  timeout 60 python3 benchmarks/bench_floor.py --mb 9.4,14.2,33,66 2>&1 | tee $OUT/floor.md
  ;;
esac
