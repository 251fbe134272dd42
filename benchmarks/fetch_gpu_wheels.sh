#!/usr/bin/env bash
# Fetch, on the dev machine (it has PyPI access), the wheels the GPU machine lacks, into .whl/
# (git-ignored through .git/info/exclude), for benchmarks/gpu_session.sh to install there.
# The GPU image has Python 3.12, transformers 5.17 and no PyAV; see NOTES.md section 6. The
# wheels go in with --no-deps over the image, so the list names what transformers checks at
# import (tokenizers, huggingface-hub and what it imports, safetensors, regex: 5.25 refuses
# older ones), the suite's property tests (hypothesis) and the server's stack (FastAPI,
# uvicorn, pydantic). Not the openai client (its tests are skipped without it), nor numpy,
# PyYAML, tqdm, filelock or packaging, which the image has: the carried tree is capped at 64 MiB.
#
#   bash benchmarks/fetch_gpu_wheels.sh                  # the versions pyproject.toml was tested with, ~60 MB
#   bash benchmarks/fetch_gpu_wheels.sh pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
#                          # extra requirements are appended (here: if the image lacked pytest)
#
# Then, with the device tool: carry [".whl"], command "bash benchmarks/gpu_session.sh".
# What travels with the working tree is capped at 64 MiB: keep .whl well under that.
# PYTHON picks the interpreter whose pip downloads (default python3).
set -u

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}

exclude=$(git rev-parse --git-path info/exclude) || exit 1
mkdir -p "$(dirname "$exclude")"
if ! grep -qxF '/.whl/' "$exclude" 2>/dev/null; then
    echo '/.whl/' >> "$exclude"
    echo "added /.whl/ to $exclude"
fi

# The recipe of NOTES.md section 6: binary wheels for CPython 3.12 on manylinux x86_64, no deps.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.25.0 tokenizers==0.23.3 huggingface-hub==2.4.0 safetensors==0.8.0 \
    regex==2026.12.2 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 h11==0.16.0 anyio==4.16.0 idna==3.21 \
    av==19.0.2 hypothesis==6.170.27 sortedcontainers==2.4.0 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 "$@" \
    || { echo "pip download failed" >&2; exit 1; }

ls -l .whl
size_mb=$(du -sm .whl | cut -f1)
echo ".whl: ${size_mb} MB"
if [ "$size_mb" -gt 60 ]; then
    echo "warning: .whl is ${size_mb} MB; the carried tree is capped at 64 MiB (remove stale wheels)" >&2
fi
git check-ignore -q .whl || { echo "warning: .whl is not ignored by git" >&2; exit 1; }
