// quantmix codebook-quant kernels (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), byte-exact
// with ggml-quants.c's quantize_row_iq*_impl.
//
// One source, two compilers (as kquants.cu): NVRTC with --fmad=false and IEEE division / sqrt for the
// GPU, g++ -ffp-contract=off for the host, so CI checks this very arithmetic against ggml without a GPU
// (tests/test_formats_gpu.py, quantmix.formats.gpu.iqkernels). Every float operation is the C one in
// C's order: products associate left to right as written in C ((w*x)*q), sums accumulate sequentially,
// comparisons are C's (NaN compares false), nearest_int and the fp16 rounding are ggml's bit tricks.
//
// Work split: IQ2_XS, IQ3_XXS and IQ3_S run one warp per super-block, their neighbour searches spread
// over the lanes as a queue of chunks (see "one warp per super-block" below): their long, heavy-tailed
// lists dominate. IQ2_XXS and IQ2_S run one thread per super-block, each lane searching its own lists;
// IQ1_S / IQ1_M one thread per super-block with their searches handed to the whole warp (iq_search: C's
// first-minimum result, found cooperatively). Each type uses the split that measured fastest for it
// (BENCHMARKS.md). The codebook tables are read from global memory (cached):
//   map  int32 [keys]: >= 0 the grid index of an on-grid key, else -(1 + offset) into nbr, where
//        nbr[offset] = number of neighbours, followed by their keys (not indices: one load fewer per
//        neighbour; the winner's index is map[key]) in ggml's order;
//   grid u16 [G]: the key of each grid point (level l_i at bits*i: 2 bits for the 8-d grids, 3 for 4-d).

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IQ_CUDA 1
#endif

#ifdef IQ_CUDA
#define IQ_DEV __device__ __forceinline__
#define IQ_NOINLINE __device__ __noinline__  // long serial helpers: kept out of the kernels' register budget
#define IQ_UNROLL _Pragma("unroll")
#define IQ_UNROLL1 _Pragma("unroll 1")
#define IQ_UNROLL_J _Pragma("unroll 4")  // the neighbour loops: independent d2 chains to overlap
#define IQ_KERNEL extern "C" __global__ void
#define IQ_LD(p) __ldg(p)
#else
#include <math.h>
#include <string.h>
#define IQ_DEV static inline
#define IQ_NOINLINE static
#define IQ_UNROLL
#define IQ_UNROLL1
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

// The terms (w_i*diff)*diff of an 8-d neighbour's distance per position and level (q = 1, 3, 5), for
// iq2_scan: C computes the same products per neighbour, so summing them in C's order gives C's d2.
IQ_DEV void iq2_terms(const float* xval, const float* w, float scale, float* t0, float* t1, float* t2) {
    IQ_UNROLL
    for (int i = 0; i < 8; ++i) {
        const float x = xval[i], wi = w[i];
        float d0 = scale * 1.f - x, d1 = scale * 3.f - x, d2 = scale * 5.f - x;
        t0[i] = wi * d0 * d0;
        t1[i] = wi * d1 * d1;
        t2[i] = wi * d2 * d2;
    }
}

// C's neighbour loop over keys[j0..j1): the first neighbour of least d2 (d2 < FLT_MAX), as its key
// (KEY) or its index j; 0xFFFFFFFF if none. *best gets its d2. (Each caller tracks only what it uses.)
template <bool KEY>
IQ_DEV u32 iq2_scan(const float* t0, const float* t1, const float* t2, const u16* keys, int j0, int j1, float* best) {
    float b = IQ_FLT_MAX;
    u32 r = 0xFFFFFFFFu;
    IQ_UNROLL_J
    for (int j = j0; j < j1; ++j) {
        const u32 key = IQ_LD(keys + j);
        float d2 = 0;
        IQ_UNROLL
        for (int i = 0; i < 8; ++i) {
            // bit 0 of the level picks t1, bit 1 t2 (as C: level 2 -> t2): two bit-test selects; the
            // compare-based form of the level kept the ALU pipe busy and measured ~1.4x slower
            const float a = (key & (1u << (2 * i))) ? t1[i] : t0[i];
            d2 += (key & (2u << (2 * i))) ? t2[i] : a;
        }
        if (d2 < b) {
            b = d2;
            r = KEY ? key : (u32)j;
        }
    }
    *best = b;
    return r;
}

// iq2_find_best_neighbour for the per-thread kernels (IQ2_XXS, IQ2_S), for a group with need set (key u
// off the grid). Where C aborts (no neighbour with d2 < FLT_MAX: only for weights that overflow) the first
// is taken. Every lane of the warp may call it, need or not.
// Its loop is iq2_terms + iq2_scan written out: these kernels run capped at 64 registers and spill, and
// calling the helpers changed their spills and measured 5-8% slower (IQ2_XXS 3.41 -> 3.14 G w/s, H200).
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

// the key of 8 levels (2 bits each)
IQ_DEV u32 iq2_key(const i8* L) {
    u32 u = 0;
    for (int i = 0; i < 8; ++i) u |= ((u32)L[i] << (2 * i));
    return u;
}

// IQ1_S / IQ1_M neighbour search (iq1_find_best_neighbour2); where C aborts (no neighbour with
// d2 < FLT_MAX: only for weights that overflow) the first is taken. Every lane of the warp may call it.
// q = xg[level] (the shifted ternary values); x are the signed weights. Returns the winner's key.
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
// IQ2_XXS (32-weight sub-blocks) and IQ2_S (16-weight sub-blocks): one thread per super-block, each
// lane searching its own lists (measured faster for these two than the warp design below: their searches
// are a smaller share of the work)
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

IQ_DEV void iq2_s_sb(IqWarp& W, const IqTabs& t, const float* xbl, const float* qwbl, int has_qw, u8* y) {
    const int kMaxQ = 3;
    const int TS = 82;
    float scales[16];
    for (int i = 0; i < TS; ++i) y[i] = 0;
    float max_scale = 0;
    float sumx2 = iq_sumx2(xbl);
    float sigma2 = 2 * sumx2 / QK_K;
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
        iq_signs<2, false>(xb, weight, xval, block_signs);
        float max = xval[0];
        for (int i = 1; i < 16; ++i) max = iq_max(max, xval[i]);
        for (int i = 0; i < 16; ++i) L[i] = 0;
        if (max < 1e-8f) {
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
            for (int k = 0; k < 2; ++k) block_signs[k] = (u8)(~block_signs[k]);
        }
        for (int k = 0; k < 2; ++k) {
            int gi = IQ_LD(t.map + iq2_key(L + 8 * k));
            if (gi < 0) gi = 0;  // C aborts: unreachable
            const int g8 = 2 * ib + k;
            y[2 + g8] = (u8)(gi & 255);
            y[2 + 64 + g8 / 4] |= (u8)((gi >> 8) << (2 * (g8 % 4)));
            y[2 + 32 + g8] = block_signs[k];
        }
        scales[ib] = scale;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) {
        return;
    }
    float d = max_scale / 31;
    iq_wr16(y, iq_fp16(d * 0.9875f));
    float id = 1 / d;
    u8* sc = y + 74;
    for (int ib = 0; ib < 16; ++ib) {
        int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
        if (ib % 2 == 0) sc[ib / 2] = (u8)l;
        else sc[ib / 2] |= (u8)(l << 4);
    }
}

// ------------------------------------------------------------------------------------------------
// IQ2_XS, IQ3_XXS, IQ3_S: one warp per super-block, the searches on a balanced queue
// ------------------------------------------------------------------------------------------------
// Why: their candidate-scale loops run one neighbour search per (group, candidate scale), and the list
// lengths are heavy-tailed (IQ2_XS: median 21, max 292 neighbours). With one super-block per lane a warp
// waited at every step for its longest list (Nsight: ~10 of 32 lanes active). Here a warp owns one
// super-block and runs each phase across its lanes: every (group, scale) task computes its key; the
// off-grid ones put their neighbour lists on a queue as chunks of at most CH neighbours; the queue is
// evaluated 32 chunks at a time, and each chunk's best, packed as (d2 order key, index), is merged per
// task by a 64-bit min: C's first minimum whatever the split. The sums, the sequential choice of the
// scale, the final pass and the packing are C's, op for op.
//
// The host build runs the same phases with the lanes as a loop (IQ_LANES); only the scan, the min merge
// and __syncwarp differ, so CI checks this code against ggml.

#ifdef IQ_CUDA
#define IQ_LANES(...)                                                                                   \
    for (int lane = threadIdx.x & 31, once_ = 1; once_; once_ = 0) { __VA_ARGS__ }                    \
    __syncwarp();
#else
#define IQ_LANES(...) for (int lane = 0; lane < 32; ++lane) { __VA_ARGS__ }
#endif

// KIND: 1 IQ2_XS, 3 IQ3_XXS, 4 IQ3_S (IQ2_XXS and IQ2_S, 0 and 2, measured faster per thread, above)
template <int KIND>
struct GridT {
    enum {
        IQ3 = KIND >= 3,
        IS_S = KIND == 4,
        GS = IQ3 ? 4 : 8,                          // weights per grid point
        BITS = IQ3 ? 3 : 2,                        // key bits per level
        KMAXQ = IQ3 ? 8 : 3,
        BS = KIND == 1 ? 16 : 32,                  // sub-block
        NSB = QK_K / BS,
        GPB = BS / GS,                             // groups per sub-block
        NIS = KIND == 3 ? 15 : 9,
        NIS2 = 2 * NIS + 1,                        // candidate scales
#ifdef IQ_NBB
        NBB = IQ_NBB,
#else
        NBB = KIND == 3 ? 1 : (KIND == 4 ? 2 : 8),  // sub-blocks per batch (shared memory)
#endif
#ifdef IQ_CH
        CH = IQ_CH,
#else
        CH = IQ3 ? 8 : 16,                         // neighbours per queue item
#endif
        MAXN = KIND == 1 ? 292 : 38,               // longest list of the tables (longer ones still work)
        MAXI = (MAXN + CH - 1) / CH,               // items per task at most (the last takes any rest)
        NMAIN = NBB * GPB * NIS2,                  // slots of the candidate-scale tasks of a batch
        NSLOT = NMAIN + NBB * GPB,                 // + the final pass's
        QCAP = 31 + 32 * MAXI,
        TS = KIND == 1 ? 74 : (KIND == 3 ? 98 : 110),
    };
};

template <class T>
struct GridS {
    unsigned long long best[T::NSLOT];  // per task: min of (iq_okey(d2) << 32 | index); ~0 = no search
    float w[QK_K], wa[QK_K], xv[QK_K];
    float mx[T::NSB], s0[T::NSB], sc[T::NSB];  // max |x|, the first scale, the chosen scale
    u32 tu[T::NSLOT];                   // the task's key u; after its search the winner's, with bit 16 set
    u32 q[T::QCAP];                     // queue items: slot | chunk << 10
    // per (sub-block of the batch, candidate scale): id and the search scale 1/id, then C's sums and
    // the scale and best that C sets when the candidate wins (they depend on the candidate only)
    float pid[T::NBB * T::NIS2], pts[T::NBB * T::NIS2];
    float sqx[T::NBB * T::NIS2], sq2[T::NBB * T::NIS2], csc[T::NBB * T::NIS2], cbt[T::NBB * T::NIS2];
    float fts[T::NBB * T::GPB];         // the final pass's search scale
    u32 fkey[T::NSB * T::GPB];          // the sub-block's chosen, then final, key of each group
    int cnt[32];
    u8 skip[T::NSB], fin[T::NSB], doit[T::NSB];
    u8 sg[32];                          // sign byte of each group of 8
    float sumx2;
};

template <class T>
IQ_DEV u32 grid_key(const float* xv, float id) {
    u32 u = 0;
    IQ_UNROLL
    for (int i = 0; i < T::GS; ++i) {
        const int l = iq_clampi(iq_nint(0.5f * (id * xv[i] - 1)), 0, T::KMAXQ - 1);
        u |= (u32)l << (T::BITS * i);
    }
    return u;
}

// queue items of a list of n neighbours: chunks of CH, at most MAXI (the last takes any rest)
template <class T>
IQ_DEV int grid_nit(int n) {
    const int it = (n + T::CH - 1) / T::CH;
    return it < T::MAXI ? it : T::MAXI;
}

// level i of a key as C's grid value q = 2l+1
template <class T>
IQ_DEV float grid_q(u32 key, int i) {
    return iq_q(2 * (int)((key >> (T::BITS * i)) & ((1u << T::BITS) - 1)) + 1);
}

template <class T>
IQ_DEV int grid_items(const IqTabs& t, u32 u) {
    const int m = IQ_LD(t.map + u);
    return m >= 0 ? 0 : grid_nit<T>(IQ_LD(t.nbr + (-m - 1)));
}

// the slot's group (its first weight in the super-block) and search scale
template <class T>
IQ_DEV int grid_slot(const GridS<T>& S, int slot, int b0, float* scale) {
    int bl, k;
    if (slot < T::NMAIN) {
        bl = slot / (T::GPB * T::NIS2);
        k = (slot / T::NIS2) % T::GPB;
        *scale = S.pts[bl * T::NIS2 + slot % T::NIS2];
    } else {
        bl = (slot - T::NMAIN) / T::GPB;
        k = (slot - T::NMAIN) % T::GPB;
        *scale = S.fts[slot - T::NMAIN];
    }
    return (b0 + bl) * T::BS + k * T::GS;
}

// one queue item: its chunk of the slot's neighbour list, merged into best[slot]
template <class T>
IQ_DEV void grid_eval(GridS<T>& S, const IqTabs& t, int b0, u32 item) {
    const int slot = (int)(item & 1023u), c = (int)(item >> 10);
    float scale;
    const int e0 = grid_slot<T>(S, slot, b0, &scale);
    const int off = -IQ_LD(t.map + S.tu[slot]) - 1;
    const int n = IQ_LD(t.nbr + off);
    const int j0 = c * T::CH, j1 = c == grid_nit<T>(n) - 1 ? n : j0 + T::CH;
    const float* xv = S.xv + e0;
    const float* wa = S.wa + e0;
    float best = IQ_FLT_MAX;
    int bj = -1;
    if (T::IQ3) {
        float xr[4], wr[4];
        IQ_UNROLL
        for (int i = 0; i < 4; ++i) {
            xr[i] = xv[i];
            wr[i] = wa[i];
        }
        IQ_UNROLL_J
        for (int j = j0; j < j1; ++j) {
            const u32 key = IQ_LD(t.nbr + off + 1 + j);
            float d2 = 0;
            IQ_UNROLL
            for (int i = 0; i < 4; ++i) {
                float q = grid_q<T>(key, i);
                float diff = scale * q - xr[i];
                d2 += wr[i] * diff * diff;
            }
            if (d2 < best) {
                best = d2;
                bj = j;
            }
        }
    } else {
        float t0[8], t1[8], t2[8];
        iq2_terms(xv, wa, scale, t0, t1, t2);
        bj = (int)iq2_scan<false>(t0, t1, t2, t.nbr + off + 1, j0, j1, &best);
    }
    // no d2 < FLT_MAX (C aborts; only overflowing weights): the chunk offers its first, so the list's first wins
    const unsigned long long v = bj < 0 ? (0xFFFFFFFFull << 32) | (u32)j0 : ((unsigned long long)iq_okey(best) << 32) | (u32)bj;
#ifdef IQ_CUDA
    atomicMin(&S.best[slot], v);
#else
    if (v < S.best[slot]) S.best[slot] = v;
#endif
}

// Append the items of the 32 slots base + lane (S.cnt[lane] of them each) at q[qn..]; returns how many.
template <class T>
IQ_DEV int grid_push(GridS<T>& S, int base, int qn) {
#ifdef IQ_CUDA
    const int lane = threadIdx.x & 31;
    const int v = S.cnt[lane];
    int incl = v;
    IQ_UNROLL
    for (int d = 1; d < 32; d <<= 1) {
        const int o = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += o;
    }
    const int total = __shfl_sync(0xFFFFFFFFu, incl, 31);
    for (int c = 0; c < v; ++c) S.q[qn + incl - v + c] = (u32)(base + lane) | ((u32)c << 10);
    __syncwarp();
    return total;
#else
    int p = qn;
    for (int lane = 0; lane < 32; ++lane)
        for (int c = 0; c < S.cnt[lane]; ++c) S.q[p++] = (u32)(base + lane) | ((u32)c << 10);
    return p - qn;
#endif
}

// Evaluate the queue 32 items at a time while a full round is there (all of it with flush); the rest
// moves to the front.
template <class T>
IQ_DEV void grid_drain(GridS<T>& S, const IqTabs& t, int b0, int& qn, bool flush) {
    int qh = 0;
    while (qn - qh >= 32 || (flush && qn > qh)) {
        const int h = qh, e = qn;
        IQ_LANES(if (h + lane < e) grid_eval<T>(S, t, b0, S.q[h + lane]);)
        qh += 32;
    }
    if (qh >= qn) {
        qn = 0;
    } else if (qh > 0) {  // qh >= 32 > rest: the two ranges do not overlap
        const int h = qh, rest = qn - qh;
        IQ_LANES(if (lane < rest) S.q[lane] = S.q[h + lane];)
        qn = rest;
    }
}

// After the searches of slots [lo, hi): each searched task's winner key, bit 16 set.
template <class T>
IQ_DEV void grid_resolve(GridS<T>& S, const IqTabs& t, int lo, int hi) {
    IQ_LANES(for (int s = lo + lane; s < hi; s += 32) {
        const unsigned long long b = S.best[s];
        if (b != ~0ull) {
            const int off = -IQ_LD(t.map + S.tu[s]) - 1;
            S.tu[s] = (u32)IQ_LD(t.nbr + off + 1 + (int)(u32)(b & 0xFFFFFFFFu)) | 0x10000u;
        }
    })
}

// C's sums over a sub-block: sumqx += (w*xval)*q, sumq2 += (w*q)*q, q = 2l+1, in weight order
template <class T>
IQ_DEV void grid_sums(const GridS<T>& S, int ib, const u32* keys, int kstride, float* sumqx, float* sumq2) {
    float a = 0, b = 0;
    IQ_UNROLL1
    for (int k = 0; k < T::GPB; ++k) {
        const u32 key = keys[k * kstride];
        IQ_UNROLL
        for (int i = 0; i < T::GS; ++i) {
            const int e = ib * T::BS + k * T::GS + i;
            const float w = S.w[e];
            const float q = grid_q<T>(key, i);
            a += w * S.xv[e] * q;
            b += w * q * q;
        }
    }
    *sumqx = a;
    *sumq2 = b;
}

// The super-block's bytes from the per-sub-block results, as C writes them (sign flips for negative
// scales, grid indices, the super-block scale and the 4-bit sub-block scales).
template <int KIND>
IQ_NOINLINE void grid_pack(const GridS<GridT<KIND> >& S, const IqTabs& t, u8* y) {
    typedef GridT<KIND> T;
    float scales[T::NSB];
    float max_scale = 0;
    for (int i = 0; i < T::TS; ++i) y[i] = 0;
    int slot = 0;  // IQ3_S: qs / signs advance only past sub-blocks that are not all zero
    for (int ib = 0; ib < T::NSB; ++ib) {
        if (S.skip[ib]) {
            scales[ib] = 0;
            continue;
        }
        float scale = S.sc[ib];
        const int nsg = T::BS / 8;  // sign bytes of the sub-block
        u8 bs[4];
        for (int k = 0; k < nsg; ++k) bs[k] = S.sg[nsg * ib + k];
        if (scale < 0) {
            scale = -scale;
            for (int k = 0; k < nsg; ++k) bs[k] = T::IS_S ? (u8)(~bs[k]) : (u8)((~bs[k]) & 127);
        }
        for (int k = 0; k < T::GPB; ++k) {
            int gi = IQ_LD(t.map + S.fkey[ib * T::GPB + k]);
            if (gi < 0) gi = 0;  // C aborts: unreachable
            if (KIND == 1) {
                iq_wr16(y + 2 + 2 * (2 * ib + k), (u32)gi | ((u32)bs[k] << 9));
            } else if (KIND == 3) {
                y[2 + 8 * ib + k] = (u8)gi;
            } else {
                y[2 + 8 * slot + k] = (u8)(gi & 255);
                y[66 + ib] |= (u8)((gi >> 8) << k);
            }
        }
        if (KIND == 3) {
            u32 sas = (u32)bs[0] | ((u32)bs[1] << 7) | ((u32)bs[2] << 14) | ((u32)bs[3] << 21);
            iq_wr32(y + 66 + 4 * ib, sas);
        } else if (KIND == 4) {
            for (int k = 0; k < 4; ++k) y[74 + 4 * slot + k] = bs[k];
            ++slot;
        }
        scales[ib] = scale;
        max_scale = iq_max(max_scale, scale);
    }
    if (!max_scale) {
        // IQ2_XS / IQ3_XXS zero the block; IQ3_S keeps what it wrote
        if (!T::IS_S)
            for (int i = 0; i < T::TS; ++i) y[i] = 0;
        return;
    }
    const float d = max_scale / 31;
    const float dm = KIND == 3 ? d * 1.0125f : (KIND == 4 ? d * 1.033f : d);
    iq_wr16(y, iq_fp16(dm));
    const float id = 1 / d;
    if (KIND == 1) {
        u8* sc = y + 66;
        for (int ib = 0; ib < T::NSB; ++ib) {
            int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
            if (ib % 2 == 0) sc[ib / 2] = (u8)l;
            else sc[ib / 2] |= (u8)(l << 4);
        }
    } else if (KIND == 3) {
        for (int ib = 0; ib < 8; ++ib) {
            int l = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
            y[66 + 4 * ib + 3] |= (u8)((u32)l << 4);
        }
    } else {
        for (int ib = 0; ib < 8; ib += 2) {
            int l1 = iq_clampi(iq_nint(0.5f * (id * scales[ib] - 1)), 0, 15);
            int l2 = iq_clampi(iq_nint(0.5f * (id * scales[ib + 1] - 1)), 0, 15);
            y[106 + ib / 2] = (u8)(l1 | (l2 << 4));
        }
    }
}

template <int KIND>
IQ_DEV void grid_sb(GridS<GridT<KIND> >& S, const IqTabs& t, const float* xbl, const float* qwbl, int has_qw, u8* y) {
    typedef GridT<KIND> T;
    const float step = T::IQ3 ? 0.2f : 0.1f;
    // weights, |x| with C's sign handling, the sub-blocks' maxima and first scales
    IQ_LANES(if (lane == 0) S.sumx2 = iq_sumx2(xbl);)
    const float sumx2 = S.sumx2;
    const float sigma2 = KIND == 1 ? sumx2 / QK_K : 2 * sumx2 / QK_K;
    IQ_LANES(IQ_UNROLL1 for (int e = lane; e < QK_K; e += 32) {
        const float xe = xbl[e];
        float we;
        if (has_qw) we = qwbl[e] * sqrtf(sigma2 + xe * xe);
        else if (KIND == 1) we = 0.25f * sigma2 + xe * xe;
        else we = xe * xe;
        S.w[e] = we;
        S.wa[e] = sqrtf(we);
    })
    IQ_LANES(iq_signs<1, !T::IS_S>(xbl + 8 * lane, S.w + 8 * lane, S.xv + 8 * lane, S.sg + lane);)
    IQ_LANES(if (lane < T::NSB) {
        const int ib = lane;
        const float* xv = S.xv + T::BS * ib;
        float mx = xv[0];
        for (int i = 1; i < T::BS; ++i) mx = iq_max(mx, xv[i]);
        S.skip[ib] = KIND == 1 ? mx < 1e-15f : (KIND == 3 ? mx < 1e-8f : !mx);
        S.mx[ib] = mx;
        S.s0[ib] = mx / (2 * T::KMAXQ - 1);
        S.sc[ib] = 0;
    })
    for (int b0 = 0; b0 < T::NSB; b0 += T::NBB) {
        int qn = 0;
        IQ_LANES(for (int p = lane; p < T::NBB * T::NIS2; p += 32) {
            const int ib = b0 + p / T::NIS2;
            if (!S.skip[ib]) {
                const float id = (2 * T::KMAXQ - 1 + (p % T::NIS2 - T::NIS) * step) / S.mx[ib];
                S.pid[p] = id;
                S.pts[p] = 1 / id;
            }
        })
        // the candidate scales: every (group, scale) key, the off-grid ones searched
        for (int r = 0; r < T::NMAIN; r += 32) {
            IQ_LANES({
                const int slot = r + lane;
                int items = 0;
                if (slot < T::NMAIN) {
                    const int bl = slot / (T::GPB * T::NIS2), k = (slot / T::NIS2) % T::GPB, si = slot % T::NIS2;
                    const int ib = b0 + bl;
                    S.best[slot] = ~0ull;
                    S.tu[slot] = 0;
                    if (!S.skip[ib]) {
                        const u32 u = grid_key<T>(S.xv + ib * T::BS + k * T::GS, S.pid[bl * T::NIS2 + si]);
                        S.tu[slot] = u;
                        items = grid_items<T>(t, u);
                    }
                }
                S.cnt[lane] = items;
            })
            qn += grid_push<T>(S, r, qn);
            grid_drain<T>(S, t, b0, qn, false);
        }
        grid_drain<T>(S, t, b0, qn, true);
        grid_resolve<T>(S, t, 0, T::NMAIN);
        IQ_LANES(for (int p = lane; p < T::NBB * T::NIS2; p += 32) {
            const int bl = p / T::NIS2, si = p % T::NIS2;
            if (!S.skip[b0 + bl]) {
                float sumqx, sumq2;
                grid_sums<T>(S, b0 + bl, S.tu + bl * T::GPB * T::NIS2 + si, T::NIS2, &sumqx, &sumq2);
                S.sqx[p] = sumqx;
                S.sq2[p] = sumq2;
                const float scale = sumqx / sumq2;
                S.csc[p] = scale;
                S.cbt[p] = scale * sumqx;
            }
        })
        // C's sequential choice of the scale, then which groups the final pass redoes
        IQ_LANES(if (lane < T::NBB && !S.skip[b0 + lane]) {
            const int bl = lane, ib = b0 + lane;
            float best = 0, scale = S.s0[ib];
            int ch = -1;
            for (int si = 0; si < T::NIS2; ++si) {
                const int p = bl * T::NIS2 + si;
                const float sumqx = S.sqx[p], sumq2 = S.sq2[p];
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = S.csc[p];  // = sumqx / sumq2
                    best = S.cbt[p];   // = scale * sumqx
                    ch = si;
                }
            }
            u32 on = 0;
            int n_not = 0;
            for (int k = 0; k < T::GPB; ++k) {
                const u32 key = ch >= 0 ? S.tu[(bl * T::GPB + k) * T::NIS2 + ch] : 0u;
                const bool onk = ch >= 0 ? !(key & 0x10000u) : !T::IS_S;
                S.fkey[ib * T::GPB + k] = key & 0xFFFFu;
                if (onk) on |= 1u << k;
                else ++n_not;
            }
            const bool fin = n_not > 0 && scale > 0;
            const u32 doit = fin ? (T::IS_S ? 0xFFu : (~on & ((1u << T::GPB) - 1))) : 0u;
            S.sc[ib] = scale;
            S.fin[ib] = (u8)fin;
            S.doit[ib] = (u8)doit;
        })
        // the final pass at the chosen scale
        IQ_LANES({
            const int f = lane;
            int items = 0;
            if (f < T::NBB * T::GPB) {
                const int bl = f / T::GPB, k = f % T::GPB, ib = b0 + bl, slot = T::NMAIN + f;
                S.best[slot] = ~0ull;
                if (!S.skip[ib] && ((S.doit[ib] >> k) & 1)) {
                    const float scale = S.sc[ib];
                    const float id = 1 / scale;
                    const u32 u = grid_key<T>(S.xv + ib * T::BS + k * T::GS, id);
                    S.fkey[ib * T::GPB + k] = u;
                    S.fts[f] = scale;
                    S.tu[slot] = u;
                    items = grid_items<T>(t, u);
                }
            }
            S.cnt[lane] = items;
        })
        qn += grid_push<T>(S, T::NMAIN, qn);
        grid_drain<T>(S, t, b0, qn, true);
        grid_resolve<T>(S, t, T::NMAIN, T::NSLOT);
        IQ_LANES(if (lane < T::NBB * T::GPB) {
            const int slot = T::NMAIN + lane;
            if (S.best[slot] != ~0ull) S.fkey[b0 * T::GPB + lane] = S.tu[slot] & 0xFFFFu;
        })
        IQ_LANES(if (lane < T::NBB && !S.skip[b0 + lane] && S.fin[b0 + lane]) {
            const int ib = b0 + lane;
            float sumqx, sumq2;
            grid_sums<T>(S, ib, S.fkey + ib * T::GPB, 1, &sumqx, &sumq2);
            if (sumq2 > 0) S.sc[ib] = sumqx / sumq2;
        })
    }
    // packing, in C's order (one lane)
    IQ_LANES(if (lane == 0) grid_pack<KIND>(S, t, y);)
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
// entry points. x [nsb * 256] (rows of sb_per_row super-blocks), qw the row's imatrix [sb_per_row * 256]
// (ignored when has_qw is 0), out [nsb * type_size]. IQ_ENTRY (IQ1_S, IQ1_M, IQ2_XXS, IQ2_S): one thread
// per super-block, CUDA blocks of IQ_TPB threads (iqkernels.TPB). IQ_WENTRY (IQ2_XS, IQ3_XXS, IQ3_S): one
// warp per super-block, CUDA blocks of IQ_WTPB threads (iqkernels.WTPB), IQ_WTPB / 32 super-blocks each.
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
// per-thread kernels: 16 blocks of 64 threads per SM (the register cap this sets, 64, measured fastest).
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

#ifndef IQ_WTPB
#define IQ_WTPB 64
#endif
#define IQ_WENTRY(NAME, KIND)                                                                           \
    IQ_KERNEL IQ_WBOUNDS qm_iq_##NAME(const float* x, const float* qw, u8* out, const int* map,         \
                                      const u16* nbr, const u16* grid, int nsb, int sb_per_row, int has_qw) { \
        IqTabs t = {map, nbr, grid};                                                                    \
        IQ_WLOOP(KIND)                                                                                  \
    }
#define IQ_WONE(KIND, S, sb)                                                                            \
    grid_sb<KIND>(S, t, x + (i64)(sb) * QK_K, has_qw ? qw + (i64)((sb) % sb_per_row) * QK_K : (const float*)0, \
                  has_qw, out + (i64)(sb) * GridT<KIND>::TS);
#ifdef IQ_CUDA
// warp kernels: at least 8 blocks of 64 threads per SM (at most 128 registers) measured fastest (4-12%
// over no cap; 12 and 16 blocks cap registers harder for no gain)
#ifndef IQ_WMINB
#define IQ_WMINB 8
#endif
#define IQ_WBOUNDS __launch_bounds__(IQ_WTPB, IQ_WMINB)
#define IQ_WLOOP(KIND)                                                                                  \
    __shared__ GridS<GridT<KIND> > gs[IQ_WTPB / 32];                                                    \
    const int sb = blockIdx.x * (IQ_WTPB / 32) + threadIdx.x / 32;                                      \
    if (sb < nsb) { IQ_WONE(KIND, gs[threadIdx.x / 32], sb) }
#else
#define IQ_WBOUNDS
#define IQ_WLOOP(KIND)                                                                                  \
    GridS<GridT<KIND> > gs;                                                                             \
    for (int sb = 0; sb < nsb; ++sb) { IQ_WONE(KIND, gs, sb) }
#endif

IQ_ENTRY(iq2_xxs, 66, iq2_xxs_sb(W, t, xbl, qwbl, y))
IQ_WENTRY(iq2_xs, 1)
IQ_ENTRY(iq2_s, 82, iq2_s_sb(W, t, xbl, qwbl, has_qw, y))
IQ_WENTRY(iq3_xxs, 3)
IQ_WENTRY(iq3_s, 4)
IQ_ENTRY(iq1_s, 50, iq1_s_sb(W, t, xbl, qwbl, y))
IQ_ENTRY(iq1_m, 56, iq1_m_sb(W, t, xbl, qwbl, has_qw, y))
