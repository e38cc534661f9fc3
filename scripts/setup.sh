#!/usr/bin/env bash
# Creates .venv (if needed) and installs the project with its blur, scaleout and test extras.
# torch is pinned to the 2.13.0 CPU build; a CUDA machine can install its own torch>=2.3 first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[blur,scaleout,test]"
