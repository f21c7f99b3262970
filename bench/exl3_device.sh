#!/bin/bash
# exllamav3 on the lent GPU without network: its wheel and the few packages the image lacks travel in .whl/exl3
# (bench/pack_device.sh --exl3), the extension is built there on first import into .exl3build/ (git-ignored, kept
# between calls while the machine stays warm). Pass carry [".whl"].
#   bench/exl3_device.sh [ARGS of bench/exl3_device.py]   rates and errors on real shapes; the built extension back
#   bench/exl3_device.sh --tiny [ARGS of bench/exl3_tiny.py]   measure, plan, convert, KLD on a tiny Llama
#   bench/exl3_device.sh --compare [ARGS of bench/exl3_compare.py]   quantmix vs exllamav3 optimize / uniform
set -u
# files too big for one call travel in several: each call's .whl/stash/* is kept in .exl3build/stash/ (ignored,
# kept while the machine stays warm); `bench/exl3_device.sh --stash` only does that
mkdir -p .exl3build/stash
[ -d .whl/stash ] && find .whl/stash -type f -exec mv {} .exl3build/stash/ \;
if ls .whl/exl3/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/exl3/*.whl .whl/gguf-*.whl \
    || exit 1
elif [ ! -d /tmp/site/exllamav3 ]; then
  echo "no wheels in .whl/exl3 and none installed in /tmp/site: carry .whl (bench/pack_device.sh --exl3)"; exit 1
fi
if [ "${1:-}" = --stash ]; then ls -la .exl3build/stash; exit 0; fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 QUANTMIX_CACHE=$PWD/.whl/qmcache
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} TORCH_EXTENSIONS_DIR=$PWD/.exl3build
mkdir -p "$TORCH_EXTENSIONS_DIR"
so=/tmp/site/exllamav3_ext.cpython-312-x86_64-linux-gnu.so
for d in .whl/exl3 .exl3build/stash; do
  [ -f $d/exllamav3_ext.so.xz.00 ] && [ ! -f $so ] && cat $d/exllamav3_ext.so.xz.* | xz -d > $so.tmp && mv $so.tmp $so
done
# a GGUF carried in parts (split -d -b): NAME.gguf.part00, part01, ... with NAME.gguf.sha256
for sum in .exl3build/stash/*.gguf.sha256; do
  [ -f "$sum" ] || continue
  g=${sum%.sha256}
  [ -f "$g" ] || { cat "$g".part* > "$g".tmp && mv "$g".tmp "$g"; }
  (cd .exl3build/stash && sha256sum -c "$(basename "$sum")") || exit 1
done
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
