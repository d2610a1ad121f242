#!/usr/bin/env bash
# On a CUDA GPU: the kernel tests (compiled), the launch-configuration tuning of the decode kernel, the
# width sweep against the source model's SDPA decode, and the quantized-cache timings.
#
#   bash scripts/check_gpu.sh                 # everything, results in DEST (default runs/check_gpu)
#   STEPS="tests widths" bash scripts/check_gpu.sh
#
# Steps: tests (pytest of the kernel and decode tests on the GPU), tune (scripts/tune_decode.py: writes
# DEST/tuned.json; copy it to latentkv/kernels/tuned/<family>.json to make it the default), widths
# (scripts/bench_decode.py --preset widths), quantized (scripts/bench_decode_quantized.py when present).
# TUNE_MINUTES bounds the tuning (default 4; the wide latents come first so that they are measured within
# it); PYTHON (default python) runs everything.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEST=${DEST:-runs/check_gpu}
STEPS=${STEPS:-tests tune widths quantized}
TUNE_MINUTES=${TUNE_MINUTES:-4}
TUNE_WIDTHS=${TUNE_WIDTHS:-"960+64 1024+64 192+64 96+32 448+64 48+32 156+36"}
TUNE_ROWS=${TUNE_ROWS:-"32 16"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p "$DEST"
status=0
for step in $STEPS; do
  echo "== $step"
  case $step in
    tests)
      tests="tests/test_kernels.py tests/test_decode_loop.py"
      [ -f tests/test_kernels_quantized.py ] && tests="$tests tests/test_kernels_quantized.py"
      $PYTHON -m pytest $tests -q -x -p no:cacheprovider -n "${JOBS:-8}" 2>&1 | tee "$DEST/tests.log" | tail -5
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    tune)
      family=$($PYTHON -c "from latentkv.kernels import tuning; import torch; print(tuning.gpu_family(torch.device('cuda')))")
      # start from the table the package ships for this GPU family: new shapes are added to it
      [ -f "latentkv/kernels/tuned/$family.json" ] && [ ! -f "$DEST/tuned.json" ] && cp "latentkv/kernels/tuned/$family.json" "$DEST/tuned.json"
      $PYTHON scripts/tune_decode.py --widths $TUNE_WIDTHS --rows $TUNE_ROWS --max-minutes "$TUNE_MINUTES" \
        --out "$DEST/tuned.json" --log "$DEST/tune.jsonl" 2>&1 | grep -v Warning | tee "$DEST/tune.log" | tail -20 ;;
    widths)
      tuned="$DEST/tuned.json"
      if [ -f "$tuned" ]; then  # time the launcher with the table just measured
        family=$($PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))['family'])" "$tuned")
        mkdir -p latentkv/kernels/tuned && cp "$tuned" "latentkv/kernels/tuned/$family.json"
      fi
      $PYTHON scripts/bench_decode.py --preset widths --json "$DEST/widths.json" --md "$DEST/widths.md" 2>&1 \
        | grep -v Warning | tail -22 ;;
    quantized)
      if [ -f scripts/bench_decode_quantized.py ]; then
        $PYTHON scripts/bench_decode_quantized.py --json "$DEST/quantized.json" 2>&1 | grep -v Warning | tail -15
      fi ;;
    *) echo "unknown step $step (tests, tune, widths, quantized)"; status=2 ;;
  esac
done
exit $status
