#!/usr/bin/env bash
# GPU evaluation, call 1 of 3 (run THERE, from the repo root, carry [".carry1"]): keep part 1 of the
# GGUF in $WORK for call 2, which must follow at once (the machine keeps /tmp only while warm, ~30 s).
# Also records what the machine has. See scripts/gpu_eval_prep.sh for the plan.
source "$(dirname "$0")/gpu_eval_common.sh"
exec > >(tee -a "$OUT/log_part1.txt") 2>&1
log "part 1 on $(hostname)"
rm -rf "$WORK" && mkdir -p "$WORK/logs"
cp .carry1/part1 "$WORK/part1"
(cd "$WORK" && sha256sum -c "$OLDPWD/.carry1/part1.sha256")
nvidia-smi -L || true
python3 - <<'PY'
import importlib.util, sys
import jax
print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())
print("gguf installed:", importlib.util.find_spec("gguf") is not None)
PY
df -h /tmp | tail -1
log "part 1 done: $WORK/part1 kept; make call 2 now"
