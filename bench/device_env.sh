# Sourced first by every command on the lent GPU machine (no network there), from the repository root:
#   source bench/device_env.sh && python3 -m pytest -q tests/test_formats_gpu.py
# Installs the carried wheels (.whl/*.whl, made by bench/pack_device.sh) into /tmp/site, points quantmix at
# this checkout and a private cache, and puts the carried ggml quantizer library where quantmix looks for it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src QUANTMIX_CACHE=${QUANTMIX_CACHE:-/tmp/qm-cache} PYTHONUNBUFFERED=1
if [ -f .whl/lib/libggml-base.so ]; then
  export LD_LIBRARY_PATH=$PWD/.whl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  _qm_lib=$(python3 -c 'from quantmix.tools.llamacpp import LlamaCpp, _source_root; print(LlamaCpp(_source_root()).libggml_base)')
  mkdir -p "$(dirname "$_qm_lib")" && cp .whl/lib/libggml-base.so "$_qm_lib"
  unset _qm_lib
fi
