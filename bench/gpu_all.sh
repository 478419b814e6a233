#!/usr/bin/env bash
# One device call for everything that needs the GPU: the test suite (fast-path and kernel tests first), then the
# training-step, offloaded-checkpointing, fused-LoRA and RMSNorm benchmarks. Logs and JSON go to /tmp/res and
# come back as $OUT/results.tgz (the device tool returns at most 8 files). Budget ~9 minutes.
source bench/gpu_env.sh
CORE="tests/kernels tests/test_patching.py tests/test_fused_lora.py tests/test_offload_checkpointing.py tests/test_architectures.py"
timeout ${CORE_S:-220} python3 -m pytest -q -rfE -p no:cacheprovider --timeout 120 $CORE > $RES/tests_core.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $RES/tests_core.log | tail -n 30
timeout ${REST_S:-110} python3 -m pytest -q -rfE -p no:cacheprovider --timeout 60 --ignore=tests/test_smollm2.py \
  $(for f in $CORE; do echo --ignore=$f; done) tests > $RES/tests_rest.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $RES/tests_rest.log | tail -n 20
timeout ${TRAIN_S:-110} python3 bench/train_step.py --out $RES --shape 1b --steps 6 > $RES/train_step.log 2>&1; tail -n 6 $RES/train_step.log
timeout ${OFFLOAD_S:-60} python3 bench/offload_checkpointing.py --out $RES --steps 4 > $RES/offload.log 2>&1; tail -n 6 $RES/offload.log
timeout ${LORA_S:-40} python3 bench/fused_lora.py --out $RES > $RES/fused_lora.log 2>&1; tail -n 12 $RES/fused_lora.log
timeout ${RMS_S:-30} python3 bench/kernels.py --ops rms_norm --out $RES > $RES/rms.log 2>&1; grep -E "fastlm|compile|liger" $RES/rms.log | tail -n 12
tar czf $OUT/results.tgz -C $RES .
