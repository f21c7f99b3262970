"""IQ3_XXS and IQ3_S: 3-bit codebook quants (4-weight grid points), byte-exact with ggml-quants.c.

Both follow ``quantize_row_iq3_xxs_impl`` / ``quantize_row_iq3_s_impl`` (with or without an imatrix, as
``ggml_quantize_chunk`` calls them). Per 32-weight block: weights ``x^2`` (no imatrix) or
``qw * sqrt(sigma2 + x^2)`` with sigma2 = 2 * mean(x^2) over the super-block; the signs are split off
(IQ3_XXS keeps an even number of negatives per 8 weights by flipping the least important one); then a
search over 31 (XXS) / 19 (S) candidate scales, each rounding every 4 magnitudes to levels 0..7 and, where
that point is not on the grid, taking the best of ggml's neighbour list (codebook.py) under the weighted
distance; the candidate with the largest ``sumqx^2 / sumq2`` wins (first one on ties, as C's strict ``>``).
A last pass re-snaps off-grid groups at the winning scale, then 4-bit block scales are set against an fp16
super-scale.

Exactness: every float op is the C one, in C order (common.py's div / sqrt32 / seq sums; the 4-term
neighbour distance summed left to right; first minimum kept). IQ3_S reproduces a quirk of the C code: a
block whose magnitudes are all zero does not advance the ``qs`` / ``signs`` write pointers, so later
blocks of its super-block are stored one slot earlier (the ``qh`` bits stay at their own block).
Where C aborts (no neighbour with a finite distance: weights that overflow to inf) the first neighbour is
taken; ggml cannot produce those bytes at all.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from quantmix.formats import codebook
from quantmix.formats import common as C
from quantmix.formats.api import register_numerics

QK_K = 256
F32 = torch.float32
FLT_MAX = float(np.finfo(np.float32).max)
GROUP_MAX_EPS_IQ3_XXS = C.f32(1e-8)
KMAXQ = 8

TYPE_SIZE = {"IQ3_XXS": 98, "IQ3_S": 110}
_PARAMS = {
    # qtype: (candidate range, super-scale fudge, initial is_on_grid, refine on-grid groups too)
    "IQ3_XXS": (15, C.f32(1.0125), True, False),
    "IQ3_S": (9, C.f32(1.033), False, True),
}

# Super-blocks per solver call: bounded temporaries (~60 kB per super-block at the peak) on CPU; a GPU
# takes many more, its cost being the kernel launches of the per-position loops.
CHUNK_SUPERBLOCKS = 2048
CHUNK_SUPERBLOCKS_CUDA = 65536


# ---- tables ---------------------------------------------------------------------------------------


class _Tables:
    """The grid, map and neighbour lists of one type on one device, shaped for the vectorized search.

    levels [G, 4] int64; kmap [4096] int64 (-1 off the grid); counts [4096] neighbours per key;
    nbr_flat [4096 * K] the padded neighbour lists, row-major; grid_qt [4, G] float32 coordinates 2l+1;
    levels_t [4, G]."""

    def __init__(self, qtype: str, device: torch.device):
        cb = codebook.codebook(qtype, device=device)
        self.levels = cb.levels
        self.kmap = cb.kmap
        self.counts = cb.counts
        self.nbr_width = int(cb.neighbours.shape[1])
        self.nbr_flat = cb.neighbours.reshape(-1)
        self.grid_qt = (2 * cb.levels + 1).to(F32).t().contiguous()  # [4, G]
        self.levels_t = cb.levels.t().contiguous()  # [4, G]


@functools.lru_cache(maxsize=None)
def _tables(qtype: str, device: str) -> _Tables:
    return _Tables(qtype, torch.device(device))


def _nearest_int(v: Tensor) -> Tensor:
    """common.nearest_int with NaN -> 0, as x86's default NaN reads (CUDA's NaN has other bits)."""
    r = C.nearest_int(v)
    return torch.where(torch.isnan(v), torch.zeros_like(r), r)


def _levels(idv: Tensor, xval: Tensor) -> Tensor:
    """``MAX(0, MIN(7, nearest_int(0.5f*(id*xval - 1))))`` (int64); idv broadcasts against xval."""
    return _nearest_int((idv * xval - 1.0) * 0.5).clamp_(0, KMAXQ - 1).to(torch.int64)


def _keys(L3: Tensor) -> Tensor:
    """Levels [8, 4, B] -> map keys [8, B] (``u |= l << 3*i``)."""
    return L3[:, 0] | (L3[:, 1] << 3) | (L3[:, 2] << 6) | (L3[:, 3] << 9)


def _snap(tab: _Tables, L3: Tensor, sel: Tensor, xvg: Tensor, wag: Tensor, scale: Tensor) -> Tensor:
    """Put groups ``sel`` [8, B] whose level point is off the grid onto ggml's best neighbour.

    ``iq3_find_best_neighbour``: d2 = sum_i waux_i * (scale * q_i - xval_i)^2 in float32, summed in order,
    first strict minimum below FLT_MAX. ``xvg`` / ``wag``: xval / waux as [4, 8*B] (coordinate, group).
    Updates L3 [8, 4, B] in place; returns the off-grid mask [8, B] as it was before snapping."""
    B = L3.shape[2]
    key = _keys(L3).reshape(-1)  # [8*B], group g = k*B + b
    off = tab.kmap.index_select(0, key) < 0
    gi = (off & sel.reshape(-1)).nonzero().squeeze(1)
    if gi.numel():
        key = key.index_select(0, gi)
        # one entry per (group, neighbour) pair, 1-D throughout (gathers of scalars are the fast ones):
        # ~10 pairs per group, where padding every list to the longest (36-38) would do 4x the work
        cnt = tab.counts.index_select(0, key)
        grp = torch.repeat_interleave(torch.arange(gi.numel(), device=gi.device), cnt)
        pos = torch.arange(grp.numel(), device=gi.device)
        slot = pos - (torch.cumsum(cnt, 0) - cnt).index_select(0, grp)
        nid = tab.nbr_flat.index_select(0, key.index_select(0, grp) * tab.nbr_width + slot)
        gp = gi.index_select(0, grp)
        sp = scale.index_select(0, gp % B)
        terms = []
        for i in range(4):
            diff = sp * tab.grid_qt[i].index_select(0, nid) - xvg[i].index_select(0, gp)
            terms.append(wag[i].index_select(0, gp) * diff * diff)  # (w*diff)*diff, as C
        d2 = ((terms[0] + terms[1]) + terms[2]) + terms[3]  # C's 0 + t0 == t0: every t is +0, > 0 or NaN
        d2 = torch.where(d2 < FLT_MAX, d2, torch.full_like(d2, float("inf")))  # C keeps d2 < FLT_MAX only
        gmin = torch.full((gi.numel(),), float("inf"), device=gi.device).scatter_reduce(0, grp, d2, "amin")
        big = grp.numel()
        at = torch.where(d2 == gmin.index_select(0, grp), pos, torch.full_like(pos, big))
        win = torch.full((gi.numel(),), big, dtype=torch.int64, device=gi.device).scatter_reduce(0, grp, at, "amin")
        chosen = nid.index_select(0, win)  # the first pair at the minimum, as C's strict <
        k, b = gi // B, gi % B
        for i in range(4):
            L3[k, i, b] = tab.levels_t[i].index_select(0, chosen)
    return off.view(8, B)


def _sums(wx: Tensor, w: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    """sumqx = sum (w*xval)*q, sumq2 = sum (w*q)*q over the 32 positions in order, q = 2L+1 ([32, B])."""
    q = (2 * L + 1).to(F32)
    return C.seq_sum_pm(wx * q), C.seq_sum_pm(w * q * q)


# ---- the block solver -----------------------------------------------------------------------------


def _solve(qtype: str, x: Tensor, qw: Tensor | None) -> dict[str, Tensor]:
    """Quantize super-blocks x [S, 256] (qw [S, 256] or None): per-block grid indices, signs and scales."""
    tab = _tables(qtype, str(x.device))
    n_is, _, on_grid0, refine_all = _PARAMS[qtype]
    S = x.shape[0]
    B = S * 8
    sumx2 = C.seq_sum_rows(x * x)  # [S]
    sigma2 = C.div(sumx2 * 2.0, 256.0)  # 2*sumx2/QK_K
    xt = x.reshape(B, 32).t().contiguous()  # [32, B] position-major
    if qw is not None:
        qwt = qw.reshape(B, 32).t()
        w = qwt * C.sqrt32(sigma2.repeat_interleave(8).unsqueeze(0) + xt * xt)
    else:
        w = xt * xt
    waux = C.sqrt32(w)
    neg = xt < 0  # C: x >= 0 keeps the sign (so -0.0 counts as positive)
    xval = torch.where(neg, -xt, xt)
    bits = neg.to(torch.int64).view(4, 8, B)
    if qtype == "IQ3_XXS":
        # an odd number of negatives per 8: flip the sign of the element with the least weight*x*x
        ax = (w * xt * xt).view(4, 8, B)
        imin = torch.zeros((4, B), dtype=torch.int64, device=x.device)
        mn = ax[:, 0].clone()
        for i in range(1, 8):
            upd = ax[:, i] < mn
            mn = torch.where(upd, ax[:, i], mn)
            imin = torch.where(upd, torch.full_like(imin, i), imin)
        odd = (bits.sum(dim=1) % 2) == 1  # [4, B]
        flip = odd.unsqueeze(1) & (torch.arange(8, device=x.device).view(1, 8, 1) == imin.unsqueeze(1))
        xval = torch.where(flip.reshape(32, B), -xval, xval)
        bits = bits ^ flip.to(torch.int64)
    signs = (bits << torch.arange(8, device=x.device).view(1, 8, 1)).sum(dim=1)  # [4, B]
    if qtype == "IQ3_XXS":
        signs = signs & 127

    mx = xval.amax(dim=0)  # MAX over the 32 (no NaN possible: x is finite)
    zero = (mx < GROUP_MAX_EPS_IQ3_XXS) if qtype == "IQ3_XXS" else (mx == 0)
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)  # zero blocks are overwritten at the end
    wx = w * xval
    xvg = xval.view(8, 4, B).permute(1, 0, 2).reshape(4, 8 * B)  # [coordinate, group]
    wag = waux.view(8, 4, B).permute(1, 0, 2).reshape(4, 8 * B)
    everywhere = torch.ones((8, B), dtype=torch.bool, device=x.device)

    best = torch.zeros(B, dtype=F32, device=x.device)
    scale = C.div(mx_safe, float(2 * KMAXQ - 1))
    L = torch.zeros((32, B), dtype=torch.int64, device=x.device)
    on_grid = torch.full((8, B), on_grid0, dtype=torch.bool, device=x.device)
    for is_ in range(-n_is, n_is + 1):
        c = C.f32(np.float32(2 * KMAXQ - 1) + np.float32(is_) * np.float32(0.2))
        idv = C.rdiv(c, mx_safe)
        this_scale = C.rdiv(1.0, idv)
        Laux = _levels(idv, xval)
        off = _snap(tab, Laux.view(8, 4, B), everywhere, xvg, wag, this_scale)
        sumqx, sumq2 = _sums(wx, w, Laux)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_scale = C.div(sumqx, sumq2)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumqx, best)
        L = torch.where(better, Laux, L)
        on_grid = torch.where(better, ~off, on_grid)

    # re-snap the off-grid groups at the winning scale (IQ3_S re-rounds every group of such a block)
    redo = (~on_grid).any(dim=0) & (scale > 0)
    if bool(redo.any()):
        idv = C.nonzero_or(scale, C.rdiv(1.0, scale))
        Lr = _levels(idv, xval).view(8, 4, B)
        sel = redo.unsqueeze(0) & (everywhere if refine_all else ~on_grid)
        _snap(tab, Lr, sel, xvg, wag, scale)
        L = torch.where(sel.unsqueeze(1), Lr, L.view(8, 4, B)).view(32, B)
        sumqx, sumq2 = _sums(wx, w, L)
        scale = torch.where(redo & (sumq2 > 0), C.div(sumqx, sumq2), scale)

    negs = scale < 0  # "should never happen" in C, but handled there: flip the scale and the signs
    scale = torch.where(negs, -scale, scale)
    signs = torch.where(negs.unsqueeze(0), ~signs & (127 if qtype == "IQ3_XXS" else 255), signs)
    gidx = tab.kmap[_keys(L.view(8, 4, B))].clamp(min=0)  # C aborts on an off-grid point: never reached

    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return {"gidx": gidx.t().reshape(S, 8, 8), "signs": signs.t().reshape(S, 8, 4),
            "scales": scale.view(S, 8), "zero": zero.view(S, 8)}


def _super_scales(qtype: str, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """d = max_scale/31 stored as fp16(d * fudge); the 4-bit block scales nearest_int(0.5*(s/d - 1))."""
    fudge = _PARAMS[qtype][1]
    max_scale = scales.amax(dim=1).clamp(min=0.0)  # MAX(0, ...) in order; scales are >= 0 and not NaN
    d = C.div(max_scale, 31.0)
    dh = C.f16_field(d * fudge)
    idv = C.rdiv(1.0, d)
    ls = _nearest_int((idv.unsqueeze(1) * scales - 1.0) * 0.5).clamp_(0, 15).to(torch.int64)
    return max_scale, dh, ls


def _pack_iq3_xxs(r: dict[str, Tensor]) -> Tensor:
    S = r["gidx"].shape[0]
    max_scale, dh, ls = _super_scales("IQ3_XXS", r["scales"])
    gidx = torch.where(r["zero"].unsqueeze(-1), torch.zeros_like(r["gidx"]), r["gidx"])
    signs = torch.where(r["zero"].unsqueeze(-1), torch.zeros_like(r["signs"]), r["signs"])
    sas = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (ls << 28)
    body = torch.cat([gidx.reshape(S, 64).to(torch.uint8), C.pack_u32(sas).reshape(S, 32)], dim=1)
    empty = (max_scale == 0).unsqueeze(1)  # C zeroes the whole block when every scale is 0
    body = torch.where(empty, torch.zeros_like(body), body)
    dh = torch.where(empty, torch.zeros_like(dh), dh)
    return torch.cat([dh, body], dim=1)


def _pack_iq3_s(r: dict[str, Tensor]) -> Tensor:
    S = r["gidx"].shape[0]
    dev = r["gidx"].device
    max_scale, dh, ls = _super_scales("IQ3_S", r["scales"])
    empty = (max_scale == 0).unsqueeze(1)
    dh = torch.where(empty, torch.zeros_like(dh), dh)
    ls = torch.where(empty, torch.zeros_like(ls), ls)
    nz = ~r["zero"]  # [S, 8]
    gidx = torch.where(nz.unsqueeze(-1), r["gidx"], torch.zeros_like(r["gidx"]))
    qh = ((gidx >> 8) << torch.arange(8, device=dev)).sum(dim=2)  # [S, 8] at the block's own position
    # qs / signs: the j-th non-zero block of a super-block lands in slot j (zero blocks skip the pointer bump)
    slot = torch.cumsum(nz.to(torch.int64), dim=1) - 1
    slot = torch.where(nz, slot, torch.full_like(slot, 8))  # zero blocks go to a dropped 9th slot
    qs = torch.zeros((S, 9, 8), dtype=torch.int64, device=dev)
    qs.scatter_(1, slot.unsqueeze(-1).expand(S, 8, 8), gidx & 255)
    sg = torch.zeros((S, 9, 4), dtype=torch.int64, device=dev)
    sg.scatter_(1, slot.unsqueeze(-1).expand(S, 8, 4), r["signs"])
    scales = ls[:, 0::2] | (ls[:, 1::2] << 4)
    body = torch.cat([qs[:, :8].reshape(S, 64), qh, sg[:, :8].reshape(S, 32), scales], dim=1).to(torch.uint8)
    return torch.cat([dh, body], dim=1)


_PACK = {"IQ3_XXS": _pack_iq3_xxs, "IQ3_S": _pack_iq3_s}


def _kernels_for(x: Tensor) -> bool:
    """CUDA tensors go to the codebook kernels (gpu/iqkernels.py: the same bytes, far faster), unless
    QUANTMIX_IQ_KERNELS=0 or they cannot be built."""
    if x.device.type != "cuda":
        return False
    from quantmix.formats.gpu import iqkernels

    return iqkernels.use_kernels(x)


def quantize_rows(qtype: str, x: Tensor, imatrix: Tensor | None = None) -> Tensor:
    """float32 rows [rows, n] -> ``qtype`` bytes uint8 [rows, n/256*type_size], as ggml_quantize_chunk.

    ``imatrix`` [n] or None (ggml runs the same impl either way; None means weights x^2). Inputs are assumed
    checked (formats.api does). CUDA tensors run the codebook kernels (see :func:`_kernels_for`)."""
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {QK_K}")
    if _kernels_for(x):
        from quantmix.formats.gpu import iqkernels

        return iqkernels.quantize_rows(qtype, x, imatrix)
    nb = n // QK_K
    ts = TYPE_SIZE[qtype]
    xs = x.to(F32).contiguous().view(rows * nb, QK_K)
    qws = None
    if imatrix is not None:
        im = imatrix.to(device=x.device, dtype=F32).reshape(1, nb, QK_K)
        qws = im.expand(rows, nb, QK_K).reshape(rows * nb, QK_K)
    out = torch.empty((rows * nb, ts), dtype=torch.uint8, device=x.device)
    step = CHUNK_SUPERBLOCKS if x.device.type == "cpu" else CHUNK_SUPERBLOCKS_CUDA
    for s in range(0, rows * nb, step):
        e = min(s + step, rows * nb)
        out[s:e] = _PACK[qtype](_solve(qtype, xs[s:e], None if qws is None else qws[s:e]))
    return out.view(rows, nb * ts)


# ---- dequantization -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _grid_values(qtype: str, device: str) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(codebook.grid_values(qtype))).to(torch.device(device))


def _sign_factors(sbytes: Tensor) -> Tensor:
    """Sign bytes [...] -> factors +-1 float32 [..., 8] (bit j set: element j negative)."""
    bit = (sbytes.unsqueeze(-1) >> torch.arange(8, device=sbytes.device)) & 1
    return 1.0 - 2.0 * bit.to(F32)


def _deq_iq3_xxs(b: Tensor) -> Tensor:
    S = b.shape[0]
    d = C.f16_from_field(b[:, :2])  # [S]
    qs = b[:, 2:66].to(torch.int64).view(S, 8, 8)
    sas = C.unpack_u32(b[:, 66:98].reshape(S, 8, 4))  # [S, 8]
    db = d.unsqueeze(1) * (0.5 + (sas >> 28).to(F32)) * 0.5  # (d * (0.5 + s)) * 0.5
    s7 = (sas.unsqueeze(-1) >> (7 * torch.arange(4, device=b.device))) & 127  # [S, 8, 4]
    parity = s7.clone()
    for sh in (4, 2, 1):
        parity = parity ^ (parity >> sh)
    sbytes = s7 | ((parity & 1) << 7)  # ksigns_iq2xs: the 8th sign makes the count of negatives even
    grid = _grid_values("IQ3_XXS", str(b.device))[qs].reshape(S, 8, 32)
    return (db.unsqueeze(-1) * grid * _sign_factors(sbytes).reshape(S, 8, 32)).reshape(S, QK_K)


def _deq_iq3_s(b: Tensor) -> Tensor:
    S = b.shape[0]
    d = C.f16_from_field(b[:, :2])
    qs = b[:, 2:66].to(torch.int64).view(S, 8, 8)
    qh = b[:, 66:74].to(torch.int64)  # [S, 8]
    sg = b[:, 74:106].to(torch.int64).view(S, 8, 4)
    sc = b[:, 106:110].to(torch.int64)
    ls = torch.stack([sc & 15, sc >> 4], dim=2).reshape(S, 8)
    db = d.unsqueeze(1) * (1 + 2 * ls).to(F32)
    idx = qs | (((qh.unsqueeze(-1) >> torch.arange(8, device=b.device)) & 1) << 8)
    grid = _grid_values("IQ3_S", str(b.device))[idx].reshape(S, 8, 32)
    return (db.unsqueeze(-1) * grid * _sign_factors(sg).reshape(S, 8, 32)).reshape(S, QK_K)


_DEQ = {"IQ3_XXS": _deq_iq3_xxs, "IQ3_S": _deq_iq3_s}


def dequantize_rows(qtype: str, q: Tensor, n: int) -> Tensor:
    """``qtype`` bytes uint8 [rows, row_bytes] -> float32 [rows, n], as ggml's dequantize_row_iq3_*."""
    ts = TYPE_SIZE[qtype]
    nb = n // QK_K
    if n % QK_K or q.dim() != 2 or q.shape[1] != nb * ts:
        raise ValueError(f"{qtype}: expected uint8 [rows, {nb * ts}] for n={n}, got {tuple(q.shape)}")
    rows = q.shape[0]
    return _DEQ[qtype](q.reshape(rows * nb, ts)).reshape(rows, n)


for _name in TYPE_SIZE:
    register_numerics(_name, functools.partial(quantize_rows, _name), functools.partial(dequantize_rows, _name))
