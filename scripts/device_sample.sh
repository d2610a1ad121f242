#!/usr/bin/env bash
# on the device, after part2 built SmolLM2: sample N tokens to /tmp/teacher-20M.jsonl, then compress it into $OUT
set -euo pipefail
SRC=$(python3 -c 'from latentkv.io.assets import smollm2_folder; print(smollm2_folder())')
python3 - "$SRC" <<'PY'
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
from latentkv.finetune.teacher_text import SampleOptions, sample_teacher_text
r = sample_teacher_text(SampleOptions(teacher=sys.argv[1], output="/tmp/teacher-20M.jsonl", tokens=20_000_000,
                                      batch_size=2048, device="cuda"))
print(r)
PY
ls -la /tmp/teacher-20M.jsonl
xz -T16 -6 -k -c /tmp/teacher-20M.jsonl > /tmp/teacher-20M.jsonl.xz
ls -la /tmp/teacher-20M.jsonl.xz
split -b 15M -d /tmp/teacher-20M.jsonl.xz "$OUT/teacher-20M.jsonl.xz.part"
ls -la "$OUT"
