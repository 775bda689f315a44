#!/usr/bin/env bash
# The same bench under several XLA_FLAGS settings, one process each (flags are read at JAX start),
# in one device call: does an XLA option move dense or sparse decode?  Outputs: "$OUT/flags/<tag>/"
# (bench.json + bench.md each; no plots, to stay within the files a call returns) and log.txt.
#
#   bash scripts/device_xla_flags.sh    # defaults below: OPT-6.7B dense and sparse 0.25:0.5 lazy,
#                                       # default flags vs
#                                       # command buffers that also capture while loops/conditionals
#
# Overrides: PRESET, BENCH_ARGS (the bench flags after --preset), VARIANTS ("tag=flags;tag=flags").
set -u -o pipefail

PRESET=${PRESET:-opt-6.7b}
BENCH_ARGS=${BENCH_ARGS:---dtype fp16 --reps 5 --baselines copy --sparse 0.25:0.5 --kernels pallas --kv-modes lazy --no-extras}
VARIANTS=${VARIANTS:-default=;while_cmdbuf=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL}
OUT=${OUT:-results/tmp/device_xla_flags}

export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT/flags"
LOG="$OUT/flags/log.txt"
START=$(date +%s)
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
status=0
IFS=';' read -ra items <<< "$VARIANTS"
for item in "${items[@]}"; do
    tag=${item%%=*}; flags=${item#*=}
    stamp "$tag: XLA_FLAGS='$flags' python3 -m dejavu_jax.bench --preset $PRESET $BENCH_ARGS"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    XLA_FLAGS="$flags" python3 -m dejavu_jax.bench --preset "$PRESET" $BENCH_ARGS --out "/tmp/flags/$tag" \
        2>&1 | tee -a "$LOG"
    rc=$?; [ $rc -ne 0 ] && status=$rc
    mkdir -p "$OUT/flags/$tag" && cp /tmp/flags/"$tag"/bench.json /tmp/flags/"$tag"/bench.md "$OUT/flags/$tag/" 2>/dev/null
    stamp "$tag done, rc=$rc"
done
exit $status
