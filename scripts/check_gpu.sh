#!/usr/bin/env bash
# On a CUDA GPU: the kernel tests (compiled), the launch-configuration tuning of the decode kernel, the
# width sweep against the source model's SDPA decode, the quantized-cache timings (on Hopper also through
# the Gluon kernel) and the sparse-decode step (shared and per-latent-head block tables).
#
#   bash scripts/check_gpu.sh                 # everything, results in DEST (default runs/check_gpu)
#   STEPS="tests widths" bash scripts/check_gpu.sh
#
# Steps: tests (pytest of the kernel, decode and offload tests on the GPU), tune (scripts/tune_decode.py:
# writes DEST/tuned.json; copy it to latentkv/kernels/tuned/<family>.json to make it the default), widths
# (scripts/bench_decode.py --preset widths), quantized (scripts/bench_decode_quantized.py; --wgmma on
# compute capability 9.x), sparse (scripts/bench_sparse_decode.py, MLA and GLA-2 with --per-head).
# TUNE_MINUTES bounds the tuning (default 4; the wide latents come first so that they are measured within
# it); PYTHON (default python) runs everything.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEST=${DEST:-runs/check_gpu}
STEPS=${STEPS:-tests tune widths quantized sparse}
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
      tests="tests/test_kernels.py tests/test_decode_loop.py tests/test_sparsity_offload.py"
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
      hopper=$($PYTHON -c "import torch; print(int(torch.cuda.get_device_capability()[0] == 9))")
      wgmma=(); [ "$hopper" = 1 ] && wgmma=(--wgmma 1 2 4)
      $PYTHON scripts/bench_decode_quantized.py "${wgmma[@]}" --json "$DEST/quantized.json" 2>&1 | grep -v Warning | tail -25 ;;
    sparse)
      $PYTHON scripts/bench_sparse_decode.py --json "$DEST/sparse_mla.json" 2>&1 | grep -v Warning | tail -8
      $PYTHON scripts/bench_sparse_decode.py --latent-heads 2 --per-head --json "$DEST/sparse_gla2.json" 2>&1 \
        | grep -v Warning | tail -10 ;;
    *) echo "unknown step $step (tests, tune, widths, quantized, sparse)"; status=2 ;;
  esac
done
exit $status
