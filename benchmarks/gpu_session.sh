#!/usr/bin/env bash
# One GPU session in one command (NOTES.md section 6: a machine start costs 1-2 minutes of the
# 30 a session gets, one command may run 10): install the carried wheels, print the versions,
# run the GPU tests, the whole suite (Python 3.12 + PyAV 19), then the benchmark of the
# LLaVA-OneVision 0.5B and 7B architectures in bf16 on CUDA (frames 32,64,128, 64 tokens).
#
# Before (dev machine):  bash benchmarks/fetch_gpu_wheels.sh       # fills .whl/ (git-ignored)
# On the GPU machine, from the repo root, with the device tool:
#     carry [".whl"], command "bash benchmarks/gpu_session.sh", timeout_s 600
# Everything lands in $OUT (the device tool returns it; default runs/gpu_session): one log per
# step (NN-step.log), bench_<arch>.{json,png,md}, summary.txt.
#
# Steps, in this order: install info serve gpu-tests attention bench-0.5b bench-7b suite. Name some to
# run only those (install always runs):  bash benchmarks/gpu_session.sh bench-7b
# Each step runs under `timeout`: its cap in seconds (T_INSTALL 45, T_INFO 20, T_SERVE 30, T_GPU_TESTS 60,
# T_ATTENTION 45, T_BENCH_05B 60, T_BENCH_7B 90; the suite, last, gets what is left), never past the
# session's deadline (BUDGET_S, default 330 s from the start: with a machine's cold start of 1-2
# minutes, the whole run fits 7 minutes of device time). The figures come first; the suite runs
# with -m "not gpu" and without -x (DYCOKE_DEVICE=cpu keeps its tests on the CPU), so one failure
# does not hide the rest. A failed step does not stop the next ones; the exit status is 1 when
# any step failed or was skipped for lack of time.
set -u

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_session}
BUDGET_S=${BUDGET_S:-330}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
STEP_NO=0

# run_step NAME CAP_S [--no-tests-ok] COMMAND...: COMMAND under timeout, output teed to $OUT.
# --no-tests-ok: pytest's exit 5 (no test selected) counts as a pass.
run_step() {
    local name=$1 cap=$2 no_tests_ok=0
    shift 2
    if [ "${1:-}" = "--no-tests-ok" ]; then no_tests_ok=1; shift; fi
    STEP_NO=$((STEP_NO + 1))
    local log
    log=$(printf '%s/%02d-%s.log' "$OUT" "$STEP_NO" "$name")
    local left=$((BUDGET_S - SECONDS - 5))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: SKIPPED, ${left}s left of the ${BUDGET_S}s budget" | tee "$log"
        echo "$name SKIPPED (no time left)" >> "$SUMMARY"
        FAILED=1
        return 1
    fi
    echo "=== $name (timeout ${limit}s, $((BUDGET_S - SECONDS))s of the budget left): $*" | tee "$log"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 5 ] && [ "$no_tests_ok" -eq 1 ]; then rc=0; fi
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT"; elif [ "$rc" -ne 0 ]; then status="FAILED"; fi
    echo | tee -a "$log"  # after a progress line that did not end (pytest's dots)
    echo "=== $name: $status (exit $rc, $((SECONDS - t0))s)" | tee -a "$log"
    echo "$name $status (exit $rc, $((SECONDS - t0))s)" >> "$SUMMARY"
    if [ "$rc" -ne 0 ]; then FAILED=1; fi
    return "$rc"
}

# The carried wheels into /tmp/site, the exact command of NOTES.md section 6.
install_wheels() {
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        echo "no .whl/*.whl: run benchmarks/fetch_gpu_wheels.sh here and carry [\".whl\"]" >&2
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

# transformers checks its dependencies' versions when it is imported: if the carried wheels do not
# satisfy it, nothing else can run, so the session stops here with one line saying why.
import_check() {
    "$PY" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)" \
        > "$OUT/import.log" 2>&1 && return 0
    echo "gpu_session: transformers does not import with the carried wheels: $(grep -v '^\s*$' "$OUT/import.log" | tail -n 1)" >&2
    return 1
}

print_versions() {
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "regex", "av", "fastapi",
             "uvicorn", "pydantic", "pytest", "hypothesis", "PIL", "numpy", "typer", "rich", "dycoke_cli"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # report and go on: the next steps say what it breaks
        print(name, "MISSING:", type(exc).__name__, exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "",
      "cudnn SDPA", torch.backends.cuda.cudnn_sdp_enabled())
EOF
    local rc=$?
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || rc=1
    return "$rc"
}

# The benchmark of one --arch in bf16 on CUDA; the device defaults: frames 32,64,128, 64 tokens.
bench() {
    local arch=$1
    "$PY" benchmarks/bench_compression.py --arch "$arch" --device cuda --dtype bfloat16 \
        --json "$OUT/bench_$arch.json" --plot "$OUT/bench_$arch.png" --markdown "$OUT/bench_$arch.md"
}

STEPS="install info serve gpu-tests attention bench-0.5b bench-7b suite"
for step in "$@"; do
    case " $STEPS " in
        *" $step "*) ;;
        *) echo "unknown step '$step' (steps: $STEPS)" >&2; exit 2 ;;
    esac
done

wanted() {  # wanted STEP [NAMED...]: true when no step was named, or STEP was
    local step=$1 s
    shift
    [ "$#" -eq 0 ] && return 0
    for s in "$@"; do [ "$s" = "$step" ] && return 0; done
    return 1
}

# `dycoke serve` from the carried wheels (fastapi or uvicorn may import a package not carried):
# start it on a free port, read /health, stop it.
serve_check() {
    local err="$OUT/serve.stderr"
    "$PY" -m dycoke_cli serve --model demo --port 0 2> "$err" &
    local pid=$! url=""
    for _ in $(seq 200); do
        url=$(sed -n 's/.*serving demo at \(http[^ ]*\)\/v1 .*/\1/p' "$err")
        [ -n "$url" ] && break
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.1
    done
    [ -n "$url" ] && "$PY" -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + '/health').read().decode())" "$url"
    local rc=$?
    [ -n "$url" ] || { cat "$err"; rc=1; }
    kill "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null
    return "$rc"
}

# What travels: the tree and the wheels, against the device tool's 64 MiB cap.
carried() {
    du -sh .whl 2> /dev/null
    git ls-files -z | xargs -0 du -cb 2> /dev/null | tail -n 1 | awk '{printf "tracked tree: %.1f MB\n", $1 / 1e6}'
}

export -f install_wheels print_versions bench serve_check carried
export PY OUT

run_step install "${T_INSTALL:-45}" bash -c install_wheels
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
import_check || { echo "import FAILED" >> "$SUMMARY"; cat "$SUMMARY"; exit 1; }
wanted info "$@" && run_step info "${T_INFO:-20}" bash -c "print_versions; carried"
wanted serve "$@" && run_step serve "${T_SERVE:-30}" bash -c serve_check
wanted gpu-tests "$@" && run_step gpu-tests "${T_GPU_TESTS:-60}" --no-tests-ok "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
wanted attention "$@" && run_step attention "${T_ATTENTION:-45}" \
    "$PY" benchmarks/bench_attention.py --arch 7b --json "$OUT/attention_7b.json"
wanted bench-0.5b "$@" && run_step bench-0.5b "${T_BENCH_05B:-60}" bash -c "bench 0.5b"
wanted bench-7b "$@" && run_step bench-7b "${T_BENCH_7B:-90}" bash -c "bench 7b"
wanted suite "$@" && run_step suite "${T_SUITE:-$((BUDGET_S - SECONDS - 5))}" \
    env DYCOKE_DEVICE=cpu "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider tests

echo "=== summary ($SECONDS s in all; files in $OUT)"
cat "$SUMMARY"
exit "$FAILED"
