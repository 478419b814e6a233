#!/usr/bin/env bash
# One device call: GPU tests ($TESTS); bench/memory_peak.py at 1B QLoRA batch 4 with graphs on, tracing the step
# where the layer graphs are captured (--warmup 1) and a later step under the expandable-segments allocator;
# bench/train_step.py with graphs on, default allocator vs PYTORCH_ALLOC_CONF=expandable_segments:True, and HF +
# PEFT (default allocator), one process each; bench/profile_step.py of fastlm's graphed step. $OUT/results.tgz.
source bench/gpu_env.sh
EXPANDABLE="expandable_segments:True"
if [ -n "${TESTS:-}" ]; then
  timeout ${TESTS_S:-170} python3 -m pytest -q -rfEs -p no:cacheprovider --timeout 100 $TESTS > $RES/tests.log 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|Error" $RES/tests.log | cut -c1-300 | tail -n 25
fi
summary() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(k, d[k]) for k in d]" "$1" 2>&1 | cut -c1-700; }
FASTLM_CUDA_GRAPHS=1 timeout 90 python3 bench/memory_peak.py --out $RES/capture --warmup 1 > $RES/mem_capture.log 2>&1
summary $RES/capture/memory_peak_1b_qlora_fastlm.json
PYTORCH_ALLOC_CONF=$EXPANDABLE timeout 90 python3 bench/memory_peak.py --out $RES/expandable > $RES/mem_expandable.log 2>&1
summary $RES/expandable/memory_peak_1b_qlora_fastlm.json
tar czf $OUT/results.tgz -C $RES .
for run in default expandable hf; do
  conf=$([ "$run" = expandable ] && echo $EXPANDABLE || echo "")
  impl=$([ "$run" = hf ] && echo hf || echo fastlm)
  env ${conf:+PYTORCH_ALLOC_CONF=$conf} timeout 80 python3 bench/train_step.py --out $RES/train_$run --shape 1b \
    --variants qlora --batch 4 --steps 8 --impls $impl > $RES/train_$run.log 2>&1
  echo "$run $(grep '^{' $RES/train_$run.log | cut -c1-600)"; grep -E "Error" $RES/train_$run.log | tail -n 3 | cut -c1-300
  tar czf $OUT/results.tgz -C $RES .
done
timeout 100 python3 bench/profile_step.py --out $RES --shape 1b --variant qlora --batch 4 --impls fastlm > $RES/profile.log 2>&1
tail -n 30 $RES/profile.log | cut -c1-200
tar czf $OUT/results.tgz -C $RES .
