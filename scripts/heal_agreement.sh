#!/usr/bin/env bash
# Heal a converted model on text sampled from its source, then measure where the healed student
# still differs from the source, text by text: KL(source || model), top-1 agreement and both
# perplexities on held-out samples (the training distribution), on WikiText-2 (the evaluation
# text) and on a Gutenberg book (text the student never trained on). A student that agrees on the
# samples but not on WikiText is short of data diversity; one that disagrees everywhere is short of
# capacity or training.
#
#   bash scripts/heal_agreement.sh SOURCE CONVERTED DEST [TOKENS]
#   GPUS=8 bash scripts/heal_agreement.sh SOURCE CONVERTED DEST  # healing data parallel on 8 GPUs
#
# SOURCE: the model CONVERTED was made from (`latentkv convert SOURCE CONVERTED ...`); DEST: a folder
# for the sampled text, the healed model and DEST/agreement.md. TOKENS: healing tokens (20M).
# Environment: GPUS (1), SAMPLE_TOKENS (10000000), HELDOUT_TOKENS (262144), DEVICE (cuda),
# FINETUNE_ARGS (more `latentkv finetune` flags, e.g. "--target attention+mlp --lr 3e-4"), PYTHON.
set -euo pipefail
usage="usage: bash scripts/heal_agreement.sh SOURCE CONVERTED DEST [TOKENS]"
SOURCE=${1:?$usage}
CONVERTED=${2:?$usage}
DEST=${3:?$usage}
TOKENS=${4:-20000000}
GPUS=${GPUS:-1}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DEST"

# Training text sampled from the source, and a held-out sample drawn with another seed.
[ -f "$DEST/samples.jsonl" ] || "$PY" -m latentkv.cli sample "$SOURCE" "$DEST/samples.jsonl" \
  --tokens "${SAMPLE_TOKENS:-10000000}" --device "$DEVICE"
[ -f "$DEST/heldout.jsonl" ] || "$PY" -m latentkv.cli sample "$SOURCE" "$DEST/heldout.jsonl" \
  --tokens "${HELDOUT_TOKENS:-262144}" --seed 1 --device "$DEVICE"

if [ "$GPUS" -gt 1 ]; then
  launch=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$GPUS" -m latentkv.cli)
else
  launch=("$PY" -m latentkv.cli)
fi
# shellcheck disable=SC2086
"${launch[@]}" finetune "$CONVERTED" "$DEST/healed" --teacher "$SOURCE" --data "$DEST/samples.jsonl" \
  --mode attention --tokens "$TOKENS" --compile --overwrite ${FINETUNE_ARGS:-}

BOOK=$("$PY" -c 'from latentkv.data import CALIBRATION_TEXT; print(CALIBRATION_TEXT / "austen-emma.txt.gz")')
"$PY" "$HERE/agreement_by_text.py" --source "$SOURCE" --device "$DEVICE" \
  --models one-shot="$CONVERTED" healed="$DEST/healed" \
  --texts wikitext2-test=latentkv:wikitext2-test samples="$DEST/heldout.jsonl" gutenberg="$BOOK" \
  --out "$DEST/agreement.md"
