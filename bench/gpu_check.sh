#!/usr/bin/env bash
# One device call: unpack carried packages, run the tests on the GPU, then the kernel benchmark.
#   bash bench/gpu_check.sh [pytest paths...]      (env OPS=rms_norm,swiglu restricts the benchmark)
# Logs and results go to $OUT (tests.log, kernels.json, kernels.md, bench.log).
OUT=${OUT:-/tmp/out}; RES=$OUT  # this script's files come back one by one, not packed
source bench/gpu_env.sh
cat "$OUT/gpu.txt"
TESTS=${*:-tests}
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rfE --maxfail=30 --ignore=tests/test_smollm2.py -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 bench/kernels.py --out "$OUT" ${OPS:+--ops $OPS} > "$OUT/bench.log" 2>&1
  tail -n 60 "$OUT/bench.log"
fi
