#!/usr/bin/env bash
# The suite at the oldest torch and transformers that pyproject.toml allows, in its own venv
# (.venv-oldest), so both ends of the supported ranges are tested. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
OLDEST_TORCH=$(sed -n 's/^ *"torch>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$OLDEST" ] && [ -n "$OLDEST_TORCH" ] || { echo "test_oldest: no lower bound for torch or transformers in pyproject.toml" >&2; exit 1; }
PY=${PYTHON:-python3}
VENV=.venv-oldest
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
INSTALLED=$("$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
case "$INSTALLED" in "$OLDEST_TORCH"|"$OLDEST_TORCH+"*) ;; *)
  TORCH_ARGS=$("$VPY" scripts/pick_torch.py "" "$OLDEST_TORCH.0")
  # shellcheck disable=SC2086 - the words are pip arguments
  "$VPY" -m pip install -q --force-reinstall --no-deps $TORCH_ARGS ;;
esac
"$VPY" -m pip install -q -e ".[test]" "torch==$OLDEST_TORCH.*" "transformers==$OLDEST.0"
echo "test_oldest: $("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')" >&2
"$VPY" -m pytest -q "$@"
