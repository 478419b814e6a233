#!/usr/bin/env bash
# One device call: GPU tests ($TESTS, optional), then fastlm's training step for each
# "shape:variant:batch:extra-args[:env]" entry of $RUNS (extra args with commas for spaces, e.g.
# 1b:qlora:4:--ce-chunk-mib,128; extra args starting with "hf" run HF + PEFT instead; env: NAME=VALUE pairs with commas, set
# for that process, e.g. 1b:qlora:4::FASTLM_LENGTH_BUCKETS=0), one process each, $STEPS timed steps
# after 3 warm-up ones (issue 4's protocol: 10). Results come back as $OUT/results.tgz.
source bench/gpu_env.sh
if [ -n "${TESTS:-}" ]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -rfEs -p no:cacheprovider --timeout 100 $TESTS > $RES/tests.log 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|Error" $RES/tests.log | cut -c1-300 | tail -n 25
  tar czf $OUT/results.tgz -C $RES .
fi
i=0
for entry in ${RUNS:-}; do
  IFS=: read shape variant batch extra envs <<< "$entry"
  extra=${extra//,/ }; envs=${envs//,/ }
  if [ "${extra%% *}" = hf ]; then args="--impls hf ${extra#hf}"; else args="--impls fastlm $extra"; fi
  i=$((i + 1))
  env $envs timeout ${RUN_S:-100} python3 bench/train_step.py --out $RES/run$i --shape $shape --variants $variant \
    --batch $batch --steps ${STEPS:-8} $args > $RES/run$i.log 2>&1
  echo "$i $entry $(grep '^{' $RES/run$i.log | cut -c1-700)"; grep -E "Error" $RES/run$i.log | tail -n 3 | cut -c1-300
  tar czf $OUT/results.tgz -C $RES .
done
