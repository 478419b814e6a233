#!/usr/bin/env bash
# One device call: the whole GPU test suite (fast-path and kernel tests first), then the Llama-3.1-8B QLoRA step
# with each implementation in its own process (clean memory figures). Results come back as $OUT/results.tgz.
source bench/gpu_env.sh
CORE="tests/kernels tests/test_patching.py tests/test_fused_lora.py tests/test_offload_checkpointing.py tests/test_architectures.py"
timeout ${CORE_S:-200} python3 -m pytest -q -rfE -p no:cacheprovider --timeout 100 $CORE > $RES/tests_core.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $RES/tests_core.log | cut -c1-240 | tail -n 20
timeout ${REST_S:-110} python3 -m pytest -q -rfE -p no:cacheprovider --timeout 60 --ignore=tests/test_smollm2.py \
  $(for f in $CORE; do echo --ignore=$f; done) tests > $RES/tests_rest.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $RES/tests_rest.log | cut -c1-240 | tail -n 20
for impl in hf fastlm; do
  timeout ${T8_S:-120} python3 bench/train_step.py --out $RES --shape 8b --variants qlora --batch 2 --steps 5 --impls $impl > $RES/train_step_8b_$impl.log 2>&1
  grep "^{" $RES/train_step_8b_$impl.log | cut -c1-330
done
tar czf $OUT/results.tgz -C $RES .
