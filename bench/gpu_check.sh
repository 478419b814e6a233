#!/usr/bin/env bash
# One device call: unpack carried packages, run the tests on the GPU, then the kernel benchmark.
#   bash bench/gpu_check.sh [pytest paths...]      (env OPS=rms_norm,swiglu restricts the benchmark)
# Logs and results go to $OUT (tests.log, kernels.json, kernels.md, bench.log).
set -u
mkdir -p /tmp/site && tar xzf .device/site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
TESTS=${*:-tests}
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rfE --maxfail=30 --ignore=tests/test_smollm2.py -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 bench/kernels.py --out "$OUT" ${OPS:+--ops $OPS} > "$OUT/bench.log" 2>&1
  tail -n 60 "$OUT/bench.log"
fi
