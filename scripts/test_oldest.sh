#!/usr/bin/env bash
# The suite at the oldest transformers that pyproject.toml allows, in its own venv (.venv-oldest),
# so both ends of the supported range are tested. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$OLDEST" ] || { echo "test_oldest: no lower bound for transformers in pyproject.toml" >&2; exit 1; }
PY=${PYTHON:-python3}
[ -x .venv-oldest/bin/python ] || "$PY" -m venv .venv-oldest
VPY=.venv-oldest/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VPY" -c "import torch" >/dev/null 2>&1 || "$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[test]" "transformers==$OLDEST.0"
echo "test_oldest: $("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')" >&2
"$VPY" -m pytest -q "$@"
