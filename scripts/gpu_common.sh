# Sourced by scripts/gpu_check.sh and scripts/gpu_profile.sh (from the repository root): the
# Python to run (PYTHON, else .venv/bin/python if present, else python3: on the lent GPU image
# plain python3 holds jax[cuda], torch, transformers, peft) and the environment both run in.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# JAX and PyTorch share the card: no up-front grab of 75% of its memory by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
