"""The ``"ggml"`` backend: ggml's own C quantizer (libggml-base of the cached llama.cpp build) on CPU tensors.

quantmix's torch numerics are the reference and produce the same bytes (the tests hold them to
``ggml_quantize_chunk``), but on a CPU the codebook types' neighbour searches run about ten times slower in
torch than in ggml's C. Measuring every candidate type over every row of a model (the error table) or writing
a GGUF on a CPU would then take hours for IQ1_S ... IQ3_S, so those callers hand these types to ggml here,
split over the torch thread count (ctypes releases the GIL during the C call).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# The types whose torch numerics are far slower than ggml's C on a CPU (measured in BENCHMARKS.md, "Codebook
# types": 0.3-0.9 M weights/s against 1.7-7.5 M): the ones worth handing to ggml there.
SLOW_ON_CPU = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"})
# Types that ggml's C also quantizes faster, once it is built (64 x 4096 rows with an imatrix, one thread, this
# 2-core machine: Q4_K 0.44 s torch vs 0.11 s ggml, Q5_K 0.27 vs 0.10, Q6_K 0.22 vs 0.024, Q4_0 0.066 vs 0.024,
# Q8_0 0.012 vs 0.001; IQ4_XS is faster in torch, 0.068 vs 0.14). Same bytes either way.
FASTER_IN_GGML = SLOW_ON_CPU | {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}


def built() -> bool:
    """Whether ggml's quantizers (libggml-base) are at hand, building that one library (~12 s, once) when they
    are not and can be."""
    from quantmix.tools.llamacpp import ensure_ggml_base

    return ensure_ggml_base() is not None


def preferred_backend(qtype: str, device: torch.device) -> str:
    """The fastest backend producing the bytes of ``qtype`` on ``device``: ggml on a CPU for the types its C
    quantizes faster (libggml-base built on first use), else ``"auto"`` (CUDA or torch)."""
    if device.type == "cpu" and qtype in FASTER_IN_GGML and built():
        return "ggml"
    return "auto"


def threads() -> int:
    """Threads to split a quantization over: torch's setting, at most the cores."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def quantize_rows(qtype: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """``ggml_quantize_chunk`` over float32 rows ``x [rows, n]`` -> uint8 ``[rows, row_bytes]``, rows split
    over threads (each row is quantized independently, so the split does not change a byte)."""
    from quantmix.tools.ggml_oracle import oracle_quantize

    rows = x.shape[0]
    k = min(threads(), rows)
    if k <= 1:
        return oracle_quantize(x, qtype, imatrix)
    oracle_quantize(x[:1], qtype, imatrix)  # ggml builds its grid tables on first use: once, before threads
    bounds = np.linspace(0, rows, k + 1).astype(int)
    with ThreadPoolExecutor(k) as pool:
        parts = list(pool.map(lambda i: oracle_quantize(x[bounds[i]:bounds[i + 1]], qtype, imatrix), range(k)))
    return np.concatenate(parts, axis=0)


def dequantize_rows(qtype: str, q: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml's ``to_float`` for the type: uint8 ``[rows, row_bytes]`` -> float32 ``[rows, n_per_row]``."""
    from quantmix.tools.ggml_oracle import oracle_dequantize

    return oracle_dequantize(q, qtype, n_per_row)
