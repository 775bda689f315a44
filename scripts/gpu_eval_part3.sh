#!/usr/bin/env bash
# GPU evaluation, call 3 of 3 (run THERE, from the repo root, carry [".carry3"], right after call 2;
# it needs call 2's checkpoint and data in $WORK, kept only while the machine is warm):
#   a. the perplexity sweep in predictor mode (PREDICTORS, default .carry3/predictors; any newer
#      predictors/ directory for this model can be carried instead), resuming any dense / oracle /
#      threshold points that call 2's deadline cut off                -> $WORK/sweep_ppl
#   b. in parallel: the zero-shot sweep, the 7 tasks with LIMIT_ZS (default 100) documents each, for
#      dense, oracle, threshold and predictor at the same densities     -> $WORK/sweep_zeroshot
#      Every row is padded to 512 tokens and all its positions go through the output layer
#      (--min-bucket 512 --min-scored 4096): each sweep point compiles 2-3 shapes instead of ~15.
# Comes back in $OUT: log_part3.txt, ppl_quality_vs_density.{png,md}, zeroshot_quality_vs_density.{png,md},
# part3_results.tar.gz (every eval JSON/MD of both sweeps, the plots' JSON and the per-process logs).
# Running it again (while warm) resumes both sweeps.
#
# More environment: PREDICTORS, LIMIT_ZS, LIMIT_PPL (as in part 2), MLP_DENSITIES, HEAD_DENSITIES.
source "$(dirname "$0")/gpu_eval_common.sh"
exec > >(tee -a "$OUT/log_part3.txt") 2>&1
PREDICTORS=${PREDICTORS:-.carry3/predictors}
LIMIT_ZS=${LIMIT_ZS:-100}
log "part 3 on $(hostname); deadline ${DEADLINE_S}s; predictors $PREDICTORS; zero-shot limit $LIMIT_ZS"
[ -f "$WORK/converted.ok" ] || { log "error: no checkpoint in $WORK: the machine went cold after call 2; redo calls 1 and 2"; exit 3; }
[ -f "$PREDICTORS/predictor_config.json" ] || { log "error: $PREDICTORS holds no predictors (carry .carry3)"; exit 3; }
PREDICTORS=$(readlink -f "$PREDICTORS")
rm -f "$WORK"/logs/*.log "$WORK"/logs/*.txt

PPL_ARGS=("${SWEEP_ARGS[@]}" --tasks wikitext2,c4 --out-dir "$WORK/sweep_ppl" --batch-size 32 --max-batch-tokens 65536
          --limit "${LIMIT_PPL:-all}")
ZS_TASKS=cb,copa,lambada_openai,openbookqa,piqa,rte,winogrande
ZS_ARGS=("${SWEEP_ARGS[@]}" --tasks "$ZS_TASKS" --out-dir "$WORK/sweep_zeroshot" --limit "$LIMIT_ZS"
         --batch-size 128 --max-batch-tokens 65536 --min-bucket 512 --min-scored 4096)
# The predictor points first; the other modes' points are skipped when call 2 finished them.
bg sweep_ppl python3 -m dejavu_jax.report sweep "${PPL_ARGS[@]}" --modes dense,predictor,oracle,threshold \
  --predictors "$PREDICTORS"
bg sweep_zs_dense_oracle python3 -m dejavu_jax.report sweep "${ZS_ARGS[@]}" --modes dense,oracle
bg sweep_zs_threshold python3 -m dejavu_jax.report sweep "${ZS_ARGS[@]}" --modes threshold --predictors "$PREDICTORS"
bg sweep_zs_predictor python3 -m dejavu_jax.report sweep "${ZS_ARGS[@]}" --modes predictor --predictors "$PREDICTORS"
wait_all

log "plot and pack"
plot_dir "$WORK/sweep_ppl" "WikiText-2 + C4 perplexity, ${LIMIT_PPL:-all} windows x $CONTEXT tokens (SmolLM2-135M fp32)"
plot_dir "$WORK/sweep_zeroshot" "7 zero-shot tasks, first $LIMIT_ZS docs each (SmolLM2-135M fp32)"
for ext in png md; do
  [ -f "$WORK/sweep_ppl/quality_vs_density.$ext" ] && cp "$WORK/sweep_ppl/quality_vs_density.$ext" "$OUT/ppl_quality_vs_density.$ext"
  [ -f "$WORK/sweep_zeroshot/quality_vs_density.$ext" ] && cp "$WORK/sweep_zeroshot/quality_vs_density.$ext" "$OUT/zeroshot_quality_vs_density.$ext"
done
tar -czf "$OUT/part3_results.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d sweep_ppl sweep_zeroshot logs 2>/dev/null) \
  || log "packing the results failed"
ls -la "$OUT"
[ -f "$WORK/sweep_ppl/quality_vs_density.md" ] && cat "$WORK/sweep_ppl/quality_vs_density.md"
[ -f "$WORK/sweep_zeroshot/quality_vs_density.md" ] && cat "$WORK/sweep_zeroshot/quality_vs_density.md"
log "part 3 done; points: ppl $(ls "$WORK"/sweep_ppl/eval_*.json 2>/dev/null | wc -l), zero-shot $(ls "$WORK"/sweep_zeroshot/eval_*.json 2>/dev/null | wc -l) (19 each for the full grid)"
sleep 1
