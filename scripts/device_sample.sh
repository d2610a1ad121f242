#!/usr/bin/env bash
# On a lent GPU, after `device_heal.sh part2` built SmolLM2: sample TOKENS teacher tokens (default 20M) to
# /tmp/teacher-<N>M.jsonl and put it, xz-compressed in 15 MB pieces, in $OUT (what comes back is limited
# to 16 MiB a file). Carry the pieces in later and `device_heal.sh stash` + part2/again unpack them.
#   run("bash scripts/device_heal.sh again bash scripts/device_sample.sh")
set -euo pipefail
TOKENS=${TOKENS:-20000000}
NAME="teacher-$((TOKENS / 1000000))M.jsonl"
SRC=$(python3 -c 'from latentkv.io.assets import smollm2_folder; print(smollm2_folder())')
python3 - "$SRC" "/tmp/$NAME" "$TOKENS" <<'PY'
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from latentkv.finetune.teacher_text import SampleOptions, sample_teacher_text
print(sample_teacher_text(SampleOptions(teacher=sys.argv[1], output=sys.argv[2], tokens=int(sys.argv[3]),
                                        batch_size=2048, device="cuda")))
PY
xz -T16 -6 -k -c "/tmp/$NAME" > "/tmp/$NAME.xz"
ls -la "/tmp/$NAME" "/tmp/$NAME.xz"
split -b 15M -d "/tmp/$NAME.xz" "$OUT/$NAME.xz.part"
ls -la "$OUT"
