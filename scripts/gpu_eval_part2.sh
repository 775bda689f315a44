#!/usr/bin/env bash
# GPU evaluation, call 2 of 3 (run THERE, from the repo root, carry [".carry2"], right after call 1):
#   a. reassemble the GGUF from call 1's part + .carry2/part2, check its sha256, install the carried
#      gguf wheel into /tmp/site, convert to an fp32 checkpoint (python3 -m convert) and check that its
#      tokenizer encodes the evaluation data like the local one (else use the carried tokenizer files);
#   b. dense evaluation on the FULL sets: WikiText-2 + C4 perplexity and the 7 zero-shot tasks
#      (python3 -m dejavu_jax.eval --tasks all)                          -> eval_dense_full.{json,md}
#   c. in parallel with b: the perplexity sweep (WikiText-2 + C4, full sets unless LIMIT_PPL) for modes
#      dense + oracle and threshold, MLP densities 1/.75/.5/.35/.25, head densities 1/.75/.5
#                                                     -> $WORK/sweep_ppl (call 3 adds predictor mode)
# Several processes share the GPU so XLA compilation (CPU) overlaps with execution; tokens/s in the
# JSONs are therefore under load, not latency measurements. Everything runs under the deadline
# (DEADLINE_S, default 550 s from the start; gpu_eval_common.sh); a sweep stopped by it resumes in
# call 3. Comes back in $OUT: log_part2.txt, eval_dense_full.{json,md}, ppl_quality_vs_density.{png,md,json},
# part2_results.tar.gz (every eval JSON/MD and the per-process logs).
#
# More environment: LIMIT_PPL (perplexity windows per task in the sweep; empty = full sets),
# LIMIT_DENSE (--limit of the dense evaluation; empty = full sets), MLP_DENSITIES, HEAD_DENSITIES.
source "$(dirname "$0")/gpu_eval_common.sh"
exec > >(tee -a "$OUT/log_part2.txt") 2>&1
log "part 2 on $(hostname); deadline ${DEADLINE_S}s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

# ---- a. GGUF -> checkpoint
if [ -f "$CKPT/config.json" ] && [ -f "$WORK/converted.ok" ]; then
  log "checkpoint $CKPT already converted (a repeated call 2): skipping the conversion"
else
  [ -f "$WORK/part1" ] || { log "error: $WORK/part1 is missing: the machine went cold after call 1; redo call 1, then call 2 at once"; exit 3; }
  cat "$WORK/part1" .carry2/part2 > "$WORK/model.gguf"
  (cd "$WORK" && sha256sum -c "$OLDPWD/.carry2/model.gguf.sha256") || { log "error: reassembled GGUF has the wrong sha256"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry2/wheels/gguf-*.whl
  python3 -c "import gguf, importlib.metadata as m; print('gguf', m.version('gguf'), 'from', gguf.__file__)"
  rm -rf "$DATA" && cp -r .carry2/data "$DATA"
  rm -rf "$WORK/thresholds" && cp -r .carry2/thresholds "$WORK/thresholds"
  log "convert"
  python3 -m convert "$WORK/model.gguf" "$CKPT" --dtype fp32 --overwrite 2>&1 | grep -v -i "warn" || true
  [ -f "$CKPT/config.json" ] || { log "error: conversion failed"; exit 3; }
  log "tokenizer check"
  if ! python3 scripts/gpu_eval_tokcheck.py check --model "$CKPT" --data-dir "$DATA" --ref .carry2/tokcheck.json; then
    log "WARNING: this transformers' GGUF tokenizer differs from the local one: using the carried tokenizer files"
    cp .carry2/tokenizer/* "$CKPT/"
    python3 scripts/gpu_eval_tokcheck.py check --model "$CKPT" --data-dir "$DATA" --ref .carry2/tokcheck.json \
      || { log "error: the carried tokenizer does not match either"; exit 3; }
  fi
  rm -f "$WORK/part1" "$WORK/model.gguf"
  touch "$WORK/converted.ok"
fi
log "checkpoint: $(du -sh "$CKPT" | cut -f1)"
rm -f "$WORK"/logs/*.log "$WORK"/logs/*.txt

# ---- b + c in parallel
DENSE_LIMIT_ARGS=(); [ -n "${LIMIT_DENSE:-}" ] && DENSE_LIMIT_ARGS=(--limit "$LIMIT_DENSE")
PPL_LIMIT=${LIMIT_PPL:-}
PPL_ARGS=("${SWEEP_ARGS[@]}" --tasks wikitext2,c4 --out-dir "$WORK/sweep_ppl" --batch-size 32 --max-batch-tokens 65536)
PPL_ARGS+=(--limit "${PPL_LIMIT:-all}")
bg dense_full python3 -m dejavu_jax.eval --model "$CKPT" --tasks all --data-dir "$DATA" --context-length "$CONTEXT" \
  --batch-size 128 --max-batch-tokens 65536 --min-scored 4096 --compile-cache "$WORK/jax_cache" --no-progress \
  --out "$WORK/eval_dense_full.json" "${DENSE_LIMIT_ARGS[@]}"
bg sweep_ppl_dense_oracle python3 -m dejavu_jax.report sweep "${PPL_ARGS[@]}" --modes dense,oracle
bg sweep_ppl_threshold python3 -m dejavu_jax.report sweep "${PPL_ARGS[@]}" --modes threshold --predictors "$WORK/thresholds"
wait_all

# ---- results
log "plot and pack"
plot_dir "$WORK/sweep_ppl" "WikiText-2 + C4 perplexity, ${PPL_LIMIT:-all} windows x $CONTEXT tokens (SmolLM2-135M fp32)"
for ext in png md json; do
  [ -f "$WORK/sweep_ppl/quality_vs_density.$ext" ] && cp "$WORK/sweep_ppl/quality_vs_density.$ext" "$OUT/ppl_quality_vs_density.$ext"
done
copy_back "$WORK/eval_dense_full.json" "$WORK/eval_dense_full.md"
tar -czf "$OUT/part2_results.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d eval_dense_full.* sweep_ppl logs 2>/dev/null) \
  || log "packing the results failed"
ls -la "$OUT"
[ -f "$WORK/eval_dense_full.md" ] && cat "$WORK/eval_dense_full.md"
[ -f "$WORK/sweep_ppl/quality_vs_density.md" ] && cat "$WORK/sweep_ppl/quality_vs_density.md"
log "part 2 done; points in $WORK/sweep_ppl: $(ls "$WORK"/sweep_ppl/eval_*.json 2>/dev/null | wc -l); make call 3 now"
sleep 1
