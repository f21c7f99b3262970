#!/bin/bash
# exllamav3 on the lent GPU without network: its wheel and the few packages the image lacks travel in .whl/exl3
# (bench/pack_device.sh --exl3), the extension is built there on first import into .exl3build/ (git-ignored, kept
# between calls while the machine stays warm), then bench/exl3_device.py runs. Pass carry [".whl"].
#   bench/exl3_device.sh [ARGS for exl3_device.py]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/exl3/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} TORCH_EXTENSIONS_DIR=$PWD/.exl3build
mkdir -p "$TORCH_EXTENSIONS_DIR"
nvcc --version | tail -1; nproc
start=$(date +%s)
python3 bench/exl3_device.py "$@" 2>&1 | tee "${OUT:-/tmp}/exl3-device.log" | cut -c1-400
echo "wall $(( $(date +%s) - start )) s"
so=$(find "$TORCH_EXTENSIONS_DIR" -name 'exllamav3_ext*.so' | head -1)
if [ -n "$so" ] && [ -n "${OUT:-}" ]; then
  ls -la "$so"; xz -T16 -6 -c "$so" | split -b 15M -d - "$OUT/exllamav3_ext.so.xz."; ls -la "$OUT"
fi
