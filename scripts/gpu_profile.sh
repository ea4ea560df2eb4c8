#!/usr/bin/env bash
# Where a lent GPU's step time goes, for variants of one cell, in one command (no torch
# baseline, no correctness checks: scripts/gpu_check.sh does those):
#   1. environment (scripts/gpu_env.py: packages, devices, JAX's bf16 matmul rate);
#   2. scripts/profile_step.py over the variants, one process: per variant the first call
#      (compile), the untraced step time and MFU, then 3 traced steps summed by kernel category
#      (matmul, cuDNN attention, fusions, copies) and by kernel, and the share of the untraced
#      step the kernels cover (the rest: the GPU waiting on the host); a summary table last;
#   3. every variant's compiled step as HLO text in OUT_DIR/hlo.tar (read offline, at no device
#      time: which products went to cuBLAS or Triton, what fused).
# Writes OUT_DIR/{env.txt, profile.txt, hlo.tar, log.txt}.
#
#   bash scripts/gpu_profile.sh [OUT_DIR]
#   GPU_PROFILE_VARIANTS='shared/base/128/1/128;shared/base/128/1/128:prng=rbg' bash scripts/gpu_profile.sh out
#   MTLX_GPU_CHECK_CPU=1 GPU_PROFILE_VARIANTS='shared/tiny/32/1/8' bash scripts/gpu_profile.sh /tmp/p
# Environment: PYTHON (as gpu_check.sh), GPU_PROFILE_VARIANTS (';'-separated
# config/size/L/T/B[:field=value,...], mtlx.bench.workload.Features fields; default below),
# GPU_PROFILE_DTYPE (bfloat16; float32 with MTLX_GPU_CHECK_CPU=1), GPU_PROFILE_ATTENTION (cudnn;
# default with MTLX_GPU_CHECK_CPU=1), GPU_PROFILE_LIMIT_S (300: the
# profile is stopped so that the script ends by then; the variants finished are printed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_profile_out}
mkdir -p "$OUT/hlo"
. scripts/gpu_common.sh
LIMIT=${GPU_PROFILE_LIMIT_S:-300}
LOG="$OUT/log.txt"
: > "$LOG"
START=$(date +%s)
# The A/Bs of the switches not yet timed on a GPU (BUILD_NOTES.md, "For the next lease"):
# BERT's residual LayerNorm VJP, the gather's one-hot gradient (8 tasks against 1), the grouped
# gradient norm, dropout's draws, the state NOT stacked at the jit boundary (the 8-task state's
# 2,655 leaves stack by default since the eleventh session: does its GPU wait on the host's
# per-array dispatch without? mtlx.train.stacking), and the 1-task state stacked (under
# 'auto''s 1,024 leaves: its update is ~470 per-leaf kernels, ~0 when stacked; on the dev CPU
# neutral, 3-4 s more compile: is a GPU faster?); in that order: a limit stops the last ones.
V="shared/base/128/1/128;shared/base/128/1/128:layer_norm_vjp=autodiff"
V="$V;adapters/base/128/1/128;adapters/base/128/8/128;adapters/base/128/8/128:gather_grad=scatter"
V="$V;adapters/base/128/8/128:grad_norm=per_leaf;shared/base/128/1/128:dropout_draws=bernoulli"
V="$V;adapters/base/128/8/128:stack_state=off;adapters/base/128/1/128:stack_state=on"
V=${GPU_PROFILE_VARIANTS:-$V}

echo "== 1. environment" | tee -a "$LOG"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader; } 2>&1 | tee -a "$LOG"
"$PYTHON" scripts/gpu_env.py 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
if [ "${PIPESTATUS[0]}" != "0" ]; then echo "environment check failed" | tee -a "$LOG"; exit 2; fi

ARGS=()
IFS=';' read -ra VS <<< "$V"
for v in "${VS[@]}"; do ARGS+=(--cell "$v"); done
LEFT=$(( LIMIT - ($(date +%s) - START) - 5 ))
if [ "$LEFT" -lt 20 ]; then LEFT=20; fi
echo "== 2. profile of ${#VS[@]} variants (stopped after ${LEFT}s at the latest)" | tee -a "$LOG"
# MTLX_GPU_CHECK_CPU=1 (the logic test on a CPU, as gpu_check.sh's): XLA's attention, float32.
if [ "${MTLX_GPU_CHECK_CPU:-0}" = "1" ]; then DT=float32; AT=default; else DT=bfloat16; AT=cudnn; fi
timeout "$LEFT" "$PYTHON" scripts/profile_step.py "${ARGS[@]}" \
  --dtype "${GPU_PROFILE_DTYPE:-$DT}" --attention "${GPU_PROFILE_ATTENTION:-$AT}" \
  --steps 3 --top 30 --hlo-dir "$OUT/hlo" > "$OUT/profile.txt" 2>&1
RC=$?
grep -v "Warning\|warnings.warn" "$OUT/profile.txt" | tee -a "$LOG"
(cd "$OUT" && tar cf hlo.tar hlo && rm -rf hlo)
echo "== done in $(( $(date +%s) - START )) s, exit $RC; results in $OUT" | tee -a "$LOG"
exit "$RC"
