#!/usr/bin/env bash
# One device call: bench/memory_peak.py for fastlm with decoder-layer CUDA graphs on and off ($CASES entries
# "shape:variant:batch"); JSON and logs come back as $OUT/results.tgz.
source bench/gpu_env.sh
for case in ${CASES:-1b:qlora:4}; do
  IFS=: read shape variant batch <<< "$case"
  for graphs in 1 0; do
    FASTLM_CUDA_GRAPHS=$graphs timeout ${RUN_S:-90} python3 bench/memory_peak.py --out $RES/${shape}_${variant}_g$graphs \
      --shape $shape --variant $variant --batch $batch > $RES/mem_${shape}_${variant}_g$graphs.log 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(k, d[k]) for k in d]" \
      $RES/${shape}_${variant}_g$graphs/memory_peak_${shape}_${variant}_fastlm.json 2>&1 | cut -c1-900
    tar czf $OUT/results.tgz -C $RES .
  done
done
