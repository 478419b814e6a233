#!/usr/bin/env bash
# One device call: bench/ablate_step.py (with the Python garbage-collector settings) at 1B QLoRA and LoRA bf16
# and at 8B QLoRA. Results come back as $OUT/results.tgz. ~4.5 minutes.
source bench/gpu_env.sh
for variant in qlora lora16; do
  timeout 100 python3 bench/ablate_step.py --out $RES --shape 1b --variant $variant --steps 8 > $RES/ablate_1b_$variant.log 2>&1; grep "^{" $RES/ablate_1b_$variant.log
done
timeout ${T8_S:-200} python3 bench/ablate_step.py --out $RES --shape 8b --variant qlora --batch 2 --steps 5 > $RES/ablate_8b.log 2>&1; grep "^{" $RES/ablate_8b.log
tar czf $OUT/results.tgz -C $RES .
