"""K-quant numerics (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), byte-exact with llama.cpp's ggml-quants.c.

Why it looks the way it does: the reference quantizers run in plain IEEE float32 with every sum
accumulated in loop order, so byte-exactness means repeating that arithmetic op for op. Every reduction
here is an explicit loop over the positions of a block, each step vectorized over all super-blocks of all
rows (position-major tensors [n, blocks], so each step reads one contiguous slice). Candidate-scale searches
run side by side where the C candidates are independent (make_qx_quants, make_qp_quants) and in sequence
where they are not (make_qkx2/3: an accepted candidate moves ``min`` for all later ones). Divisions go
through common.div / rdiv (never a reciprocal), square roots through common.sqrt32 (torch's float32 CPU
sqrt is not correctly rounded), and no fused multiply-add is ever used.

Dispatch follows ``ggml_quantize_chunk``: without an importance matrix every type runs its
``quantize_row_*_ref``; with one it runs ``quantize_row_*_impl`` (Q6_K's impl without weights equals its ref).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from quantmix.formats import common as C
from quantmix.formats.api import register_numerics
from quantmix.formats.registry import QK_K

F32 = torch.float32
GROUP_MAX_EPS = C.GROUP_MAX_EPS

# bytes per super-block, from ggml-common.h
TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


# ----------------------------------------------------------------------------------------------------
# helpers (the generic ones come from formats.common)
# ----------------------------------------------------------------------------------------------------
def _nearest_int(v: Tensor) -> Tensor:
    """common.nearest_int, with NaN -> 0 as on x86 (whose default NaN has mantissa 0x400000).

    NaN does reach nearest_int here (e.g. Q3_K's second-level make_qx_quants on scales that are inf/inf
    for rows near 1e30); CUDA's NaN bit pattern would give 4194303 instead."""
    r = C.nearest_int(v)
    return torch.where(torch.isnan(v), torch.zeros_like(r), r)


def _fp16(v: Tensor) -> Tensor:
    """GGML_FP32_TO_FP16 as int32 bits 0..65535."""
    return C.fp32_to_fp16_bits(v).to(torch.int32) & 0xFFFF


def _u8(v: Tensor) -> Tensor:
    """C's conversion of an int to uint8_t (modulo 256)."""
    return v & 0xFF


def _pm(x: Tensor) -> Tensor:
    """[..., n] -> contiguous position-major [n, M] (M = all blocks), so each position is one slice."""
    return x.reshape(-1, x.shape[-1]).t().contiguous()


def _unpm(t: Tensor, lead: torch.Size) -> Tensor:
    return t.t().reshape(*lead, t.shape[0])


def _max_abs_first(xt: Tensor) -> tuple[Tensor, Tensor]:
    """``amax = max = 0; for i: if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` over dim 0.

    Written as the loop (not argmax) because x can hold NaN here, which C's ``>`` skips."""
    amax = torch.zeros(xt.shape[1:], dtype=F32, device=xt.device)
    mx = torch.zeros_like(amax)
    for i in range(xt.shape[0]):
        ax = xt[i].abs()
        upd = ax > amax
        amax = torch.where(upd, ax, amax)
        mx = torch.where(upd, xt[i], mx)
    return amax, mx


def _max_first(v: Tensor) -> Tensor:
    """``m = 0; for j: if (v[j] > m) m = v[j];`` over the last axis (NaN never taken)."""
    m = torch.zeros(v.shape[:-1], dtype=F32, device=v.device)
    for j in range(v.shape[-1]):
        m = torch.where(v[..., j] > m, v[..., j], m)
    return m


# ----------------------------------------------------------------------------------------------------
# the group solvers of ggml-quants.c that only the K-quants use (make_qkx2/3 is common.make_qkx3_quants:
# for finite x with explicit weights the two C functions are the same computation)
# ----------------------------------------------------------------------------------------------------
def make_qx_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qx_quants with rmse_type 1 (the only one the K-quants use); ``w`` = qw, or x*x when qw is NULL.

    x, w: [..., n]. Returns (scale [...], L [..., n] int32 in 0..2*nmax-1; all 0 for an all-zero group).
    Unlike common.make_qx_quants this one is NaN-exact (Q3_K runs it on scales that may be NaN) and
    evaluates the 19 candidate scales side by side (they all divide the same fixed max).
    """
    lead = x.shape[:-1]
    xt, wt = _pm(x), _pm(w)
    amax, mx = _max_abs_first(xt)
    zero = amax < GROUP_MAX_EPS
    # candidate 0 is the plain -nmax/max, then is = -9..9 without 0
    nums = [C.f32(-nmax)] + [
        C.f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(i))) for i in range(-9, 10) if i != 0
    ]
    nc = len(nums)
    num_t = torch.tensor(nums, dtype=F32, device=x.device).unsqueeze(1).expand(nc, mx.shape[0])
    iscale = C.div(num_t.contiguous(), mx.unsqueeze(0).expand(nc, -1).contiguous())  # [C, M]
    # |iscale*x| <= nmax + 1 here, where nearest_int is exactly round-half-even (torch.round); a NaN
    # (from NaN x) is 0 in C, which nan_to_num gives after the clamp (that leaves NaN alone).
    lf = torch.round(iscale.unsqueeze(0) * xt.unsqueeze(1)).clamp_(-nmax, nmax - 1).nan_to_num_(nan=0.0)  # [n, C, M]
    sumlx = C.seq_sum_pm((wt * xt).unsqueeze(1) * lf)  # (w*x)*l, C's order
    suml2 = C.seq_sum_pm((wt.unsqueeze(1) * lf) * lf)
    s0, l0 = sumlx[0], suml2[0]
    scale = C.nonzero_or(l0, C.div(s0, l0))
    best = scale * s0
    bi = torch.zeros(mx.shape, dtype=torch.int64, device=x.device)
    for c in range(1, nc):
        sx, s2 = sumlx[c], suml2[c]
        ok = (s2 > 0) & ((sx * sx) > (best * s2))
        scale = torch.where(ok, C.div(sx, s2), scale)
        best = torch.where(ok, scale * sx, best)
        bi = torch.where(ok, torch.full_like(bi, c), bi)
    L = lf.gather(1, bi.view(1, 1, -1).expand(lf.shape[0], 1, -1)).squeeze(1).to(torch.int32) + nmax  # [n, M]
    L = torch.where(zero.unsqueeze(0), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(lead), _unpm(L, lead)


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants with do_rmse = true (Q3_K without imatrix). x: [..., n] -> (scale, L in 0..2*nmax-1)."""
    lead = x.shape[:-1]
    xt = _pm(x)
    n = xt.shape[0]
    amax, mx = _max_abs_first(xt)
    zero = amax < GROUP_MAX_EPS
    iscale = C.rdiv(float(-nmax), mx)
    Lt = _nearest_int(iscale.unsqueeze(0) * xt).clamp_(-nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    Lf = Lt.to(F32)
    sumlx = C.seq_sum_pm(wx * Lf)
    suml2 = C.seq_sum_pm((w * Lf) * Lf)
    cols = list(Lt.unbind(0))
    # 5 passes; C stops after a pass without change, and a further pass from that state changes nothing
    for _ in range(5):
        for i in range(n):
            xi, wi, wxi = xt[i], w[i], wx[i]
            Li = cols[i].to(F32)
            slx = sumlx - wxi * Li
            sl2 = suml2 - (wi * Li) * Li
            new_l = _nearest_int(C.div(xi * sl2, slx)).clamp_(-nmax, nmax - 1)
            nlf = new_l.to(F32)
            slx2 = slx + wxi * nlf
            sl22 = sl2 + (wi * nlf) * nlf
            upd = (slx > 0) & (new_l != cols[i]) & (sl22 > 0) & (((slx2 * slx2) * suml2) > ((sumlx * sumlx) * sl22))
            cols[i] = torch.where(upd, new_l, cols[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.stack(cols, dim=0) + nmax
    scale = torch.where(suml2 > 0, C.div(sumlx, suml2), torch.zeros_like(sumlx))
    L = torch.where(zero.unsqueeze(0), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(lead), _unpm(L, lead)


def make_qp_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qp_quants: quantize non-negative group scales to 0..nmax. x, w: [..., n] -> (scale, L uint8 values).

    C stores L in uint8_t while its first sums use the int, so both are kept where they can differ."""
    lead = x.shape[:-1]
    xt, wt = _pm(x), _pm(w)
    n = xt.shape[0]
    mx = torch.zeros(xt.shape[1:], dtype=F32, device=x.device)
    for i in range(n):
        mx = torch.where(mx > xt[i], mx, xt[i])  # MAX(max, x[i])
    zero = mx < GROUP_MAX_EPS
    wx = wt * xt

    def mse(iscale: Tensor, scale: Tensor, l: Tensor) -> Tensor:
        diff = xt - scale * l.to(F32)
        return C.seq_sum_pm((wt * diff) * diff)

    iscale = C.rdiv(float(nmax), mx)
    best = mse(iscale, C.rdiv(1.0, iscale), _u8(_nearest_int(iscale * xt)))
    for k in range(-4, 5):  # the candidates share max, so only the pick is sequential
        if k == 0:
            continue
        iscale_is = C.rdiv(C.f32(np.float32(0.1) * np.float32(k) + np.float32(nmax)), mx)
        m = mse(iscale_is, C.rdiv(1.0, iscale_is), _nearest_int(iscale_is * xt).clamp(max=nmax))
        ok = m < best
        best = torch.where(ok, m, best)
        iscale = torch.where(ok, iscale_is, iscale)
    l = _nearest_int(iscale * xt).clamp(max=nmax)
    lf = l.to(F32)
    sumlx = C.seq_sum_pm(wx * lf)
    suml2 = C.seq_sum_pm((wt * lf) * lf)
    cols = list(_u8(l).unbind(0))
    for _ in range(5):  # as in make_q3_quants, passes after one without change are no-ops
        for i in range(n):
            xi, wi, wxi = xt[i], wt[i], wx[i]
            Li = cols[i].to(F32)
            slx = sumlx - wxi * Li
            sl2 = suml2 - (wi * Li) * Li
            new_l = _nearest_int(C.div(xi * sl2, slx)).clamp(max=nmax)
            nlf = new_l.to(F32)
            slx2 = slx + wxi * nlf
            sl22 = sl2 + (wi * nlf) * nlf
            upd = (slx > 0) & (sl2 > 0) & (new_l != cols[i]) & (((slx2 * slx2) * suml2) > ((sumlx * sumlx) * sl22))
            cols[i] = torch.where(upd, _u8(new_l), cols[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.stack(cols, dim=0)
    scale = torch.where(suml2 > 0, C.div(sumlx, suml2), torch.zeros_like(sumlx))
    L = torch.where(zero.unsqueeze(0), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(lead), _unpm(L, lead)


def make_qkx_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx2_quants / make_qkx3_quants (identical for finite x with weights): (scale, the_min, L)."""
    return C.make_qkx3_quants(x, nmax, w, rmin, rdelta, nstep, use_mad)


# ----------------------------------------------------------------------------------------------------
# bit packing shared by several types
# ----------------------------------------------------------------------------------------------------
def _pack_2bit(L: Tensor) -> Tensor:
    """[B, 256] values 0..3 -> qs [B, 64]: byte j/4+l of each 128-chunk holds L[j+l+32k] << 2k."""
    v = L.reshape(-1, 2, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: Tensor) -> Tensor:
    q = qs.reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=qs.device).view(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


def _pack_k4_scales(ls: Tensor, lm: Tensor) -> Tensor:
    """get_scale_min_k4's layout: 8 six-bit scales and 8 six-bit mins in 12 bytes. ls, lm: [B, 8] ints."""
    lo = _u8(ls[:, :4] | ((ls[:, 4:] >> 4) << 6))
    mid = _u8(lm[:, :4] | ((lm[:, 4:] >> 4) << 6))
    hi = _u8((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4))
    return torch.cat([lo, mid, hi], dim=1)


def _unpack_k4_scales(q: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse, as get_scale_min_k4 reads it: q [B, 12] -> (sc [B, 8], m [B, 8])."""
    q = q.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _pack_q3_scales(l6: Tensor) -> Tensor:
    """Q3_K: 16 six-bit scales [B, 16] -> 12 bytes (low nibbles in 0..7, 2-bit highs in 8..11)."""
    lo = _u8((l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4))
    h = (l6 >> 4) & 3  # [B, 16], j -> byte 8 + j%4, shift 2*(j/4)
    h = h.view(-1, 4, 4)  # [B, j/4, j%4]
    hi = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return torch.cat([lo, _u8(hi)], dim=1)


def _unpack_q3_scales(q: Tensor) -> Tensor:
    """Q3_K 12 scale bytes -> 16 signed scales (six-bit value - 32)."""
    q = q.to(torch.int32)
    lo = torch.cat([q[:, :8] & 0xF, q[:, :8] >> 4], dim=1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=q.device).view(1, 4, 1)
    hi = ((q[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
    return (lo | (hi << 4)) - 32


def _bytes(*parts: Tensor) -> Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], dim=1)


# ----------------------------------------------------------------------------------------------------
# per-type block quantizers: x [B, 256] float32, qw [B, 256] or None -> [B, type_size] uint8
# ----------------------------------------------------------------------------------------------------
def _sigma2(x: Tensor, factor: int) -> Tensor:
    """``factor*sum(x^2)/QK_K`` per super-block, the sum in loop order (the imatrix paths)."""
    s = C.seq_sum_pm(_pm(x * x))
    if factor != 1:
        s = float(factor) * s
    return C.div(s, float(QK_K))


def _imatrix_weights(xs: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``qw[i] * sqrtf(sigma2 + x[i]*x[i])``: the weights of the imatrix paths of Q2_K..Q5_K."""
    return qw.view(xs.shape) * C.sqrt32(sigma2.view(-1, 1, 1) + xs * xs)


def _requant_min(xs: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, L: Tensor, nmax: int) -> Tensor:
    """Final pass of the scale+min types: L = clamp(nearest_int((x + dmin*m)/(d*sc))), kept where d*sc == 0."""
    dq = d.unsqueeze(-1) * sc.to(F32)
    dm = dmin.unsqueeze(-1) * m.to(F32)
    lnew = _nearest_int(C.div(xs + dm.unsqueeze(-1), dq.unsqueeze(-1).expand_as(xs).contiguous())).clamp_(0, nmax)
    return torch.where((dq == 0).unsqueeze(-1), L, lnew)


def _requant_sym(xs: Tensor, d: Tensor, sc: Tensor, L: Tensor, lo: int, hi: int) -> Tensor:
    """Final pass of Q3_K / Q6_K: L = clamp(nearest_int(x/(d*sc))) - lo, kept where d*sc == 0."""
    dq = d.unsqueeze(-1) * sc.to(F32)
    lnew = _nearest_int(C.div(xs, dq.unsqueeze(-1).expand_as(xs).contiguous())).clamp_(lo, hi) - lo
    return torch.where((dq == 0).unsqueeze(-1), L, lnew)


def _q2_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[0]
    xs = x.view(B, 16, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, mins, L = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        max_scale, max_min = _max_first(scales), _max_first(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = _u8(_nearest_int(C.rdiv(15.0, max_scale).unsqueeze(-1) * scales))
        ls = torch.where(has_s.unsqueeze(-1), ls, torch.zeros_like(ls))
        lm = _nearest_int(C.rdiv(15.0, max_min).unsqueeze(-1) * mins)
        sc = torch.where(has_m.unsqueeze(-1), _u8(ls | (lm << 4)), ls)
        zero = torch.zeros_like(max_scale)
        d_bits = _fp16(torch.where(has_s, C.div(max_scale, 15.0), zero))
        m_bits = _fp16(torch.where(has_m, C.div(max_min, 15.0), zero))
    else:  # quantize_row_q2_K_impl
        weight = _imatrix_weights(xs, qw, _sigma2(x, 1))
        sw = C.seq_sum_pm(_pm(weight)).view(B, 16)
        scales, mins, L = make_qkx_quants(xs, weight, 3, -0.9, 0.05, 36, use_mad=False)
        dm, Ls = make_qp_quants(scales, 15, sw)
        mm, Lm = make_qp_quants(mins, 15, sw)
        d_bits, m_bits = _fp16(dm), _fp16(mm)
        sc = _u8(Ls | (Lm << 4))
    d, dmin = C.fp16_bits_to_fp32(d_bits), C.fp16_bits_to_fp32(m_bits)
    L = _requant_min(xs, d, dmin, sc & 0xF, sc >> 4, L, 3)
    return _bytes(sc, _pack_2bit(L.reshape(B, QK_K)), C.pack_u16(d_bits), C.pack_u16(m_bits))


def _q3_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[0]
    xs = x.view(B, 16, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = make_q3_quants(xs, 4)
        _, max_scale = _max_abs_first(scales.t())
        nonzero = max_scale != 0  # C's `if (max_scale)`: NaN counts as true
        iscale = C.rdiv(-32.0, max_scale)
        l6 = C.as_int8(_nearest_int(iscale.unsqueeze(-1) * scales)).clamp_(-32, 31) + 32
        packed = _pack_q3_scales(l6)
        packed = torch.where(nonzero.unsqueeze(-1), packed, torch.zeros_like(packed))
        d_bits = _fp16(torch.where(nonzero, C.rdiv(1.0, iscale), torch.zeros_like(iscale)))
    else:  # quantize_row_q3_K_impl
        weight = _imatrix_weights(xs, qw, _sigma2(x, 2))
        sw = C.seq_sum_pm(_pm(weight)).view(B, 16)
        scales, L = make_qx_quants(xs, 4, weight)
        d_block, Ls = make_qx_quants(scales, 32, sw)
        packed = _pack_q3_scales(Ls)
        d_bits = _fp16(d_block)
    sc = _unpack_q3_scales(packed)
    L = _requant_sym(xs, C.fp16_bits_to_fp32(d_bits), sc, L, -4, 3).reshape(B, QK_K)
    # the high bit of quant j goes to hmask[j % 32], bit j / 32
    high = (L > 3).to(torch.int32).view(B, 8, 32)
    hmask = torch.zeros((B, 32), dtype=torch.int32, device=x.device)
    for b in range(8):
        hmask = hmask | (high[:, b] << b)
    return _bytes(hmask, _pack_2bit(L & 3), packed, C.pack_u16(d_bits))


def _q45_k(x: Tensor, qw: Tensor | None, nmax: int) -> Tensor:
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 groups of 32 with 6-bit scales and mins."""
    B = x.shape[0]
    xs = x.view(B, 8, 32)
    if qw is None:  # quantize_row_q{4,5}_K_ref
        av_x = C.sqrt32(C.div(C.seq_sum_pm(_pm(xs * xs)).view(B, 8), 32.0))
        weights = av_x.unsqueeze(-1) + xs.abs()
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, rmin, 0.1, nstep, use_mad=False)
        max_scale, max_min = _max_first(scales), _max_first(mins)
        zero = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, C.rdiv(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, C.rdiv(63.0, max_min), zero)
        ls = _u8(_nearest_int(inv_scale.unsqueeze(-1) * scales)).clamp_(max=63)
        lm = _u8(_nearest_int(inv_min.unsqueeze(-1) * mins)).clamp_(max=63)
        d_bits = _fp16(C.div(max_scale, 63.0))
        m_bits = _fp16(C.div(max_min, 63.0))
    else:  # quantize_row_q{4,5}_K_impl
        weights = _imatrix_weights(xs, qw, _sigma2(x, 2))
        sw = C.seq_sum_pm(_pm(weights)).view(B, 8)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, -0.9, 0.05, 36, use_mad=False)
        d_block, ls = make_qp_quants(scales, 63, sw)
        m_block, lm = make_qp_quants(mins, 63, sw)
        if nmax == 31:  # only the Q5_K impl clamps again
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d_bits, m_bits = _fp16(d_block), _fp16(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    d, dmin = C.fp16_bits_to_fp32(d_bits), C.fp16_bits_to_fp32(m_bits)
    L = _requant_min(xs, d, dmin, sc, m, L, nmax).reshape(B, 4, 2, 32)
    head = (C.pack_u16(d_bits), C.pack_u16(m_bits), packed)
    if nmax == 15:
        return _bytes(*head, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(B, 128))
    qh = torch.zeros((B, 32), dtype=torch.int32, device=x.device)
    for k in range(4):
        qh = qh | ((L[:, k, 0] >> 4) << (2 * k)) | ((L[:, k, 1] >> 4) << (2 * k + 1))
    ql = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(B, 128)
    return _bytes(*head, qh, ql)


def _q6_k(x: Tensor, qw: Tensor | None) -> Tensor:
    """quantize_row_q6_K_ref / _impl: the imatrix is used as the weights directly."""
    B = x.shape[0]
    xs = x.view(B, 16, 16)
    w = xs * xs if qw is None else qw.view(B, 16, 16)
    scales, L = make_qx_quants(xs, 32, w)
    max_abs, max_scale = _max_abs_first(scales.t())
    zero = max_abs < GROUP_MAX_EPS
    iscale = C.rdiv(-128.0, max_scale)
    d_bits = _fp16(C.rdiv(1.0, iscale))
    sc = C.as_int8(_nearest_int(iscale.unsqueeze(-1) * scales).clamp_(max=127))
    L = _requant_sym(xs, C.fp16_bits_to_fp32(d_bits), sc, L, -32, 31).reshape(B, 2, 4, 32)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], 2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = _bytes(ql.reshape(B, 128), qh.reshape(B, 64), _u8(sc), C.pack_u16(d_bits))
    return torch.where(zero.unsqueeze(-1), torch.zeros_like(out), out)  # all-zero block: memset 0


_BLOCK_QUANT: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": lambda x, qw: _q45_k(x, qw, 15),
    "Q5_K": lambda x, qw: _q45_k(x, qw, 31),
    "Q6_K": _q6_k,
}


# ----------------------------------------------------------------------------------------------------
# dequantization: q [B, type_size] uint8 -> [B, 256] float32, as dequantize_row_* computes it
# ----------------------------------------------------------------------------------------------------
def _deq_q2_k(q: Tensor) -> Tensor:
    q = q.to(torch.int32)
    sc, qs = q[:, :16], q[:, 16:80]
    d, dmin = C.fp16_bits_to_fp32(q[:, 80] | (q[:, 81] << 8)), C.fp16_bits_to_fp32(q[:, 82] | (q[:, 83] << 8))
    dl = d.unsqueeze(-1) * (sc & 0xF).to(F32)
    ml = dmin.unsqueeze(-1) * (sc >> 4).to(F32)
    L = _unpack_2bit(qs).view(-1, 16, 16).to(F32)
    return (dl.unsqueeze(-1) * L - ml.unsqueeze(-1)).reshape(-1, QK_K)


def _deq_q3_k(q: Tensor) -> Tensor:
    q = q.to(torch.int32)
    hmask, qs, scb = q[:, :32], q[:, 32:96], q[:, 96:108]
    d = C.fp16_bits_to_fp32(q[:, 108] | (q[:, 109] << 8))
    dl = d.unsqueeze(-1) * _unpack_q3_scales(scb).to(F32)
    bits = torch.arange(8, dtype=torch.int32, device=q.device).view(1, 8, 1)
    high = ((hmask.unsqueeze(1) >> bits) & 1).reshape(-1, QK_K)
    L = ((_unpack_2bit(qs) | (high << 2)) - 4).view(-1, 16, 16).to(F32)  # a clear high bit means -4
    return (dl.unsqueeze(-1) * L).reshape(-1, QK_K)


def _deq_q45_k(q: Tensor, nmax: int) -> Tensor:
    q = q.to(torch.int32)
    d, dmin = C.fp16_bits_to_fp32(q[:, 0] | (q[:, 1] << 8)), C.fp16_bits_to_fp32(q[:, 2] | (q[:, 3] << 8))
    sc, m = _unpack_k4_scales(q[:, 4:16])
    if nmax == 15:
        qs = q[:, 16:144].view(-1, 4, 1, 32)
        L = (qs >> torch.tensor([0, 4], dtype=torch.int32, device=q.device).view(1, 1, 2, 1)) & 0xF
    else:
        qh, qs = q[:, 16:48], q[:, 48:176].view(-1, 4, 1, 32)
        low = (qs >> torch.tensor([0, 4], dtype=torch.int32, device=q.device).view(1, 1, 2, 1)) & 0xF
        shifts = torch.arange(8, dtype=torch.int32, device=q.device).view(1, 4, 2, 1)
        L = low + ((qh.view(-1, 1, 1, 32) >> shifts) & 1) * 16
    L = L.reshape(-1, 8, 32).to(F32)
    d1 = d.unsqueeze(-1) * sc.to(F32)
    m1 = dmin.unsqueeze(-1) * m.to(F32)
    return (d1.unsqueeze(-1) * L - m1.unsqueeze(-1)).reshape(-1, QK_K)


def _deq_q6_k(q: Tensor) -> Tensor:
    q = q.to(torch.int32)
    ql, qh, sc = q[:, :128].view(-1, 2, 2, 32), q[:, 128:192].view(-1, 2, 1, 32), C.as_int8(q[:, 192:208])
    d = C.fp16_bits_to_fp32(q[:, 208] | (q[:, 209] << 8))
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=q.device).view(1, 1, 4, 1)
    L = (low | (((qh >> shifts) & 3) << 4)) - 32  # [B, 2, 4, 32]
    ds = d.unsqueeze(-1) * sc.to(F32)  # [B, 16]: d * sc, then * q
    return (ds.view(-1, 16, 1) * L.reshape(-1, 16, 16).to(F32)).reshape(-1, QK_K)


_BLOCK_DEQUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "Q2_K": _deq_q2_k,
    "Q3_K": _deq_q3_k,
    "Q4_K": lambda q: _deq_q45_k(q, 15),
    "Q5_K": lambda q: _deq_q45_k(q, 31),
    "Q6_K": _deq_q6_k,
}


# ----------------------------------------------------------------------------------------------------
# row-level entry points, registered with formats.api
# ----------------------------------------------------------------------------------------------------
# Super-blocks per solver call. On CPU small chunks keep the candidate tensors in cache; on a GPU large
# ones amortize the thousands of small kernel launches per call (memory ~1.5 kB per super-block and
# temporary, so 65536 blocks stay within a few GB).
CHUNK_BLOCKS = 1024
CHUNK_BLOCKS_CUDA = 65536


def quantize_rows(qtype: str, x: Tensor, imatrix: Tensor | None = None) -> Tensor:
    """float32 rows [rows, n] -> ``qtype`` bytes uint8 [rows, n/256*type_size], as ggml_quantize_chunk makes them.

    ``imatrix`` [n] selects the quantize_row_*_impl paths. Inputs are assumed checked (formats.api does)."""
    qtype = qtype.upper()
    fn = _BLOCK_QUANT[qtype]
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {QK_K}")
    nb = n // QK_K
    xb = x.to(F32).contiguous().view(rows * nb, QK_K)
    qwb = None
    if imatrix is not None:
        im = imatrix.to(device=x.device, dtype=F32).reshape(1, nb, QK_K)
        qwb = im.expand(rows, nb, QK_K).reshape(rows * nb, QK_K)
    ts = TYPE_SIZE[qtype]
    out = torch.empty((rows * nb, ts), dtype=torch.uint8, device=x.device)
    step = CHUNK_BLOCKS if x.device.type == "cpu" else CHUNK_BLOCKS_CUDA
    for s in range(0, rows * nb, step):
        e = min(s + step, rows * nb)
        out[s:e] = fn(xb[s:e], None if qwb is None else qwb[s:e])
    return out.view(rows, nb * ts)


def dequantize_rows(qtype: str, q: Tensor, n: int) -> Tensor:
    """``qtype`` bytes uint8 [rows, row_bytes] -> float32 [rows, n], as ggml's dequantize_row_* computes them."""
    qtype = qtype.upper()
    ts = TYPE_SIZE[qtype]
    nb = n // QK_K
    if n % QK_K or q.dim() != 2 or q.shape[1] != nb * ts:
        raise ValueError(f"{qtype}: expected uint8 [rows, {nb * ts}] for n={n}, got {tuple(q.shape)}")
    rows = q.shape[0]
    return _BLOCK_DEQUANT[qtype](q.reshape(rows * nb, ts)).reshape(rows, n)


def _register() -> None:
    for name in TYPE_SIZE:
        register_numerics(
            name,
            functools.partial(quantize_rows, name),
            functools.partial(dequantize_rows, name),
        )


_register()
