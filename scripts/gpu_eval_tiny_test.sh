#!/usr/bin/env bash
# CPU rehearsal of the GPU evaluation with a tiny stand-in: a 2-layer random Llama written as a Q4_1
# GGUF (tests/test_gguf.py's writer, byte-level tokenizer), random predictors and a threshold
# calibration for it. Runs gpu_eval_prep.sh, then part 1, 2 and 3 in a scratch copy of the repo
# (so the real .carry* folders are untouched) with limits of 2 and two densities per sweep, and
# checks that each part wrote its files. Takes a few minutes on 2 CPU cores.
#
#     scripts/gpu_eval_tiny_test.sh [SCRATCH_DIR]
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
SCRATCH=${1:-$(mktemp -d /tmp/gpu_eval_tiny.XXXX)}
DATA_SRC=$(readlink -f "${DATA_SRC:-$ROOT/../shared/data}")
mkdir -p "$SCRATCH/repo" "$SCRATCH/inputs"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$SCRATCH/repo"
cd "$SCRATCH/repo"
git init -q . && git add -A >/dev/null && git -c user.name=t -c user.email=t@t commit -qm snapshot

echo "== tiny GGUF, predictors and thresholds in $SCRATCH/inputs"
PYTHONPATH=$PWD python3 - "$SCRATCH/inputs" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, "tests")
from test_gguf import Q4_1, tiny_hf_llama, write_tiny_gguf
from convert.gguf import load_gguf
from dejavu_jax import sparse

out = Path(sys.argv[1])
gguf_path = write_tiny_gguf(out / "tiny.gguf", tiny_hf_llama(), quant=Q4_1)
cfg, params, _ = load_gguf(gguf_path, progress=False, tokenizer=False)
params = jax.tree_util.tree_map(jnp.asarray, params)
rank = 8
rng = np.random.default_rng(0)
shapes = sparse.predictor_shapes(cfg, rank)
preds = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                               is_leaf=lambda x: isinstance(x, tuple))
config = {"format": "dejavu_jax.predictors/1", "rank": rank, "lookahead": True,
          "model_fingerprint": sparse.model_fingerprint(cfg), "params_digest": sparse.params_digest(params)}
pdir = sparse.save_predictors(out / "predictors", preds, config)
tables = sparse.calibrate_quantiles(params, cfg, rng.integers(0, 256, size=(2, 32)))
sparse.save_thresholds(pdir / sparse.THRESHOLDS_FILE, tables, cfg)
print("wrote", gguf_path, pdir)
PY

echo "== prep"
GGUF_SRC="$SCRATCH/inputs/tiny.gguf" PREDICTORS_SRC="$SCRATCH/inputs/predictors" DATA_SRC="$DATA_SRC" \
  scripts/gpu_eval_prep.sh

export WORK="$SCRATCH/work" CONTEXT=64 LIMIT_DENSE=2 LIMIT_PPL=2 LIMIT_ZS=2 \
  MLP_DENSITIES=1.0,0.5 HEAD_DENSITIES=1.0,0.5 DEADLINE_S=${DEADLINE_S:-1500}
for part in 1 2 3; do
  echo "== part $part"
  rm -rf "$SCRATCH/out$part"
  OUT="$SCRATCH/out$part" scripts/gpu_eval_part$part.sh > "$SCRATCH/part$part.stdout" 2>&1 \
    || { tail -30 "$SCRATCH/part$part.stdout"; echo "FAIL: part $part exited non-zero"; exit 1; }
  tail -5 "$SCRATCH/part$part.stdout"
done

echo "== checks"
fail=0
expect() { for f in "$@"; do [ -s "$f" ] || { echo "FAIL: missing $f"; fail=1; }; done; }
expect "$SCRATCH/out1/log_part1.txt"
expect "$SCRATCH"/out2/{log_part2.txt,eval_dense_full.json,eval_dense_full.md,part2_results.tar.gz} \
       "$SCRATCH"/out2/ppl_quality_vs_density.{png,md,json}
expect "$SCRATCH"/out3/{log_part3.txt,part3_results.tar.gz} \
       "$SCRATCH"/out3/{ppl,zeroshot}_quality_vs_density.{png,md}
# grid: dense + 3 modes x (1 MLP + 1 head density) = 7 points per sweep
for d in sweep_ppl sweep_zeroshot; do
  n=$(ls "$WORK/$d"/eval_*.json | wc -l)
  [ "$n" = 7 ] || { echo "FAIL: $d has $n points, expected 7"; fail=1; }
done
for f in "$SCRATCH"/out*/; do
  n=$(ls "$f" | wc -l); [ "$n" -le 8 ] || { echo "FAIL: $f has $n files (at most 8 come back)"; fail=1; }
done
grep -h "tokcheck\|exited with" "$SCRATCH"/out2/log_part2.txt "$WORK"/logs/*.log | sort | uniq -c || true
[ $fail = 0 ] && echo "OK: tiny GPU-evaluation rehearsal passed ($SCRATCH)"
exit $fail
