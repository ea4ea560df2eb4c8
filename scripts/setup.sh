#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with mtlx and its data and test
# extras (torch==2.13.0 CPU build for the Hugging Face reference models). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[data,test]"
# The official SQuAD 2.0 scoring as Hugging Face shipped it (transformers 4.x,
# transformers/data/metrics/squad_metrics.py; gone from 5.x): tests/test_metrics.py scores
# mtlx.metrics.squad_v2 against it. Downloaded, not installed (it would replace transformers 5).
REF=.venv/reference/transformers-4.46.3-py3-none-any.whl
[ -f "$REF" ] || .venv/bin/python -m pip download -q --no-deps "transformers==4.46.3" -d .venv/reference
