#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite on the CPU; Triton kernels run in its interpreter.
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
