#!/bin/bash
# The scale benchmark on the lent H100 (no network: gguf-py travels in .whl/, bench/pack_device.sh). One call per step:
#   bench/scale_h100.sh glm   "1 2 4" "errortable probes refine"   # GLM-4.6 widths, float32
#   bench/scale_h100.sh dsv3  "1 2"   "imatrix errortable probes refine eval" bfloat16
# Results: $OUT/scale-<preset>.jsonl (one JSON line per layers x phase), the log beside it.
set -u
preset=$1; layers=$2; phases=$3; dtype=${4:-float32}
[ "$preset" = glm ] && preset=glm46
source bench/device_env.sh || exit 1
work=/tmp/scale-$preset
# one preset's checkpoint on the 64 GiB disk at a time
for d in /tmp/scale-*; do [ "$d" != "$work" ] && rm -rf "$d"; done
df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/scale.py --preset "$preset" --layers $layers --phases $phases --dtype "$dtype" --work "$work" \
  --timeout 300 --out "${OUT:-/tmp}/scale-$preset.jsonl" 2>&1 | tee "${OUT:-/tmp}/scale-$preset.log" | cut -c1-600
