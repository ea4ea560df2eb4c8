#!/usr/bin/env bash
# GPU readiness in one command (< 8 minutes on one GPU, nothing downloaded):
#   1. environment: JAX sees a GPU, torch sees CUDA, the Python packages import;
#   2. correctness: mtlx float32 vs the PyTorch HF reference on the same weights, bf16 vs that
#      reference, cuDNN vs XLA attention (values and gradients) -- stops here on a failure;
#   3. the benchmark (scripts/bench.py, one process), in priority order under a time budget:
#      BERT-base L=128 bf16 with cuDNN attention, batch 128 (the MFU >= 50% goal), against
#      PyTorch eager (+ PEFT) on the same card, with 1/8/64 tasks (task scaling); features
#      on/off on adapters with 8 tasks (routing implementation, float32, XLA attention, remat,
#      donation, scan over layers); the
#      PEFT configurations; L=512; packing; real GLUE lengths (adapters, mtlx packed vs torch
#      padded to the longest and to 128); persistent compilation cache cold vs warm.
#      If only the cuDNN check failed, the benchmark runs with XLA attention (exit code 4).
#   4. a profile of the headline cell's step (kernels by name; scripts/profile_step.py).
# Writes OUT_DIR/{env.txt, checks.json, bench.json, bench.md, bench_tasks.png, profile.txt,
# log.txt}; bench.json and bench.md hold every finished phase even if the run is stopped.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out
#   MTLX_GPU_CHECK_CPU=1 bash scripts/gpu_check.sh /tmp/g   # the same logic on a CPU, tiny
#                                                          # sizes (tests the script itself)
# Environment: PYTHON (default: .venv/bin/python if present, else python3; on the GPU image
# plain python3 holds jax[cuda], torch, transformers, peft), GPU_CHECK_BUDGET_S (default 210:
# seconds after which the benchmark builds no further runner; what is left is recorded as
# skipped), GPU_CHECK_CELLS (the cells, in priority order, instead of the default list),
# GPU_CHECK_FEATURES (the cell whose features are switched on and off), GPU_CHECK_REAL_SIDES
# (the real-length cell's sides; default mtlx[packed],mtlx[mixed],torch[longest]: one task a
# row, rows mixing tasks, torch padded to the longest), GPU_CHECK_LIMIT_S
# (default 470: the benchmark and the profile are stopped so that the script ends by then).
# Exit: 0 done; 2 environment; 3 a correctness check failed (no benchmark); 4 only the cuDNN
# check failed (benchmarked with XLA attention); 5 a benchmark phase failed (the others ran);
# 124 the benchmark was stopped at the limit (bench.json/bench.md hold what it finished).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
. scripts/gpu_common.sh
BUDGET=${GPU_CHECK_BUDGET_S:-210}
# The whole script's wall-clock limit: the benchmark and the profile are stopped (timeout) so
# that it ends by then; bench.json and bench.md keep every phase finished before the stop.
LIMIT=${GPU_CHECK_LIMIT_S:-470}
LOG="$OUT/log.txt"
: > "$LOG"
START=$(date +%s)

echo "== 1. environment" | tee -a "$LOG"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } 2>&1 | tee -a "$LOG"
"$PYTHON" scripts/gpu_env.py 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
if [ "${PIPESTATUS[0]}" != "0" ]; then echo "environment check failed" | tee -a "$LOG"; exit 2; fi

if [ "${MTLX_GPU_CHECK_CPU:-0}" = "1" ]; then
  # Logic test on a CPU: tiny model, short sequences, small batches, short budget.
  SIZE=tiny; L=32; L2=64; B=4; B2=4; DTYPE=float32; ATT=default; REP=2; BLOCK=0.05
  FEAT="adapters/tiny/32/4/4"; PACK="shared/tiny/32/16/2"; REAL="adapters/tiny/4/4"; BUDGET=${GPU_CHECK_BUDGET_S:-210}
  CHECK_ARGS=""
else
  SIZE=base; L=128; L2=512; B=128; B2=32; DTYPE=bfloat16; ATT=cudnn; REP=5; BLOCK=0.5
  # Real lengths: 128 GLUE examples a task, packed 32 rows a step (8 rows left the H200 idle).
  FEAT="adapters/base/128/8/64"; PACK="shared/base/128/512/4"; REAL="adapters/base/128/32"
  CHECK_ARGS=""
fi

echo "== 2. correctness checks" | tee -a "$LOG"
"$PYTHON" scripts/bench.py --checks-only --json "$OUT/checks.json" $CHECK_ARGS 2>&1 | grep --line-buffered -v "Warning\|warnings.warn" | tee -a "$LOG"
CHECK_RC=${PIPESTATUS[0]}
if [ "$CHECK_RC" = "4" ]; then
  echo "cuDNN attention check FAILED: benchmarking with XLA attention" | tee -a "$LOG"; ATT=xla
elif [ "$CHECK_RC" != "0" ]; then
  echo "correctness checks FAILED: no benchmark" | tee -a "$LOG"; exit 3
fi

echo "== 3. benchmark (budget ${BUDGET}s of phases)" | tee -a "$LOG"
# Group 1 (headline and task scaling), then the features, then the rest. On the H200 a
# BERT-base step compiles in 25-50 s, so in 8 minutes the budget covers group 1, the first
# features and little more (BUILD_NOTES.md); GPU_CHECK_CELLS='cell;cell;...' times other cells
# first (e.g. those a previous lease did not reach).
CELLS="shared/$SIZE/$L/1/$B;shared/$SIZE/$L/8/$B;shared/$SIZE/$L/64/$B"
CELLS="$CELLS;adapters/$SIZE/$L/1/$B;adapters/$SIZE/$L/8/$B"
CELLS="$CELLS;hyperformer++/$SIZE/$L/1/$B;hyperformer++/$SIZE/$L/64/$B"
CELLS="$CELLS;lora/$SIZE/$L/1/$B;lora/$SIZE/$L/8/$B"
CELLS="$CELLS;shared/$SIZE/$L2/8/$B2"
CELLS=${GPU_CHECK_CELLS:-$CELLS}
# The features cell: adapters with 8 tasks, so the routing implementations are among the
# switches (timed first after the reference); GPU_CHECK_FEATURES overrides it.
FEAT=${GPU_CHECK_FEATURES:-$FEAT}
PROFILE_S=${GPU_CHECK_PROFILE_S:-100}
LEFT=$(( LIMIT - ($(date +%s) - START) - PROFILE_S ))
if [ "$LEFT" -lt 30 ]; then LEFT=30; fi
echo "(stopped after ${LEFT}s at the latest: GPU_CHECK_LIMIT_S=${LIMIT})" | tee -a "$LOG"
timeout "$LEFT" "$PYTHON" scripts/bench.py --cells "$CELLS" --dtype "$DTYPE" --attention "$ATT" \
  --repeats "$REP" --block-seconds "$BLOCK" --features "$FEAT" --short-features \
  --features-after-groups 1 \
  --packing "$PACK" --real-lengths "$REAL" \
  --real-lengths-sides "${GPU_CHECK_REAL_SIDES:-mtlx[packed],mtlx[mixed],torch[longest]}" \
  --compile-cache-check "shared/tiny/128/1/16" \
  --time-budget "$BUDGET" --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
  --plot "$OUT/bench_tasks.png" 2>&1 | grep --line-buffered -v "Warning\|warnings.warn" | tee -a "$LOG"
RC=${PIPESTATUS[0]}
if [ "$RC" = "124" ]; then
  echo "benchmark stopped at the time limit: $OUT/bench.{json,md} hold the phases it finished (PARTIAL)" | tee -a "$LOG"
fi
if [ "$RC" = "0" ] && [ "$CHECK_RC" = "4" ]; then RC=4; fi

# 4. Where the headline cell's step time goes: kernels summed by name over traced steps
# (scripts/profile_step.py), bounded by GPU_CHECK_PROFILE_S (default 100; 0 skips it) and by
# what is left of GPU_CHECK_LIMIT_S. A failure here is logged and leaves the exit code alone.
P_LEFT=$(( LIMIT - ($(date +%s) - START) ))
if [ "$P_LEFT" -lt "$PROFILE_S" ]; then PROFILE_S=$P_LEFT; fi
if [ "$PROFILE_S" -gt 20 ]; then
  echo "== 4. profile shared/$SIZE/$L/1/$B (limit ${PROFILE_S}s)" | tee -a "$LOG"
  timeout "$PROFILE_S" "$PYTHON" scripts/profile_step.py --cell "shared/$SIZE/$L/1/$B" \
    --dtype "$DTYPE" --attention "$ATT" --steps 3 --top 25 > "$OUT/profile.txt" 2>&1
  P_RC=$?
  grep -v "Warning\|warnings.warn" "$OUT/profile.txt" | tail -30 | tee -a "$LOG"
  echo "profile exit $P_RC" | tee -a "$LOG"
fi
echo "== done in $(( $(date +%s) - START )) s, exit $RC; results in $OUT" | tee -a "$LOG"
exit "$RC"
