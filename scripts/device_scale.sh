#!/usr/bin/env bash
# Scale runs for one nvidia-h200 call (<= ~8 min wall): everything lands in "$OUT/scale/" (7 files).
#
#   (a) OPT-66B fp16, batch 1, prompt 128, 128 new tokens: dense vs sparse (MLP 0.25, heads 0.5,
#       pallas kernels, exact KV, random predictors with lookahead), 2 reps.
#       -> scale/opt66b/bench.{json,md,png}
#   (b) OPT-6.7B fp16 batch sweep 1,2,4,8,16,32, prompt 128, 64 new tokens: dense vs sparse (same
#       point, pallas, union batch selection), 2 reps.  -> scale/sweep/sweep.{json,md,png}
#   scale/log.txt: both runs' output with timestamps.
#
#   run from the repo root:  bash scripts/device_scale.sh
#
# Wall-time estimate (compiles dominate; OPT-6.7B on the H100 compiled in 14 s dense and 23-25 s with
# pallas kernels, prefill included; OPT-66B has twice the layers):
#   (a) start + 132 GB of random weights ~20 s, dense compile ~40 s + 3 decodes x ~4 s, sparse compile
#       ~60 s + 3 decodes x ~2 s: ~140 s expected, capped at BIG_TIMEOUT_S (270 s).
#   (b) 6 batch sizes x (dense ~15 s + sparse ~25 s compile; the sparse run's prefill is the dense
#       one's program and comes from the persistent compile cache) + short decodes: ~220 s expected,
#       capped by what is left of BUDGET_S (470 s). The sweep rewrites its files after every batch
#       size, so a cap leaves the batch sizes already measured (sweep.md then says INCOMPLETE).
#
# OPT-66B fp16 is 122.4 GiB of weights: JAX's allocator stops at XLA_CLIENT_MEM_FRACTION of the GPU
# (0.75 by default, ~104 GiB on an H200, also without preallocation), hence 0.95 below; the bench
# prints its peak estimate and refuses to start if it exceeds the limit. No transformers baselines
# here: a second 132 GB copy cannot fit next to ours (time them in a run of their own).
#
# Overrides (e.g. a CPU smoke run): BIG_PRESET, SWEEP_PRESET, DTYPE, KERNELS, PROMPT_LEN,
# BIG_NEW_TOKENS, SWEEP_NEW_TOKENS, BATCHES, REPS, BUDGET_S, BIG_TIMEOUT_S, OUT.
set -u -o pipefail

BIG_PRESET=${BIG_PRESET:-opt-66b}
SWEEP_PRESET=${SWEEP_PRESET:-opt-6.7b}
DTYPE=${DTYPE:-fp16}
KERNELS=${KERNELS:-pallas}
PROMPT_LEN=${PROMPT_LEN:-128}
BIG_NEW_TOKENS=${BIG_NEW_TOKENS:-128}
SWEEP_NEW_TOKENS=${SWEEP_NEW_TOKENS:-64}
BATCHES=${BATCHES:-1,2,4,8,16,32}
REPS=${REPS:-2}
BUDGET_S=${BUDGET_S:-470}
BIG_TIMEOUT_S=${BIG_TIMEOUT_S:-270}
OUT=${OUT:-results/tmp/device_scale}

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
unset XLA_PYTHON_CLIENT_MEM_FRACTION  # deprecated name; jax refuses both names set together
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-0.95}
# Identical programs (the dense prefill that dense and sparse runs share) compile once per call;
# the cache lives outside $OUT so none of it comes back.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/dejavu_jax_compile_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5

mkdir -p "$OUT/scale"
LOG="$OUT/scale/log.txt"
START=$(date +%s)
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

stamp "device_scale: big=$BIG_PRESET sweep=$SWEEP_PRESET dtype=$DTYPE kernels=$KERNELS batches=$BATCHES budget=${BUDGET_S}s"
{ nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee -a "$LOG"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

status=0
stamp "(a) $BIG_PRESET dense vs sparse 0.25:0.5 ($KERNELS, exact KV), batch 1: expect ~140 s, cap ${BIG_TIMEOUT_S}s"
timeout --kill-after=10 "$BIG_TIMEOUT_S" python3 -m dejavu_jax.bench --preset "$BIG_PRESET" --dtype "$DTYPE" \
    --prompt-len "$PROMPT_LEN" --new-tokens "$BIG_NEW_TOKENS" --reps "$REPS" --baselines none \
    --sparse 0.25:0.5 --kernels "$KERNELS" --kv-modes exact --no-extras \
    --out "$OUT/scale/opt66b" 2>&1 | tee -a "$LOG"
rc=$?; [ $rc -ne 0 ] && status=$rc
stamp "(a) done, rc=$rc"

left=$(( BUDGET_S - ($(date +%s) - START) - 15 ))
if [ "$left" -lt 60 ]; then
    stamp "(b) skipped: only ${left}s of the budget left"
    exit 1
fi
stamp "(b) $SWEEP_PRESET batch sweep $BATCHES, dense vs sparse 0.25:0.5 ($KERNELS, union): expect ~220 s, cap ${left}s"
timeout --kill-after=10 "$left" python3 -m dejavu_jax.bench --preset "$SWEEP_PRESET" --dtype "$DTYPE" \
    --prompt-len "$PROMPT_LEN" --new-tokens "$SWEEP_NEW_TOKENS" --reps "$REPS" --baselines none \
    --batches "$BATCHES" --sparse 0.25:0.5 --kernels "$KERNELS" --kv-modes exact --batch-select union \
    --out "$OUT/scale/sweep" 2>&1 | tee -a "$LOG"
rc=$?; [ $rc -ne 0 ] && status=$rc
stamp "(b) done, rc=$rc"
ls -la "$OUT/scale" "$OUT/scale/opt66b" "$OUT/scale/sweep" 2>&1 | tee -a "$LOG"
exit $status
