"""F32, F16, BF16 and the 32-weight block quants Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, byte-exact with ggml.

Without an imatrix ggml uses ``quantize_row_*_ref`` (scale from the block's extreme value); with one,
``quantize_row_*_impl``: weights ``qw_j * sqrt(sigma2 + x_j^2)`` with sigma2 = sum(x^2)/n_per_row over
the whole row, then ``make_qx_quants`` (Q4_0, Q5_0) or ``make_qkx3_quants`` (Q4_1, Q5_1). Q8_0 ignores
the imatrix. Block layouts are ggml-common.h's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmix.formats import common as C
from quantmix.formats.api import register_numerics

QK = 32


# ---- float types ----------------------------------------------------------------------------------


def _q_f32(x: Tensor, imatrix: Tensor | None) -> Tensor:
    return x.float().contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _dq_f32(q: Tensor, n: int) -> Tensor:
    return q.contiguous().view(torch.float32).reshape(q.shape[0], n).clone()


def _q_f16(x: Tensor, imatrix: Tensor | None) -> Tensor:
    return C.pack_u16(C.fp32_to_fp16_bits(x)).reshape(x.shape[0], -1)


def _dq_f16(q: Tensor, n: int) -> Tensor:
    return C.fp16_bits_to_fp32(C.bytes_to_i16(q.reshape(q.shape[0], n, 2)))


def _q_bf16(x: Tensor, imatrix: Tensor | None) -> Tensor:
    return C.pack_u16(C.fp32_to_bf16_bits(x)).reshape(x.shape[0], -1)


def _dq_bf16(q: Tensor, n: int) -> Tensor:
    return C.bf16_bits_to_fp32(C.bytes_to_i16(q.reshape(q.shape[0], n, 2)))


# ---- shared pieces --------------------------------------------------------------------------------


def _inv(d: Tensor) -> Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return C.nonzero_or(d, C.rdiv(1.0, d))


def _c_int8(v: Tensor) -> Tensor:
    """C's ``(int8_t)`` of a float, as x86-64 compiles it (int32 conversion, then the low byte)."""
    return C.as_int8(C.c_float_to_int(v))


def _nibbles(xi: Tensor) -> Tensor:
    """``qs[j] = xi[j] | xi[j+16] << 4`` for blocks [B, 32] of small ints (C's uint8 wraparound kept)."""
    lo = xi[:, :16].to(torch.int64) & 0xFF
    hi = (xi[:, 16:].to(torch.int64) << 4) & 0xFF
    return (lo | hi).to(torch.uint8)


def _fifth_bits(xi: Tensor) -> Tensor:
    """Q5 ``qh``: bit 4 of xi[j] at bit j (j < 16) and of xi[j+16] at bit j+16, little-endian u32 bytes."""
    bit = (xi.to(torch.int64) & 0x10) >> 4
    shifts = torch.arange(QK, device=xi.device, dtype=torch.int64)
    qh = (bit << shifts).sum(dim=1)  # disjoint bits: exact integer sum
    return C.pack_u32(qh)


def _row_weights(x: Tensor, imatrix: Tensor) -> Tensor:
    """``qw_j * sqrtf(sigma2 + x_j^2)``, sigma2 = (sequential sum of x^2 over the row) / n_per_row."""
    rows, n = x.shape
    x2 = x * x
    sigma2 = C.div(C.seq_sum_rows(x2), float(n))
    return imatrix.unsqueeze(0) * C.sqrt32(sigma2.unsqueeze(1) + x2)


def _blocks(x: Tensor) -> Tensor:
    return x.reshape(-1, QK)


def _assemble(rows: int, *fields: Tensor) -> Tensor:
    """Concatenate per-block byte fields [B, k_i] into rows of bytes."""
    return torch.cat(fields, dim=1).reshape(rows, -1)


# ---- Q8_0 ---------------------------------------------------------------------------------------


def _q_q8_0(x: Tensor, imatrix: Tensor | None) -> Tensor:
    xb = _blocks(x)
    amax = xb.abs().amax(dim=1)
    d = C.div(amax, 127.0)
    idv = _inv(d)
    qs = _c_int8(C.roundf(xb * idv.unsqueeze(1))) & 0xFF
    return _assemble(x.shape[0], C.f16_field(d), qs.to(torch.uint8))


def _dq_q8_0(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 34)
    d = C.f16_from_field(b[:, :2])
    qs = b[:, 2:].view(torch.int8).float()
    return (qs * d.unsqueeze(1)).reshape(q.shape[0], n)


# ---- Q4_0 / Q5_0 (symmetric) ----------------------------------------------------------------------


def _sym_ref(xb: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """quantize_row_q{4,5}_0_ref: d = max / -nmax; xi = MIN(2nmax-1, (int8_t)(x*id + nmax + 0.5))."""
    _, mx = C.max_abs_first(xb)
    d = C.div(mx, float(-nmax))
    idv = _inv(d)
    xi = _c_int8(xb * idv.unsqueeze(1) + (nmax + 0.5))
    return d, torch.clamp(xi, max=2 * nmax - 1)


def _sym_impl(x: Tensor, imatrix: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    w = _row_weights(x, imatrix)
    return C.make_qx_quants(_blocks(x), nmax, 1, _blocks(w))


def _q_q4_0(x: Tensor, imatrix: Tensor | None) -> Tensor:
    d, L = _sym_ref(_blocks(x), 8) if imatrix is None else _sym_impl(x, imatrix, 8)
    return _assemble(x.shape[0], C.f16_field(d), _nibbles(L))


def _dq_q4_0(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 18)
    d = C.f16_from_field(b[:, :2])
    qs = b[:, 2:].to(torch.int32)
    v = torch.cat([(qs & 0xF) - 8, (qs >> 4) - 8], dim=1).float()
    return (v * d.unsqueeze(1)).reshape(q.shape[0], n)


def _q_q5_0(x: Tensor, imatrix: Tensor | None) -> Tensor:
    d, L = _sym_ref(_blocks(x), 16) if imatrix is None else _sym_impl(x, imatrix, 16)
    qs = ((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)).to(torch.uint8)
    return _assemble(x.shape[0], C.f16_field(d), _fifth_bits(L), qs)


def _q5_values(b: Tensor, qh_at: int, qs_at: int) -> Tensor:
    """The 5-bit values 0..31 of Q5 blocks (bytes [B, size]) as int32 [B, 32]."""
    qh = C.unpack_u32(b[:, qh_at:qh_at + 4]).unsqueeze(1)
    shifts = torch.arange(QK, device=b.device, dtype=torch.int64)
    high = ((qh >> shifts) & 1).to(torch.int32) << 4
    qs = b[:, qs_at:qs_at + 16].to(torch.int32)
    return torch.cat([qs & 0xF, qs >> 4], dim=1) | high


def _dq_q5_0(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 22)
    d = C.f16_from_field(b[:, :2])
    v = (_q5_values(b, 2, 6) - 16).float()
    return (v * d.unsqueeze(1)).reshape(q.shape[0], n)


# ---- Q4_1 / Q5_1 (affine) -------------------------------------------------------------------------


def _affine_ref(xb: Tensor, nmax: int, clamp: bool) -> tuple[Tensor, Tensor, Tensor]:
    """quantize_row_q{4,5}_1_ref: d = (max - min) / nmax, m = min, xi = (int)((x - min)*id + 0.5)."""
    mn = C.min_first(xb)
    mx = C.max_first(xb)
    d = C.div(mx - mn, float(nmax))
    idv = _inv(d)
    v = (xb - mn.unsqueeze(1)) * idv.unsqueeze(1) + 0.5
    if clamp:  # Q4_1: MIN(15, (int8_t)v)
        xi = torch.clamp(_c_int8(v), max=nmax)
    else:  # Q5_1: (uint8_t)v
        xi = C.c_float_to_int(v) & 0xFF
    return d, mn, xi


def _affine_impl(x: Tensor, imatrix: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    w = _row_weights(x, imatrix)
    d, the_min, L = C.make_qkx3_quants(_blocks(x), nmax, _blocks(w), -0.9, 0.05, 36, False)
    return d, -the_min, L


def _q_q4_1(x: Tensor, imatrix: Tensor | None) -> Tensor:
    d, m, L = _affine_ref(_blocks(x), 15, True) if imatrix is None else _affine_impl(x, imatrix, 15)
    return _assemble(x.shape[0], C.f16_field(d), C.f16_field(m), _nibbles(L))


def _dq_q4_1(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 20)
    d = C.f16_from_field(b[:, :2]).unsqueeze(1)
    m = C.f16_from_field(b[:, 2:4]).unsqueeze(1)
    qs = b[:, 4:].to(torch.int32)
    v = torch.cat([qs & 0xF, qs >> 4], dim=1).float()
    return (v * d + m).reshape(q.shape[0], n)


def _q_q5_1(x: Tensor, imatrix: Tensor | None) -> Tensor:
    d, m, L = _affine_ref(_blocks(x), 31, False) if imatrix is None else _affine_impl(x, imatrix, 31)
    qs = ((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)).to(torch.uint8)
    return _assemble(x.shape[0], C.f16_field(d), C.f16_field(m), _fifth_bits(L), qs)


def _dq_q5_1(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 24)
    d = C.f16_from_field(b[:, :2]).unsqueeze(1)
    m = C.f16_from_field(b[:, 2:4]).unsqueeze(1)
    v = _q5_values(b, 4, 8).float()
    return (v * d + m).reshape(q.shape[0], n)


register_numerics("F32", _q_f32, _dq_f32, uses_imatrix=False)
register_numerics("F16", _q_f16, _dq_f16, uses_imatrix=False)
register_numerics("BF16", _q_bf16, _dq_bf16, uses_imatrix=False)
register_numerics("Q8_0", _q_q8_0, _dq_q8_0, uses_imatrix=False)
register_numerics("Q4_0", _q_q4_0, _dq_q4_0)
register_numerics("Q4_1", _q_q4_1, _dq_q4_1)
register_numerics("Q5_0", _q_q5_0, _dq_q5_0)
register_numerics("Q5_1", _q_q5_1, _dq_q5_1)
