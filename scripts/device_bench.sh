#!/usr/bin/env bash
# Issue-7 latency runs on the GPU machine (device tool), from the repo root:
#   1. the kernels' GPU tests (TESTS=1; TESTS_K narrows the -k filter): top-K, window K/V (and fused Q/K/V), the normalising up
#      projection, the model-size gpu tests, lazy == exact, the decode loop's CUDA-graph options (TESTS_K="scheduling or concurrent")
#   2. python -m dejavu_jax.bench at each preset of PRESETS: dense, transformers eager and static cache +
#      torch.compile, and sparse decode (random predictors with lookahead in the loop) at MLP:heads
#      densities SPARSE, lazy and exact KV (lazy first: the no-lookahead and fixed-index variants use it),
#      the MLP top-K per MLP_TOPK_BLOCK neurons (0: one per layer)
#   2b. KERNELS=1 (before the bench): pallas_kernels.microbench at OPT-6.7B, heads 0.5 (Ka = 18): the
#      lazy step's attention inputs unfused, fused after XLA's norm, and fused over the window tile sweep, and the up kernel
#      with and without the norm inside, at MLP density 0.25 ($OUT/kernels/kernels.{json,md})
#   3. PROFILE=1: scripts/profile_decode.py at the first preset and density, lazy KV, FUSED's fused-step setting
#      (the launch list per token; dense and fixed-index runs beside it)
# Results: $OUT/bench-<preset>/bench.{json,md,png}, $OUT/log.txt, $OUT/gpu_tests.txt, $OUT/kernels/ (KERNELS=1),
# $OUT/profile/profile.{json,md} (PROFILE=1).
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/bench_out}
PRESETS=${PRESETS:-opt-6.7b}
SPARSE=${SPARSE:-0.25:0.5,0.1:0.5}
MLP_TOPK_BLOCK=${MLP_TOPK_BLOCK:-0}
KV_MODES=${KV_MODES:-lazy,exact}
BASELINES=${BASELINES:-eager,static-compile}  # "copy": only the cudaMemcpy bandwidth of the floor
FUSED=${FUSED:-auto}  # bench --fused-step: auto (the backend's default: on for Pallas), on, off (the extras time the others)
case "$FUSED" in 1) FUSED=on ;; 0) FUSED=off ;; esac  # the sessions 7-8 spelling in README commands
FUSED_NORM=${FUSED_NORM:-off}  # bench --fused-norm: the fused kernel normalises too (on), or XLA first (off)
mkdir -p "$OUT"
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_sparse.py tests/test_generate.py \
    -rfE -k "${TESTS_K:-window_kv or qkv or normalises or topk or gpu or lazy}" 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
fi
if [ "${KERNELS:-0}" = 1 ]; then
  python3 -m pallas_kernels.microbench --out "$OUT/kernels" --no-mlp --no-attention --window-kv --window-kv-heads 18 \
    --window-kv-methods pallas_update qkv_unfused qkv_normed qkv_fused --window-kv-sweep-methods pallas_update qkv_fused \
    --sweep --up-norm --densities 0.25 --seconds 240 2>&1 | grep -v "^[WI][0-9]" | tail -60
  rm -f "$OUT/kernels/kernels.jsonl"  # kernels.json holds the same rows
fi
for preset in $PRESETS; do
  date
  python3 -m dejavu_jax.bench --preset "$preset" --dtype fp16 --reps 3 --sparse "$SPARSE" --kernels pallas \
    --kv-modes "$KV_MODES" --mlp-topk-block "$MLP_TOPK_BLOCK" --baselines "$BASELINES" \
    --fused-step "$FUSED" --fused-norm "$FUSED_NORM" --out "$OUT/bench-$preset" 2>&1 | grep -v "^[WI][0-9]"
done 2>&1 | tee "$OUT/log.txt"
if [ "${PROFILE:-0}" = 1 ]; then
  python3 scripts/profile_decode.py --preset "${PRESETS%% *}" --sparse "${SPARSE%%,*}" --kv-mode lazy \
    --mlp-topk-block "$MLP_TOPK_BLOCK" --fused-step "$FUSED" --out "$OUT/profile" 2>&1 | grep -v "^[WI][0-9]" | tail -40
fi
