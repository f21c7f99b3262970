"""MXFP4 (ggml type 39): 32 e2m1 values sharing one e8m0 power-of-two scale, byte-exact with ggml.

Block (ggml-common.h ``block_mxfp4``, 17 bytes): ``e`` (e8m0), then ``qs[16]`` with element j in the low nibble
and element j+16 in the high nibble of ``qs[j]``. The codes index ``kvalues_mxfp4`` (e2m1 doubled) and the scale
is ``ggml_e8m0_to_fp32_half(e)`` = 2^(e-128), so a value is ``kvalues[code] * 2^(e-128)``.

``quantize_row_mxfp4_ref`` (ggml_quantize_chunk ignores any imatrix for MXFP4: ``quantize_mxfp4`` calls the ref
path): ``e = (uint8_t)(floorf(log2f(amax)) - 2 + 127)`` (0 for an all-zero block), then per element the first
of the 16 codes with the smallest ``fabsf(kvalues[i]*d - x)``. Out-of-range exponents (amax < 2^-125) wrap as
x86-64's float -> int conversion wraps them; the tests hold this to ggml on such blocks too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmix.formats import common as C
from quantmix.formats.api import register_numerics

QK = 32
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_half(e: Tensor) -> Tensor:
    """``ggml_e8m0_to_fp32_half``: uint8/int codes -> float32 2^(e-128) (subnormal bit patterns for e < 2)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _log2f_floor(amax: Tensor) -> Tensor:
    """``floorf(log2f(amax))`` for amax > 0. Only where log2f rounds up to an integer (amax a few ulps below a
    power of two) can this differ from the exponent; glibc's log2f is within 1 ulp there and far from a float
    midpoint, so the double log2 rounded to float32 gives the same float (checked against ggml near every
    power of two)."""
    return torch.floor(torch.log2(amax.double()).float())


def _q_mxfp4(x: Tensor, imatrix: Tensor | None) -> Tensor:
    xb = x.reshape(-1, QK)
    amax = xb.abs().amax(dim=1)
    pos = amax > 0
    fl = _log2f_floor(torch.where(pos, amax, torch.ones_like(amax)))
    e = torch.where(pos, C.c_float_to_int(fl - 2.0 + 127.0) & 0xFF, torch.zeros_like(fl, dtype=torch.int32))
    d = e8m0_half(e).unsqueeze(1)
    # best_index_mxfp4: a sequential scan, strictly smaller error wins (the first code on ties)
    best = (d * float(KVALUES_MXFP4[0]) - xb).abs()
    idx = torch.zeros(xb.shape, dtype=torch.int64, device=x.device)
    for i in range(1, 16):
        err = (d * float(KVALUES_MXFP4[i]) - xb).abs()
        better = err < best
        best = torch.where(better, err, best)
        idx = torch.where(better, i, idx)
    qs = (idx[:, :16] | (idx[:, 16:] << 4)).to(torch.uint8)
    return torch.cat([e.to(torch.uint8).unsqueeze(1), qs], dim=1).reshape(x.shape[0], -1)


def _dq_mxfp4(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 17)
    d = e8m0_half(b[:, 0]).unsqueeze(1)
    qs = b[:, 1:].to(torch.int64)
    kv = torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=q.device)
    v = kv[torch.cat([qs & 0xF, qs >> 4], dim=1)]
    return (v * d).reshape(q.shape[0], n)


register_numerics("MXFP4", _q_mxfp4, _dq_mxfp4, uses_imatrix=False)
