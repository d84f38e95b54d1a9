#!/usr/bin/env bash
# Creates .venv (once) and installs mi with its test extras into it. Sourced by demo.sh/test.sh.
# On a host without an NVIDIA GPU, torch's CPU build is installed first: a bare `torch` would
# pull a multi-GB CUDA build. Set MI_TORCH_SPEC to choose another torch (e.g. "torch" on GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    default_torch="torch"
  else
    default_torch="torch==2.13.0"  # the CPU build (on this project's CI machines it is on local disk)
  fi
  python -m pip install -q "${MI_TORCH_SPEC:-$default_torch}"
fi
if ! python -c "import mi, pytest, openai" 2>/dev/null || [ setup.cfg -nt .venv/.mi-installed ]; then
  python -m pip install -q -e '.[test]'
  touch .venv/.mi-installed
fi
