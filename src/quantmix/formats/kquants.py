"""K-quant numerics (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), byte-exact with llama.cpp's ggml-quants.c.

Why it looks the way it does: the reference quantizers run in plain IEEE float32 with every sum
accumulated in loop order, so byte-exactness means repeating that arithmetic op for op. Every reduction
here is therefore an explicit loop over the positions of a block (or over candidate scales), each step
vectorized over all super-blocks of all rows (and over the candidate scales of a search). Divisions are
always tensor / tensor (torch rewrites some divisions by a scalar into a multiplication by a reciprocal),
and no fused multiply-add is ever used.

Dispatch follows ``ggml_quantize_chunk``: without an importance matrix every type runs its
``quantize_row_*_ref``; with one it runs ``quantize_row_*_impl`` (Q6_K's impl without weights equals its ref).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from quantmix.formats.registry import QK_K

F32 = torch.float32
GROUP_MAX_EPS = float(np.float32(1e-15))
_CHUNK = 2048  # super-blocks processed at once (bounds the candidate-search tensors to tens of MB)

# bytes per super-block, from ggml-common.h
TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


# ----------------------------------------------------------------------------------------------------
# scalar-exact helpers
# ----------------------------------------------------------------------------------------------------
def _f32(v: float) -> float:
    """A Python float holding exactly the float32 value C would use for the literal ``v``."""
    return float(np.float32(v))


def _full(like: Tensor, v: float) -> Tensor:
    return torch.full_like(like, _f32(v), dtype=F32)


def _div(a: Tensor | float, b: Tensor) -> Tensor:
    """IEEE float32 a / b with both operands materialized, so torch never swaps in a reciprocal."""
    if not isinstance(a, Tensor):
        a = _full(b, a)
    a, b = torch.broadcast_tensors(a, b)
    return torch.div(a.contiguous(), b.contiguous())


def _sqrt(v: Tensor) -> Tensor:
    """Correctly rounded float32 sqrtf. torch's own float32 CPU sqrt is off by one ulp for ~17% of inputs;
    a float64 sqrt rounded once to float32 is exact (53 >= 2*24 + 2 bits)."""
    return torch.sqrt(v.to(torch.float64)).to(F32)


def _nearest_int(v: Tensor) -> Tensor:
    """ggml's nearest_int: add 1.5*2^23 and read the low mantissa bits (int32), wrap-around included.

    NaN maps to 0, which is what x86 gives (its default NaN has mantissa 0x400000); on CUDA the NaN bit
    pattern differs, so it is fixed here explicitly.
    """
    bits = (v + 12582912.0).view(torch.int32)
    r = (bits & 0x7FFFFF) - 0x400000
    return torch.where(torch.isnan(v), torch.zeros_like(r), r)


def _fp16_bits(v: Tensor) -> Tensor:
    """ggml_compute_fp32_to_fp16 as int32 bits (round to nearest even, overflow to inf, NaN -> 0x7E00|sign)."""
    h = v.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    sign = (v.view(torch.int32) >> 16) & 0x8000
    return torch.where(torch.isnan(v), sign | 0x7E00, h)


def _fp16_to_f32(bits: Tensor) -> Tensor:
    """fp16 bits (int) -> float32 value, exact."""
    b = bits.to(torch.int32) & 0xFFFF
    return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(torch.float16).to(F32)


def _u8(v: Tensor) -> Tensor:
    """C's conversion of an int to uint8_t (modulo 256)."""
    return v & 0xFF


def _i8(v: Tensor) -> Tensor:
    """C's conversion of an int to int8_t (modulo 256, two's complement)."""
    return ((v + 128) & 0xFF) - 128


def _le16(bits: Tensor) -> Tensor:
    """fp16 bits [...] -> two little-endian bytes [..., 2]."""
    return torch.stack([bits & 0xFF, (bits >> 8) & 0xFF], dim=-1)


def _seq_sum(t: Tensor) -> Tensor:
    """Sum over the last axis in loop order, starting from 0.0 (as ``float s = 0; s += t[i]``)."""
    t = t.movedim(-1, 0).contiguous()
    acc = torch.zeros(t.shape[1:], dtype=F32, device=t.device)
    for i in range(t.shape[0]):
        acc = acc + t[i]
    return acc


def _seq_max_first(t: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """``if (key[i] > best) { best = key[i]; val = t[i]; }`` from best = val = 0, over the last axis."""
    best = torch.zeros(t.shape[:-1], dtype=F32, device=t.device)
    val = torch.zeros_like(best)
    for i in range(t.shape[-1]):
        upd = key[..., i] > best
        best = torch.where(upd, key[..., i], best)
        val = torch.where(upd, t[..., i], val)
    return best, val


# ----------------------------------------------------------------------------------------------------
# the block quantizers of ggml-quants.c, vectorized over their leading axes
# ----------------------------------------------------------------------------------------------------
def make_qx_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qx_quants with rmse_type 1 (the only one the K-quants use); ``w`` = qw, or x*x when qw is NULL.

    x, w: [..., n]. Returns (scale [...], L [..., n] int32 in 0..2*nmax-1; all 0 for an all-zero group).
    """
    n = x.shape[-1]
    amax, mx = _seq_max_first(x, x.abs())
    zero = amax < GROUP_MAX_EPS
    # candidate 0 is the plain -nmax/max, then is = -9..9 without 0
    nums = [_f32(-nmax)] + [
        float(-(np.float32(nmax) + np.float32(0.1) * np.float32(i))) for i in range(-9, 10) if i != 0
    ]
    nc = len(nums)
    num_t = torch.tensor(nums, dtype=F32, device=x.device)
    iscale = _div(num_t.expand(*mx.shape, nc), mx.unsqueeze(-1).expand(*mx.shape, nc))  # [..., C]
    l = _nearest_int(iscale.unsqueeze(-1) * x.unsqueeze(-2)).clamp_(-nmax, nmax - 1)  # [..., C, n]
    lf = l.to(F32)
    wx = w * x
    sumlx = torch.zeros(iscale.shape, dtype=F32, device=x.device)
    suml2 = torch.zeros_like(sumlx)
    for i in range(n):
        li = lf[..., i]
        sumlx = sumlx + wx[..., i : i + 1] * li
        suml2 = suml2 + (w[..., i : i + 1] * li) * li
    s0, l0 = sumlx[..., 0], suml2[..., 0]
    scale = torch.where(l0 != 0, _div(s0, l0), torch.zeros_like(s0))
    best = scale * s0
    bi = torch.zeros(mx.shape, dtype=torch.int64, device=x.device)
    for c in range(1, nc):
        sx, s2 = sumlx[..., c], suml2[..., c]
        ok = (s2 > 0) & ((sx * sx) > (best * s2))
        new_scale = _div(sx, s2)
        scale = torch.where(ok, new_scale, scale)
        best = torch.where(ok, scale * sx, best)
        bi = torch.where(ok, torch.full_like(bi, c), bi)
    L = torch.gather(l, -2, bi[..., None, None].expand(*bi.shape, 1, n)).squeeze(-2) + nmax
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants with do_rmse = true (Q3_K without imatrix). x: [..., n] -> (scale, L in 0..2*nmax-1)."""
    n = x.shape[-1]
    amax, mx = _seq_max_first(x, x.abs())
    zero = amax < GROUP_MAX_EPS
    iscale = _div(float(-nmax), mx)
    L = _nearest_int(iscale.unsqueeze(-1) * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = torch.zeros(mx.shape, dtype=F32, device=x.device)
    suml2 = torch.zeros_like(sumlx)
    Lf = L.to(F32)
    for i in range(n):
        sumlx = sumlx + wx[..., i] * Lf[..., i]
        suml2 = suml2 + (w[..., i] * Lf[..., i]) * Lf[..., i]
    cols = [L[..., i] for i in range(n)]
    # 5 passes; the C loop stops early after a pass without change, which a further pass would repeat
    for _ in range(5):
        for i in range(n):
            xi, wi, wxi = x[..., i], w[..., i], wx[..., i]
            Li = cols[i].to(F32)
            slx = sumlx - wxi * Li
            sl2 = suml2 - (wi * Li) * Li
            new_l = _nearest_int(_div(xi * sl2, slx)).clamp_(-nmax, nmax - 1)
            nlf = new_l.to(F32)
            slx2 = slx + wxi * nlf
            sl22 = sl2 + (wi * nlf) * nlf
            upd = (slx > 0) & (new_l != cols[i]) & (sl22 > 0) & (((slx2 * slx2) * suml2) > ((sumlx * sumlx) * sl22))
            cols[i] = torch.where(upd, new_l, cols[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.stack(cols, dim=-1) + nmax
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(sumlx))
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_qkx_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, qkx3: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx2_quants (qkx3=False) / make_qkx3_quants (qkx3=True): scale and min for one group.

    x, w: [..., n]. Returns (scale [...], the_min [...] (= -min, >= 0), L [..., n] int32 in 0..nmax).
    """
    n = x.shape[-1]
    mn = x[..., 0]
    mx = x[..., 0]
    sum_w = w[..., 0]
    sum_x = sum_w * x[..., 0]
    for i in range(1, n):
        xi, wi = x[..., i], w[..., i]
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
        sum_w = sum_w + wi
        sum_x = sum_x + wi * xi
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = (mx <= mn) if qkx3 else (mx == mn)
    xm = x - mn.unsqueeze(-1)
    rng = mx - mn

    def err(scale: Tensor, minv: Tensor, lf: Tensor) -> Tensor:
        """sum_i w_i * f(scale*L_i + min - x_i), f = |.| or square, in loop order."""
        diff = (scale.unsqueeze(-1) * lf + minv.unsqueeze(-1)) - x
        diff = diff.abs() if use_mad else diff * diff
        return _seq_sum(w * diff)

    iscale = _div(float(nmax), rng)
    scale = _div(1.0, iscale)
    L = _nearest_int(iscale.unsqueeze(-1) * xm).clamp_(0, nmax)
    best = err(scale, mn, L.to(F32))
    minv = mn
    # The candidates cannot be evaluated side by side: an accepted one moves ``min``, and every later
    # candidate's inverse scale and rounding use the moved min, exactly as the C loop does.
    for step in range(nstep + 1):
        num = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = _div(num, mx - minv)
        laux = _nearest_int(iscale.unsqueeze(-1) * (x - minv.unsqueeze(-1))).clamp_(0, nmax)
        lf = laux.to(F32)
        wl = w * lf
        sums = _seq_sum(torch.stack([wl, wl * lf, wl * x], dim=-2))
        sum_l, sum_l2, sum_xl = sums.unbind(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, _div(sum_xl, sum_l2), this_scale)
        cur = err(this_scale, this_min, lf)
        ok = (D > 0) & (cur < best)
        L = torch.where(ok.unsqueeze(-1), laux, L)
        best = torch.where(ok, cur, best)
        scale = torch.where(ok, this_scale, scale)
        minv = torch.where(ok, this_min, minv)
    L = torch.where(flat.unsqueeze(-1), torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minv = torch.where(flat, mn, minv)
    return scale, -minv, L


def make_qp_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qp_quants: quantize non-negative group scales to 0..nmax. x, w: [..., n] -> (scale, L uint8 values)."""
    n = x.shape[-1]
    mx = torch.zeros(x.shape[:-1], dtype=F32, device=x.device)
    for i in range(n):
        mx = torch.where(mx > x[..., i], mx, x[..., i])  # MAX(max, x[i])
    zero = mx < GROUP_MAX_EPS
    wx = w * x

    def mse(iscale: Tensor, scale: Tensor, clamp: bool, trunc: bool) -> Tensor:
        l = _nearest_int(iscale.unsqueeze(-1) * x)
        if clamp:
            l = l.clamp(max=nmax)
        if trunc:
            l = _u8(l)
        lf = l.to(F32)
        acc = torch.zeros_like(mx)
        for i in range(n):
            diff = x[..., i] - scale * lf[..., i]
            acc = acc + (w[..., i] * diff) * diff
        return acc

    iscale = _div(float(nmax), mx)
    best = mse(iscale, _div(1.0, iscale), clamp=False, trunc=True)
    for k in range(-4, 5):
        if k == 0:
            continue
        num = float(np.float32(0.1) * np.float32(k) + np.float32(nmax))
        iscale_is = _div(num, mx)
        m = mse(iscale_is, _div(1.0, iscale_is), clamp=True, trunc=False)
        ok = m < best
        best = torch.where(ok, m, best)
        iscale = torch.where(ok, iscale_is, iscale)
    l = _nearest_int(iscale.unsqueeze(-1) * x).clamp(max=nmax)
    lf = l.to(F32)
    sumlx = torch.zeros_like(mx)
    suml2 = torch.zeros_like(mx)
    for i in range(n):
        sumlx = sumlx + wx[..., i] * lf[..., i]
        suml2 = suml2 + (w[..., i] * lf[..., i]) * lf[..., i]
    cols = [_u8(l[..., i]) for i in range(n)]
    for _ in range(5):  # see make_q3_quants: extra passes after a pass without change are no-ops
        for i in range(n):
            xi, wi, wxi = x[..., i], w[..., i], wx[..., i]
            Li = cols[i].to(F32)
            slx = sumlx - wxi * Li
            sl2 = suml2 - (wi * Li) * Li
            new_l = _nearest_int(_div(xi * sl2, slx)).clamp(max=nmax)
            nlf = new_l.to(F32)
            slx2 = slx + wxi * nlf
            sl22 = sl2 + (wi * nlf) * nlf
            upd = (slx > 0) & (sl2 > 0) & (new_l != cols[i]) & (((slx2 * slx2) * suml2) > ((sumlx * sumlx) * sl22))
            cols[i] = torch.where(upd, _u8(new_l), cols[i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.stack(cols, dim=-1)
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(sumlx))
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


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
    """``factor*sum(x^2)/QK_K`` with the sum in loop order over the super-block (the imatrix paths)."""
    s = _seq_sum(x * x)
    if factor != 1:
        s = float(factor) * s
    return _div(s, _full(s, float(QK_K)))


def _requant_min(xs: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor, L: Tensor, nmax: int) -> Tensor:
    """The final pass of the scale+min types: L = clamp(nearest_int((x + dmin*m)/(d*sc))), skipped where d*sc == 0."""
    dq = d.unsqueeze(-1) * sc.to(F32)
    dm = dmin.unsqueeze(-1) * m.to(F32)
    lnew = _nearest_int(_div(xs + dm.unsqueeze(-1), dq.unsqueeze(-1).expand_as(xs))).clamp_(0, nmax)
    return torch.where((dq == 0).unsqueeze(-1), L, lnew)


def _q2_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[0]
    xs = x.view(B, 16, 16)
    if qw is None:
        scales, mins, L = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True, qkx3=False)
        max_scale, _ = _seq_max_first(scales, scales)
        max_min, _ = _seq_max_first(mins, mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = _u8(_nearest_int(_div(15.0, max_scale).unsqueeze(-1) * scales))
        ls = torch.where(has_s.unsqueeze(-1), ls, torch.zeros_like(ls))
        lm = _nearest_int(_div(15.0, max_min).unsqueeze(-1) * mins)
        sc = torch.where(has_m.unsqueeze(-1), _u8(ls | (lm << 4)), ls)
        zero = torch.zeros_like(max_scale)
        d_bits = _fp16_bits(torch.where(has_s, _div(max_scale, _full(max_scale, 15.0)), zero))
        m_bits = _fp16_bits(torch.where(has_m, _div(max_min, _full(max_min, 15.0)), zero))
    else:
        sigma2 = _sigma2(x, 1)
        weight = qw.view(B, 16, 16) * _sqrt(sigma2[:, None, None] + xs * xs)
        sw = _seq_sum(weight)
        scales, mins, L = make_qkx_quants(xs, weight, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        dm, Ls = make_qp_quants(scales, 15, sw)
        mm, Lm = make_qp_quants(mins, 15, sw)
        d_bits, m_bits = _fp16_bits(dm), _fp16_bits(mm)
        sc = _u8(Ls | (Lm << 4))
    L = _requant_min(xs, _fp16_to_f32(d_bits), _fp16_to_f32(m_bits), sc & 0xF, sc >> 4, L, 3)
    return _bytes(sc, _pack_2bit(L.reshape(B, QK_K)), _le16(d_bits), _le16(m_bits))


def _q3_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[0]
    xs = x.view(B, 16, 16)
    if qw is None:
        scales, L = make_q3_quants(xs, 4)
        _, max_scale = _seq_max_first(scales, scales.abs())
        nonzero = max_scale != 0
        iscale = _div(-32.0, max_scale)
        l6 = _i8(_nearest_int(iscale.unsqueeze(-1) * scales)).clamp_(-32, 31) + 32
        l6 = torch.where(nonzero.unsqueeze(-1), l6, torch.zeros_like(l6))
        packed = _pack_q3_scales(l6)
        packed = torch.where(nonzero.unsqueeze(-1), packed, torch.zeros_like(packed))
        d_bits = _fp16_bits(torch.where(nonzero, _div(1.0, iscale), torch.zeros_like(iscale)))
    else:
        sigma2 = _sigma2(x, 2)
        weight = qw.view(B, 16, 16) * _sqrt(sigma2[:, None, None] + xs * xs)
        sw = _seq_sum(weight)
        scales, L = make_qx_quants(xs, 4, weight)
        d_block, Ls = make_qx_quants(scales, 32, sw)
        packed = _pack_q3_scales(Ls)
        d_bits = _fp16_bits(d_block)
    sc = _unpack_q3_scales(packed)
    dq = _fp16_to_f32(d_bits).unsqueeze(-1) * sc.to(F32)
    lnew = _nearest_int(_div(xs, dq.unsqueeze(-1).expand_as(xs))).clamp_(-4, 3) + 4
    L = torch.where((dq == 0).unsqueeze(-1), L, lnew).reshape(B, QK_K)
    # high bit of quant j goes to hmask[j % 32], bit j / 32
    high = (L > 3).to(torch.int32).view(B, 8, 32)
    hmask = torch.zeros((B, 32), dtype=torch.int32, device=x.device)
    for b in range(8):
        hmask = hmask | (high[:, b] << b)
    return _bytes(hmask, _pack_2bit(L & 3), packed, _le16(d_bits))


def _q45_k(x: Tensor, qw: Tensor | None, nmax: int) -> Tensor:
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 groups of 32 with 6-bit scales and mins."""
    B = x.shape[0]
    xs = x.view(B, 8, 32)
    if qw is None:
        av_x = _sqrt(_div(_seq_sum(xs * xs), _full(xs[..., 0], 32.0)))
        weights = av_x.unsqueeze(-1) + xs.abs()
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, rmin, 0.1, nstep, use_mad=False, qkx3=False)
        max_scale, _ = _seq_max_first(scales, scales)
        max_min, _ = _seq_max_first(mins, mins)
        zero = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, _div(63.0, max_min), zero)
        ls = _u8(_nearest_int(inv_scale.unsqueeze(-1) * scales)).clamp_(max=63)
        lm = _u8(_nearest_int(inv_min.unsqueeze(-1) * mins)).clamp_(max=63)
        d_bits = _fp16_bits(_div(max_scale, _full(max_scale, 63.0)))
        m_bits = _fp16_bits(_div(max_min, _full(max_min, 63.0)))
    else:
        sigma2 = _sigma2(x, 2)
        weights = qw.view(B, 8, 32) * _sqrt(sigma2[:, None, None] + xs * xs)
        sw = _seq_sum(weights)
        scales, mins, L = make_qkx_quants(xs, weights, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        d_block, ls = make_qp_quants(scales, 63, sw)
        m_block, lm = make_qp_quants(mins, 63, sw)
        if nmax == 31:
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d_bits, m_bits = _fp16_bits(d_block), _fp16_bits(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    L = _requant_min(xs, _fp16_to_f32(d_bits), _fp16_to_f32(m_bits), sc, m, L, nmax).reshape(B, 4, 2, 32)
    head = (_le16(d_bits), _le16(m_bits), packed)
    if nmax == 15:
        return _bytes(*head, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(B, 128))
    qh = torch.zeros((B, 32), dtype=torch.int32, device=x.device)
    for k in range(4):
        qh = qh | ((L[:, k, 0] >> 4) << (2 * k)) | ((L[:, k, 1] >> 4) << (2 * k + 1))
    ql = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(B, 128)
    return _bytes(*head, qh, ql)


def _q6_k(x: Tensor, qw: Tensor | None) -> Tensor:
    B = x.shape[0]
    xs = x.view(B, 16, 16)
    w = xs * xs if qw is None else qw.view(B, 16, 16)
    scales, L = make_qx_quants(xs, 32, w)
    max_abs, max_scale = _seq_max_first(scales, scales.abs())
    zero = max_abs < GROUP_MAX_EPS
    iscale = _div(-128.0, max_scale)
    d_bits = _fp16_bits(_div(1.0, iscale))
    sc = _i8(_nearest_int(iscale.unsqueeze(-1) * scales).clamp_(max=127))
    dq = _fp16_to_f32(d_bits).unsqueeze(-1) * sc.to(F32)
    lnew = _nearest_int(_div(xs, dq.unsqueeze(-1).expand_as(xs))).clamp_(-32, 31) + 32
    L = torch.where((dq == 0).unsqueeze(-1), L, lnew).reshape(B, 2, 4, 32)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], 2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = _bytes(ql.reshape(B, 128), qh.reshape(B, 64), _u8(sc), _le16(d_bits))
    return torch.where(zero.unsqueeze(-1), torch.zeros_like(out), out)


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
    d, dmin = _fp16_to_f32(q[:, 80] | (q[:, 81] << 8)), _fp16_to_f32(q[:, 82] | (q[:, 83] << 8))
    dl = d.unsqueeze(-1) * (sc & 0xF).to(F32)
    ml = dmin.unsqueeze(-1) * (sc >> 4).to(F32)
    L = _unpack_2bit(qs).view(-1, 16, 16).to(F32)
    return (dl.unsqueeze(-1) * L - ml.unsqueeze(-1)).reshape(-1, QK_K)


def _deq_q3_k(q: Tensor) -> Tensor:
    q = q.to(torch.int32)
    hmask, qs, scb = q[:, :32], q[:, 32:96], q[:, 96:108]
    d = _fp16_to_f32(q[:, 108] | (q[:, 109] << 8))
    dl = d.unsqueeze(-1) * _unpack_q3_scales(scb).to(F32)
    bits = torch.arange(8, dtype=torch.int32, device=q.device).view(1, 8, 1)
    high = ((hmask.unsqueeze(1) >> bits) & 1).reshape(-1, QK_K)
    L = (_unpack_2bit(qs) - torch.where(high != 0, 0, 4)).view(-1, 16, 16).to(F32)
    return (dl.unsqueeze(-1) * L).reshape(-1, QK_K)


def _deq_q45_k(q: Tensor, nmax: int) -> Tensor:
    q = q.to(torch.int32)
    d, dmin = _fp16_to_f32(q[:, 0] | (q[:, 1] << 8)), _fp16_to_f32(q[:, 2] | (q[:, 3] << 8))
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
    ql, qh, sc = q[:, :128].view(-1, 2, 2, 32), q[:, 128:192].view(-1, 2, 1, 32), _i8(q[:, 192:208])
    d = _fp16_to_f32(q[:, 208] | (q[:, 209] << 8))
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
# row-level entry points
# ----------------------------------------------------------------------------------------------------
def _check_rows(x: Tensor, qtype: str) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{qtype}: expected a 2-D [rows, n_per_row] tensor, got shape {tuple(x.shape)}")
    rows, n = x.shape
    if n % QK_K != 0:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {QK_K}")
    return rows, n


def quantize_rows(qtype: str, x: Tensor, imatrix: Tensor | None = None) -> Tensor:
    """Quantize float32 rows [rows, n] to ``qtype`` bytes [rows, n/256*type_size], as ggml_quantize_chunk does."""
    qtype = qtype.upper()
    fn = _BLOCK_QUANT[qtype]
    rows, n = _check_rows(x, qtype)
    x = x.to(F32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{qtype}: input contains NaN or infinite values")
    nb = n // QK_K
    xb = x.view(rows * nb, QK_K)
    qwb = None
    if imatrix is not None:
        imatrix = imatrix.to(device=x.device, dtype=F32).reshape(-1)
        if imatrix.numel() != n:
            raise ValueError(f"{qtype}: imatrix has {imatrix.numel()} values, rows have {n}")
        qwb = imatrix.view(1, nb, QK_K).expand(rows, nb, QK_K).reshape(rows * nb, QK_K)
    ts = TYPE_SIZE[qtype]
    out = torch.empty((rows * nb, ts), dtype=torch.uint8, device=x.device)
    for s in range(0, rows * nb, _CHUNK):
        e = min(s + _CHUNK, rows * nb)
        out[s:e] = fn(xb[s:e], None if qwb is None else qwb[s:e])
    return out.view(rows, nb * ts)


def dequantize_rows(qtype: str, q: Tensor, n: int) -> Tensor:
    """Bytes [rows, row_bytes] -> float32 [rows, n], as ggml's dequantize_row_* computes them."""
    qtype = qtype.upper()
    ts = TYPE_SIZE[qtype]
    if n % QK_K != 0:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {QK_K}")
    nb = n // QK_K
    if q.dim() != 2 or q.shape[1] != nb * ts or q.dtype != torch.uint8:
        raise ValueError(f"{qtype}: expected uint8 [rows, {nb * ts}] for n={n}, got {q.dtype} {tuple(q.shape)}")
    rows = q.shape[0]
    out = _BLOCK_DEQUANT[qtype](q.reshape(rows * nb, ts))
    return out.reshape(rows, n)
