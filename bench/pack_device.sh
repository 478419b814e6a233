#!/usr/bin/env bash
# Packs what the GPU runs need and the H200 image lacks into .device/site.tgz (carry [".device"]):
# bitsandbytes (../shared/device/pack.sh), the peers of bench/kernels.py (Liger, Cut Cross-Entropy), for
# tests/test_trl.py trl with datasets and its dependencies, and gguf (tests/test_export.py). The device tool
# carries at most 64 MiB, and pyarrow's wheel alone unpacks to 166 MB, so its parts that datasets never loads
# are dropped (Arrow Flight, the S3 filesystem, headers, C++ tests and sources): ~50 MB packed in all.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/device/pack.sh liger_kernel==0.8.5 cut_cross_entropy==25.1.1 trl==1.16.0 datasets==5.2.0 \
  pyarrow==26.0.1 pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0 dill==0.4.1 multiprocess==0.70.19 \
  xxhash==4.1.0 gguf==0.19.0 > /dev/null
SITE=$(mktemp -d)
tar xzf .device/site.tgz -C "$SITE"
( cd "$SITE/pyarrow" && rm -rf include src tests ./*flight* ./*s3* _pyarrow_cpp_tests* \
    libarrow_python.so libarrow_python.so.2600.1.0 )
tar czf .device/site.tgz -C "$SITE" .
rm -rf "$SITE"
ls -la .device/site.tgz
