"""IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks): 4-bit non-linear grid quants.

Both follow ggml's ``quantize_row_iq4_nl_impl`` with ntry = 7, as ``ggml_quantize_chunk`` calls it
(with or without an imatrix): per 32-weight block, the best scale over 16 candidates of
``sum w q x`` / ``sum w q^2`` with q on the ``kvalues_iq4nl`` grid and weights ``x^2`` (no imatrix) or
``qw * sqrt(sigma2 + x^2)``, sigma2 = 2 * mean(x^2) over the (super-)block. IQ4_XS then stores a 6-bit
signed scale per block relative to an fp16 super-scale and re-picks the grid points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmix.formats import common as C
from quantmix.formats.api import register_numerics

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7
QK_K = 256


GRID = C.Int8Grid(KVALUES_IQ4NL)


def _kvalues(device: torch.device) -> Tensor:
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


def _block_scales(xt: Tensor, wt: Tensor) -> Tensor:
    """The per-block scale search of quantize_row_iq4_nl_impl (its first loop), position-major.

    ``xt``, ``wt``: [32, B]. Returns scales [B] (0 for blocks with amax < GROUP_MAX_EPS)."""
    v0 = float(KVALUES_IQ4NL[0])
    amax, mx = C.max_abs_first(xt.t())
    zero = amax < C.GROUP_MAX_EPS

    def sums(idv: Tensor) -> tuple[Tensor, Tensor]:
        q = GRID.value(idv * xt)
        wq = wt * q
        return C.seq_sum_pm(wq * xt), C.seq_sum_pm(wq * q)

    d = C.div(-mx, v0)  # ntry > 0: d = -max/values[0]
    sumqx, sumq2 = sums(C.rdiv(1.0, d))
    d = torch.where(sumq2 > 0, C.div(sumqx, sumq2), torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        idv = C.rdiv(float(itry + KVALUES_IQ4NL[0]), mx)
        sumqx, sumq2 = sums(idv)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        nd = C.div(sumqx, sumq2)
        d = torch.where(better, nd, d)
        best = torch.where(better, nd * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _weights(xt: Tensor, imatrix_t: Tensor | None, sigma2: Tensor) -> Tensor:
    """weight[j] = qw[j] * sqrtf(sigma2 + x^2) with an imatrix, x^2 without (position-major)."""
    x2 = xt * xt
    if imatrix_t is None:
        return x2
    return imatrix_t * C.sqrt32(sigma2 + x2)


# ---- IQ4_NL -------------------------------------------------------------------------------------


def _q_iq4_nl(x: Tensor, imatrix: Tensor | None) -> Tensor:
    rows, n = x.shape
    nb = n // 32
    xt = x.reshape(-1, 32).t().contiguous()  # [32, B]
    imt = imatrix.reshape(nb, 32).t().repeat(1, rows) if imatrix is not None else None
    sigma2 = C.seq_sum_pm(xt * xt) * C.f32(2.0 / 32)
    wt = _weights(xt, imt, sigma2)
    d = _block_scales(xt, wt)
    idv = C.nonzero_or(d, C.rdiv(1.0, d))
    L = GRID.index(idv * xt).t()  # [B, 32]
    qs = (L[:, :16] | (L[:, 16:] << 4)).to(torch.uint8)
    return torch.cat([C.f16_field(d), qs], dim=1).reshape(rows, -1)


def _dq_iq4_nl(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 18)
    d = C.f16_from_field(b[:, :2]).unsqueeze(1)
    qs = b[:, 2:].to(torch.int64)
    v = _kvalues(q.device)[torch.cat([qs & 0xF, qs >> 4], dim=1)]
    return (d * v).reshape(q.shape[0], n)


# ---- IQ4_XS -------------------------------------------------------------------------------------


def _q_iq4_xs(x: Tensor, imatrix: Tensor | None) -> Tensor:
    rows, n = x.shape
    nsb = rows * (n // QK_K)  # super-blocks
    xs = x.reshape(nsb, 8, 32)
    xt = xs.reshape(nsb * 8, 32).t().contiguous()  # [32, B] with B = nsb*8 blocks
    # sigma2 per super-block: sequential over its 256 values in order (block by block)
    x2 = xs * xs  # [nsb, 8, 32]
    sigma2 = (C.seq_sum_rows(x2.reshape(nsb, QK_K)) * C.f32(2.0 / QK_K)).repeat_interleave(8)  # [B]
    imt = None
    if imatrix is not None:
        imt = imatrix.reshape(n // 32, 32).t().repeat(1, rows)
    wt = _weights(xt, imt, sigma2)
    scales = _block_scales(xt, wt).reshape(nsb, 8)
    # super-scale from the first block scale of largest magnitude
    _, max_scale = C.max_abs_first(scales)
    d = C.div(-max_scale, 32.0)
    idv = C.nonzero_or(d, C.rdiv(1.0, d))
    l = C.nearest_int(idv.unsqueeze(1) * scales).clamp(-32, 31)  # [nsb, 8]
    dl = d.unsqueeze(1) * l.float()
    idl = C.nonzero_or(dl, C.rdiv(1.0, dl))
    L = GRID.index(idl.reshape(1, -1) * xt).t().reshape(nsb, 8, 32)
    l = (l + 32).to(torch.int64)
    lo, hi = l & 0xF, l >> 4
    scales_l = (lo[:, 0::2] | (lo[:, 1::2] << 4)).to(torch.uint8)  # [nsb, 4]
    shifts = 2 * torch.arange(8, device=x.device, dtype=torch.int64)
    scales_h = (hi << shifts).sum(dim=1)  # disjoint bits
    qs = (L[:, :, :16] | (L[:, :, 16:] << 4)).to(torch.uint8).reshape(nsb, 128)
    out = torch.cat([C.f16_field(d), C.pack_u16(scales_h), scales_l, qs], dim=1)
    return out.reshape(rows, -1)


def _dq_iq4_xs(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 136)
    d = C.f16_from_field(b[:, :2])
    sh = C.unpack_u16(b[:, 2:4]).to(torch.int64)
    sl = b[:, 4:8].to(torch.int64)
    ib = torch.arange(8, device=q.device)
    ls = ((sl[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh.unsqueeze(1) >> (2 * ib)) & 3) << 4)
    dl = d.unsqueeze(1) * (ls - 32).float()  # [nsb, 8]
    qs = b[:, 8:].to(torch.int64).reshape(-1, 8, 16)
    v = _kvalues(q.device)[torch.cat([qs & 0xF, qs >> 4], dim=2)]  # [nsb, 8, 32]
    return (dl.unsqueeze(2) * v).reshape(q.shape[0], n)


register_numerics("IQ4_NL", _q_iq4_nl, _dq_iq4_nl)
register_numerics("IQ4_XS", _q_iq4_xs, _dq_iq4_xs)
