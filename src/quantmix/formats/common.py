"""Bit-exact float32 building blocks shared by the GGUF quantizers (ggml-quants.c, ggml-impl.h).

The C reference quantizers run as plain IEEE float32 (x86-64 baseline, no FMA, no -ffast-math): every
product and sum rounds once, and reductions run in loop order. To reproduce their bytes these helpers
keep to ops whose torch results are correctly rounded on CPU and CUDA, and avoid the ones that are not:

* ``torch.sqrt`` on CPU float32 is NOT correctly rounded (measured: it differs from IEEE in ~17% of
  random inputs): use :func:`sqrt32` (double sqrt rounded once to float32, which is exact).
* ``scalar / tensor`` is computed by torch as ``reciprocal(tensor) * scalar`` (two roundings, measured),
  and a CPU scalar divisor may take a reciprocal path on CUDA: use :func:`div` / :func:`rdiv`, which
  divide by a tensor on the same device.
* NaNs: CUDA's canonical NaN differs from x86's default NaN; :func:`nearest_int` and
  :func:`fp32_to_fp16_bits` map NaNs to what x86 gives, so GPU bytes match ggml's (checked on an H100).
* ``torch.sum`` / ``matmul`` reduce in tree order: use :func:`seq_sum`.

Layout convention of the solvers (:func:`make_qx_quants`, :func:`make_qkx3_quants`, ...): inputs are
``[..., n]`` with the block positions last (one block per leading index); they work position-major
internally so that sequential sums read contiguous memory.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0  # 1.5 * 2^23: adding it leaves round-half-even(x) in the low mantissa bits
INT32_MIN = -(2**31)

# ---- scalar helpers -------------------------------------------------------------------------------


def f32(v: float) -> float:
    """``v`` rounded to float32 (returned as a Python float that is exactly that float32)."""
    return float(np.float32(v))


def const(v: float, like: Tensor) -> Tensor:
    """A 0-d float32 tensor on ``like``'s device (so that CUDA never takes a CPU-scalar shortcut)."""
    return torch.tensor(f32(v), dtype=torch.float32, device=like.device)


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """IEEE float32 division ``a / b`` (one rounding), whatever mix of tensors and scalars."""
    if not isinstance(a, Tensor):
        a = const(a, b)  # type: ignore[arg-type]
    if not isinstance(b, Tensor):
        b = const(b, a)
    return torch.div(a, b)


def rdiv(a: float, b: Tensor) -> Tensor:
    """``a / b`` for a scalar ``a`` and a tensor ``b``, correctly rounded (not ``b.reciprocal() * a``)."""
    return torch.div(const(a, b), b)


def sqrt32(x: Tensor) -> Tensor:
    """Correctly rounded float32 ``sqrtf`` (torch's float32 CPU sqrt is not)."""
    return torch.sqrt(x.double()).float()


def nonzero_or(v: Tensor, then: Tensor, other: float = 0.0) -> Tensor:
    """C's ``v ? then : other`` for float ``v`` (NaN counts as true, as in C)."""
    return torch.where(v != 0, then, torch.full_like(then, other))


# ---- integer rounding as ggml does it -------------------------------------------------------------


def nearest_int(x: Tensor) -> Tensor:
    """ggml's ``nearest_int``: add 12582912.f and read the mantissa bits (round half to even for
    |x| < 2^22; the same garbage as C outside that range). Returns int32."""
    x = x.float()
    v = (x + _MAGIC).view(torch.int32)
    r = (v & 0x007FFFFF) - 0x00400000
    if x.device.type != "cpu":
        # x86 NaNs (made by invalid ops from finite data) carry the quiet bit alone, so C reads 0 here;
        # CUDA's canonical NaN has every mantissa bit set. Give C's answer.
        r = torch.where(torch.isnan(x), torch.zeros_like(r), r)
    return r


def c_float_to_int(x: Tensor) -> Tensor:
    """C's ``(int)x`` as x86-64 does it (cvttss2si): truncation toward zero; NaN, inf and values out of
    int32 range give INT32_MIN. Returns int32 (take ``.to(torch.int8)`` for C's ``(int8_t)`` low byte)."""
    x = x.float()
    ok = (x > -2147483904.0) & (x < 2147483648.0)  # False for NaN
    return torch.where(ok, x, torch.full_like(x, -2147483648.0)).to(torch.int32)


def as_int8(v: Tensor) -> Tensor:
    """Low byte of an integer tensor read as a signed int8 (C's ``(int8_t)`` of an int), as int32."""
    return v.to(torch.int8).to(torch.int32)


def roundf(x: Tensor) -> Tensor:
    """C ``roundf``: round half away from zero (``torch.round`` rounds half to even)."""
    t = x.trunc()
    frac = (x - t).abs()  # exact in float32
    return torch.where(frac >= 0.5, t + torch.sign(x), t)


# ---- fp16 / bf16 ----------------------------------------------------------------------------------


def _bits_u32(x: Tensor) -> Tensor:
    return x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits_u32(b: Tensor) -> Tensor:
    b = b & 0xFFFFFFFF
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _to_int16(b: Tensor) -> Tensor:
    b = b & 0xFFFF
    return torch.where(b >= 2**15, b - 2**16, b).to(torch.int16)


def fp32_to_fp16_bits(x: Tensor) -> Tensor:
    """``ggml_compute_fp32_to_fp16``: round to nearest even, overflow to inf, NaN -> 0x7E00 (sign kept).

    Returns int16 bit patterns (``.view(torch.float16)`` gives the halves). torch's own conversion is
    IEEE round-to-nearest-even on CPU and CUDA (tested against Python's struct over random bit
    patterns); only NaNs are rewritten to ggml's quiet NaN."""
    f = x.float()
    h = f.to(torch.float16).view(torch.int16)
    nan = torch.isnan(f)
    if bool(nan.any()):
        if f.device.type == "cpu":
            neg = torch.signbit(f)
        else:
            # CUDA makes canonical positive NaNs where x86 makes its negative default NaN (0xFFC00000),
            # the NaN every quantizer NaN comes from (inf - inf, 0 * inf from overflowing sums).
            neg = torch.ones_like(nan)
        h = torch.where(nan, torch.where(neg, -0x8000, 0).to(torch.int16) | 0x7E00, h)
    return h


def fp32_to_fp16_bits_reference(x: Tensor) -> Tensor:
    """ggml's bit-twiddling fp32 -> fp16 algorithm transcribed (slow; kept to test the fast path)."""
    f = x.float()
    base = (f.abs() * 2.0**112) * 2.0**-110
    w = _bits_u32(f)
    shl1 = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = torch.clamp(shl1 & 0xFF000000, min=0x71000000)
    base = _from_bits_u32((bias >> 1) + 0x07800000) + base
    bits = _bits_u32(base)
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    h = (sign >> 16) | torch.where(shl1 > 0xFF000000, torch.full_like(nonsign, 0x7E00), nonsign)
    return _to_int16(h)


def fp16_bits_to_fp32(bits: Tensor) -> Tensor:
    """fp16 bit patterns (int16, or any integer dtype whose low 16 bits are used) -> float32 (exact)."""
    if bits.dtype != torch.int16:
        bits = _to_int16(bits.to(torch.int64))
    return bits.contiguous().view(torch.float16).float()


def fp16_round(x: Tensor) -> Tensor:
    """``x`` after ggml's fp32 -> fp16 -> fp32 round trip."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(x))


def fp32_to_bf16_bits(x: Tensor) -> Tensor:
    """``ggml_compute_fp32_to_bf16``: round to nearest even; NaN truncated and forced quiet. int16 bits.

    torch's conversion rounds the same way for non-NaN values; NaNs are rewritten as ggml does."""
    f = x.float()
    h = f.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(f)
    if bool(nan.any()):
        hi = (f.contiguous().view(torch.int32) >> 16).to(torch.int16)  # arithmetic shift: low 16 bits right
        h = torch.where(nan, hi | 64, h)
    return h


def bf16_bits_to_fp32(bits: Tensor) -> Tensor:
    """bf16 bit patterns -> float32 (exact: the bits become the high half)."""
    if bits.dtype == torch.int16:
        return bits.contiguous().view(torch.bfloat16).float()
    return _from_bits_u32((bits.to(torch.int64) & 0xFFFF) << 16)


# ---- sequential reductions ------------------------------------------------------------------------


def seq_sum(x: Tensor, dim: int = -1, init: float | None = 0.0) -> Tensor:
    """Left-to-right float32 sum along ``dim``, as C's ``s = init; for (...) s += x[i];``.

    ``init=None`` starts from the first element (C's ``s = x[0]; for (i = 1; ...)``). Starting from
    0.0 matters: ``0.0 + (-0.0)`` is ``+0.0``."""
    xt = x.float().movedim(dim, 0)
    n = xt.shape[0]
    if n == 0:
        return torch.full(xt.shape[1:], 0.0 if init is None else init, dtype=torch.float32, device=x.device)
    acc = xt[0].clone() if init is None else xt[0] + init
    for i in range(1, n):
        acc.add_(xt[i])
    return acc


def seq_sum_pm(xt: Tensor, init: float | None = 0.0) -> Tensor:
    """:func:`seq_sum` over dim 0 of a position-major tensor ``[n, ...]`` (no copy)."""
    acc = xt[0].clone() if init is None else xt[0] + init
    for i in range(1, xt.shape[0]):
        acc.add_(xt[i])  # in place: half the time of allocating a new vector per step
    return acc


# ---- layout helpers -------------------------------------------------------------------------------


def blocks(x: Tensor, block_size: int) -> Tensor:
    """View ``[rows, n]`` as ``[rows, n // block_size, block_size]``."""
    rows, n = x.shape
    if n % block_size:
        raise ValueError(f"row length {n} is not a multiple of the block size {block_size}")
    return x.reshape(rows, n // block_size, block_size)


def pack_u16(v: Tensor) -> Tensor:
    """Integers (low 16 bits) -> little-endian bytes: ``[...]`` -> uint8 ``[..., 2]``."""
    if v.dtype == torch.int16 and sys.byteorder == "little":
        return v.contiguous().view(torch.uint8).reshape(*v.shape, 2)
    v = v.to(torch.int64) & 0xFFFF
    return torch.stack([v & 0xFF, v >> 8], dim=-1).to(torch.uint8)


def pack_u32(v: Tensor) -> Tensor:
    """Integers (low 32 bits) -> little-endian bytes: ``[...]`` -> uint8 ``[..., 4]``."""
    v = v.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(v >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8)


def unpack_u16(b: Tensor) -> Tensor:
    """Little-endian bytes uint8 ``[..., 2]`` -> int32 ``[...]`` in 0..65535."""
    b = b.to(torch.int32)
    return b[..., 0] | (b[..., 1] << 8)


def bytes_to_i16(b: Tensor) -> Tensor:
    """Little-endian bytes uint8 ``[..., 2]`` -> the int16 they spell (fp16/bf16 bit patterns)."""
    if sys.byteorder == "little":
        return b.contiguous().view(torch.int16).reshape(b.shape[:-1])
    return _to_int16(unpack_u16(b).to(torch.int64))


def unpack_u32(b: Tensor) -> Tensor:
    """Little-endian bytes uint8 ``[..., 4]`` -> int64 ``[...]`` in 0..2^32-1."""
    b = b.to(torch.int64)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def pack_nibbles(lo: Tensor, hi: Tensor) -> Tensor:
    """``lo | hi << 4`` as uint8 (both 0..15), the layout of every 4-bit quant array."""
    return ((lo.to(torch.int32) & 0xF) | ((hi.to(torch.int32) & 0xF) << 4)).to(torch.uint8)


def f16_field(v: Tensor) -> Tensor:
    """float32 ``[...]`` -> the two bytes of its ggml fp16 (``GGML_FP32_TO_FP16``), uint8 ``[..., 2]``."""
    return pack_u16(fp32_to_fp16_bits(v))


def f16_from_field(b: Tensor) -> Tensor:
    """uint8 ``[..., 2]`` fp16 field -> float32 ``[...]``."""
    return fp16_bits_to_fp32(bytes_to_i16(b))


# ---- first-occurrence selections (C loops with strict comparisons) -------------------------------


def first_where(mask: Tensor, values: Tensor) -> Tensor:
    """Along the last dim: ``values`` at the first position where ``mask`` holds (mask must hold somewhere)."""
    idx = torch.argmax(mask.to(torch.uint8), dim=-1, keepdim=True)  # argmax returns the first maximum
    return values.gather(-1, idx).squeeze(-1)


def max_abs_first(x: Tensor) -> tuple[Tensor, Tensor]:
    """``amax = 0, max = 0; for i: if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }``.

    Returns (amax, max) over the last dim; ``max`` is +0.0 when the block is all zeros. (x must be
    NaN-free: torch.argmax returns the first of equal maxima, as the strict ``>`` keeps the first.)"""
    ax = x.abs()
    idx = torch.argmax(ax, dim=-1, keepdim=True)
    amax = ax.gather(-1, idx).squeeze(-1)
    mx = x.gather(-1, idx).squeeze(-1)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def min_first(x: Tensor) -> Tensor:
    """``m = x[0]; for i: if (x[i] < m) m = x[i];`` over the last dim (of equal minima, -0.0 and +0.0
    included, the first is kept, as C does)."""
    return x.gather(-1, torch.argmin(x, dim=-1, keepdim=True)).squeeze(-1)


def max_first(x: Tensor) -> Tensor:
    """``m = x[0]; for i: if (x[i] > m) m = x[i];`` over the last dim."""
    return x.gather(-1, torch.argmax(x, dim=-1, keepdim=True)).squeeze(-1)


# ---- solvers shared by several types (position-major inside, [..., n] outside) --------------------


def _pm(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """[..., n] -> contiguous [n, B] plus the leading shape."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).t().contiguous(), lead


def _unpm(t: Tensor, lead: tuple[int, ...]) -> Tensor:
    return t.t().reshape(*lead, t.shape[0])


def _qx_weight(xt: Tensor, qwt: Tensor | None, rmse_type: int) -> Tensor:
    if qwt is not None:
        return qwt
    if rmse_type == 1:
        return xt * xt
    if rmse_type == 2:
        return torch.ones_like(xt)
    if rmse_type == 3:
        return xt.abs()
    return sqrt32(xt.abs())


def make_qx_quants(x: Tensor, nmax: int, rmse_type: int, qw: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ggml ``make_qx_quants`` over many blocks at once.

    ``x``: float32 ``[..., n]``; ``qw``: weights broadcastable to ``x`` or None. Returns (scale
    ``[...]`` float32, L ``[..., n]`` int32 in 0..2*nmax-1, i.e. already offset by nmax).

    Two shortcuts, both exact: |iscale * x| <= nmax + 1 (x is bounded by the block's max), where
    nearest_int is round-half-even, i.e. torch.round; and the C code re-derives L from the winning
    iscale, so only that iscale is tracked and L is computed once at the end."""
    lead = tuple(x.shape[:-1])
    xt, _ = _pm(x)
    qwt = _pm(torch.broadcast_to(qw, x.shape).float())[0] if qw is not None else None
    amax, mx = max_abs_first(xt.t())
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)  # zero blocks: any finite max; results are replaced

    def quant(iscale: Tensor) -> Tensor:
        return torch.round(iscale * xt).clamp_(-nmax, nmax - 1)

    iscale = rdiv(-nmax, mx)
    best_iscale = iscale
    lf = quant(iscale)
    if rmse_type == 0:
        scale = rdiv(1.0, iscale)
    else:
        return_early = rmse_type < 0
        rt = -rmse_type if return_early else rmse_type
        w = _qx_weight(xt, qwt, rt)
        wx = w * xt  # (w*x[i])*l is C's order
        sumlx = seq_sum_pm(wx * lf)
        suml2 = seq_sum_pm(w * lf * lf)
        scale = nonzero_or(suml2, div(sumlx, suml2))
        if return_early:
            inv = rdiv(1.0, iscale)
            scale = torch.where(suml2 > 0, (scale + inv) * 0.5, inv)
        else:
            best = scale * sumlx
            for is_ in range(-9, 10):
                if is_ == 0:
                    continue
                c = f32(np.float32(nmax) + np.float32(0.1) * np.float32(is_))
                isc = rdiv(-c, mx)
                lf = quant(isc)
                sumlx = seq_sum_pm(wx * lf)
                suml2 = seq_sum_pm(w * lf * lf)
                better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
                new_scale = div(sumlx, suml2)
                best_iscale = torch.where(better, isc, best_iscale)
                scale = torch.where(better, new_scale, scale)
                best = torch.where(better, new_scale * sumlx, best)
            lf = quant(best_iscale)
    L = (lf + nmax).to(torch.int32).t()
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(lead), L.reshape(*lead, x.shape[-1])


def make_qkx3_quants(
    x: Tensor,
    nmax: int,
    weights: Tensor | None,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """ggml ``make_qkx3_quants`` over many blocks at once.

    ``x``: float32 ``[..., n]``; ``weights`` broadcastable to ``x`` or None (then x^2). Returns
    (scale ``[...]``, the_min ``[...]`` (= -min, as the C out-parameter), L ``[..., n]`` int32 in 0..nmax)."""
    lead = tuple(x.shape[:-1])
    n = x.shape[-1]
    xt, _ = _pm(x)
    wt = _pm(torch.broadcast_to(weights, x.shape).float())[0] if weights is not None else xt * xt
    xb = xt.t()
    mn = min_first(xb)
    mx = max_first(xb)
    sum_w = seq_sum_pm(wt, init=None)
    sum_x = wt[0] * xt[0]
    wx = wt * xt
    for i in range(1, n):
        sum_x = sum_x + wx[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    degenerate = mx <= mn
    iscale = rdiv(float(nmax), mx - mn)
    scale = rdiv(1.0, iscale)

    def quant(isc: Tensor) -> Tensor:
        return nearest_int(isc * (xt - mn)).clamp(0, nmax)

    def mad_of(sc: Tensor, m: Tensor, lf: Tensor) -> Tensor:
        diff = sc * lf + m - xt
        diff = diff.abs() if use_mad else diff * diff
        return seq_sum_pm(wt * diff)

    L = quant(iscale)
    best_mad = mad_of(scale, mn, L.float())
    # L of the winner is re-derived at the end from its iscale and the min it was computed with
    best_isc, best_off = iscale, mn
    if nstep >= 1:
        for is_ in range(nstep + 1):
            # as in C, `min` (hence the range and the offsets) is the best candidate's so far
            c = f32(np.float32(rmin) + np.float32(rdelta) * np.float32(is_) + np.float32(nmax))
            isc = rdiv(c, mx - mn)
            laux = quant(isc)
            lf = laux.float()
            wl = wt * lf
            sum_l = seq_sum_pm(wl)
            sum_l2 = seq_sum_pm(wl * lf)
            sum_xl = seq_sum_pm(wl * xt)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
            this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
            pos = this_min > 0
            this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
            this_scale = torch.where(pos, div(sum_xl, sum_l2), this_scale)
            mad = mad_of(this_scale, this_min, lf)
            better = (D > 0) & (mad < best_mad) & ~degenerate
            best_isc = torch.where(better, isc, best_isc)
            best_off = torch.where(better, mn, best_off)
            best_mad = torch.where(better, mad, best_mad)
            scale = torch.where(better, this_scale, scale)
            mn = torch.where(better, this_min, mn)
        L = nearest_int(best_isc * (xt - best_off)).clamp(0, nmax)
    L = torch.where(degenerate, torch.zeros_like(L), L)
    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    return scale.reshape(lead), (-mn).reshape(lead), _unpm(L, lead).to(torch.int32)


class Int8Grid:
    """Nearest-entry lookup on a sorted integer table (kvalues_iq4nl, ...), as ggml's ``best_index_int8``.

    C decides between neighbours lo < x < hi by ``x - lo < hi - x`` in float32 (ties to hi). Near the
    midpoint both differences are exact (|x| < 256, integer table), so the test is exactly
    ``x >= (lo + hi) / 2``, and away from it rounding cannot flip it. With j = lo + hi an integer,
    ``x >= j / 2`` iff ``floor(2x) >= j``: the answer is a table lookup on ``floor(2x)`` (2x is exact).
    x <= values[0] gives 0, x >= values[-1] the last index, NaN the last index (as the C code)."""

    def __init__(self, values: tuple[int, ...] | list[int]):
        v = [int(a) for a in values]
        if any(b <= a for a, b in zip(v, v[1:])) or min(v) < -128 or max(v) > 127:
            raise ValueError("Int8Grid needs a strictly increasing table of int8 values")
        self.values = tuple(v)
        mids2 = [a + b for a, b in zip(v, v[1:])]  # 2 * midpoints, integers
        self._lo = mids2[0] - 1
        self._hi = mids2[-1]
        keys = range(self._lo, self._hi + 1)
        self._count = [sum(1 for m in mids2 if m <= k) for k in keys]
        self._luts: dict[str, tuple[Tensor, Tensor]] = {}

    def _lut(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._luts:
            idx = torch.tensor(self._count, dtype=torch.int64, device=device)
            val = torch.tensor(self.values, dtype=torch.float32, device=device)
            self._luts[key] = (idx, val[idx])
        return self._luts[key]

    def _key(self, x: Tensor) -> Tensor:
        k = torch.floor(x * 2.0).clamp_(self._lo, self._hi)
        k = torch.nan_to_num_(k, nan=float(self._hi)) - self._lo
        return k.to(torch.int64).reshape(-1)

    def index(self, x: Tensor) -> Tensor:
        """Indices (int64, shape of x) of the nearest entries."""
        lut, _ = self._lut(x.device)
        return lut.index_select(0, self._key(x)).reshape(x.shape)

    def value(self, x: Tensor) -> Tensor:
        """The nearest entries themselves (float32, shape of x)."""
        _, lut = self._lut(x.device)
        return lut.index_select(0, self._key(x)).reshape(x.shape)


def best_index_int8(values: Tensor | tuple[int, ...], x: Tensor) -> Tensor:
    """ggml ``best_index_int8`` (see :class:`Int8Grid`): index of the nearest table entry, int64."""
    vals = tuple(int(v) for v in (values.tolist() if isinstance(values, Tensor) else values))
    return Int8Grid(vals).index(x)


def seq_sum_rows(x: Tensor) -> Tensor:
    """Sequential float32 sum of each row of a 2-D tensor (``s = 0; for j: s += x[j]``), for long rows.

    On the CPU through numpy's add.accumulate, which runs strictly left to right in float32
    (torch.cumsum accumulates in double). On a GPU a loop over the columns costs one kernel launch per
    column, so few long rows go through the CPU instead; many rows stay on the device."""
    rows, n = x.shape
    if x.device.type != "cpu" and rows >= 4096:
        return seq_sum_pm(x.float().t().contiguous()) if n else torch.zeros(rows, device=x.device)
    a = x.detach().float().contiguous().cpu().numpy()
    if n == 0:
        return torch.zeros(rows, dtype=torch.float32, device=x.device)
    acc = np.add.accumulate(a, axis=1, dtype=np.float32)[:, -1]
    return torch.from_numpy(acc.copy()).to(x.device) + 0.0  # + 0.0: C starts from 0.0f (-0.0 -> +0.0)
