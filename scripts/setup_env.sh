#!/usr/bin/env bash
# Build .venv with latentkv and its test tools. torch is pinned to the CPU wheel this machine
# kind carries on disk (an unpinned torch would pull a multi-GB CUDA build); on a GPU machine,
# install your CUDA torch first and this leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
