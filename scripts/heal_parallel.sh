#!/usr/bin/env bash
# Several healing benchmarks at once on one GPU (a 135M model leaves most of an H100 idle, so two
# runs side by side cost little more wall time than one). Run on the device after SmolLM2 is built
# (scripts/device_heal.sh part2 / again):
#
#   bash scripts/device_heal.sh again bash scripts/heal_parallel.sh NAME1 "ARGS1" NAME2 "ARGS2" ...
#
# Each NAME gets its own work folder and writes $OUT/NAME.{md,json} and $OUT/NAME.log; ARGS are
# scripts/bench_heal.py options (word-split: no spaces inside one option's value).
set -uo pipefail
cd "$(dirname "$0")/.."
pids=()
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2
  # shellcheck disable=SC2086
  python3 scripts/bench_heal.py --work "/tmp/bench_heal_$name" --name "$name" --out-dir "$OUT" $args \
    > "$OUT/$name.log" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for f in "$OUT"/*.md; do echo "== $f"; grep -E '^\| ' "$f"; done
exit $status
