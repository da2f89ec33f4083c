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
case ",$EXTRAS," in
  *,bench,*)
    # Betty: pip picks betty-ml 0.1.1 on Python 3.11, whose darts step leaks the meta gradient
    # into the model (p.data.add, not add_). 0.2.1 declares Python < 3.11 but runs here; its
    # dependencies are torch and numpy, already installed.
    .venv/bin/python -m pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1 ;;
esac
