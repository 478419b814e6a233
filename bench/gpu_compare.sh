#!/usr/bin/env bash
# One device call: GPU tests ($TESTS), then the training step of this tree against an older one (AB_OLD: an
# untracked folder holding that tree's fastlm/ and bench/, carried with the working tree) at 1B QLoRA in
# alternating processes (old, new, old, new: the spread between repeats is the drift), then fastlm vs HF + PEFT
# at 1B (QLoRA, LoRA bf16; batch 4) and 8B (QLoRA, batch 2), each implementation in its own process.
# Results come back as $OUT/results.tgz. Budget ~9.5 minutes.
source bench/gpu_env.sh
if [ -n "${TESTS:-}" ]; then
  timeout ${TESTS_S:-150} python3 -m pytest -q -rfEs -p no:cacheprovider --timeout 100 $TESTS > $RES/tests.log 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" $RES/tests.log | cut -c1-250 | tail -n 15
fi
if [ -n "${AB_OLD:-}" ]; then
  for round in 1 2; do
    for tree in $AB_OLD .; do
      name=$([ "$tree" = . ] && echo new || echo old)
      timeout ${AB_S:-60} python3 $tree/bench/train_step.py --out $RES/ab_${name}_$round --shape 1b --variants qlora \
        --steps 8 --impls fastlm > $RES/ab_${name}_$round.log 2>&1
      echo "$name $round $(grep '^{' $RES/ab_${name}_$round.log | cut -c1-150)"
    done
  done
fi
for variant in qlora lora16; do
  for impl in hf fastlm; do
    timeout ${T1_S:-50} python3 bench/train_step.py --out $RES --shape 1b --variants $variant --steps 8 --impls $impl \
      > $RES/train_1b_${variant}_$impl.log 2>&1; grep "^{" $RES/train_1b_${variant}_$impl.log | cut -c1-330
  done
done
for impl in hf fastlm; do
  timeout ${T8_S:-80} python3 bench/train_step.py --out $RES --shape 8b --variants qlora --batch 2 --steps 5 --impls $impl \
    > $RES/train_8b_$impl.log 2>&1; grep "^{" $RES/train_8b_$impl.log | cut -c1-330
done
tar czf $OUT/results.tgz -C $RES .
