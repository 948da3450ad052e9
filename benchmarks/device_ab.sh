#!/usr/bin/env bash
# One device call (carry .whl): the synthetic Llama-8B decode under switches, to place a difference
# (each line: tg128 with the given environment), and a per-kernel profile of two decode steps.
set -u
source benchmarks/device_setup.sh >/dev/null || exit 1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
# (kept on the machine while it stays warm: a second call reuses it)
[ -s /tmp/llama8b-q4_0.gguf ] || python3 benchmarks/make_synthetic.py --shape llama3-8b --type Q4_0 -o /tmp/llama8b-q4_0.gguf > $OUT/synth.log 2>&1
# ENVS: ";"-separated environments to compare (default below)
ENVS="${ENVS:-GGFLAT_MARLIN=auto;GGFLAT_MARLIN=auto GGFLAT_CUDA_FUSE=1;GGFLAT_MARLIN=auto GGFLAT_MARLIN_DEC=0;GGFLAT_MARLIN=auto GGFLAT_PDL=0;GGFLAT_MARLIN=off;GGFLAT_MARLIN=all}"
IFS=';' read -ra LIST <<< "$ENVS"
for envs in "${LIST[@]}"; do
  r=$(env $envs timeout 100 python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 128 -r 3 2>&1 | grep tg128 | awk -F'|' '{print $(NF-1)}')
  echo "$envs: $r"
done | tee $OUT/ab.md
[ -n "${NCU_ENV+x}" ] && env $NCU_ENV timeout 200 $NCU --clock-control none --cache-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  python3 -m cli.main bench -m /tmp/llama8b-q4_0.gguf --backend cupy -p 0 -n 2 -r 1 > $OUT/ncu_decode.txt 2>&1
[ -n "${NCU_ENV+x}" ] && python3 - <<'PY'
import os, re
txt = open(os.environ["OUT"] + "/ncu_decode.txt").read()
rows = []
for b in re.split(r"\n  (?=\S+ \()", txt)[1:]:
    m = re.match(r"(\S+) \(([^)]*)\)x\(([^)]*)\).*Invocations (\d+)", b)
    d = re.search(r"gpu__time_duration.sum\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", b)
    if m and d:
        f = {"ns": 1e-3, "us": 1, "ms": 1e3}[d.group(1)]
        rows.append((int(m.group(4)) * float(d.group(4)) * f, m.group(1), m.group(2), int(m.group(4)), float(d.group(4)) * f))
for r in sorted(rows, reverse=True)[:16]:
    print(f"{r[0]:9.1f} us {r[3]:5d} x {r[4]:7.2f}  {r[1]} {r[2]}")
PY
