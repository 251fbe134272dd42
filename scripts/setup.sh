#!/usr/bin/env bash
# Set up a virtual environment in .venv with dycoke-cli and its test extras.
# CPU-only machines get the CPU build of torch (torch==2.13.0); on a machine with an NVIDIA
# GPU, install a CUDA build first (see README, "GPU"), then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${DYCOKE_CPU_TORCH:-}" ]; then
    echo "setup: NVIDIA GPU found; installing the default (CUDA) torch build" >&2
    "$VPY" -m pip install -q "torch>=2.11,<2.14"  # the range pyproject.toml declares (tested)
  else
    "$VPY" -m pip install -q "torch==2.13.0"
  fi
fi
"$VPY" -m pip install -q -e ".[test]"
echo "setup: ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
