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
# XLA's per-fusion autotuning results kept on disk for the lease (the machine stays warm between
# calls): a GEMM fusion tuned while compiling one variant is not tuned again for the next, whose
# products are mostly the same (a BERT-base step compiled in 25-60 s on the H100). Kept only if
# this XLA knows the flag (an unknown XLA_FLAGS entry aborts every process). The compile times
# printed after the first variant are then with warm tuning results; MTLX_GPU_AUTOTUNE_CACHE=0
# turns it off.
if [ "${MTLX_GPU_AUTOTUNE_CACHE:-1}" != "0" ]; then
  _ATDIR=${MTLX_GPU_AUTOTUNE_DIR:-/tmp/mtlx_xla_autotune}
  mkdir -p "$_ATDIR"   # XLA requires the directory to exist
  _AT="--xla_gpu_per_fusion_autotune_cache_dir=$_ATDIR"
  if XLA_FLAGS="${XLA_FLAGS:-} $_AT" "$PYTHON" -c "import jax; jax.numpy.ones(1).block_until_ready()" >/dev/null 2>&1; then
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$_AT"
  fi
fi
