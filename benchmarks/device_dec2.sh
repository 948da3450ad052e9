#!/usr/bin/env bash
# (carry .whl) Marlin tests, then the 8B A/B of the policies with a per-kernel profile of "all".
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_marlin.py 2>&1 | tee $OUT/tests.log | grep -E "passed|failed|Error|assert" | tail -6
ENVS="GGFLAT_MARLIN=auto;GGFLAT_MARLIN=all;GGFLAT_MARLIN=auto;GGFLAT_MARLIN=all" NCU_ENV="GGFLAT_MARLIN=all" bash benchmarks/device_ab.sh
