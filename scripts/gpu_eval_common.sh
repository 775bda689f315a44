# Sourced by scripts/gpu_eval_part{1,2,3}.sh (run on the GPU machine, from the repo root).
#
# Environment (defaults in brackets):
#   OUT         folder whose files come back [set by the device tool; /tmp/gpu_eval_out otherwise]
#   WORK        scratch kept between calls while the machine stays warm [/tmp/smollm2]
#   DEADLINE_S  seconds after the script's start by which it must have written its results [550];
#               every evaluation runs under `timeout` up to DEADLINE_S - PACK_S, and the sweeps resume
#               from the eval JSONs already written when a later call runs them again
#   PACK_S      seconds kept for plotting and packing the results [35]
#   CONTEXT     evaluation context length [2048]
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || dirname "$(dirname "$(readlink -f "$0")")")"
OUT=${OUT:-/tmp/gpu_eval_out}
WORK=${WORK:-/tmp/smollm2}
DEADLINE_S=${DEADLINE_S:-550}
PACK_S=${PACK_S:-35}
CONTEXT=${CONTEXT:-2048}
CKPT=$WORK/ckpt
DATA=$WORK/data
mkdir -p "$OUT" "$WORK/logs"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several evaluation processes share the GPU
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
START_EPOCH=$(date +%s)

log() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - START_EPOCH))s] $*"; }

# Seconds left for an evaluation step (the deadline minus what packing needs).
left() { echo $((DEADLINE_S - PACK_S - ($(date +%s) - START_EPOCH))); }

# bg NAME CMD...: run CMD in the background under the deadline, output to $WORK/logs/NAME.log.
# SIGTERM, not SIGINT: background jobs of a script ignore SIGINT. Finished sweep points are on disk
# (written atomically), so a stopped sweep loses only the point in progress.
PIDS=()
bg() {
  local name=$1; shift
  local secs; secs=$(left)
  if [ "$secs" -lt 20 ]; then log "skip $name: only ${secs}s left"; return 0; fi
  log "start $name (timeout ${secs}s): $*"
  ( timeout -s TERM -k 10 "$secs" "$@" > "$WORK/logs/$name.log" 2>&1; rc=$?
    echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - START_EPOCH))s] $name exited with $rc$([ $rc = 124 ] && echo ' (deadline)')" \
      >> "$WORK/logs/$name.log"; exit $rc ) &
  PIDS+=($!)
}

# wait_all: wait for the background steps; report each one's end.
wait_all() {
  local pid
  for pid in "${PIDS[@]}"; do wait "$pid" || true; done
  PIDS=()
  local f
  for f in "$WORK"/logs/*.log; do log "$(basename "$f" .log): $(tail -1 "$f")"; done
}

# The `python3 -m dejavu_jax.report sweep` arguments shared by every sweep.
SWEEP_ARGS=(--model "$CKPT" --data-dir "$DATA" --context-length "$CONTEXT" --compile-cache "$WORK/jax_cache"
            --mlp-densities "${MLP_DENSITIES:-1.0,0.75,0.5,0.35,0.25}" --head-densities "${HEAD_DENSITIES:-1.0,0.75,0.5}"
            --no-progress)

# plot_dir DIR TITLE: the quality-vs-density plot of every eval JSON in DIR (if any).
plot_dir() {
  local dir=$1 title=$2
  if compgen -G "$dir/eval_*.json" > /dev/null; then
    python3 -m dejavu_jax.report plot "$dir"/eval_*.json --out "$dir/quality_vs_density" --title "$title" \
      > "$WORK/logs/plot_$(basename "$dir").txt" 2>&1 || log "plot of $dir failed: $(tail -3 "$WORK/logs/plot_$(basename "$dir").txt")"
  else
    log "no eval JSONs in $dir to plot"
  fi
}

# copy_back FILE...: copy existing files into $OUT (flat; at most 8 files come back).
copy_back() { local f; for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/" || true; done; }
