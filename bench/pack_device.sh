#!/bin/bash
# Here (with network): fill .whl/ (git-ignored) with what a lent GPU machine lacks and cannot download:
# gguf-py as a wheel, and ggml's quantizer library (libggml-base.so of the cached llama.cpp build, plus the
# libgomp it links) so that the ggml comparisons of tests/test_formats_gpu.py run there too.
# Then pass carry [".whl"] and start the device command with `source bench/device_env.sh`.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
mkdir -p .whl/lib
py=${PYTHON:-.venv/bin/python}
ls .whl/gguf-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps -d .whl "gguf==$("$py" -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
lib=$("$py" -c 'from quantmix.tools.llamacpp import ensure_ggml_base; lc = ensure_ggml_base(); print(lc.libggml_base if lc else "")')
[ -n "$lib" ] || { echo "no libggml-base here to carry"; exit 1; }
cp -L "$lib" .whl/lib/libggml-base.so
gomp=$(ldd "$lib" | awk '/libgomp/ {print $3}')
[ -n "$gomp" ] && cp -L "$gomp" .whl/lib/
du -sh .whl
