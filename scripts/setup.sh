#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with mtlx and its data and test
# extras (torch==2.13.0 CPU build for the Hugging Face reference models). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[data,test]"
