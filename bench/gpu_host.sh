#!/usr/bin/env bash
# One device call: where the training step's host time goes. Host microseconds per launch
# (bench/launch_overhead.py), cProfile of the 8B and 1B fastlm steps' Python (train_step.py --cprofile), and,
# when AB_OLD names an older tree holding fastlm/ and bench/ (untracked, carried with the working tree), the 1B
# QLoRA step of that tree against this one in alternating processes (old, new, old, new: drift shows as the
# spread between repeats). Results come back as $OUT/results.tgz.
source bench/gpu_env.sh
timeout ${LO_S:-60} python3 bench/launch_overhead.py --out $RES > $RES/launch_overhead.log 2>&1; tail -n 12 $RES/launch_overhead.log | cut -c1-200
if [ -n "${AB_OLD:-}" ]; then
  for round in 1 2; do
    for tree in $AB_OLD .; do
      name=$([ "$tree" = . ] && echo new || echo old)
      timeout ${AB_S:-75} python3 $tree/bench/train_step.py --out $RES/ab_${name}_$round --shape 1b --variants qlora \
        --steps 8 --impls fastlm > $RES/ab_${name}_$round.log 2>&1
      echo "$name $round $(grep '^{' $RES/ab_${name}_$round.log | cut -c1-200)"
    done
  done
fi
for shape in 8b 1b; do
  batch=$([ $shape = 8b ] && echo 2 || echo 4)
  timeout ${CP_S:-100} python3 bench/train_step.py --out $RES --shape $shape --variants qlora --batch $batch --steps 4 \
    --impls fastlm --cprofile > $RES/cprofile_$shape.log 2>&1; grep "^{" $RES/cprofile_$shape.log | cut -c1-200
done
tar czf $OUT/results.tgz -C $RES .
