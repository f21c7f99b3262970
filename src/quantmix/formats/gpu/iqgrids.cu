// quantmix codebook-quant kernels (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), byte-exact
// with ggml-quants.c's quantize_row_iq*_impl.
//
// One source, two compilers (as kquants.cu): NVRTC with --fmad=false and IEEE division / sqrt for the
// GPU, g++ -ffp-contract=off for the host, so CI checks this very arithmetic against ggml without a GPU
// (tests/test_formats_gpu.py, quantmix.formats.gpu.iqkernels). Every float operation is the C one in
// C's order: products associate left to right as written in C ((w*x)*q), sums accumulate sequentially,
// comparisons are C's (NaN compares false), nearest_int and the fp16 rounding are ggml's bit tricks.
//
// Work split: one thread per super-block of 256 weights runs the whole quantizer of its type (the
// candidate-scale search of every sub-block, the neighbour searches, the super-block scale and the bit
// packing) and writes the block bytes. IQ1_S / IQ1_M hand their neighbour searches to the whole warp
// (iq_search: C's first-minimum result, found cooperatively); the others search privately, which measured
// faster for their many short lists (BENCHMARKS.md). The codebook tables are read from global memory (cached):
//   map  int32 [keys]: >= 0 the grid index of an on-grid key, else -(1 + offset) into nbr, where
//        nbr[offset] = number of neighbours, followed by their keys (not indices: one load fewer per
//        neighbour; the winner's index is map[key]) in ggml's order;
//   grid u16 [G]: the key of each grid point (level l_i at bits*i: 2 bits for the 8-d grids, 3 for 4-d).

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IQ_CUDA 1
#endif

#ifdef IQ_CUDA
#define IQ_DEV __device__ __forceinline__
#define IQ_UNROLL _Pragma("unroll")
#define IQ_UNROLL_J _Pragma("unroll 4")  // the neighbour loops: independent d2 chains to overlap
#define IQ_KERNEL extern "C" __global__ void
#define IQ_LD(p) __ldg(p)
#else
#include <math.h>
#include <string.h>
#define IQ_DEV static inline
#define IQ_UNROLL
#define IQ_UNROLL_J
#define IQ_KERNEL extern "C" void
#define IQ_LD(p) (*(p))
#endif

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define QK_K 256
#define IQ_FLT_MAX 3.402823466e+38F

IQ_DEV u32 iq_f2u(float f) {
#ifdef IQ_CUDA
    return __float_as_uint(f);
#else
    u32 u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

IQ_DEV float iq_u2f(u32 u) {
#ifdef IQ_CUDA
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// ggml's nearest_int (add 1.5*2^23, read the mantissa); x86's default NaN reads as 0.
IQ_DEV int iq_nint(float f) {
    if (f != f) return 0;
    float v = f + 12582912.f;
    return (int)(iq_f2u(v) & 0x007fffffu) - 0x00400000;
}

IQ_DEV float iq_max(float a, float b) { return a > b ? a : b; }  // C's MAX
IQ_DEV int iq_clampi(int l, int lo, int hi) { return l < lo ? lo : (l > hi ? hi : l); }  // MAX(lo, MIN(hi, l))

// ggml_compute_fp32_to_fp16: round to nearest even; NaN -> x86's default NaN bits 0xFE00.
IQ_DEV u16 iq_fp16(float f) {
    if (f != f) return 0xFE00;
    float base = (fabsf(f) * iq_u2f(0x77800000u)) * iq_u2f(0x08800000u);
    u32 w = iq_f2u(f);
    u32 shl1 = w + w;
    u32 sign = w & 0x80000000u;
    u32 bias = shl1 & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = iq_u2f((bias >> 1) + 0x07800000u) + base;
    u32 bits = iq_f2u(base);
    u32 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (u16)((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
}

IQ_DEV void iq_wr16(u8* p, u32 v) {
    p[0] = (u8)(v & 0xFF);
    p[1] = (u8)((v >> 8) & 0xFF);
}
IQ_DEV void iq_wr32(u8* p, u32 v) {
    p[0] = (u8)(v & 0xFF);
    p[1] = (u8)((v >> 8) & 0xFF);
    p[2] = (u8)((v >> 16) & 0xFF);
    p[3] = (u8)(v >> 24);
}

struct IqTabs {
    const int* map;
    const u16* nbr;
    const u16* grid;
};

// sum of squares of the super-block, in order
IQ_DEV float iq_sumx2(const float* xbl) {
    float s = 0;
    for (int i = 0; i < QK_K; ++i) s += xbl[i] * xbl[i];
    return s;
}

// ------------------------------------------------------------------------------------------------
// neighbour searches
// ------------------------------------------------------------------------------------------------

// (float)v for 0 <= v < 2^23, exact, without the quarter-rate int->float conversion
IQ_DEV float iq_q(int v) { return iq_u2f(0x4B000000u | (u32)v) - 8388608.f; }

// The terms (w_i*diff)*diff of a neighbour's distance depend only on the position i and its level, so
// for the 8-d grids they are computed once per search for every (i, level) (T[3*i + level]) and summed
// per neighbour in C's order: the same float operations on the same values as C's loop, so the same d2
// bit for bit.
IQ_DEV void iq8_terms(float* T, const float* x, const float* w, float scale, float g0, float g1, float g2) {
    IQ_UNROLL
    for (int i = 0; i < 8; ++i) {
        float d0 = scale * g0 - x[i], d1 = scale * g1 - x[i], d2 = scale * g2 - x[i];
        T[3 * i + 0] = w[i] * d0 * d0;
        T[3 * i + 1] = w[i] * d1 * d1;
        T[3 * i + 2] = w[i] * d2 * d2;
    }
}

IQ_DEV float iq8_d2(const float* T, u32 key) {
    float d2 = 0;
    IQ_UNROLL
    for (int i = 0; i < 8; ++i) d2 += T[3 * i + ((key >> (2 * i)) & 3)];
    return d2;
}

// d2 as an unsigned key whose order is C's `d2 < best` order for the values that can win (d2 < FLT_MAX;
// +0 and -0 equal); NaN and d2 >= FLT_MAX, which never win, map to the largest key.
IQ_DEV u32 iq_okey(float d2) {
    if (!(d2 < IQ_FLT_MAX)) return 0xFFFFFFFFu;
    if (d2 == 0) return 0x80000000u;
    const u32 b = iq_f2u(d2);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Per-warp scratch of the cooperative search: the owner lanes' parameters and lists, running bests.
#define IQ_NP 25
struct IqWarp {
    float P[32][IQ_NP];
    int start[32];
    int off[32];
    unsigned long long best[32];
};

#ifdef IQ_CUDA
// The neighbour searches of all lanes of a warp that need one, evaluated together: the lists are laid end
// to end and each lane evaluates every 32nd neighbour (the lanes of one list reduce with redux); the
// result per list is C's: the first neighbour (in ggml's order) of least d2 among those with d2 < FLT_MAX,
// else the first. Any set of converged lanes may call it (the mask is taken at entry and every later step
// is uniform over it); the scratch is indexed by lane, so two disjoint groups of one warp cannot collide.
// Returns the index j (0-based) of the winner in the calling lane's list (0 where need is false).
template <class D2>
IQ_DEV int iq_search(IqWarp& W, bool need, int off, const u16* nbr, D2 d2of) {
    const unsigned mask = __activemask();
    const unsigned needm = __ballot_sync(mask, need);
    if (!needm) return 0;
    const int lane = threadIdx.x & 31;
    const int cnt = need ? (int)IQ_LD(nbr + off) : 0;
    int incl = cnt;
    if (mask == 0xFFFFFFFFu) {
        IQ_UNROLL
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(0xFFFFFFFFu, incl, d);
            if (lane >= d) incl += v;
        }
    } else {
        W.start[lane] = cnt;
        __syncwarp(mask);
        incl = 0;
        for (int l = 0; l <= lane; ++l)
            if ((mask >> l) & 1) incl += W.start[l];
        __syncwarp(mask);
    }
    const int total = __shfl_sync(mask, incl, 31 - __clz(mask));
    if (need) {
        W.start[lane] = incl - cnt;
        W.off[lane] = off;
        W.best[lane] = ~0ull;
    }
    __syncwarp(mask);
    const int me = __popc(mask & ((1u << lane) - 1)), width = __popc(mask);
    int r = __ffs(needm) - 1;  // owner lane of this lane's current neighbour (items only move forward)
    for (int base = 0; base < total; base += width) {
        const int f = base + me;
        const bool act = f < total;
        u32 key = 0xFFFFFFFFu, j = 0;
        if (act) {
            for (;;) {
                const unsigned nx = r == 31 ? 0u : (needm & ~((2u << r) - 1u));
                if (!nx) break;
                const int rn = __ffs(nx) - 1;
                if (f < W.start[rn]) break;
                r = rn;
            }
            j = (u32)(f - W.start[r]);
            key = iq_okey(d2of(W.P[r], (u32)IQ_LD(nbr + W.off[r] + 1 + j)));
        }
        const unsigned grp = __match_any_sync(mask, act ? r : 32);
        const u32 kmin = __reduce_min_sync(grp, key);
        const u32 jmin = __reduce_min_sync(grp, key == kmin ? j : 0xFFFFFFFFu);
        if (act && lane == __ffs(grp) - 1) {
            const unsigned long long c = ((unsigned long long)kmin << 32) | jmin;
            if (c < W.best[r]) W.best[r] = c;
        }
        __syncwarp(mask);
    }
    const int jw = need ? (int)(u32)(W.best[lane] & 0xFFFFFFFFu) : 0;
    __syncwarp(mask);
    return jw;
}
#define IQ_WS_DECL IqWarp& W,
#define IQ_WS W,
#else
// host: one super-block at a time, C's loop
template <class D2>
IQ_DEV int iq_search(IqWarp& W, bool need, int off, const u16* nbr, D2 d2of) {
    if (!need) return 0;
    const int n = nbr[off];
    float best = IQ_FLT_MAX;
    int bj = -1;
    for (int j = 0; j < n; ++j) {
        const float d2 = d2of(W.P[0], (u32)nbr[off + 1 + j]);
        if (d2 < best) {
            best = d2;
            bj = j;
        }
    }
    return bj < 0 ? 0 : bj;
}
#define IQ_WS_DECL IqWarp& W,
#define IQ_WS W,
#endif

IQ_DEV float* iq_myP(IqWarp& W) {
#ifdef IQ_CUDA
    return W.P[threadIdx.x & 31];
#else
    return W.P[0];
#endif
}

// neighbour searches (iq2_find_best_neighbour, iq3_find_best_neighbour, iq1_find_best_neighbour2) for
// the groups with need set (key u off the grid). Where C aborts (no neighbour with d2 < FLT_MAX: only for
// weights that overflow) the first is taken. Every lane of the warp may call them, need or not.

// 8-d grid, q = 2l+1 (levels 0..2): the winner's levels into L[0..7]. One lane, its own list (the
// warp-cooperative search was measured slower for these callers: many calls with short lists).
IQ_DEV void iq2_best(IQ_WS_DECL const IqTabs& t, bool need, u32 u, const float* xval, const float* w, float scale, i8* L) {
    (void)W;
    if (!need) return;
    const int off = -IQ_LD(t.map + u) - 1;
    const int n = IQ_LD(t.nbr + off);
    float t0[8], t1[8], t2[8];
    IQ_UNROLL
    for (int i = 0; i < 8; ++i) {
        float d0 = scale * 1.f - xval[i], d1 = scale * 3.f - xval[i], d2 = scale * 5.f - xval[i];
        t0[i] = w[i] * d0 * d0;
        t1[i] = w[i] * d1 * d1;
        t2[i] = w[i] * d2 * d2;
    }
    float best = IQ_FLT_MAX;
    u32 bk = 0xFFFFFFFFu;
    IQ_UNROLL_J
    for (int j = 1; j <= n; ++j) {
        const u32 key = IQ_LD(t.nbr + off + j);
        float d2 = 0;
        IQ_UNROLL
        for (int i = 0; i < 8; ++i) {
            // bit 0 of the level picks t1, bit 1 t2 (as C: level 2 -> t2): two bit-test selects; the
            // compare-based form of the level kept the ALU pipe busy and measured ~1.4x slower
            const float a = (key & (1u << (2 * i))) ? t1[i] : t0[i];
            d2 += (key & (2u << (2 * i))) ? t2[i] : a;
        }
        if (d2 < best) {
            best = d2;
            bk = key;
        }
    }
    if (bk == 0xFFFFFFFFu) bk = IQ_LD(t.nbr + off + 1);
    IQ_UNROLL
    for (int i = 0; i < 8; ++i) L[i] = (i8)((bk >> (2 * i)) & 3);
}

// 4-d grid of 3-bit levels, q = 2l+1.
IQ_DEV void iq3_best(IQ_WS_DECL const IqTabs& t, bool need, u32 u, const float* xval, const float* w, float scale, i8* L) {
    (void)W;
    if (!need) return;
    const int off = -IQ_LD(t.map + u) - 1;
    const int n = IQ_LD(t.nbr + off);
    float best = IQ_FLT_MAX;
    u32 bk = 0xFFFFFFFFu;
    IQ_UNROLL_J
    for (int j = 1; j <= n; ++j) {
        const u32 key = IQ_LD(t.nbr + off + j);
        float d2 = 0;
        IQ_UNROLL
        for (int i = 0; i < 4; ++i) {
            float q = iq_q(2 * (int)((key >> (3 * i)) & 7) + 1);
            float diff = scale * q - xval[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best) {
            best = d2;
            bk = key;
        }
    }
    if (bk == 0xFFFFFFFFu) bk = IQ_LD(t.nbr + off + 1);
    IQ_UNROLL
    for (int i = 0; i < 4; ++i) L[i] = (i8)((bk >> (3 * i)) & 7);
}

// IQ1: q = xg[level] (the shifted ternary values); x are the signed weights. Returns the winner's key.
IQ_DEV u32 iq1_best(IQ_WS_DECL const IqTabs& t, bool need, u32 u, const float* x, const float* w, float scale, const float* xg) {
    const int off = need ? -IQ_LD(t.map + u) - 1 : 0;
    if (need) iq8_terms(iq_myP(W), x, w, scale, xg[0], xg[1], xg[2]);
    const int j = iq_search(W, need, off, t.nbr, [](const float* P, u32 k) { return iq8_d2(P, k); });
    return need ? (u32)IQ_LD(t.nbr + off + 1 + j) : 0u;
}

// ------------------------------------------------------------------------------------------------
// signs: |x| per position and the sign byte of each group of 8 (IQ2_XXS / IQ2_XS / IQ3_XXS keep an
// even number of negatives: the least important element of an odd group is flipped, xval negative)
// ------------------------------------------------------------------------------------------------
template <int NG, bool PARITY>
IQ_DEV void iq_signs(const float* xb, const float* weight, float* xval, u8* signs) {
    for (int k = 0; k < NG; ++k) {
        int nflip = 0;
        u32 s = 0;
        for (int i = 0; i < 8; ++i) {
            if (xb[8 * k + i] >= 0) {
                xval[8 * k + i] = xb[8 * k + i];
            } else {
                xval[8 * k + i] = -xb[8 * k + i];
                ++nflip;
                s |= (1u << i);
            }
        }
        if (PARITY) {
            if (nflip % 2) {
                int imin = 0;
                float mn = weight[8 * k] * xb[8 * k] * xb[8 * k];
                for (int i = 1; i < 8; ++i) {
                    float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                    if (ax < mn) {
                        mn = ax;
                        imin = i;
                    }
                }
                xval[8 * k + imin] = -xval[8 * k + imin];
                s ^= (1u << imin);
            }
            signs[k] = (u8)(s & 127);
        } else {
            signs[k] = (u8)s;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// make_qp_quants(32, 4, xval, L, weight) as IQ2_XXS calls it (L is uint8 in C: negative levels wrap)
// ------------------------------------------------------------------------------------------------
IQ_DEV float iq_make_qp(const float* x, const float* w) {
    const int n = 32, nmax = 4;
    float max = 0;
    for (int i = 0; i < n; ++i) max = iq_max(max, x[i]);
    if (max < 1e-15f) return 0.f;
    u8 L[32];
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (u8)iq_nint(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        best_mse += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = iq_nint(iscale_is * x[i]);
            l = l < nmax ? l : nmax;
            float diff = x[i] - scale_is * l;
            mse += w[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = iq_nint(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (u8)l;
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float slx = sumlx - w[i] * x[i] * L[i];
            float sl2 = suml2 - w[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = iq_nint(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != L[i]) {
                    slx += w[i] * x[i] * new_l;
                    sl2 += w[i] * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (u8)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ------------------------------------------------------------------------------------------------
// IQ2_XXS (32-weight sub-blocks), IQ2_XS / IQ2_S (16-weight sub-blocks)
// ------------------------------------------------------------------------------------------------
template <int BS>
IQ_DEV void iq2_sums(const float* weight, const float* xval, const i8* L, float* sumqx, float* sumq2) {
    float a = 0, b = 0;
    for (int i = 0; i < BS; ++i) {
        float w = weight[i];
        float q = iq_q(2 * L[i] + 1);
        a += w * xval[i] * q;
        b += w * q * q;
    }
    *sumqx = a;
    *sumq2 = b;
}

IQ_DEV u32 iq2_key(const i8* L) {
    u32 u = 0;
    for (int i = 0; i < 8; ++i) u |= ((u32)L[i] << (2 * i));
    return u;
}

IQ_DEV void iq2_xxs_sb(IqWarp& W, const IqTabs& t, const float* xbl, const float* qwbl, u8* y) {
    const int kMaxQ = 3;
    float scales[8];
    u32 q2[16];
    for (int i = 0; i < 16; ++i) q2[i] = 0;
    float max_scale = 0;
    float sigma2 = iq_sumx2(xbl) / QK_K;
    for (int ib = 0; ib < 8; ++ib) {
        const float* xb = xbl + 32 * ib;
        const float* qw = qwbl + 32 * ib;
        float weight[32], waux[32], xval[32];
        i8 L[32], Laux[32];
        u8 block_signs[4];
        for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        for (int i = 0; i < 32; ++i) waux[i] = sqrtf(weight[i]);
        iq_signs<4, true>(xb, weight, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 32; ++i) max = iq_max(max, xval[i]);
        if (max < 1e-15f) {
            scales[ib] = 0;
            continue;
        }
        float scale = iq_make_qp(xval, weight);
        float eff_max = scale * kMaxQ;
        if (eff_max <= 0) {
            scales[ib] = 0;
            continue;
        }
        float best = 0;
        for (int i = 0; i < 32; ++i) L[i] = 0;  // C: make_qp's levels; every path below overwrites them
        bool have = false;
        for (int is = -6; is <= 6; ++is) {
            float id = (2 * kMaxQ - 1 + is * 0.1f) / eff_max;
            float this_scale = 1 / id;
            for (int k = 0; k < 4; ++k) {
                for (int i = 0; i < 8; ++i) {
                    int l = iq_nint(0.5f * (id * xval[8 * k + i] - 1));
                    Laux[8 * k + i] = (i8)iq_clampi(l, 0, kMaxQ - 1);
                }
                u32 u = iq2_key(Laux + 8 * k);
                iq2_best(W, t, IQ_LD(t.map + u) < 0, u, xval + 8 * k, waux + 8 * k, this_scale, Laux + 8 * k);
            }
            float sumqx, sumq2;
            iq2_sums<32>(weight, xval, Laux, &sumqx, &sumq2);
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                for (int i = 0; i < 32; ++i) L[i] = Laux[i];
                have = true;
            }
        }
        (void)have;
        const bool fin = scale > 0;  // every lane runs the block (see iq2_16_sb)
        {
            float id = 1 / scale;
            for (int k = 0; k < 4; ++k) {
                u32 u = 0;
                for (int i = 0; i < 8; ++i) {
                    int l = iq_nint(0.5f * (id * xval[8 * k + i] - 1));
                    l = iq_clampi(l, 0, kMaxQ - 1);
                    u |= ((u32)l << (2 * i));
                    if (fin) L[8 * k + i] = (i8)l;
                }
                iq2_best(W, t, fin && IQ_LD(t.map + u) < 0, u, xval + 8 * k, waux + 8 * k, scale, L + 8 * k);
            }
            if (fin) {
                float sumqx, sumq2;
                iq2_sums<32>(weight, xval, L, &sumqx, &sumq2);
                if (sumq2 > 0) scale = sumqx / sumq2;
            }
        }
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; ++k) block_signs[k] = (u8)((~block_signs[k]) & 127);
        }
        for (int k = 0; k < 4; ++k) {
            int gi = IQ_LD(t.map + iq2_key(L + 8 * k));
            if (gi < 0) gi = 0;  // C aborts: unreachable
            q2[2 * ib + 0] |= ((u32)gi << (8 * k));
            q2[2 * ib + 1] |= ((u32)block_signs[k] << (7 * k));
        }
        scales[ib] = scale;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) {
        for (int i = 0; i < 66; ++i) y[i] = 0;
        return;
    }
    float d = max_scale / 31;
    iq_wr16(y, iq_fp16(d));
    float id = 1 / d;
    for (int ib = 0; ib < 8; ++ib) {
        int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
        q2[2 * ib + 1] |= ((u32)l << 28);
    }
    for (int i = 0; i < 16; ++i) iq_wr32(y + 2 + 4 * i, q2[i]);
}

template <bool IS_S>
IQ_DEV void iq2_16_sb(IqWarp& W, const IqTabs& t, const float* xbl, const float* qwbl, int has_qw, u8* y) {
    const int kMaxQ = 3;
    const int TS = IS_S ? 82 : 74;
    float scales[16];
    for (int i = 0; i < TS; ++i) y[i] = 0;
    float max_scale = 0;
    float sumx2 = iq_sumx2(xbl);
    float sigma2 = IS_S ? 2 * sumx2 / QK_K : sumx2 / QK_K;
    for (int ib = 0; ib < 16; ++ib) {
        const float* xb = xbl + 16 * ib;
        float weight[16], waux[16], xval[16];
        i8 L[16], Laux[16];
        bool on_grid[2], on_aux[2];
        u8 block_signs[2];
        if (has_qw) {
            const float* qw = qwbl + 16 * ib;
            for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        } else {
            for (int i = 0; i < 16; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
        }
        for (int i = 0; i < 16; ++i) waux[i] = sqrtf(weight[i]);
        iq_signs<2, !IS_S>(xb, weight, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 16; ++i) max = iq_max(max, xval[i]);
        for (int i = 0; i < 16; ++i) L[i] = 0;
        if (max < (IS_S ? 1e-8f : 1e-15f)) {
            scales[ib] = 0;
            continue;
        }
        float best = 0;
        float scale = max / (2 * kMaxQ - 1);
        on_grid[0] = on_grid[1] = true;
        for (int is = -9; is <= 9; ++is) {
            float id = (2 * kMaxQ - 1 + is * 0.1f) / max;
            float this_scale = 1 / id;
            for (int k = 0; k < 2; ++k) {
                for (int i = 0; i < 8; ++i) {
                    int l = iq_nint(0.5f * (id * xval[8 * k + i] - 1));
                    Laux[8 * k + i] = (i8)iq_clampi(l, 0, kMaxQ - 1);
                }
                u32 u = iq2_key(Laux + 8 * k);
                on_aux[k] = IQ_LD(t.map + u) >= 0;
                iq2_best(W, t, !on_aux[k], u, xval + 8 * k, waux + 8 * k, this_scale, Laux + 8 * k);
            }
            float sumqx, sumq2;
            iq2_sums<16>(weight, xval, Laux, &sumqx, &sumq2);
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                for (int i = 0; i < 16; ++i) L[i] = Laux[i];
                on_grid[0] = on_aux[0];
                on_grid[1] = on_aux[1];
            }
        }
        // (run by every lane, so that the warp's searches stay together; fin says whether C runs it)
        const bool fin = (!on_grid[0] || !on_grid[1]) && scale > 0;
        {
            float id = 1 / scale;
            for (int k = 0; k < 2; ++k) {
                const bool doit = fin && !on_grid[k];
                u32 u = 0;
                for (int i = 0; i < 8; ++i) {
                    int l = iq_clampi(iq_nint(0.5f * (id * xval[8 * k + i] - 1)), 0, kMaxQ - 1);
                    u |= ((u32)l << (2 * i));
                    if (doit) L[8 * k + i] = (i8)l;
                }
                iq2_best(W, t, doit && IQ_LD(t.map + u) < 0, u, xval + 8 * k, waux + 8 * k, scale, L + 8 * k);
            }
            if (fin) {
                float sumqx, sumq2;
                iq2_sums<16>(weight, xval, L, &sumqx, &sumq2);
                if (sumq2 > 0) scale = sumqx / sumq2;
            }
        }
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 2; ++k) block_signs[k] = IS_S ? (u8)(~block_signs[k]) : (u8)((~block_signs[k]) & 127);
        }
        for (int k = 0; k < 2; ++k) {
            int gi = IQ_LD(t.map + iq2_key(L + 8 * k));
            if (gi < 0) gi = 0;  // C aborts: unreachable
            const int g8 = 2 * ib + k;
            if (IS_S) {
                y[2 + g8] = (u8)(gi & 255);
                y[2 + 64 + g8 / 4] |= (u8)((gi >> 8) << (2 * (g8 % 4)));
                y[2 + 32 + g8] = block_signs[k];
            } else {
                iq_wr16(y + 2 + 2 * g8, (u32)gi | ((u32)block_signs[k] << 9));
            }
        }
        scales[ib] = scale;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) {
        if (!IS_S) for (int i = 0; i < TS; ++i) y[i] = 0;  // XS zeroes qs; S keeps what it wrote
        return;
    }
    float d = max_scale / 31;
    iq_wr16(y, iq_fp16(IS_S ? d * 0.9875f : d));
    float id = 1 / d;
    u8* sc = y + (IS_S ? 74 : 66);
    for (int ib = 0; ib < 16; ++ib) {
        int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
        if (ib % 2 == 0) sc[ib / 2] = (u8)l;
        else sc[ib / 2] |= (u8)(l << 4);
    }
}

// ------------------------------------------------------------------------------------------------
// IQ3_XXS (256-point grid) and IQ3_S (512 points), 32-weight sub-blocks, groups of 4
// ------------------------------------------------------------------------------------------------
IQ_DEV u32 iq3_key(const i8* L) {
    return (u32)L[0] | ((u32)L[1] << 3) | ((u32)L[2] << 6) | ((u32)L[3] << 9);
}

template <bool IS_S>
IQ_DEV void iq3_sb(IqWarp& W, const IqTabs& t, const float* xbl, const float* qwbl, int has_qw, u8* y) {
    const int kMaxQ = 8;
    const int TS = IS_S ? 110 : 98;
    float scales[8];
    for (int i = 0; i < TS; ++i) y[i] = 0;
    float max_scale = 0;
    float sigma2 = 2 * iq_sumx2(xbl) / QK_K;
    int slot = 0;  // IQ3_S: qs / signs advance only past blocks that are not all zero
    for (int ib = 0; ib < 8; ++ib) {
        const float* xb = xbl + 32 * ib;
        float weight[32], waux[32], xval[32];
        i8 L[32], Laux[32];
        bool on_grid[8], on_aux[8];
        u8 block_signs[4];
        if (has_qw) {
            const float* qw = qwbl + 32 * ib;
            for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        } else {
            for (int i = 0; i < 32; ++i) weight[i] = xb[i] * xb[i];
        }
        for (int i = 0; i < 32; ++i) waux[i] = sqrtf(weight[i]);
        iq_signs<4, !IS_S>(xb, weight, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 32; ++i) max = iq_max(max, xval[i]);
        for (int i = 0; i < 32; ++i) L[i] = 0;
        if (IS_S ? !max : (max < 1e-8f)) {
            scales[ib] = 0;
            continue;
        }
        float best = 0;
        float scale = max / (2 * kMaxQ - 1);
        for (int k = 0; k < 8; ++k) on_grid[k] = !IS_S;
        const int nis = IS_S ? 9 : 15;
        for (int is = -nis; is <= nis; ++is) {
            float id = (2 * kMaxQ - 1 + is * 0.2f) / max;
            float this_scale = 1 / id;
            for (int k = 0; k < 8; ++k) {
                for (int i = 0; i < 4; ++i) {
                    int l = iq_nint(0.5f * (id * xval[4 * k + i] - 1));
                    Laux[4 * k + i] = (i8)iq_clampi(l, 0, kMaxQ - 1);
                }
                u32 u = iq3_key(Laux + 4 * k);
                on_aux[k] = IQ_LD(t.map + u) >= 0;
                iq3_best(W, t, !on_aux[k], u, xval + 4 * k, waux + 4 * k, this_scale, Laux + 4 * k);
            }
            float sumqx, sumq2;
            iq2_sums<32>(weight, xval, Laux, &sumqx, &sumq2);
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                for (int i = 0; i < 32; ++i) L[i] = Laux[i];
                for (int k = 0; k < 8; ++k) on_grid[k] = on_aux[k];
            }
        }
        int n_not = 0;
        for (int k = 0; k < 8; ++k) if (!on_grid[k]) ++n_not;
        const bool fin = n_not > 0 && scale > 0;  // every lane runs the block (see iq2_16_sb)
        {
            float id = 1 / scale;
            for (int k = 0; k < 8; ++k) {
                const bool doit = fin && (IS_S || !on_grid[k]);
                i8 Lk[4];
                for (int i = 0; i < 4; ++i) Lk[i] = (i8)iq_clampi(iq_nint(0.5f * (id * xval[4 * k + i] - 1)), 0, kMaxQ - 1);
                u32 u = iq3_key(Lk);
                iq3_best(W, t, doit && IQ_LD(t.map + u) < 0, u, xval + 4 * k, waux + 4 * k, scale, Lk);
                if (doit)
                    for (int i = 0; i < 4; ++i) L[4 * k + i] = Lk[i];
            }
            if (fin) {
                float sumqx, sumq2;
                iq2_sums<32>(weight, xval, L, &sumqx, &sumq2);
                if (sumq2 > 0) scale = sumqx / sumq2;
            }
        }
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < 4; ++k) block_signs[k] = IS_S ? (u8)(~block_signs[k]) : (u8)((~block_signs[k]) & 127);
        }
        if (IS_S) {
            for (int k = 0; k < 8; ++k) {
                int gi = IQ_LD(t.map + iq3_key(L + 4 * k));
                if (gi < 0) gi = 0;  // C aborts: unreachable
                y[2 + 8 * slot + k] = (u8)(gi & 255);
                y[66 + ib] |= (u8)((gi >> 8) << k);
            }
            for (int k = 0; k < 4; ++k) y[74 + 4 * slot + k] = block_signs[k];
            ++slot;
        } else {
            for (int k = 0; k < 8; ++k) {
                int gi = IQ_LD(t.map + iq3_key(L + 4 * k));
                if (gi < 0) gi = 0;
                y[2 + 8 * ib + k] = (u8)gi;
            }
            u32 sas = (u32)block_signs[0] | ((u32)block_signs[1] << 7) | ((u32)block_signs[2] << 14) | ((u32)block_signs[3] << 21);
            iq_wr32(y + 66 + 4 * ib, sas);
        }
        scales[ib] = scale;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) {
        if (!IS_S) for (int i = 0; i < TS; ++i) y[i] = 0;
        return;  // IQ3_S keeps what it wrote (qh / qs of blocks with max != 0 and scale 0)
    }
    float d = max_scale / 31;
    iq_wr16(y, iq_fp16(d * (IS_S ? 1.033f : 1.0125f)));
    float id = 1 / d;
    if (IS_S) {
        for (int ib = 0; ib < 8; ib += 2) {
            int l1 = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
            int l2 = iq_clampi(iq_nint(0.5f * (id * scales[ib + 1] - 1)), 0, 15);
            y[106 + ib / 2] = (u8)(l1 | (l2 << 4));
        }
    } else {
        for (int ib = 0; ib < 8; ++ib) {
            int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
            y[66 + 4 * ib + 3] |= (u8)((u32)l << 4);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// IQ1_S (32-weight blocks) and IQ1_M (16-weight blocks): split search over the sorted weights
// ------------------------------------------------------------------------------------------------

// Stable ascending order of x[0..n) (glibc's qsort is a merge sort here: equal keys keep index order).
template <int N>
IQ_DEV void iq1_sort(const float* x, u8* idx) {
    float v[N];
    for (int j = 0; j < N; ++j) {
        float key = x[j];
        int p = j;
        while (p > 0 && v[p - 1] > key) {
            v[p] = v[p - 1];
            idx[p] = idx[p - 1];
            --p;
        }
        v[p] = key;
        idx[p] = (u8)j;
    }
}

IQ_DEV void iq1_s_sb(IqWarp& W, const IqTabs& t, const float* xbl, const float* qwbl, u8* y) {
    const float x_p[3] = {-1 + 0.125f, 0.125f, 1 + 0.125f};
    const float x_m[3] = {-1 - 0.125f, -0.125f, 1 - 0.125f};
    float scales[8];
    int shifts[8];
    for (int i = 0; i < 50; ++i) y[i] = 0;
    float max_scale = 0;
    float sigma2 = 2 * iq_sumx2(xbl) / QK_K;
    for (int ib = 0; ib < 8; ++ib) {
        const float* xb = xbl + 32 * ib;
        const float* qw = qwbl + 32 * ib;
        float weight[32];
        for (int i = 0; i < 32; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        float max = fabsf(xb[0]);
        for (int i = 1; i < 32; ++i) max = iq_max(max, fabsf(xb[i]));
        if (max < 1e-12f) {
            scales[ib] = 0;
            shifts[ib] = 1;
            continue;
        }
        u8 idx[32];
        iq1_sort<32>(xb, idx);
        float sumx[33], sumw[33];
        sumx[0] = sumw[0] = 0;
        for (int j = 0; j < 32; ++j) {
            int i = idx[j];
            sumx[j + 1] = sumx[j] + weight[i] * xb[i];
            sumw[j + 1] = sumw[j] + weight[i];
        }
        float best_score = -IQ_FLT_MAX, scale = max;
        int besti1 = -1, besti2 = -1, best_shift = 0;
        // C's expressions with the loop-invariant products hoisted and x_m[1] = -x_p[1] (a power of two):
        // b*x_m[1] == -(b*x_p[1]) and (bw*x_m[1])*x_m[1] == (bw*x_p[1])*x_p[1] exactly, so the same floats.
        const float xp0 = x_p[0], xp1 = x_p[1], xp2 = x_p[2], xm0 = x_m[0], xm2 = x_m[2];
        const float sx32 = sumx[32], sw32 = sumw[32];
        for (int i1 = 0; i1 <= 32; ++i1) {
            const float a = sumx[i1] - sumx[0], aw = sumw[i1] - sumw[0];
            const float ap = a * xp0, am = a * xm0, awp = aw * xp0 * xp0, awm = aw * xm0 * xm0;
            const float sx1 = sumx[i1], sw1 = sumw[i1];
            for (int i2 = i1; i2 <= 32; ++i2) {
                const float sx2 = sumx[i2], sw2 = sumw[i2];
                const float b = sx2 - sx1, c = sx32 - sx2;
                const float bw = sw2 - sw1, cw = sw32 - sw2;
                const float bq = b * xp1, bw2 = bw * xp1 * xp1;
                float sumqx = ap + bq + c * xp2;
                float sumq2 = awp + bw2 + cw * xp2 * xp2;
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    scale = sumqx / sumq2;
                    best_score = scale * sumqx;
                    besti1 = i1;
                    besti2 = i2;
                    best_shift = 1;
                }
                sumqx = am - bq + c * xm2;
                sumq2 = awm + bw2 + cw * xm2 * xm2;
                if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
                    scale = sumqx / sumq2;
                    best_score = scale * sumqx;
                    besti1 = i1;
                    besti2 = i2;
                    best_shift = -1;
                }
            }
        }
        if (besti1 < 0 || besti2 < 0 || best_shift == 0) {
            scales[ib] = 0;
            shifts[ib] = 1;
            continue;
        }
        i8 L[32];
        for (int j = 0; j < 32; ++j) L[idx[j]] = (i8)(j < besti1 ? 0 : (j < besti2 ? 1 : 2));
        if (scale < 0) {
            for (int j = 0; j < 32; ++j) L[j] = (i8)(2 - L[j]);
            scale = -scale;
            best_shift = -best_shift;
        }
        const float* xx = best_shift == 1 ? x_p : x_m;
        bool all_on = true;
        int index[4];
        for (int k = 0; k < 4; ++k) {
            u32 u = iq2_key(L + 8 * k);
            int gi = IQ_LD(t.map + u);
            const u32 bk = iq1_best(W, t, gi < 0, u, xb + 8 * k, weight + 8 * k, scale, xx);
            if (gi < 0) {
                all_on = false;
                gi = IQ_LD(t.map + bk);
            }
            index[k] = gi;
        }
        if (!all_on) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < 4; ++k) {
                const u32 key = IQ_LD(t.grid + index[k]);
                for (int j = 0; j < 8; ++j) {
                    float w = weight[8 * k + j];
                    float q = xx[(key >> (2 * j)) & 3];
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
        }
        u32 h = 0;
        for (int k = 0; k < 4; ++k) {
            y[2 + 4 * ib + k] = (u8)(index[k] & 255);
            h |= (u32)(index[k] >> 8) << (3 * k);
        }
        iq_wr16(y + 34 + 2 * ib, h);
        scales[ib] = scale;
        shifts[ib] = best_shift;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) return;
    float d = max_scale / 15;
    iq_wr16(y, iq_fp16(d * 1.125f));
    float id = 1 / d;
    for (int ib = 0; ib < 8; ++ib) {
        int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 7);
        if (shifts[ib] == -1) l |= 8;
        y[34 + 2 * ib + 1] |= (u8)(l << 4);
    }
}

IQ_DEV void iq1_m_sb(IqWarp& W, const IqTabs& t, const float* xbl, const float* qwbl, int has_qw, u8* y) {
    const float x_p[3] = {-1 + 0.125f, 0.125f, 1 + 0.125f};
    const float x_m[3] = {-1 - 0.125f, -0.125f, 1 - 0.125f};
    const u8 masks[4] = {0x00, 0x80, 0x08, 0x88};
    float scales[16];
    int shifts[16];
    for (int i = 0; i < 56; ++i) y[i] = 0;
    float max_scale = 0;
    float sigma2 = 2 * iq_sumx2(xbl) / QK_K;
    for (int ib = 0; ib < 16; ++ib) {
        const float* xb = xbl + 16 * ib;
        float weight[16];
        if (has_qw) {
            const float* qw = qwbl + 16 * ib;
            for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        } else {
            for (int i = 0; i < 16; ++i) weight[i] = xb[i] * xb[i];
        }
        float max = fabsf(xb[0]);
        for (int i = 1; i < 16; ++i) max = iq_max(max, fabsf(xb[i]));
        if (max < 1e-7f) {
            scales[ib] = 0;
            shifts[ib] = 0;
            continue;
        }
        u8 idx[16];
        iq1_sort<16>(xb, idx);
        float best_score = -IQ_FLT_MAX, scale = max;
        int besti1 = -1, besti2 = -1, best_k = -1;
        float px[2][17], pw[2][17];
        px[0][0] = px[1][0] = 0;
        pw[0][0] = pw[1][0] = 0;
        for (int j = 0; j < 16; ++j) {
            const int i = idx[j];
            const int h = i < 8 ? 0 : 1;
            px[h][j + 1] = px[h][j] + weight[i] * xb[i];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + weight[i];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        const float txs[2] = {px[0][16], px[1][16]};
        const float tws[2] = {pw[0][16], pw[1][16]};
        const float p2 = x_p[2], m2 = x_m[2];
        const float cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1];
        const float cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2];
        const float cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1];
        const float cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2];
        for (int i1 = 0; i1 <= 16; ++i1) {
            for (int i2 = i1; i2 <= 16; ++i2) {
                float qx_p[2], qx_m[2], q2_p[2], q2_m[2];
                for (int h = 0; h < 2; ++h) {
                    const float sx = px[h][i1] + px[h][i2];
                    qx_p[h] = txs[h] * p2 - sx;
                    qx_m[h] = txs[h] * m2 - sx;
                    q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                    q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                }
                float sqx[4] = {qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]};
                float sq2[4] = {q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]};
                IQ_UNROLL
                for (int k = 0; k < 4; ++k) {
                    if (sq2[k] > 0 && sqx[k] * sqx[k] > best_score * sq2[k]) {
                        scale = sqx[k] / sq2[k];
                        best_score = scale * sqx[k];
                        besti1 = i1;
                        besti2 = i2;
                        best_k = k;
                    }
                }
            }
        }
        if (besti1 < 0 || besti2 < 0 || best_k < 0) {
            scales[ib] = 0;
            shifts[ib] = 0;
            continue;
        }
        i8 L[16];
        for (int j = 0; j < 16; ++j) L[idx[j]] = (i8)(j < besti1 ? 0 : (j < besti2 ? 1 : 2));
        if (scale < 0) {
            for (int j = 0; j < 16; ++j) L[j] = (i8)(2 - L[j]);
            scale = -scale;
            best_k = 3 - best_k;
        }
        bool all_on = true;
        int index[2];
        for (int k = 0; k < 2; ++k) {
            const float* xx = k == 0 ? (best_k < 2 ? x_p : x_m) : (best_k % 2 == 0 ? x_p : x_m);
            u32 u = iq2_key(L + 8 * k);
            int gi = IQ_LD(t.map + u);
            const u32 bk = iq1_best(W, t, gi < 0, u, xb + 8 * k, weight + 8 * k, scale, xx);
            if (gi < 0) {
                all_on = false;
                gi = IQ_LD(t.map + bk);
            }
            index[k] = gi;
        }
        if (!all_on) {
            float sumqx = 0, sumq2 = 0;
            for (int k = 0; k < 2; ++k) {
                const float* xx = k == 0 ? (best_k < 2 ? x_p : x_m) : (best_k % 2 == 0 ? x_p : x_m);
                const u32 key = IQ_LD(t.grid + index[k]);
                for (int j = 0; j < 8; ++j) {
                    float w = weight[8 * k + j];
                    float q = xx[(key >> (2 * j)) & 3];
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
        }
        y[2 * ib + 0] = (u8)(index[0] & 255);
        y[2 * ib + 1] = (u8)(index[1] & 255);
        y[32 + ib] = (u8)((index[0] >> 8) | ((index[1] >> 8) << 4));
        scales[ib] = scale;
        shifts[ib] = best_k;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) return;
    u32 sc[4] = {0, 0, 0, 0};
    float d = max_scale / 15;
    float id = 1 / d;
    float sumqx_f = 0, sumq2_f = 0;
    for (int ib = 0; ib < 16; ++ib) {
        int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 7);
        sc[ib / 4] |= ((u32)l << (3 * (ib % 4)));
        y[32 + ib] |= masks[shifts[ib]];
        const float* xb = xbl + 16 * ib;
        float weight[16];
        if (has_qw) {
            const float* qw = qwbl + 16 * ib;
            for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
        } else {
            for (int i = 0; i < 16; ++i) weight[i] = xb[i] * xb[i];
        }
        for (int k = 0; k < 2; ++k) {
            const float* xx = k == 0 ? (shifts[ib] < 2 ? x_p : x_m) : (shifts[ib] % 2 == 0 ? x_p : x_m);
            const int gi = (int)y[2 * ib + k] + (int)((((u32)y[32 + ib]) << (8 - 4 * k)) & 0x700);
            const u32 key = IQ_LD(t.grid + gi);
            for (int j = 0; j < 8; ++j) {
                float w = weight[8 * k + j];
                float q = xx[(key >> (2 * j)) & 3] * (2 * l + 1);
                sumqx_f += w * q * xb[8 * k + j];
                sumq2_f += w * q * q;
            }
        }
    }
    if (sumq2_f > 0) d = sumqx_f / sumq2_f;
    u32 s = iq_fp16(d * 1.1125f);
    sc[0] |= ((s & 0x000f) << 12);
    sc[1] |= ((s & 0x00f0) << 8);
    sc[2] |= ((s & 0x0f00) << 4);
    sc[3] |= ((s & 0xf000) << 0);
    for (int i = 0; i < 4; ++i) iq_wr16(y + 48 + 2 * i, sc[i]);
}

// ------------------------------------------------------------------------------------------------
// entry points: one thread per super-block (the threads of a warp share their neighbour searches). x
// [nsb * 256] (rows of sb_per_row super-blocks), qw the row's imatrix [sb_per_row * 256] (ignored when
// has_qw is 0), out [nsb * type_size]. CUDA blocks have IQ_TPB threads (iqkernels.TPB).
// ------------------------------------------------------------------------------------------------
#ifndef IQ_TPB
#define IQ_TPB 64
#endif
#define IQ_ENTRY(NAME, TS, BODY)                                                                        \
    IQ_DEV void NAME##_one(IqWarp& W, const float* x, const float* qw, u8* out, const int* map,         \
                           const u16* nbr, const u16* grid, int sb, int sb_per_row, int has_qw) {      \
        IqTabs t = {map, nbr, grid};                                                                    \
        const float* xbl = x + (i64)sb * QK_K;                                                          \
        const float* qwbl = has_qw ? qw + (i64)(sb % sb_per_row) * QK_K : (const float*)0;             \
        u8* y = out + (i64)sb * TS;                                                                     \
        (void)qwbl;                                                                                     \
        BODY;                                                                                           \
    }                                                                                                   \
    IQ_KERNEL IQ_BOUNDS qm_iq_##NAME(const float* x, const float* qw, u8* out, const int* map,          \
                                     const u16* nbr, const u16* grid, int nsb, int sb_per_row, int has_qw) { \
        IQ_LOOP(NAME)                                                                                   \
    }

#ifdef IQ_CUDA
// 16 blocks of 64 threads per SM: the register cap this sets (64) measured fastest for every type.
#define IQ_BOUNDS __launch_bounds__(IQ_TPB, 16)
#define IQ_LOOP(NAME)                                                                                   \
    __shared__ IqWarp ws[IQ_TPB / 32];                                                                  \
    int sb = blockIdx.x * blockDim.x + threadIdx.x;                                                     \
    if (sb < nsb) NAME##_one(ws[threadIdx.x / 32], x, qw, out, map, nbr, grid, sb, sb_per_row, has_qw);
#else
#define IQ_BOUNDS
#define IQ_LOOP(NAME)                                                                                   \
    IqWarp ws;                                                                                          \
    for (int sb = 0; sb < nsb; ++sb) NAME##_one(ws, x, qw, out, map, nbr, grid, sb, sb_per_row, has_qw);
#endif

IQ_ENTRY(iq2_xxs, 66, iq2_xxs_sb(W, t, xbl, qwbl, y))
IQ_ENTRY(iq2_xs, 74, iq2_16_sb<false>(W, t, xbl, qwbl, has_qw, y))
IQ_ENTRY(iq2_s, 82, iq2_16_sb<true>(W, t, xbl, qwbl, has_qw, y))
IQ_ENTRY(iq3_xxs, 98, iq3_sb<false>(W, t, xbl, qwbl, has_qw, y))
IQ_ENTRY(iq3_s, 110, iq3_sb<true>(W, t, xbl, qwbl, has_qw, y))
IQ_ENTRY(iq1_s, 50, iq1_s_sb(W, t, xbl, qwbl, y))
IQ_ENTRY(iq1_m, 56, iq1_m_sb(W, t, xbl, qwbl, has_qw, y))
