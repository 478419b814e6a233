#!/usr/bin/env bash
# One device call: where the training step's host time goes. Host microseconds per launch
# (bench/launch_overhead.py) and cProfile of the 8B and 1B fastlm steps' Python (train_step.py --cprofile).
# (Run 15 also ran an A/B of two trees here; that is now bench/gpu_compare.sh's AB_OLD.) Results come back as
# $OUT/results.tgz.
source bench/gpu_env.sh
timeout ${LO_S:-60} python3 bench/launch_overhead.py --out $RES > $RES/launch_overhead.log 2>&1; tail -n 12 $RES/launch_overhead.log | cut -c1-200
for shape in 8b 1b; do
  batch=$([ $shape = 8b ] && echo 2 || echo 4)
  timeout ${CP_S:-100} python3 bench/train_step.py --out $RES --shape $shape --variants qlora --batch $batch --steps 4 \
    --impls fastlm --cprofile > $RES/cprofile_$shape.log 2>&1; grep "^{" $RES/cprofile_$shape.log | cut -c1-200
done
tar czf $OUT/results.tgz -C $RES .
