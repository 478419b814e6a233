# Sourced by the bench/gpu_*.sh scripts on the device machine: the carried packages (.device/site.tgz, made by
# bench/pack_device.sh; carry [".device/site.tgz"]) on PYTHONPATH, RES for logs and JSON (the scripts pack it
# into $OUT/results.tgz: the device tool returns at most 8 files), and the GPU's name, clocks and library
# versions in $RES/gpu.txt.
set -u
mkdir -p /tmp/site && tar xzf .device/site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RES=${RES:-/tmp/res}; rm -rf "$RES"; mkdir -p "$RES"  # a warm machine keeps /tmp between calls
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$RES/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" >> "$RES/gpu.txt" 2>&1
