#!/usr/bin/env bash
# One device call: bench/attention_backends.py (SDPA backends at the 1B and 8B attention shapes).
# Results come back as $OUT/results.tgz.
source bench/gpu_env.sh
timeout ${ATTN_S:-200} python3 bench/attention_backends.py --out $RES > $RES/attention.log 2>&1
cut -c1-700 $RES/attention.log | grep -v Warning | tail -n 20
tar czf $OUT/results.tgz -C $RES .
