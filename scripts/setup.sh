#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install bilevel into it.
#
# The pinned CPU build of torch goes in first: an unpinned torch (asked for by any package) would
# pull gigabytes of CUDA wheels. Set TORCH_SPEC to install another build (e.g. a CUDA one), and
# EXTRAS to choose the optional dependency groups (default: dev).
#
#   bash scripts/setup.sh                 # .venv with torch==2.13.0 (CPU) and bilevel[dev]
#   EXTRAS=dev,bench bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
