#!/bin/bash
# exllamav3 on the lent GPU without network: its wheel and the few packages the image lacks travel in .whl/exl3
# (bench/pack_device.sh --exl3), the extension is built there on first import into .exl3build/ (git-ignored, kept
# between calls while the machine stays warm). Pass carry [".whl"].
#   bench/exl3_device.sh [ARGS of bench/exl3_device.py]   rates and errors on real shapes; the built extension back
#   bench/exl3_device.sh --tiny [ARGS of bench/exl3_tiny.py]   measure, plan, convert, KLD on a tiny Llama
#   bench/exl3_device.sh --compare [ARGS of bench/exl3_compare.py]   quantmix vs exllamav3 optimize / uniform
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/exl3/*.whl .whl/gguf-*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 QUANTMIX_CACHE=$PWD/.whl/qmcache
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} TORCH_EXTENSIONS_DIR=$PWD/.exl3build
mkdir -p "$TORCH_EXTENSIONS_DIR"
[ -f .whl/exl3/exllamav3_ext.so.xz.00 ] && [ ! -f /tmp/site/exllamav3_ext.cpython-312-x86_64-linux-gnu.so ] && \
  cat .whl/exl3/exllamav3_ext.so.xz.* | xz -d > /tmp/site/exllamav3_ext.cpython-312-x86_64-linux-gnu.so
nvcc --version | tail -1; nproc; which ninja
python3 -c "import sys, importlib.util as u; print(sys.version.split()[0], {m: bool(u.find_spec(m)) for m in \
  ('torch', 'transformers', 'tokenizers', 'safetensors', 'yaml', 'rich', 'ninja', 'PIL', 'marisa_trie', 'pydantic', \
   'llguidance', 'flash_attn', 'triton', 'highspy', 'gguf', 'accelerate')})"
start=$(date +%s)
if [ "${1:-}" = --compare ]; then
  shift
  python3 bench/exl3_compare.py "$@" 2>&1 | tee "${OUT:-/tmp}/exl3-compare.log" | cut -c1-400
  echo "wall $(( $(date +%s) - start )) s"; exit
fi
if [ "${1:-}" = --tiny ]; then
  shift
  python3 bench/exl3_tiny.py "$@" 2>&1 | tee "${OUT:-/tmp}/exl3-tiny.log" | cut -c1-400
  echo "wall $(( $(date +%s) - start )) s"; exit
fi
python3 bench/exl3_device.py "$@" 2>&1 | tee "${OUT:-/tmp}/exl3-device.log" | cut -c1-400
echo "wall $(( $(date +%s) - start )) s"
so=$(find "$TORCH_EXTENSIONS_DIR" -name 'exllamav3_ext*.so' | head -1)
if [ -n "$so" ] && [ -n "${OUT:-}" ]; then
  ls -la "$so"; xz -T16 -6 -c "$so" | split -b 15M -d - "$OUT/exllamav3_ext.so.xz."; ls -la "$OUT"
fi
