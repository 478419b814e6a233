#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default job: a QLoRA fine-tune of SmolLM2-135M-Instruct on the
# bundled JSON-extraction data, with held-out accuracy before and after.
#   bash scripts/demo.sh [fastlm finetune options, e.g. --max-steps 30]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fastlm finetune --overwrite "$@"
