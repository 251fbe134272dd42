#!/usr/bin/env bash
# Set up a virtual environment in .venv with dycoke-cli and its test extras.
# torch first, chosen by scripts/pick_torch.py (it says which build and why): a torch already in
# the venv within the tested range is kept; a CPU-only machine gets the newest tested CPU build
# from PyTorch's CPU index, or from the default index when that index cannot be reached; a
# machine with an NVIDIA GPU gets the newest tested CUDA build (README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
INSTALLED=$("$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
TORCH_ARGS=$("$VPY" scripts/pick_torch.py "$INSTALLED" "${DYCOKE_TORCH_RELEASE:-}")
if [ -n "$TORCH_ARGS" ]; then
  # shellcheck disable=SC2086 - the words are pip arguments
  "$VPY" -m pip install -q $TORCH_ARGS
fi
"$VPY" -m pip install -q -e ".[test]"
echo "setup: ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
