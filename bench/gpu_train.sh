#!/usr/bin/env bash
# One device call for the training path: the GPU tests of the fused-LoRA / fast-path / checkpointing code, then
# bench/train_step.py at the 1B shape (QLoRA and LoRA bf16, batch 4) and the 8B shape (QLoRA, batch 2), then the
# 8B fastlm profile. Logs and JSON go to /tmp/res and come back as $OUT/results.tgz. Budget ~9.5 minutes.
source bench/gpu_env.sh
TESTS="tests/kernels/test_lora.py tests/kernels/test_rms_norm.py tests/test_patching.py tests/test_fused_lora.py tests/test_offload_checkpointing.py tests/test_training_exact.py tests/test_loading.py"
timeout ${TESTS_S:-170} python3 -m pytest -q -s -rfE -p no:cacheprovider --timeout 100 $TESTS > $RES/tests.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|bf16-parity|offload-memory" $RES/tests.log | cut -c1-250 | tail -n 24
timeout ${T1_S:-120} python3 bench/train_step.py --out $RES --shape 1b --steps 6 > $RES/train_step_1b.log 2>&1; grep -v "^ \|Loading" $RES/train_step_1b.log | tail -n 6
timeout ${T8_S:-170} python3 bench/train_step.py --out $RES --shape 8b --variants qlora --batch 2 --steps 5 > $RES/train_step_8b.log 2>&1; grep -v "^ \|Loading" $RES/train_step_8b.log | tail -n 4
timeout ${P8_S:-90} python3 bench/profile_step.py --out $RES --shape 8b --variant qlora --batch 2 --impls fastlm > $RES/profile8b.log 2>&1; grep -v "^ \|Loading" $RES/profile8b.log | tail -n 30
tar czf $OUT/results.tgz -C $RES .
