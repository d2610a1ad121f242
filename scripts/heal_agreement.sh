#!/usr/bin/env bash
# Heal GTA-T and MLA-25% on the source's own samples, then measure where each student still differs
# from the source: KL(source || student) on held-out samples (the training distribution), on WikiText-2
# (the evaluation text) and on a Gutenberg book. A student that agrees on samples but not on WikiText
# is short of data diversity; one that disagrees everywhere is short of capacity or optimisation.
# On the device, SmolLM2 built (scripts/device_heal.sh part2 / again):
#   bash scripts/device_heal.sh again bash scripts/heal_agreement.sh /tmp/teacher-10M.jsonl /tmp/heldout.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-/tmp/teacher-10M.jsonl}
HELDOUT=${2:-/tmp/heldout.jsonl}
RUNS=${RUNS:-gta mla25}  # which students to heal and compare
common="--modes attention --tokens 20e6 --eval-at 5e6,20e6 --data teacher --sample-file $SAMPLES --deadline ${HEAL_DEADLINE:-400}"
declare -A ARGS=(
  [gta]="--to gta --method-options {\"refit_output\":true} --target attention+mlp $common"
  [mla25]="--to mla --kv-budget 0.25 --target attention $common")
runs=() models=()
for r in $RUNS; do
  runs+=("$r" "${ARGS[$r]}")
  models+=("$r-oneshot=/tmp/bench_heal_$r/$r" "$r-healed=/tmp/bench_heal_$r/attention-20M")
done
bash scripts/heal_parallel.sh "${runs[@]}"
SRC=$(python3 -c 'from latentkv.io.assets import smollm2_folder; print(smollm2_folder())')
C=../shared/corpora
python3 scripts/agreement_by_text.py --source "$SRC" \
  --models "${models[@]}" \
  --texts wikitext=$C/wikitext-2-raw/wiki.test.raw samples=$HELDOUT gutenberg=$C/gutenberg/austen-emma.txt \
  --out "$OUT/agreement.md" 2>&1 | grep -v "it/s"
