#!/usr/bin/env bash
# The whole test suite on the CPU (Triton kernels run under TRITON_INTERPRET=1), on the newest
# releases of every dependency. `bash scripts/test.sh --floor` runs the fast subset (convert, eval,
# fresh-process reload, incremental decoding, decode-check on tiny models) on the oldest declared
# releases instead. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--floor" ]; then
  shift
  bash scripts/setup_env.sh floor
  exec .venv-floor/bin/python -m pytest tests -q -p no:cacheprovider -m floor "$@"
fi
bash scripts/setup_env.sh newest
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
