#!/usr/bin/env bash
# Build a virtualenv with latentkv and its test tools.
#   bash scripts/setup_env.sh          # .venv, the versions pinned in requirements.lock (reproducible)
#   bash scripts/setup_env.sh newest   # .venv, the newest releases pip resolves today
#   bash scripts/setup_env.sh floor    # .venv-floor, the oldest releases pyproject.toml declares
# torch is installed only where the environment has none (torch==2.13.0, which PyPI serves as a CPU
# build for this purpose only where your pip is configured so; on a GPU machine install your CUDA
# torch into the environment first and this leaves it alone).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-lock}
PY=${PYTHON:-python3}
case "$MODE" in
  lock|newest) VENV=.venv ;;
  floor) VENV=.venv-floor ;;
  *) echo "usage: $0 [lock|newest|floor]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
# Keep whichever torch is there: resolving the rest must never swap it for another build.
TORCH="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
case "$MODE" in
  lock) "${PIP[@]}" -r requirements.lock "$TORCH" && "${PIP[@]}" --no-deps -e . ;;
  newest) "${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[test]" "$TORCH" ;;
  floor) "${PIP[@]}" -c constraints/floor.txt -e ".[test]" "$TORCH" ;;
esac
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("environment:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "peft", "accelerate", "triton")))
PY
