#!/usr/bin/env bash
# One device call: the 1B training step with each implementation in its own process, the ablation of fastlm's
# training-path features (bench/ablate_step.py) for QLoRA and LoRA bf16, and the 1B QLoRA profile. ~5 minutes.
source bench/gpu_env.sh
timeout 60 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fused_lora.py -k "adapter_directory or offloaded" > $RES/tests.log 2>&1; tail -n 2 $RES/tests.log
for impl in fastlm hf; do
  timeout 100 python3 bench/train_step.py --out $RES --shape 1b --steps 6 --impls $impl > $RES/train_step_1b_$impl.log 2>&1
  grep "^{" $RES/train_step_1b_$impl.log | cut -c1-330
done
for variant in qlora lora16; do
  timeout 100 python3 bench/ablate_step.py --out $RES --shape 1b --variant $variant > $RES/ablate_$variant.log 2>&1; grep "^{" $RES/ablate_$variant.log
done
timeout 60 python3 bench/profile_step.py --out $RES --shape 1b --variant qlora --batch 4 --impls fastlm > $RES/profile1b.log 2>&1; grep -v "^ \|Loading" $RES/profile1b.log | tail -n 28
tar czf $OUT/results.tgz -C $RES .
