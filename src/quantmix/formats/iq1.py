"""IQ1_S and IQ1_M: ternary codebook quants (levels -1, 0, 1 shifted by +-1/8), byte-exact with ggml-quants.c.

Each 8-weight group is one point of a 2048-point grid over {-1, 0, 1}^8 and a block shares one shift
(+-IQ1S_DELTA) and a 3-bit scale. The quantizers (``quantize_row_iq1_{s,m}_impl``) sort a block's
weights and try every split of the sorted order into the three levels (and every shift), keeping the
best by ``sumqx^2 / sumq2``; groups off the grid take the best of their neighbours
(``iq1_find_best_neighbour2``, the neighbour tables are iq2.neighbour_tables with nwant = 3).

Why it looks the way it does: the split candidates are computed side by side (each one's float32
arithmetic as in C), then accepted in C's order by a sequential scan whose comparisons repeat C's;
sums run in C's order; the sort is stable as glibc's qsort (a merge sort for these sizes).

ggml_quantize_chunk needs an imatrix for IQ1_S; IQ1_M also runs without one (weights x^2).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from quantmix.formats import codebook
from quantmix.formats import common as C
from quantmix.formats.api import register_numerics
from quantmix.formats.iq2 import _chunked, _keys, _max_seq, best_neighbour, kernel_quantize, neighbour_tables

QK_K = 256
TYPE_SIZE = {"IQ1_S": 50, "IQ1_M": 56}
GROUP_MAX_EPS_IQ1_S = C.f32(1e-12)
GROUP_MAX_EPS_IQ1_M = C.f32(1e-7)
DELTA = np.float32(0.125)
X_P = (np.float32(-1) + DELTA, DELTA, np.float32(1) + DELTA)  # {-1 + delta, delta, 1 + delta}
X_M = (np.float32(-1) - DELTA, -DELTA, np.float32(1) - DELTA)
FLT_MAX = float(np.finfo(np.float32).max)
# The split searches hold ~10 tensors of (candidates x blocks) floats (~36 KB per 256 weights): on a GPU,
# IQ1 takes 1/GPU_SHARE of iq2's super-blocks per pass (~1.5 GB).
GPU_SHARE = 4


# ----------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------
def _prefix(v: Tensor) -> Tensor:
    """``s[0] = 0; s[j+1] = s[j] + v[j]`` over dim 0: [n, B] -> [n+1, B]."""
    out = torch.zeros((v.shape[0] + 1, v.shape[1]), dtype=torch.float32, device=v.device)
    for j in range(v.shape[0]):
        out[j + 1] = out[j] + v[j]
    return out


@functools.lru_cache(maxsize=None)
def _pairs(n: int, device: str) -> tuple[Tensor, Tensor]:
    """All (i1, i2) with 0 <= i1 <= i2 <= n, in C's loop order (i1 outer)."""
    p = [(i1, i2) for i1 in range(n + 1) for i2 in range(i1, n + 1)]
    t = torch.tensor(p, dtype=torch.int64, device=torch.device(device))
    return t[:, 0].contiguous(), t[:, 1].contiguous()


def _scan(qx: Tensor, q2: Tensor) -> tuple[Tensor, Tensor]:
    """C's running best over candidates in order: ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale =
    sumqx/sumq2; best = scale*sumqx; }`` from best = -FLT_MAX. qx, q2 [Cand, B]. Returns (index of the
    last accepted candidate, -1 if none [B]; its scale [B]). Every candidate's numbers are computed at
    once; only the accept / reject chain runs in order (4 small ops per candidate)."""
    sc = C.div(qx, q2)
    prod = sc * qx
    # sumq2 > 0 folded in: where it fails, -inf never beats anything (nor does NaN)
    qxx = torch.where(q2 > 0, qx * qx, torch.full_like(qx, float("-inf")))
    b = qx.shape[1]
    best = torch.full((b,), -FLT_MAX, dtype=torch.float32, device=qx.device)
    bidx = torch.full((b,), -1, dtype=torch.int64, device=qx.device)
    thr = torch.empty_like(best)
    better = torch.empty(b, dtype=torch.bool, device=qx.device)
    for c in range(qx.shape[0]):
        torch.mul(best, q2[c], out=thr)
        torch.gt(qxx[c], thr, out=better)
        best = torch.where(better, prod[c], best)
        bidx.masked_fill_(better, c)
    scale = sc.gather(0, bidx.clamp(min=0).unsqueeze(0)).squeeze(0)
    return bidx, scale


def _sorted_levels(order: Tensor, i1: Tensor, i2: Tensor) -> Tensor:
    """``L[idx[j]] = 0 (j < i1), 1 (j < i2), 2`` for position-major ``order`` [n, B] -> int64 [n, B]."""
    n = order.shape[0]
    j = torch.arange(n, device=order.device).unsqueeze(1)
    ls = (j >= i1.unsqueeze(0)).to(torch.int64) + (j >= i2.unsqueeze(0)).to(torch.int64)
    return torch.empty_like(ls).scatter_(0, order, ls)


def _qtable(device: torch.device) -> Tensor:
    """[2, 3]: row 0 the x_p values, row 1 the x_m values."""
    return torch.tensor([list(map(float, X_P)), list(map(float, X_M))], dtype=torch.float32, device=device)


def _snap(tab, L: Tensor, xt: Tensor, w: Tensor, scale: Tensor, grp_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """Grid indices of each group of 8: kmap of its levels, else iq1_find_best_neighbour2.

    L [bs, B] levels, xt / w [bs, B] signed weights and importances, scale [B], grp_q [ng, B, 3] the level
    values of each group. Returns (index [ng, B], levels [bs, B] of those grid points, all_on_grid [B])."""
    bs, b = L.shape
    ng = bs // 8
    keys = _keys(L)
    gi = tab.kmap[keys]
    off = gi < 0
    idx = off.reshape(-1).nonzero().squeeze(1)
    lv = L
    if idx.numel():
        k, blk = idx // b, idx % b
        pos = (8 * k)[:, None] + torch.arange(8, device=L.device)[None, :]
        found = best_neighbour(tab, keys.reshape(-1)[idx], xt[pos, blk[:, None]], w[pos, blk[:, None]], scale[blk],
                               grp_q[k, blk])
        gi = gi.clone()
        gi[k, blk] = found
        lv = L.clone()
        lv[pos, blk[:, None]] = tab.levels[found]
    return gi, lv, ~off.any(dim=0)


def _refit(lv: Tensor, xt: Tensor, w: Tensor, grp_q: Tensor) -> tuple[Tensor, Tensor]:
    """``sumqx += w*q*x; sumq2 += w*q*q`` over the block in order, q = the group's value of each level."""
    bs, b = lv.shape
    qv = grp_q.repeat_interleave(8, dim=0)  # [bs, B, 3]
    q = qv.gather(2, lv.unsqueeze(2)).squeeze(2)
    wq = w * q
    return C.seq_sum_pm(wq * xt), C.seq_sum_pm(wq * q)


def _sigma2(xs: Tensor) -> Tensor:
    return C.div(C.seq_sum_rows(xs * xs) * 2.0, float(QK_K))


def _block_weights(xs: Tensor, imatrix: Tensor | None, rows: int, bs: int) -> tuple[Tensor, Tensor]:
    """Position-major x [bs, B] and weights ``qw * sqrtf(sigma2 + x^2)`` (x^2 without an imatrix)."""
    nsb = xs.shape[0]
    per = QK_K // bs
    xt = xs.reshape(nsb * per, bs).t().contiguous()
    if imatrix is None:
        return xt, xt * xt
    s2 = _sigma2(xs).repeat_interleave(per).unsqueeze(0)
    n = imatrix.numel()
    imt = imatrix.reshape(n // bs, bs).t().repeat(1, rows)
    return xt, imt * C.sqrt32(s2 + xt * xt)


def _sort(xt: Tensor) -> Tensor:
    """Stable ascending order of each block (qsort with iq1_sort_helper; glibc's merge sort is stable)."""
    return torch.sort((xt + 0.0).t(), dim=1, stable=True).indices.t().contiguous()


# ----------------------------------------------------------------------------------------------------
# IQ1_S: blocks of 32, one shift per block
# ----------------------------------------------------------------------------------------------------
def _solve_s(tab, xt: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """Active blocks [32, B] -> (index [4, B], scale [B], shift [B] (+-1), written [B])."""
    dev = xt.device
    order = _sort(xt)
    wx = w * xt
    sumx = _prefix(wx.gather(0, order))  # [33, B]
    sumw = _prefix(w.gather(0, order))
    i1, i2 = _pairs(32, str(dev))
    a, bm, cm = sumx[i1] - sumx[0], sumx[i2] - sumx[i1], sumx[32] - sumx[i2]
    aw, bw, cw = sumw[i1] - sumw[0], sumw[i2] - sumw[i1], sumw[32] - sumw[i2]
    qxs, q2s = [], []
    for v in (X_P, X_M):
        p0, p1, p2 = (float(t) for t in v)
        qxs.append(((a * p0) + (bm * p1)) + (cm * p2))
        q2s.append((((aw * p0) * p0) + ((bw * p1) * p1)) + ((cw * p2) * p2))
    qx = torch.stack(qxs, dim=1).reshape(-1, xt.shape[1])  # candidate 2*pair + (0: x_p, 1: x_m)
    q2 = torch.stack(q2s, dim=1).reshape(-1, xt.shape[1])
    bidx, scale = _scan(qx, q2)
    ok = bidx >= 0
    pair = bidx.clamp(min=0) // 2
    shift = torch.where(bidx % 2 == 0, 1, -1)
    L = _sorted_levels(order, i1[pair], i2[pair])
    neg = scale < 0
    L = torch.where(neg.unsqueeze(0), 2 - L, L)
    scale = torch.where(neg, -scale, scale)
    shift = torch.where(neg, -shift, shift)
    qv = _qtable(dev)[(shift < 0).to(torch.int64)]  # [B, 3]
    grp_q = qv.unsqueeze(0).expand(4, -1, -1)
    gi, lv, on = _snap(tab, L, xt, w, scale, grp_q)
    sumqx, sumq2 = _refit(lv, xt, w, grp_q)
    refit = ~on & (sumqx > 0) & (sumq2 > 0)
    scale = torch.where(refit, C.div(sumqx, sumq2), scale)
    return gi, scale, shift, ok


def _quantize_s(x: Tensor, imatrix: Tensor | None) -> Tensor:
    if imatrix is None:
        raise ValueError("IQ1_S needs an importance matrix (ggml_quantize_chunk requires one)")
    rows, n = x.shape
    dev = x.device
    tab = neighbour_tables("IQ1_S", dev)
    nsb = rows * (n // QK_K)
    xt, w = _block_weights(x.reshape(nsb, QK_K), imatrix, rows, 32)
    mx = _max_seq(xt.abs())
    active = ~(mx < GROUP_MAX_EPS_IQ1_S)
    nblk = xt.shape[1]
    gi = torch.zeros((4, nblk), dtype=torch.int64, device=dev)
    scale = torch.zeros(nblk, device=dev)
    shift = torch.ones(nblk, dtype=torch.int64, device=dev)
    aidx = active.nonzero().squeeze(1)
    if aidx.numel():
        g, sc, sh, ok = _solve_s(tab, xt[:, aidx], w[:, aidx])
        gi[:, aidx] = torch.where(ok.unsqueeze(0), g, torch.zeros_like(g))
        scale[aidx] = torch.where(ok, sc, torch.zeros_like(sc))
        shift[aidx] = torch.where(ok, sh, torch.ones_like(sh))
    scales = scale.reshape(nsb, 8)
    max_scale = _max_seq(scales.t().contiguous(), torch.zeros(nsb, device=dev))
    has = max_scale != 0
    d = C.div(max_scale, 15.0)
    idv = C.rdiv(1.0, d)  # as C: inf where d underflows to 0
    l = C.nearest_int((idv.unsqueeze(1) * scales - 1.0) * 0.5).clamp(0, 7).to(torch.int64)
    l = l | torch.where(shift.reshape(nsb, 8) == -1, 8, 0)
    l = torch.where(has.unsqueeze(1), l, torch.zeros_like(l))
    g = gi.t().reshape(nsb, 8, 4)
    qh = ((g >> 8) << (3 * torch.arange(4, device=dev))).sum(dim=2) | (l << 12)
    dfield = C.f16_field(torch.where(has, d * C.f32(1.125), torch.zeros_like(d)))
    qs = (g & 255).to(torch.uint8).reshape(nsb, 32)
    return torch.cat([dfield, qs, C.pack_u16(qh).reshape(nsb, 16)], dim=1).reshape(rows, -1)


# ----------------------------------------------------------------------------------------------------
# IQ1_M: blocks of 16, a shift per half block, fp16 super-scale spread over the scale bytes
# ----------------------------------------------------------------------------------------------------
def _solve_m(tab, xt: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """Active blocks [16, B] -> (index [2, B], scale [B], best_k [B] (0..3), written [B])."""
    dev = xt.device
    b = xt.shape[1]
    order = _sort(xt)
    wx_s = (w * xt).gather(0, order)
    w_s = w.gather(0, order)
    half = order >= 8  # h of each sorted entry
    px = [torch.zeros((17, b), device=dev) for _ in range(2)]
    pw = [torch.zeros((17, b), device=dev) for _ in range(2)]
    for j in range(16):
        for h in range(2):
            mine = half[j] == bool(h)
            px[h][j + 1] = torch.where(mine, px[h][j] + wx_s[j], px[h][j])
            pw[h][j + 1] = torch.where(mine, pw[h][j] + w_s[j], pw[h][j])
    p2, m2 = float(X_P[2]), float(X_M[2])
    cp1 = float(X_P[0] * X_P[0] - X_P[1] * X_P[1])
    cp2 = float(X_P[1] * X_P[1] - X_P[2] * X_P[2])
    cm1 = float(X_M[0] * X_M[0] - X_M[1] * X_M[1])
    cm2 = float(X_M[1] * X_M[1] - X_M[2] * X_M[2])
    i1, i2 = _pairs(16, str(dev))
    qx_p, qx_m, q2_p, q2_m = [], [], [], []
    for h in range(2):
        sx = px[h][i1] + px[h][i2]
        txs, tws = px[h][16], pw[h][16]
        qx_p.append(txs * p2 - sx)
        qx_m.append(txs * m2 - sx)
        q2_p.append(((tws * p2) * p2 + pw[h][i1] * cp1) + pw[h][i2] * cp2)
        q2_m.append(((tws * m2) * m2 + pw[h][i1] * cm1) + pw[h][i2] * cm2)
    qx = torch.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], dim=1)
    q2 = torch.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], dim=1)
    bidx, scale = _scan(qx.reshape(-1, b), q2.reshape(-1, b))
    ok = bidx >= 0
    pair = bidx.clamp(min=0) // 4
    best_k = bidx.clamp(min=0) % 4
    L = _sorted_levels(order, i1[pair], i2[pair])
    neg = scale < 0
    L = torch.where(neg.unsqueeze(0), 2 - L, L)
    scale = torch.where(neg, -scale, scale)
    best_k = torch.where(neg, 3 - best_k, best_k)
    grp_q = _group_q(best_k)
    gi, lv, on = _snap(tab, L, xt, w, scale, grp_q)
    sumqx, sumq2 = _refit(lv, xt, w, grp_q)
    refit = ~on & (sumqx > 0) & (sumq2 > 0)
    scale = torch.where(refit, C.div(sumqx, sumq2), scale)
    return gi, scale, best_k, ok


def _group_q(best_k: Tensor) -> Tensor:
    """[2, B, 3] level values of the two groups: group 0 x_p if k < 2, group 1 x_p if k even."""
    qt = _qtable(best_k.device)
    return torch.stack([qt[(best_k >= 2).to(torch.int64)], qt[(best_k % 2).to(torch.int64)]])


def _quantize_m(x: Tensor, imatrix: Tensor | None) -> Tensor:
    rows, n = x.shape
    dev = x.device
    tab = neighbour_tables("IQ1_M", dev)
    nsb = rows * (n // QK_K)
    xt, w = _block_weights(x.reshape(nsb, QK_K), imatrix, rows, 16)
    mx = _max_seq(xt.abs())
    active = ~(mx < GROUP_MAX_EPS_IQ1_M)
    nblk = xt.shape[1]
    gi = torch.zeros((2, nblk), dtype=torch.int64, device=dev)
    scale = torch.zeros(nblk, device=dev)
    kk = torch.zeros(nblk, dtype=torch.int64, device=dev)
    aidx = active.nonzero().squeeze(1)
    if aidx.numel():
        g, sc, k, ok = _solve_m(tab, xt[:, aidx], w[:, aidx])
        gi[:, aidx] = torch.where(ok.unsqueeze(0), g, torch.zeros_like(g))
        scale[aidx] = torch.where(ok, sc, torch.zeros_like(sc))
        kk[aidx] = torch.where(ok, k, torch.zeros_like(k))
    scales = scale.reshape(nsb, 16)
    max_scale = _max_seq(scales.t().contiguous(), torch.zeros(nsb, device=dev))
    has = max_scale != 0
    d = C.div(max_scale, 15.0)
    idv = C.rdiv(1.0, d)  # as C: inf where d underflows to 0
    l = C.nearest_int((idv.unsqueeze(1) * scales - 1.0) * 0.5).clamp(0, 7).to(torch.int64)  # [nsb, 16]
    # the super-scale refit over all 256 weights, in order (grid points of skipped blocks are index 0)
    lv = codebook_levels(dev)[gi]  # [2, B, 8]
    grp_q = _group_q(kk)  # [2, B, 3]
    q = grp_q.gather(2, lv) * (2 * l.reshape(-1) + 1).to(torch.float32).unsqueeze(0).unsqueeze(2)  # [2, B, 8]
    xg = xt.reshape(2, 8, nblk).permute(0, 2, 1)  # [2, B, 8]
    wg = w.reshape(2, 8, nblk).permute(0, 2, 1)
    wq = wg * q
    order = lambda v: v.permute(1, 0, 2).reshape(nsb, QK_K)  # noqa: E731  (block, group, position)
    sumqx = C.seq_sum_rows(order(wq * xg))
    sumq2 = C.seq_sum_rows(order(wq * q))
    d = torch.where(sumq2 > 0, C.div(sumqx, sumq2), d)
    s16 = C.fp32_to_fp16_bits(d * C.f32(1.1125)).to(torch.int64) & 0xFFFF
    masks = torch.tensor([0x00, 0x80, 0x08, 0x88], dtype=torch.int64, device=dev)
    g = gi.t().reshape(nsb, 16, 2)
    qh = (g[:, :, 0] >> 8) | ((g[:, :, 1] >> 8) << 4)
    qh = qh | torch.where(has.unsqueeze(1), masks[kk.reshape(nsb, 16)], torch.zeros_like(qh))
    sc = (l.reshape(nsb, 4, 4) << (3 * torch.arange(4, device=dev))).sum(dim=2)  # [nsb, 4] uint16 words
    top = torch.stack([(s16 & 0x000F) << 12, (s16 & 0x00F0) << 8, (s16 & 0x0F00) << 4, s16 & 0xF000], dim=1)
    sc = torch.where(has.unsqueeze(1), sc | top, torch.zeros_like(sc))
    qs = (g & 255).to(torch.uint8).reshape(nsb, 32)
    return torch.cat([qs, qh.to(torch.uint8), C.pack_u16(sc).reshape(nsb, 8)], dim=1).reshape(rows, -1)


@functools.lru_cache(maxsize=None)
def _levels_dev(device: str) -> Tensor:
    return torch.from_numpy(codebook.grid_levels("IQ1_S").astype(np.int64)).to(torch.device(device))


def codebook_levels(device: torch.device) -> Tensor:
    """The IQ1 grid as level indices int64 [2048, 8] on ``device``."""
    return _levels_dev(str(device))


def quantize_iq1_s(x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 [rows, n] -> IQ1_S bytes [rows, n/256*50] (ggml's quantize_iq1_s; imatrix required)."""
    if imatrix is None:
        raise ValueError("IQ1_S needs an importance matrix (ggml_quantize_chunk requires one)")
    q = kernel_quantize("IQ1_S", x, imatrix)
    return q if q is not None else _chunked(_quantize_s, x, imatrix, gpu_share=GPU_SHARE)


def quantize_iq1_m(x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 [rows, n] -> IQ1_M bytes [rows, n/256*56] (ggml's quantize_iq1_m, with or without imatrix)."""
    q = kernel_quantize("IQ1_M", x, imatrix)
    return q if q is not None else _chunked(_quantize_m, x, imatrix, gpu_share=GPU_SHARE)


# ----------------------------------------------------------------------------------------------------
# dequantizers (dequantize_row_iq1_*)
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _grid_dev(device: str) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(codebook.grid_values("IQ1_S"))).to(torch.device(device))


def dequantize_iq1_s(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 50)
    nsb = b.shape[0]
    d = C.f16_from_field(b[:, :2])
    qs = b[:, 2:34].to(torch.int64).reshape(nsb, 8, 4)
    qh = C.unpack_u16(b[:, 34:50].reshape(nsb, 8, 2)).to(torch.int64)  # [nsb, 8]
    dl = d.unsqueeze(1) * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
    delta = torch.where((qh & 0x8000) != 0, -float(DELTA), float(DELTA))  # [nsb, 8]
    idx = qs | (((qh.unsqueeze(2) >> (3 * torch.arange(4, device=q.device))) & 7) << 8)
    grid = _grid_dev(str(q.device))[idx]  # [nsb, 8, 4, 8]
    return (dl[:, :, None, None] * (grid + delta[:, :, None, None])).reshape(q.shape[0], n)


def dequantize_iq1_m(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 56)
    nsb = b.shape[0]
    qs = b[:, :32].to(torch.int64).reshape(nsb, 8, 4)
    qh = b[:, 32:48].to(torch.int64).reshape(nsb, 8, 2)
    sc = C.unpack_u16(b[:, 48:56].reshape(nsb, 4, 2)).to(torch.int64)  # [nsb, 4]
    s16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = C.fp16_bits_to_fp32(s16)
    ib = torch.arange(8, device=q.device)
    word = sc[:, ib // 2]  # [nsb, 8]
    sh = (6 * (ib % 2)).unsqueeze(0)
    dl1 = d.unsqueeze(1) * (2 * ((word >> sh) & 7) + 1).to(torch.float32)
    dl2 = d.unsqueeze(1) * (2 * ((word >> (sh + 3)) & 7) + 1).to(torch.float32)
    hi = torch.stack([qh[:, :, 0] << 8, qh[:, :, 0] << 4, qh[:, :, 1] << 8, qh[:, :, 1] << 4], dim=2) & 0x700
    idx = qs | hi  # [nsb, 8, 4]
    dbit = torch.stack([qh[:, :, 0] & 0x08, qh[:, :, 0] & 0x80, qh[:, :, 1] & 0x08, qh[:, :, 1] & 0x80], dim=2)
    delta = torch.where(dbit != 0, -float(DELTA), float(DELTA))
    dl = torch.stack([dl1, dl1, dl2, dl2], dim=2)  # [nsb, 8, 4]
    grid = _grid_dev(str(q.device))[idx]  # [nsb, 8, 4, 8]
    return (dl[..., None] * (grid + delta[..., None])).reshape(q.shape[0], n)


register_numerics("IQ1_S", quantize_iq1_s, dequantize_iq1_s)
register_numerics("IQ1_M", quantize_iq1_m, dequantize_iq1_m)
