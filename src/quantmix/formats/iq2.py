"""IQ2_XXS, IQ2_XS and IQ2_S: 2-bit codebook quants on the E8-like grids, byte-exact with ggml-quants.c.

Each 8-weight group stores |x| as one point of a grid (256 / 512 / 1024 points of levels {0,1,2}, odd
values 2l+1) and the signs separately; a super-block of 256 weights has an fp16 scale and 4-bit
sub-block scales. The quantizers (``quantize_row_iq2_{xxs,xs,s}_impl``) search candidate scales; for
each, a group whose rounded levels are off the grid takes the best of its precomputed neighbours
(``iq2_find_best_neighbour``), so the neighbour lists must be ggml's, in ggml's order (see
:func:`neighbour_tables`).

Why it looks the way it does: every float32 operation is repeated in C's order (sequential sums over a
block's positions, no FMA, correctly rounded division / sqrt through formats.common), vectorized over
all blocks of all rows. Blocks live position-major ([positions, blocks]) so each sequential step reads one
contiguous slice; neighbour searches run on flat (group, candidate) lists with segment minima.

ggml_quantize_chunk needs an imatrix for IQ2_XXS and IQ2_XS; IQ2_S also runs without one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from quantmix.formats import codebook
from quantmix.formats import common as C
from quantmix.formats.api import register_numerics

QK_K = 256
TYPE_SIZE = {"IQ2_XXS": 66, "IQ2_XS": 74, "IQ2_S": 82}
GROUP_MAX_EPS = C.f32(1e-15)
GROUP_MAX_EPS_IQ2_S = C.f32(1e-8)
# ggml's nwant (neighbour distance shells kept per off-grid point), iq2xs_init_impl
NWANT = {"IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 1, "IQ1_S": 3, "IQ1_M": 3}
KMAP_SIZE = 1 << 16  # every 8 x 2-bit key; ggml's kmap holds the first 43692 of them
FLT_MAX = float(np.finfo(np.float32).max)

# Super-blocks per solver pass: bounds the memory of the neighbour searches (CPU); GPUs take more.
CHUNK_SUPERBLOCKS = 512
CHUNK_SUPERBLOCKS_GPU = 16384


# ----------------------------------------------------------------------------------------------------
# neighbour tables (iq2xs_init_impl), compact: only keys whose levels are all <= max_level
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeighbourTables:
    """ggml's map and neighbour lists of one 8-dimensional 2-bit grid, as flat (CSR) tensors on one device.

    kmap: int64 [65536] grid index of a key (sum l_i << 2i) or -1; start / count: int64 [65536], where the
    key's neighbour list begins in ``flat`` and its length (0 for on-grid or unreachable keys); flat: int64
    grid indices in ggml's order (ascending squared distance, then grid index); levels: int64 [G, 8];
    nlev: levels per coordinate in the grid. For the search, each list entry's levels are pre-coded:
    lo: int32 [len(flat)], the entry's first PREFIX levels as one base-nlev number; hi: int32
    [8 - PREFIX, len(flat)], ``(i - PREFIX) * nlev + l_i`` for the remaining positions."""

    qtype: str
    kmap: Tensor
    start: Tensor
    count: Tensor
    flat: Tensor
    levels: Tensor
    lo: Tensor
    hi: Tensor
    nlev: int


# The neighbour search sums its 8 terms in order; the partial sums over the first PREFIX positions are
# computed once per group for every level combination (nlev^PREFIX of them), then looked up per candidate.
PREFIX = 4


def _build_tables(qtype: str, nwant: int, max_level: int) -> dict[str, np.ndarray]:
    lv = codebook.grid_levels(qtype).astype(np.int64)  # [G, 8]
    g, dim = lv.shape
    if dim != 8 or int(lv.max()) > 3:
        raise ValueError(f"{qtype}: expected an 8-dimensional grid of 2-bit levels, got {lv.shape}")
    shifts = 2 * np.arange(8, dtype=np.int64)
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int64)
    kmap[(lv << shifts).sum(axis=1)] = np.arange(g)
    # every key of levels 0..max_level (the quantizers clamp to that range)
    nl = max_level + 1
    digits = (np.arange(nl ** 8)[:, None] // nl ** np.arange(8)[None, :]) % nl  # [K, 8]
    keys = (digits << shifts).sum(axis=1)
    off = kmap[keys] < 0
    keys, digits = keys[off], digits[off]
    # squared distances between the odd coordinates 2l+1, exact in float32 (small integers)
    p = (2 * digits + 1).astype(np.float32)
    q = (2 * lv + 1).astype(np.float32)
    d2 = (p * p).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2.0 * (p @ q.T)
    d2 = np.rint(d2).astype(np.int64)  # [K, G]
    # the nwant smallest distinct distances per key
    thr = np.full(len(keys), -1, dtype=np.int64)
    big = np.int64(1) << 40
    for _ in range(nwant):
        thr = np.where(d2 > thr[:, None], d2, big).min(axis=1)
    rows, cols = np.nonzero(d2 <= thr[:, None])
    order = np.lexsort((cols, d2[rows, cols], rows))  # by key, then distance, then grid index
    flat = cols[order]
    count_k = np.bincount(rows, minlength=len(keys)).astype(np.int64)
    start_k = np.cumsum(count_k) - count_k
    start = np.zeros(KMAP_SIZE, dtype=np.int64)
    count = np.zeros(KMAP_SIZE, dtype=np.int64)
    start[keys] = start_k
    count[keys] = count_k
    nlev = int(lv.max()) + 1
    fl = lv[flat]  # [F, 8]
    lo = (fl[:, :PREFIX] * nlev ** np.arange(PREFIX - 1, -1, -1)).sum(axis=1)
    hi = (np.arange(8 - PREFIX)[:, None] * nlev + fl[:, PREFIX:].T)
    return {"kmap": kmap, "start": start, "count": count, "flat": flat.astype(np.int64), "levels": lv,
            "lo": lo.astype(np.int32), "hi": np.ascontiguousarray(hi, dtype=np.int32), "nlev": np.array(nlev)}


@functools.lru_cache(maxsize=None)
def _tables_np(qtype: str, nwant: int, max_level: int) -> dict[str, np.ndarray]:
    return _build_tables(qtype, nwant, max_level)


@functools.lru_cache(maxsize=None)
def _tables_dev(qtype: str, nwant: int, max_level: int, device: str) -> NeighbourTables:
    t = _tables_np(qtype, nwant, max_level)
    dev = torch.device(device)
    names = ("kmap", "start", "count", "flat", "levels", "lo", "hi")
    return NeighbourTables(qtype, *(torch.from_numpy(t[k]).to(dev) for k in names), int(t["nlev"]))


def neighbour_tables(qtype: str, device: torch.device | str = "cpu", *, max_level: int = 2) -> NeighbourTables:
    """ggml's kmap / neighbour lists for ``qtype``'s grid (IQ2_* / IQ1_*), for keys of levels <= max_level.

    Built as iq2xs_init_impl does (all grid points in the ``nwant`` nearest distance shells, ordered by
    (distance, grid index)), but only for the keys the quantizers can produce; cached per device."""
    return _tables_dev(qtype, NWANT[qtype], max_level, str(torch.device(device)))


_INVALID = 0x7F7FFFFF  # bits of FLT_MAX: C accepts only d2 < FLT_MAX


def best_neighbour(tab: NeighbourTables, keys: Tensor, xval: Tensor, weight: Tensor, scale: Tensor,
                   qvals: Tensor) -> Tensor:
    """``iq2_find_best_neighbour`` for N off-grid groups at once: the grid index minimizing
    ``d2 = sum_i (w_i * diff_i) * diff_i``, ``diff_i = scale * q(l_i) - x_i``, summed in order i = 0..7,
    first of equal minima, only d2 < FLT_MAX accepted (ggml aborts when none is; the first neighbour is
    returned then).

    keys [N] int64 (off-grid keys), xval / weight [N, 8], scale [N], qvals [N, >= nlev] or [>= nlev]: the
    value of level l (2l+1 for IQ2; IQ1 passes its shifted values). Returns int64 [N]."""
    n = keys.shape[0]
    dev = keys.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    nl = tab.nlev
    qv = (qvals if qvals.dim() == 2 else qvals.unsqueeze(0).expand(n, -1))[:, :nl]
    # every (position, level) term once: t[g, i, l] = (w_i * diff) * diff
    diff = scale[:, None, None] * qv[:, None, :] - xval[:, :, None]  # [N, 8, nl]
    t = (weight[:, :, None] * diff) * diff
    # partial sums over the first PREFIX positions for every level combination, in C's order
    pre = t[:, 0, :]
    for i in range(1, PREFIX):
        pre = (pre.unsqueeze(2) + t[:, i, None, :]).reshape(n, -1)
    pre = pre.reshape(-1)
    tail = t[:, PREFIX:, :].reshape(-1)
    cnt = tab.count.index_select(0, keys)
    st = tab.start.index_select(0, keys)
    total = int(cnt.sum())
    gid = torch.repeat_interleave(torch.arange(n, device=dev), cnt, output_size=total)
    first_of = torch.cumsum(cnt, 0) - cnt
    gid32 = gid.to(torch.int32)  # int32 indices: index_select runs several times faster with them
    cflat = torch.arange(total, device=dev, dtype=torch.int32) + (st - first_of).to(torch.int32).index_select(0, gid32)
    d2 = pre.index_select(0, gid32 * (nl ** PREFIX) + tab.lo.index_select(0, cflat))
    tbase = gid32 * ((8 - PREFIX) * nl)
    for i in range(8 - PREFIX):
        d2 = d2 + tail.index_select(0, tbase + tab.hi[i].index_select(0, cflat))
    # first minimum per group: as integers, the bits of floats >= 0 order as the floats; NaN and values
    # >= FLT_MAX never win in C (become inf here). cflat grows along each list, so the smallest
    # (bits, cflat) pair is C's first minimum, and its low half is the winner's place in ``flat``.
    d2 = torch.where(d2 < FLT_MAX, d2, torch.full_like(d2, float("inf")))
    comb = (d2.view(torch.int32).to(torch.int64) << 32) | cflat.to(torch.int64)
    big = torch.iinfo(torch.int64).max
    best = torch.full((n,), big, dtype=torch.int64, device=dev).scatter_reduce(0, gid, comb, "amin")
    at = torch.where((best >> 32) >= _INVALID, st, best & 0xFFFFFFFF)
    return tab.flat.index_select(0, at)


# ----------------------------------------------------------------------------------------------------
# shared pieces of the three quantizers (position-major: [positions, blocks])
# ----------------------------------------------------------------------------------------------------
def _keys(lv: Tensor) -> Tensor:
    """Levels [bs, B] (bs = 8 * ng) -> keys [ng, B] (sum l_i << 2i over each group of 8)."""
    bs, b = lv.shape
    sh = (2 * torch.arange(8, device=lv.device, dtype=torch.int64)).repeat(bs // 8)[:, None]
    return (lv.to(torch.int64) << sh).reshape(bs // 8, 8, b).sum(dim=1)


def _round_levels(idv: Tensor, xval: Tensor) -> Tensor:
    """``MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*xval - 1))))`` with kMaxQ = 3: int64 [bs, B]."""
    v = (idv.unsqueeze(0) * xval - 1.0) * 0.5
    return C.nearest_int(v).clamp(0, 2).to(torch.int64)


def _grid_levels_of(tab: NeighbourTables, lv: Tensor, scale: Tensor, xval: Tensor, waux: Tensor,
                    need: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Snap each group of rounded levels to the grid as the IQ2 quantizers do: on-grid groups keep their
    levels; off-grid groups (where ``need`` [ng, B] holds) take their best neighbour's levels.

    lv [bs, B] int64, scale [B], xval / waux [bs, B]. Returns (levels [bs, B], on_grid [ng, B])."""
    bs, b = lv.shape
    ng = bs // 8
    keys = _keys(lv)  # [ng, B]
    on = tab.kmap[keys] >= 0
    search = ~on if need is None else (~on & need)
    idx = search.reshape(-1).nonzero().squeeze(1)  # flat (group, block) ids
    if idx.numel():
        k, blk = idx // b, idx % b
        pos = (8 * k)[:, None] + torch.arange(8, device=lv.device)[None, :]  # [N, 8]
        xg = xval[pos, blk[:, None]]
        wg = waux[pos, blk[:, None]]
        qv = torch.tensor([1.0, 3.0, 5.0, 7.0], device=lv.device)
        gi = best_neighbour(tab, keys.reshape(-1)[idx], xg, wg, scale[blk], qv)
        lv = lv.clone()
        lv[pos, blk[:, None]] = tab.levels[gi]
    return lv, on


def _sums(weight: Tensor, xval: Tensor, lv: Tensor) -> tuple[Tensor, Tensor]:
    """``sumqx += w*xval[i]*q; sumq2 += w*q*q`` (q = 2l+1) in position order."""
    q = (2 * lv + 1).to(torch.float32)
    return C.seq_sum_pm((weight * xval) * q), C.seq_sum_pm((weight * q) * q)


def _max_seq(v: Tensor, init: Tensor | None = None) -> Tensor:
    """``m = v[0] (or init); for i: m = MAX(m, v[i])`` over dim 0 (C's MAX: ``a > b ? a : b``)."""
    m = v[0] if init is None else init
    for i in range(0 if init is not None else 1, v.shape[0]):
        m = torch.where(m > v[i], m, v[i])
    return m


def _signs(xt: Tensor, weight: Tensor, parity: bool) -> tuple[Tensor, Tensor]:
    """|x| per position and the sign byte of each group of 8 (position-major [bs, B]).

    With ``parity`` (IQ2_XXS / IQ2_XS, 7 stored sign bits): a group with an odd number of negatives flips
    the sign of its least important element (smallest w*x*x, first of equals), whose xval turns negative.
    Returns (xval [bs, B], signs [ng, B] int64: 7 bits with parity, else 8)."""
    bs, b = xt.shape
    neg = xt < 0
    xval = torch.where(neg, -xt, xt)
    bit = (1 << torch.arange(8, device=xt.device, dtype=torch.int64)).repeat(bs // 8)[:, None]
    s = (neg.to(torch.int64) * bit).reshape(bs // 8, 8, b).sum(dim=1)  # [ng, B]
    if not parity:
        return xval, s
    nflip = neg.reshape(bs // 8, 8, b).sum(dim=1)
    odd = (nflip % 2) == 1
    imp = (weight * xt) * xt  # [bs, B]
    imp = imp.reshape(bs // 8, 8, b)
    mn = imp[:, 0]
    imin = torch.zeros_like(s)
    for i in range(1, 8):
        upd = imp[:, i] < mn
        mn = torch.where(upd, imp[:, i], mn)
        imin = torch.where(upd, torch.full_like(imin, i), imin)
    flip = torch.zeros((bs // 8, 8, b), dtype=torch.bool, device=xt.device)
    flip.scatter_(1, imin.unsqueeze(1), odd.unsqueeze(1))
    xval = torch.where(flip.reshape(bs, b), -xval, xval)
    s = torch.where(odd, s ^ torch.bitwise_left_shift(torch.ones_like(imin), imin), s)
    return xval, s & 127


def _weights(xs: Tensor, imatrix: Tensor | None, rows: int, bs: int, two_sigma: bool) -> tuple[Tensor, Tensor]:
    """Per-weight importances, position-major [bs, B]: ``qw * sqrtf(sigma2 + x^2)`` with an imatrix, else
    IQ2_S's ``0.25f*sigma2 + x^2``; sigma2 = (2*)sum(x^2)/256 over the super-block. Returns (x_t, w_t)."""
    nsb = xs.shape[0]
    x2 = xs * xs
    sumx2 = C.seq_sum_rows(x2)  # [nsb], in order over the 256 weights
    sigma2 = C.div(sumx2 * 2.0 if two_sigma else sumx2, float(QK_K))
    per = QK_K // bs
    xt = xs.reshape(nsb * per, bs).t().contiguous()
    s2 = sigma2.repeat_interleave(per).unsqueeze(0)  # [1, B]
    x2t = xt * xt
    if imatrix is not None:
        n = imatrix.numel()
        imt = imatrix.reshape(n // bs, bs).t().repeat(1, rows)  # [bs, rows * n/bs]
        w = imt * C.sqrt32(s2 + x2t)
    else:
        w = s2 * 0.25 + x2t
    return xt, w


def _scale_codes(scales: Tensor, max_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``d = max_scale/31; id = 1/d; l = clamp(nearest_int(0.5f*(id*scale-1)), 0, 15)`` per sub-block.

    scales [nsb, nb], max_scale [nsb] (where it is 0 the codes are garbage, and unused, as in C).
    Returns (d [nsb], l [nsb, nb] int64)."""
    d = C.div(max_scale, 31.0)
    idv = C.rdiv(1.0, d)  # inf where d underflows to 0: nearest_int's bit trick then gives C's value
    l = C.nearest_int((idv.unsqueeze(1) * scales - 1.0) * 0.5).clamp(0, 15).to(torch.int64)
    return d, l


# ----------------------------------------------------------------------------------------------------
# IQ2_XS and IQ2_S: 16-weight sub-blocks, 19 candidate scales, recompute of off-grid groups
# ----------------------------------------------------------------------------------------------------
def _solve_16(tab: NeighbourTables, xval: Tensor, weight: Tensor, waux: Tensor) -> tuple[Tensor, Tensor]:
    """The scale search of quantize_row_iq2_{xs,s}_impl for active sub-blocks (max >= eps).

    xval / weight / waux [16, B]. Returns (scale [B], levels [16, B] int64 on the grid)."""
    mx = _max_seq(xval)
    b = mx.shape[0]
    best = torch.zeros(b, device=xval.device)
    scale = C.div(mx, 5.0)
    L = torch.zeros((16, b), dtype=torch.int64, device=xval.device)
    on_grid = torch.ones((2, b), dtype=torch.bool, device=xval.device)
    for is_ in range(-9, 10):
        num = C.f32(np.float32(5) + np.float32(is_) * np.float32(0.1))
        idv = C.rdiv(num, mx)
        this_scale = C.rdiv(1.0, idv)
        laux, on = _grid_levels_of(tab, _round_levels(idv, xval), this_scale, xval, waux)
        sumqx, sumq2 = _sums(weight, xval, laux)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_scale = C.div(sumqx, sumq2)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumqx, best)
        L = torch.where(better.unsqueeze(0), laux, L)
        on_grid = torch.where(better.unsqueeze(0), on, on_grid)
    redo = (~on_grid).any(dim=0) & (scale > 0)
    if bool(redo.any()):
        need = ~on_grid & redo.unsqueeze(0)
        idv = C.rdiv(1.0, torch.where(redo, scale, torch.ones_like(scale)))
        lr, _ = _grid_levels_of(tab, _round_levels(idv, xval), scale, xval, waux, need)
        need_pos = need.repeat_interleave(8, dim=0)
        L = torch.where(need_pos, lr, L)
        sumqx, sumq2 = _sums(weight, xval, L)
        scale = torch.where(redo & (sumq2 > 0), C.div(sumqx, sumq2), scale)
    return scale, L


def _quantize_16(x: Tensor, imatrix: Tensor | None, qtype: str) -> Tensor:
    rows, n = x.shape
    is_s = qtype == "IQ2_S"
    dev = x.device
    tab = neighbour_tables(qtype, dev)
    nsb = rows * (n // QK_K)
    xs = x.reshape(nsb, QK_K)
    xt, weight = _weights(xs, imatrix, rows, 16, two_sigma=is_s)
    waux = C.sqrt32(weight)
    xval, signs = _signs(xt, weight, parity=not is_s)
    mx = _max_seq(xval)
    active = ~(mx < (GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS))  # C: skip when max < eps
    nblk = xt.shape[1]
    scale = torch.zeros(nblk, device=dev)
    grid = torch.zeros((2, nblk), dtype=torch.int64, device=dev)
    aidx = active.nonzero().squeeze(1)
    if aidx.numel():
        sc, L = _solve_16(tab, xval[:, aidx], weight[:, aidx], waux[:, aidx])
        sa = signs[:, aidx]
        negs = sc < 0
        sa = torch.where(negs.unsqueeze(0), ~sa & (255 if is_s else 127), sa)
        sc = torch.where(negs, -sc, sc)
        scale[aidx] = sc
        grid[:, aidx] = tab.kmap[_keys(L)]
        signs = signs.clone()
        signs[:, aidx] = sa
    written = active.unsqueeze(0)
    grid = torch.where(written, grid, torch.zeros_like(grid))
    signs = torch.where(written, signs, torch.zeros_like(signs))
    scales = scale.reshape(nsb, 16)
    max_scale = _max_seq(scales.t().contiguous(), torch.zeros(nsb, device=dev))
    d, l = _scale_codes(scales, max_scale)
    has = max_scale != 0
    l = torch.where(has.unsqueeze(1), l, torch.zeros_like(l))
    sc_bytes = (l[:, 0::2] | (l[:, 1::2] << 4)).to(torch.uint8)  # [nsb, 8]
    grid = grid.t().reshape(nsb, 32)  # block-major: group i8 = 2*ib + k
    signs = signs.t().reshape(nsb, 32)
    if is_s:
        dfield = C.f16_field(torch.where(has, d * C.f32(0.9875), torch.zeros_like(d)))
        qs = (grid & 255).to(torch.uint8)
        hi = (grid >> 8).reshape(nsb, 8, 4) << (2 * torch.arange(4, device=dev, dtype=torch.int64))
        qh = hi.sum(dim=2).to(torch.uint8)  # disjoint bits
        out = torch.cat([dfield, qs, signs.to(torch.uint8), qh, sc_bytes], dim=1)
    else:
        dfield = C.f16_field(torch.where(has, d, torch.zeros_like(d)))
        q2 = torch.where(has.unsqueeze(1), grid | (signs << 9), torch.zeros_like(grid))
        out = torch.cat([dfield, C.pack_u16(q2).reshape(nsb, 64), sc_bytes], dim=1)
    return out.reshape(rows, -1)


# ----------------------------------------------------------------------------------------------------
# IQ2_XXS: 32-weight sub-blocks, make_qp_quants start, 13 candidates, full recompute
# ----------------------------------------------------------------------------------------------------
def make_qp_quants(x: Tensor, w: Tensor, mx: Tensor, nmax: int) -> Tensor:
    """ggml ``make_qp_quants(n, nmax, x, L, w)``'s returned scale, position-major x / w [n, B], for blocks
    whose max(0, x...) = ``mx`` >= GROUP_MAX_EPS. L is stored as uint8 in C (a negative level wraps to
    256 + l and is used that way in the refinement), which is kept here."""
    n = x.shape[0]
    iscale = C.rdiv(float(nmax), mx)
    lst = C.nearest_int(iscale * x).to(torch.int64) & 255
    scale = C.rdiv(1.0, iscale)
    diff = x - scale * lst.float()
    best_mse = C.seq_sum_pm((w * diff) * diff)
    for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
        num = C.f32(np.float32(0.1) * np.float32(is_) + np.float32(nmax))
        isc = C.rdiv(num, mx)
        sc = C.rdiv(1.0, isc)
        lf = C.nearest_int(isc * x).clamp(max=nmax).float()
        diff = x - sc * lf
        mse = C.seq_sum_pm((w * diff) * diff)
        upd = mse < best_mse
        best_mse = torch.where(upd, mse, best_mse)
        iscale = torch.where(upd, isc, iscale)
    l = C.nearest_int(iscale * x).clamp(max=nmax)
    lf = l.float()
    lst = l.to(torch.int64) & 255
    wx = w * x
    sumlx = C.seq_sum_pm(wx * lf)
    suml2 = C.seq_sum_pm((w * lf) * lf)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(n):
            li = lst[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = C.nearest_int(C.div(x[i] * sl2, slx)).clamp(max=nmax)
            ok = ok & (new_l.to(torch.int64) != lst[i])
            nlf = new_l.float()
            slx = slx + wx[i] * nlf
            sl2 = sl2 + (w[i] * nlf) * nlf
            acc = ok & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            lst[i] = torch.where(acc, new_l.to(torch.int64) & 255, lst[i])
            sumlx = torch.where(acc, slx, sumlx)
            suml2 = torch.where(acc, sl2, suml2)
            changed |= acc
        if not bool(changed.any()):  # C stops a block after a pass without changes; later passes would be no-ops
            break
    return torch.where(suml2 > 0, C.div(sumlx, suml2), torch.zeros_like(sumlx))


def _solve_32(tab: NeighbourTables, xval: Tensor, weight: Tensor, waux: Tensor, mx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """quantize_row_iq2_xxs_impl's search for blocks with max >= eps. Returns (scale [B], levels [32, B],
    ok [B]: False where eff_max <= 0 (the block is then skipped like a zero block)."""
    b = mx.shape[0]
    scale = make_qp_quants(xval, weight, mx, 4)
    eff_max = scale * 3.0
    ok = ~(eff_max <= 0)  # C skips only when eff_max <= 0: a NaN scale goes on (and can end as inf)
    em = torch.where(ok, eff_max, torch.ones_like(eff_max))
    best = torch.zeros(b, device=xval.device)
    L = torch.zeros((32, b), dtype=torch.int64, device=xval.device)
    for is_ in range(-6, 7):
        num = C.f32(np.float32(5) + np.float32(is_) * np.float32(0.1))
        idv = C.rdiv(num, em)
        this_scale = C.rdiv(1.0, idv)
        laux, _ = _grid_levels_of(tab, _round_levels(idv, xval), this_scale, xval, waux, ok.unsqueeze(0))
        sumqx, sumq2 = _sums(weight, xval, laux)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_scale = C.div(sumqx, sumq2)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumqx, best)
        L = torch.where(better.unsqueeze(0), laux, L)
    redo = ok & (scale > 0)
    if bool(redo.any()):
        idv = C.rdiv(1.0, torch.where(redo, scale, torch.ones_like(scale)))
        lr, _ = _grid_levels_of(tab, _round_levels(idv, xval), scale, xval, waux, redo.unsqueeze(0))
        L = torch.where(redo.unsqueeze(0), lr, L)
        sumqx, sumq2 = _sums(weight, xval, L)
        scale = torch.where(redo & (sumq2 > 0), C.div(sumqx, sumq2), scale)
    return scale, L, ok


def _quantize_xxs(x: Tensor, imatrix: Tensor | None) -> Tensor:
    if imatrix is None:
        raise ValueError("IQ2_XXS needs an importance matrix (ggml_quantize_chunk requires one)")
    rows, n = x.shape
    dev = x.device
    tab = neighbour_tables("IQ2_XXS", dev)
    nsb = rows * (n // QK_K)
    xs = x.reshape(nsb, QK_K)
    xt, weight = _weights(xs, imatrix, rows, 32, two_sigma=False)
    waux = C.sqrt32(weight)
    xval, signs = _signs(xt, weight, parity=True)
    mx = _max_seq(xval)
    active = ~(mx < GROUP_MAX_EPS)
    nblk = xt.shape[1]
    scale = torch.zeros(nblk, device=dev)
    grid = torch.zeros((4, nblk), dtype=torch.int64, device=dev)
    written = torch.zeros(nblk, dtype=torch.bool, device=dev)
    aidx = active.nonzero().squeeze(1)
    if aidx.numel():
        sc, L, ok = _solve_32(tab, xval[:, aidx], weight[:, aidx], waux[:, aidx], mx[aidx])
        sa = signs[:, aidx]
        negs = ok & (sc < 0)
        sa = torch.where(negs.unsqueeze(0), ~sa & 127, sa)
        sc = torch.where(negs, -sc, sc)
        scale[aidx] = torch.where(ok, sc, torch.zeros_like(sc))
        grid[:, aidx] = tab.kmap[_keys(L)]
        signs = signs.clone()
        signs[:, aidx] = sa
        written[aidx] = ok
    grid = torch.where(written.unsqueeze(0), grid, torch.zeros_like(grid))
    signs = torch.where(written.unsqueeze(0), signs, torch.zeros_like(signs))
    scales = scale.reshape(nsb, 8)
    max_scale = _max_seq(scales.t().contiguous(), torch.zeros(nsb, device=dev))
    d, l = _scale_codes(scales, max_scale)
    has = max_scale != 0
    sh = torch.arange(4, device=dev, dtype=torch.int64)
    g = grid.t().reshape(nsb, 8, 4)
    s = signs.t().reshape(nsb, 8, 4)
    w0 = (g << (8 * sh)).sum(dim=2)
    w1 = (s << (7 * sh)).sum(dim=2) | (l << 28)
    words = torch.stack([w0, w1], dim=2).reshape(nsb, 16)
    words = torch.where(has.unsqueeze(1), words, torch.zeros_like(words))
    dfield = C.f16_field(torch.where(has, d, torch.zeros_like(d)))
    return torch.cat([dfield, C.pack_u32(words).reshape(nsb, 64)], dim=1).reshape(rows, -1)


# ----------------------------------------------------------------------------------------------------
# entry points: chunked over super-blocks
# ----------------------------------------------------------------------------------------------------
def kernel_quantize(qtype: str, x: Tensor, imatrix: Tensor | None) -> Tensor | None:
    """The bytes from the CUDA codebook kernels (gpu/iqkernels.py: ggml's bytes, far faster than the torch
    path) for a CUDA tensor; None where the torch path must run (CPU, QUANTMIX_IQ_KERNELS=0, no build)."""
    if x.device.type != "cuda":
        return None
    from quantmix.formats.gpu import iqkernels

    return iqkernels.quantize_rows(qtype, x, imatrix) if iqkernels.use_kernels(x) else None


def _chunked(fn, x: Tensor, imatrix: Tensor | None, gpu_share: int = 1) -> Tensor:  # type: ignore[no-untyped-def]
    """Run ``fn`` on row slices of at most CHUNK_SUPERBLOCKS super-blocks (whole rows: the imatrix is per row;
    on a GPU CHUNK_SUPERBLOCKS_GPU // gpu_share). Sums that overflow to inf / NaN are part of ggml's
    arithmetic on extreme inputs, so numpy's warnings about them are silenced."""
    rows, n = x.shape
    limit = CHUNK_SUPERBLOCKS if x.device.type == "cpu" else CHUNK_SUPERBLOCKS_GPU // gpu_share
    step = max(1, limit // max(1, n // QK_K))
    with np.errstate(over="ignore", invalid="ignore"):
        if rows <= step:
            return fn(x.contiguous(), imatrix)
        return torch.cat([fn(x[r0:r0 + step].contiguous(), imatrix) for r0 in range(0, rows, step)], dim=0)


def quantize_iq2_xxs(x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 [rows, n] -> IQ2_XXS bytes [rows, n/256*66] (ggml's quantize_iq2_xxs; imatrix required)."""
    if imatrix is None:
        raise ValueError("IQ2_XXS needs an importance matrix (ggml_quantize_chunk requires one)")
    q = kernel_quantize("IQ2_XXS", x, imatrix)
    return q if q is not None else _chunked(_quantize_xxs, x, imatrix)


def quantize_iq2_xs(x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 [rows, n] -> IQ2_XS bytes [rows, n/256*74] (ggml's quantize_iq2_xs; imatrix required)."""
    if imatrix is None:
        raise ValueError("IQ2_XS needs an importance matrix (ggml_quantize_chunk requires one)")
    q = kernel_quantize("IQ2_XS", x, imatrix)
    return q if q is not None else _chunked(lambda a, im: _quantize_16(a, im, "IQ2_XS"), x, imatrix)


def quantize_iq2_s(x: Tensor, imatrix: Tensor | None) -> Tensor:
    """float32 [rows, n] -> IQ2_S bytes [rows, n/256*82] (ggml's quantize_iq2_s, with or without imatrix)."""
    q = kernel_quantize("IQ2_S", x, imatrix)
    return q if q is not None else _chunked(lambda a, im: _quantize_16(a, im, "IQ2_S"), x, imatrix)


# ----------------------------------------------------------------------------------------------------
# dequantizers (dequantize_row_iq2_*)
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _grid_values_dev(qtype: str, device: str) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(codebook.grid_values(qtype))).to(torch.device(device))


@functools.lru_cache(maxsize=None)
def _ksigns_dev(device: str) -> Tensor:
    """ksigns_iq2xs as +-1.0 multipliers [128, 8]: 7 stored bits plus their parity as bit 7."""
    i = np.arange(128)
    par = np.array([bin(v).count("1") & 1 for v in i])
    full = i | (par << 7)
    bits = (full[:, None] >> np.arange(8)[None, :]) & 1
    return torch.from_numpy(np.where(bits == 1, -1.0, 1.0).astype(np.float32)).to(torch.device(device))


def _sign_mult(bits8: Tensor) -> Tensor:
    """Sign bytes [...] (8 bits) -> +-1.0 [..., 8]."""
    b = (bits8.unsqueeze(-1) >> torch.arange(8, device=bits8.device)) & 1
    return 1.0 - 2.0 * b.to(torch.float32)


def _half_scales(sc: Tensor, d: Tensor) -> Tensor:
    """``d * (0.5f + nibble) * 0.25f`` for both nibbles of each scale byte: [nsb, 8] -> [nsb, 16]."""
    nib = torch.stack([sc & 0xF, sc >> 4], dim=2).reshape(sc.shape[0], 16).to(torch.float32)
    return (d.unsqueeze(1) * (nib + 0.5)) * 0.25


def dequantize_iq2_xxs(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 66)
    nsb = b.shape[0]
    d = C.f16_from_field(b[:, :2])
    words = C.unpack_u32(b[:, 2:].reshape(nsb, 16, 4)).reshape(nsb, 8, 2)
    w1 = words[:, :, 1]
    db = (d.unsqueeze(1) * ((w1 >> 28).to(torch.float32) + 0.5)) * 0.25  # [nsb, 8]
    gidx = b[:, 2:].reshape(nsb, 8, 8)[:, :, :4].to(torch.int64)  # the 4 grid bytes of each sub-block
    grid = _grid_values_dev("IQ2_XXS", str(q.device))[gidx]  # [nsb, 8, 4, 8]
    sidx = (w1.unsqueeze(2) >> (7 * torch.arange(4, device=q.device))) & 127
    sg = _ksigns_dev(str(q.device))[sidx]  # [nsb, 8, 4, 8]
    return ((db[:, :, None, None] * grid) * sg).reshape(q.shape[0], n)


def dequantize_iq2_xs(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 74)
    nsb = b.shape[0]
    d = C.f16_from_field(b[:, :2])
    qs = C.unpack_u16(b[:, 2:66].reshape(nsb, 32, 2)).to(torch.int64)  # [nsb, 32]
    db = _half_scales(b[:, 66:74].to(torch.int64), d)  # [nsb, 16]: one per 16 weights
    grid = _grid_values_dev("IQ2_XS", str(q.device))[qs & 511]  # [nsb, 32, 8]
    sg = _ksigns_dev(str(q.device))[qs >> 9]
    dbg = db.repeat_interleave(2, dim=1)  # one per group of 8
    return ((dbg[:, :, None] * grid) * sg).reshape(q.shape[0], n)


def dequantize_iq2_s(q: Tensor, n: int) -> Tensor:
    b = q.reshape(-1, 82)
    nsb = b.shape[0]
    d = C.f16_from_field(b[:, :2])
    qs = b[:, 2:34].to(torch.int64)
    signs = b[:, 34:66].to(torch.int64)
    qh = b[:, 66:74].to(torch.int64)
    db = _half_scales(b[:, 74:82].to(torch.int64), d)
    hi = (qh.unsqueeze(2) >> (2 * torch.arange(4, device=q.device))) & 3  # [nsb, 8, 4]
    gidx = qs | (hi.reshape(nsb, 32) << 8)
    grid = _grid_values_dev("IQ2_S", str(q.device))[gidx]  # [nsb, 32, 8]
    sg = _sign_mult(signs)
    dbg = db.repeat_interleave(2, dim=1)
    return ((dbg[:, :, None] * grid) * sg).reshape(q.shape[0], n)


register_numerics("IQ2_XXS", quantize_iq2_xxs, dequantize_iq2_xxs)
register_numerics("IQ2_XS", quantize_iq2_xs, dequantize_iq2_xs)
register_numerics("IQ2_S", quantize_iq2_s, dequantize_iq2_s)
