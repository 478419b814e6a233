#!/usr/bin/env bash
# One device call: GPU tests ($TESTS), then fastlm's training step with decoder-layer CUDA graphs on and off
# (FASTLM_CUDA_GRAPHS=1/0) in alternating processes, the first setting repeated at the end (the spread between
# repeats is the drift), and HF + PEFT once, for each $CASES entry "shape:variant:batch:steps".
# Results come back as $OUT/results.tgz.
source bench/gpu_env.sh
if [ -n "${TESTS:-}" ]; then
  timeout ${TESTS_S:-150} python3 -m pytest -q -rfEs -p no:cacheprovider --timeout 100 $TESTS > $RES/tests.log 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|Error" $RES/tests.log | cut -c1-300 | tail -n 25
fi
for case in ${CASES:-1b:qlora:4:8}; do
  IFS=: read shape variant batch steps <<< "$case"
  for run in g1 g0 hf g1b; do
    case $run in g0) graphs=0 ;; *) graphs=1 ;; esac
    impl=$([ "$run" = hf ] && echo hf || echo fastlm)
    FASTLM_CUDA_GRAPHS=$graphs timeout ${RUN_S:-80} python3 bench/train_step.py --out $RES/${shape}_${variant}_$run \
      --shape $shape --variants $variant --batch $batch --steps $steps --impls $impl > $RES/${shape}_${variant}_$run.log 2>&1
    echo "$run $(grep '^{' $RES/${shape}_${variant}_$run.log | cut -c1-420)"
    grep -E "Error|error" $RES/${shape}_${variant}_$run.log | tail -n 3 | cut -c1-300
    tar czf $OUT/results.tgz -C $RES .  # after every run: a call cut short still returns what it measured
  done
done
tar czf $OUT/results.tgz -C $RES .
