#!/usr/bin/env bash
# One device call: GPU tests ($TESTS); then fastlm's training step at 1B QLoRA batch 4 for each
# MLP_ROW_BLOCK_ELEMENTS = 2^N in $BLOCKS (30: one block, the whole batch's rows) and HF + PEFT, one process
# each; bench/memory_peak.py with the default block. Results come back as $OUT/results.tgz.
source bench/gpu_env.sh
if [ -n "${TESTS:-}" ]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -rfEs -p no:cacheprovider --timeout 100 $TESTS > $RES/tests.log 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|Error" $RES/tests.log | cut -c1-300 | tail -n 25
  tar czf $OUT/results.tgz -C $RES .
fi
SHAPE=${SHAPE:-1b}; VARIANT=${VARIANT:-qlora}; BATCH=${BATCH:-4}
for run in ${BLOCKS:-24 23 25 30} hf; do
  if [ "$run" = hf ]; then args="--impls hf"; else args="--impls fastlm --mlp-block-log2 $run"; fi
  timeout ${RUN_S:-80} python3 bench/train_step.py --out $RES/train_$run --shape $SHAPE --variants $VARIANT \
    --batch $BATCH --steps 8 $args > $RES/train_$run.log 2>&1
  echo "$run $(grep '^{' $RES/train_$run.log | cut -c1-640)"; grep -E "Error" $RES/train_$run.log | tail -n 3 | cut -c1-300
  tar czf $OUT/results.tgz -C $RES .
done
if [ -n "${MEMORY:-1}" ]; then
  timeout 90 python3 bench/memory_peak.py --out $RES/memory --shape $SHAPE --variant $VARIANT --batch $BATCH \
    > $RES/memory.log 2>&1
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(k, d[k]) for k in d]" \
    $RES/memory/memory_peak_${SHAPE}_${VARIANT}_fastlm.json 2>&1 | cut -c1-900
fi
tar czf $OUT/results.tgz -C $RES .
