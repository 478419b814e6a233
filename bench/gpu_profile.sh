#!/usr/bin/env bash
# One device call: the GPU tests that failed in run 4 (with their diagnostics printed), the Gemma RMSNorm launch
# sweep, and the training-step profiles (8B QLoRA and 1B LoRA bf16, fastlm and transformers + PEFT). Logs and JSON
# go to /tmp/res and come back as $OUT/results.tgz. Budget ~9 minutes.
source bench/gpu_env.sh
timeout ${TESTS_S:-150} python3 -m pytest -q -s -rfE -p no:cacheprovider --timeout 100 tests/test_offload_checkpointing.py \
  "tests/test_patching.py::test_bf16_parity_on_gpu" "tests/test_loading.py::test_hub_id_from_cache_offline_with_revision" \
  tests/test_fused_lora.py > $RES/tests.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|bf16-parity|offload-memory" $RES/tests.log | tail -n 30
timeout ${TUNE_S:-60} python3 bench/tune_gemma_rms.py --out $RES > $RES/tune_gemma.log 2>&1; tail -n 14 $RES/tune_gemma.log
timeout ${P8_S:-270} python3 bench/profile_step.py --out $RES --shape 8b --variant qlora --batch 2 > $RES/profile8b.log 2>&1; grep -v "^ " $RES/profile8b.log | tail -n 34
timeout ${P1_S:-90} python3 bench/profile_step.py --out $RES --shape 1b --variant lora16 --batch 4 > $RES/profile1b.log 2>&1; tail -n 32 $RES/profile1b.log
tar czf $OUT/results.tgz -C $RES .
