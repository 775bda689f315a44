#!/usr/bin/env bash
# Tensor parallelism on one nvidia-h200-x2 call (<= ~9.5 min wall): everything lands in "$OUT/tp/".
#
#   (0) the TP tests on the 2 real GPUs (tests/test_sharding.py -k two_gpus: NCCL, Pallas per shard)
#   (1) OPT-66B fp16 at TP=2: dense vs sparse (MLP 0.25, heads 0.5, predictors + lookahead, Pallas,
#       exact KV), batch 1, prompt 128, 128 new tokens     -> big-tp2/
#   (2) the same at TP=1 on GPU 0, with transformers eager first (its own process, exits before
#       JAX allocates)                                        -> big-tp1/
#   (3) OPT-6.7B at TP=1 and TP=2, same settings plus the no-lookahead / fixed-index variants
#       -> small-tp1/, small-tp2/   (skipped when the budget is short)
#   scaling.md: scripts/tp_scaling.py over all of them; log.txt; results.tar.gz (every bench.*:
#   the runs write under $WORK, and only these three files come back, within the device tool's
#   limit on returned files).
#
#   run from the repo root:  bash scripts/device_tp.sh
#
# Each bench measures the cudaMemcpy bandwidth of one GPU (--baselines copy or eager); its floor at
# TP=2 is the bytes over twice that bandwidth (both GPUs read their halves at once).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 is the machine's default; we set it again).
set -u -o pipefail

DTYPE=${DTYPE:-fp16}
REPS=${REPS:-2}
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-results/tmp/device_tp}
BIG=${BIG:-opt-66b}
SMALL=${SMALL:-opt-6.7b}
PROMPT_LEN=${PROMPT_LEN:-128}
NEW_TOKENS=${NEW_TOKENS:-128}
WORK=${WORK:-/tmp/dejavu_jax_tp}

export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
unset XLA_PYTHON_CLIENT_MEM_FRACTION
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-0.95}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/dejavu_jax_compile_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5

D="$WORK"
R="$OUT/tp"
rm -rf "$D"
mkdir -p "$D" "$R"
LOG="$R/log.txt"
START=$(date +%s)
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

stamp "device_tp: big=$BIG small=$SMALL dtype=$DTYPE reps=$REPS budget=${BUDGET_S}s"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m; } 2>&1 | tee -a "$LOG"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

status=0
run() {  # run NAME CAP_S CMD...: one stage, capped by CAP_S and by what is left of the budget
    local name=$1 cap=$2; shift 2
    local l; l=$(left)
    [ "$cap" -gt "$l" ] && cap=$l
    if [ "$cap" -lt 45 ]; then stamp "$name skipped: ${l}s left"; status=1; return; fi
    stamp "$name (cap ${cap}s)"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?; [ $rc -ne 0 ] && status=$rc
    stamp "$name done, rc=$rc"
}
# the flags every bench here shares; each stage adds --preset, --tp, --out and its baselines
BENCH=(python3 -m dejavu_jax.bench --dtype "$DTYPE" --reps "$REPS" --prompt-len "$PROMPT_LEN"
       --new-tokens "$NEW_TOKENS" --sparse 0.25:0.5 --kernels pallas --kv-modes exact)
ONE_GPU=(env CUDA_VISIBLE_DEVICES=0)

run "(0) TP tests on 2 GPUs" 150 python3 -m pytest -q -p no:cacheprovider tests/test_sharding.py -k two_gpus
run "(1) $BIG TP=2" 170 "${BENCH[@]}" --preset "$BIG" --tp 2 --out "$D/big-tp2" --baselines copy --no-extras
run "(2) $BIG TP=1 + transformers eager" 260 "${ONE_GPU[@]}" "${BENCH[@]}" --preset "$BIG" --tp 1 \
    --out "$D/big-tp1" --baselines eager --baselines-timeout 150 --no-extras
run "(3a) $SMALL TP=1" 90 "${ONE_GPU[@]}" "${BENCH[@]}" --preset "$SMALL" --tp 1 --out "$D/small-tp1" \
    --baselines copy
run "(3b) $SMALL TP=2" 90 "${BENCH[@]}" --preset "$SMALL" --tp 2 --out "$D/small-tp2" --baselines copy

for size in big small; do
    python3 scripts/tp_scaling.py "$D/$size"-tp*/bench.json 2>&1 | tee -a "$LOG" "$R/scaling.md"
done
tar -czf "$R/results.tar.gz" -C "$D" . 2>&1 | tee -a "$LOG"
stamp "all done, status=$status"
exit $status
