#!/usr/bin/env bash
# The healing benchmark on a lent GPU machine that has no internet and gets files only through
# carried folders of at most 64 MiB per call (see /work/.library/device/README.md).
#
#   scripts/device_heal.sh prepare   # here: split the SmolLM2 GGUF, copy the texts and the gguf wheel
#   run(carry=[.heal_carry],  "bash scripts/device_heal.sh part1")   # there: keep half 1 in /tmp, GPU smoke test
#   run(carry=[.heal_carry2], "bash scripts/device_heal.sh part2")   # there, within 30 s: join, dequantize, bench
#   run("bash scripts/device_heal.sh part3")   # any time: step throughput on random weights + kernel profile
#   run("bash scripts/device_heal.sh part2 python3 scripts/bench_quality.py --device cuda ...")  # part2 running (python3 or bash)
#       another command than bench_heal.py once SmolLM2 is built
#   run("bash scripts/device_heal.sh again python3 scripts/bench_heal.py --to gta ...")  # within 30 s of
#       the last call: the same machine, SmolLM2 still built in /tmp
#   run(carry=[.heal_carry3], "bash scripts/device_heal.sh stash .heal_carry3")  # between part1 and part2:
#       more files for /tmp (a sampled-text file from scripts/device_sample.sh as NAME.xz.partNN pieces is
#       joined and unpacked to /tmp/NAME by part2 and again)
#
# .heal_carry/ and .heal_carry2/ are git-ignored (.git/info/exclude). part2 writes
# heal_h100.{md,json}, the bench log and the runs' logs to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
STASH=/tmp/heal_stash
export LATENTKV_CACHE=/tmp/lkv PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error

setup_device() {
  # the gguf package (dequantizing needs it) and the texts where the code expects ../shared/corpora
  local carry=$1
  if compgen -G "$carry/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$carry"/*.whl
  fi
  export PYTHONPATH="$PWD:/tmp/site"
  if [ -d "$carry/corpora" ]; then mkdir -p "$STASH" && cp -r "$carry/corpora" "$STASH/"; fi
  mkdir -p ../shared && [ -e ../shared/corpora ] || ln -s "$STASH/corpora" ../shared/corpora
}

unstash_samples() {
  local first name
  for first in "$STASH"/*.xz.part00; do
    [ -e "$first" ] || continue
    name=$(basename "${first%.xz.part00}")
    [ -f "/tmp/$name" ] || cat "${first%00}"* | xz -d > "/tmp/$name"
    ls -la "/tmp/$name"
  done
}

case "${1:-}" in
prepare)
  src="${LATENTKV_CACHE:-$HOME/.cache/latentkv}/smollm2/$GGUF_NAME"
  [ -f "$src" ] || src=$(.venv/bin/python -c 'from latentkv.io.assets import smollm2_gguf; print(smollm2_gguf())')
  rm -rf .heal_carry .heal_carry2 && mkdir -p .heal_carry/corpora/wikitext-2-raw .heal_carry2
  size=$(stat -c %s "$src"); half=$((size / 2))
  head -c "$half" "$src" > .heal_carry/gguf.part1
  tail -c +"$((half + 1))" "$src" > .heal_carry2/gguf.part2
  cp -r ../shared/corpora/gutenberg .heal_carry/corpora/
  cp ../shared/corpora/wikitext-2-raw/wiki.test.raw .heal_carry/corpora/wikitext-2-raw/
  cp -r ../shared/corpora/tinyshakespeare .heal_carry/corpora/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .heal_carry gguf==0.19.0
  cp .heal_carry/gguf-*.whl .heal_carry2/
  du -sh .heal_carry .heal_carry2
  ;;
part1)
  setup_device .heal_carry
  cp .heal_carry/gguf.part1 "$STASH/"
  nvidia-smi --query-gpu=name,memory.total --format=csv
  [ -n "${SKIP_SMOKE:-}" ] && exit 0
  python3 -c 'import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)'
  # GPU smoke test on a tiny converted model: both modes, compiled, bf16, resume and merge.
  TORCH_LOGS=recompiles python3 - <<'EOF'
import logging, shutil, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from tiny_models import TINY_TEXT, build_tiny_model
from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.finetune import FinetuneOptions, finetune
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
for d in (76, 88, 100):  # the converted SmolLM2's q/k head widths at 25% (value width 64)
    q, k = (torch.randn(16, 9, 1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(16, 9, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            print("sdpa", d, backend.name, "ok")
        except RuntimeError as exc:
            print("sdpa", d, backend.name, "unavailable:", str(exc).splitlines()[0][:100])
root = Path("/tmp/smoke"); shutil.rmtree(root, ignore_errors=True); root.mkdir()
build_tiny_model("llama", root / "src")
convert(ConvertOptions(source=str(root / "src"), output=str(root / "mla"), method_options=dict(kv_budget=0.25),
                       calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(root / "c")), device="cuda"))
for mode in ("lora", "attention"):
    kw = dict(model=str(root / "mla"), output=str(root / mode), data=str(TINY_TEXT), teacher=str(root / "src"), mode=mode,
              tokens=40 * 16 * 256, seq_len=256, batch_size=16, micro_batch_size=8, compile=True, eval_windows=8,
              eval_window=256, eval_text=str(TINY_TEXT), eval_at=(20 * 16 * 256,), log_every=10, merge=True)
    t = time.time()
    r = finetune(FinetuneOptions(**kw, stop_after_steps=15))
    r = finetune(FinetuneOptions(**kw))
    print(mode, "OK", f"{time.time() - t:.1f}s", r.before, r.evals, r.after, f"{r.tokens_per_s:.0f} tok/s", r.resumed_from)
EOF
  ;;
part2)
  setup_device .heal_carry2
  [ -f "$STASH/gguf.part1" ] || { echo "half 1 of the GGUF is not in $STASH: the machine was not kept warm; run part1 again"; exit 3; }
  mkdir -p "$LATENTKV_CACHE/smollm2"
  cat "$STASH/gguf.part1" .heal_carry2/gguf.part2 > "$LATENTKV_CACHE/smollm2/$GGUF_NAME"
  python3 -c 'from latentkv.io.assets import smollm2_folder; print(smollm2_folder())'
  unstash_samples
  if [ "${2:-}" = python3 ] || [ "${2:-}" = bash ]; then "${@:2}" 2>&1 | tee "$OUT/part2.log"; exit; fi
  left=$(( ${DEADLINE:-560} - SECONDS ))
  set -o pipefail
  TORCH_LOGS=recompiles python3 scripts/bench_heal.py --out-dir "$OUT" --work /tmp/bench_heal --deadline "$left" \
    "${@:2}" 2>&1 | tee "$OUT/bench_heal.log"
  cp /tmp/bench_heal/*.log "$OUT/" 2>/dev/null || true
  ;;
again)
  setup_device .heal_carry2
  [ -f "$LATENTKV_CACHE/smollm2/$GGUF_NAME" ] || { echo "SmolLM2 is not built on this machine: run part1 and part2 first"; exit 3; }
  unstash_samples
  "${@:2}" 2>&1 | tee "$OUT/again.log"
  cp /tmp/bench_heal/*.log "$OUT/" 2>/dev/null || true
  ;;
stash)
  mkdir -p "$STASH" && cp "${2:?the carried folder}"/* "$STASH/" && ls -la "$STASH"
  ;;
part3)
  # throughput only (random weights of the same shapes; no files needed): tokens/s, MFU, kernel profile
  export PYTHONPATH="$PWD"
  python3 scripts/bench_heal.py --synthetic --out-dir "$OUT" --work /tmp/synthetic "${@:2}" 2>&1 | tee "$OUT/bench_heal_synthetic.log"
  ;;
*)
  echo "usage: $0 prepare|part1|stash|part2|again|part3 [bench_heal.py options | command]"; exit 2 ;;
esac
