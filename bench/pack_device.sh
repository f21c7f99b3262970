#!/bin/bash
# Here (with network): fill .whl/ (git-ignored) with what a lent GPU machine lacks and cannot download:
# gguf-py as a wheel, and ggml's quantizer library (libggml-base.so of the cached llama.cpp build, plus the
# libgomp it links) so that the ggml comparisons of tests/test_formats_gpu.py run there too.
# Then pass carry [".whl"] and start the device command with `source bench/device_env.sh`.
#   bench/pack_device.sh --exl3   instead: exllamav3 1.6.5 and the wheels the device image lacks (cp312) in .whl/exl3,
#                                 SmolLM2's tokenizer and the wiki texts in .whl/qmcache, and SmolLM2-135M's GGUF in
#                                 3 parts (.whl/parts) for bench/exl3_device.sh (see bench/exl3_compare.py)
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
grep -qx '/.exl3build/' .git/info/exclude || echo /.exl3build/ >> .git/info/exclude
py=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = --exl3 ]; then
  mkdir -p .whl/exl3 .whl/parts
  "$py" -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl/exl3 exllamav3==1.6.5 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated_types typing_inspection typing_extensions==4.16.0 marisa_trie highspy==1.16.0
  ls .whl/gguf-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps -d .whl "gguf==$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  QUANTMIX_CACHE=$PWD/.whl/qmcache "$py" -c 'from quantmix.fixtures.tiny import _smollm2_tokenizer; from quantmix.fixtures.text import read_text; _smollm2_tokenizer(); read_text("wiki-eval")'
  g=$("$py" -c 'from quantmix.fixtures.smollm2 import smollm2_gguf; print(smollm2_gguf())')
  cp "$g" .whl/parts/smollm2.gguf && (cd .whl/parts && sha256sum smollm2.gguf > smollm2.gguf.sha256 && \
    split -d -n 3 smollm2.gguf smollm2.gguf.part && rm smollm2.gguf)
  du -sh .whl/exl3 .whl/qmcache .whl/parts
  exit 0
fi
mkdir -p .whl/lib
ls .whl/gguf-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps -d .whl "gguf==$("$py" -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
lib=$("$py" -c 'from quantmix.tools.llamacpp import ensure_ggml_base; lc = ensure_ggml_base(); print(lc.libggml_base if lc else "")')
[ -n "$lib" ] || { echo "no libggml-base here to carry"; exit 1; }
cp -L "$lib" .whl/lib/libggml-base.so
gomp=$(ldd "$lib" | awk '/libgomp/ {print $3}')
[ -n "$gomp" ] && cp -L "$gomp" .whl/lib/
du -sh .whl
