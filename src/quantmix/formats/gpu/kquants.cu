// quantmix k-quant kernels (Q2_K .. Q6_K), byte-exact with ggml-quants.c.
//
// One source, two compilers:
//   * NVRTC for the GPU, with --fmad=false (no contraction of a*b+c into an FMA), IEEE division and
//     square root (NVRTC's defaults --prec-div=true --prec-sqrt=true, no flush to zero);
//   * g++ -O2 -ffp-contract=off for the host, so CI can check this very arithmetic against ggml's C
//     quantizer on a machine without a GPU (see hostbuild.py).
// Both run plain IEEE float32 in the order the C reference runs it: every sum is accumulated left to
// right inside one thread, every comparison is C's (NaN compares false), and ggml's nearest_int is
// reproduced bit for bit (x86's NaN gives 0). Nothing here is faster than exact.
//
// Work split (two kernels per type, plus one for the super-block sums of squares):
//   search: one thread per sub-block (16 or 32 weights): the per-group scale search of the type
//           (make_qkx2/3_quants, make_qx_quants, make_q3_quants). Writes the group's scale, min and
//           weight sum, and its quant levels L (one byte per weight) to scratch buffers.
//   finish: one thread per super-block (256 weights): the super-block scales (make_qp_quants, ...),
//           fp16 rounding, re-quantization with the final scales and bit packing into the block bytes;
//           then either writes the bytes or dequantizes them (as ggml's to_float) and accumulates the
//           per-super-block error sums sum w e^2, sum w x^2, sum a e in float64 (the fused quant_error).
//
// The hot loop of make_qkx3 (37 candidate scales of Q2_K/Q4_K/Q5_K with an imatrix) rounds with
// float additions of 1.5*2^23 (or rintf, QM_RINT=1), which equals nearest_int while |t| < 2^22; a
// per-candidate bound picks the bit-exact integer emulation otherwise (inf/NaN included).

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define QM_CUDA 1
#endif

#ifdef QM_CUDA
#define QM_DEV __device__ __forceinline__
#define QM_MEMBER __device__ __forceinline__
#define QM_UNROLL _Pragma("unroll")
#define QM_GLOBAL extern "C" __global__
#else
#include <math.h>
#include <string.h>
#define QM_DEV static inline
#define QM_MEMBER inline
#define QM_UNROLL
#endif

#ifndef QM_RINT
#define QM_RINT 0
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

// ------------------------------------------------------------------------------------------------
// scalar helpers
// ------------------------------------------------------------------------------------------------
QM_DEV u32 f2u(float f) {
#ifdef QM_CUDA
    return __float_as_uint(f);
#else
    u32 u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

QM_DEV float u2f(u32 u) {
#ifdef QM_CUDA
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// ggml's nearest_int: add 1.5*2^23 and read the mantissa bits; x86's default NaN reads as 0.
QM_DEV int nearest_int(float f) {
    if (f != f) return 0;
    float v = f + 12582912.f;
    return (int)(f2u(v) & 0x007fffffu) - 0x00400000;
}

// nearest_int for |f| < 2^22 (the caller guarantees it), as a float.
QM_DEV float rint_small(float f) {
#if QM_RINT
    return rintf(f);
#else
    float v = f + 12582912.f;
    return v - 12582912.f;
#endif
}

// GGML_FP32_TO_FP16 (ggml_compute_fp32_to_fp16): round to nearest even; NaN -> x86's default NaN's 0xFE00.
QM_DEV u16 fp32_to_fp16(float f) {
    if (f != f) return 0xFE00;
    float base = (fabsf(f) * u2f(0x77800000u)) * u2f(0x08800000u);  // * 2^112 * 2^-110
    u32 w = f2u(f);
    u32 shl1 = w + w;
    u32 sign = w & 0x80000000u;
    u32 bias = shl1 & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    u32 bits = f2u(base);
    u32 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (u16)((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
}

// GGML_FP16_TO_FP32 (exact).
QM_DEV float fp16_to_fp32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1Fu;
    u32 m = (u32)h & 0x3FFu;
    if (e == 0) {
        float v = (float)m * u2f(0x33800000u);  // m * 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

QM_DEV float rd_fp16(const u8* p) { return fp16_to_fp32((u16)(p[0] | (p[1] << 8))); }
QM_DEV void wr_fp16(u8* p, u16 h) {
    p[0] = (u8)(h & 0xFF);
    p[1] = (u8)(h >> 8);
}

// ------------------------------------------------------------------------------------------------
// group solvers
// ------------------------------------------------------------------------------------------------

// One candidate's levels l = MAX(0, MIN(NMAX, nearest_int(isc*(x - mn)))) as floats. FAST: |isc*(x-mn)| < 2^22.
template <int N, int NMAX, bool FAST>
QM_DEV void qkx_levels(const float* x, float isc, float mn, float* lf) {
    QM_UNROLL
    for (int i = 0; i < N; ++i) {
        if (FAST) {  // finite here, where fminf/fmaxf are C's comparisons (one instruction each)
            float v = rint_small(isc * (x[i] - mn));
            lf[i] = fminf(fmaxf(v, 0.f), (float)NMAX);
        } else {
            int l = nearest_int(isc * (x[i] - mn));
            l = l > NMAX ? NMAX : l;
            l = l < 0 ? 0 : l;
            lf[i] = (float)l;
        }
    }
}

template <int N, int NMAX>
QM_DEV void qkx_levels_any(const float* x, float isc, float mn, float xmax_abs, float* lf) {
    float bound = fabsf(isc) * (xmax_abs + fabsf(mn));  // >= every |isc*(x - mn)| (rounding is monotone)
    if (bound < 4.0e6f) {
        qkx_levels<N, NMAX, true>(x, isc, mn, lf);
    } else {
        qkx_levels<N, NMAX, false>(x, isc, mn, lf);
    }
}

// make_qkx2_quants / make_qkx3_quants with explicit weights (identical for finite x). Returns the scale;
// *the_min = -min; L (0..NMAX) written to Lout.
template <int N, int NMAX, bool MAD>
QM_DEV float make_qkx(const float* x, const float* w, float rmin, float rdelta, int nstep, float* the_min, u8* Lout) {
    float mn = x[0], mx = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    float xmax_abs = fabsf(x[0]);
    QM_UNROLL
    for (int i = 1; i < N; ++i) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
        float ax = fabsf(x[i]);
        xmax_abs = ax > xmax_abs ? ax : xmax_abs;
    }
    if (mn > 0) mn = 0;
    if (mx <= mn) {
        for (int i = 0; i < N; ++i) Lout[i] = 0;
        *the_min = -mn;
        return 0.f;
    }
    float lf[N];
    float iscale = (float)NMAX / (mx - mn);
    float scale = 1.f / iscale;
    qkx_levels_any<N, NMAX>(x, iscale, mn, xmax_abs, lf);
    float best_mad = 0;
    QM_UNROLL
    for (int i = 0; i < N; ++i) {
        float diff = scale * lf[i] + mn - x[i];
        diff = MAD ? fabsf(diff) : diff * diff;
        best_mad += w[i] * diff;
    }
    float best_isc = iscale, best_off = mn;
    for (int is = 0; is <= nstep; ++is) {
        float c = rdelta * (float)is;
        c = rmin + c;
        c = c + (float)NMAX;
        iscale = c / (mx - mn);
        qkx_levels_any<N, NMAX>(x, iscale, mn, xmax_abs, lf);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        QM_UNROLL
        for (int i = 0; i < N; ++i) {
            float wl = w[i] * lf[i];
            sum_l += wl;
            sum_l2 += wl * lf[i];
            sum_xl += wl * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            QM_UNROLL
            for (int i = 0; i < N; ++i) {
                float diff = this_scale * lf[i] + this_min - x[i];
                diff = MAD ? fabsf(diff) : diff * diff;
                mad += w[i] * diff;
            }
            bool better = mad < best_mad;
            best_mad = better ? mad : best_mad;
            scale = better ? this_scale : scale;
            best_isc = better ? iscale : best_isc;
            best_off = better ? mn : best_off;
            mn = better ? this_min : mn;
        }
    }
    qkx_levels_any<N, NMAX>(x, best_isc, best_off, xmax_abs, lf);
    for (int i = 0; i < N; ++i) Lout[i] = (u8)lf[i];
    *the_min = -mn;
    return scale;
}

// make_qx_quants(rmse_type 1, weights w) on finite x (first level of Q3_K and Q6_K). L = NMAX + level.
template <int N, int NMAX>
QM_DEV float make_qx_fast(const float* x, const float* w, u8* Lout) {
    float mx = 0, amax = 0;
    QM_UNROLL
    for (int i = 0; i < N; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            mx = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < N; ++i) Lout[i] = 0;
        return 0.f;
    }
    float wx[N];
    QM_UNROLL
    for (int i = 0; i < N; ++i) wx[i] = w[i] * x[i];
    // |iscale * x| <= NMAX + 0.9 here: rint_small is nearest_int
    float iscale = (float)(-NMAX) / mx;
    float sumlx = 0, suml2 = 0;
    QM_UNROLL
    for (int i = 0; i < N; ++i) {
        float l = fmaxf(fminf(rint_small(iscale * x[i]), (float)(NMAX - 1)), (float)(-NMAX));
        sumlx += wx[i] * l;
        suml2 += (w[i] * l) * l;
    }
    float scale = suml2 != 0.f ? sumlx / suml2 : 0.f;
    float best = scale * sumlx;
    float best_isc = iscale;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        float c = 0.1f * (float)is;
        c = (float)NMAX + c;
        iscale = -c / mx;
        sumlx = 0;
        suml2 = 0;
        QM_UNROLL
        for (int i = 0; i < N; ++i) {
            float l = fmaxf(fminf(rint_small(iscale * x[i]), (float)(NMAX - 1)), (float)(-NMAX));
            sumlx += wx[i] * l;
            suml2 += (w[i] * l) * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            scale = sumlx / suml2;
            best = scale * sumlx;
            best_isc = iscale;
        }
    }
    for (int i = 0; i < N; ++i) {
        int l = nearest_int(best_isc * x[i]);
        l = l > NMAX - 1 ? NMAX - 1 : l;
        l = l < -NMAX ? -NMAX : l;
        Lout[i] = (u8)(NMAX + l);
    }
    return scale;
}

// make_qx_quants(rmse_type 1, weights w), any input (NaN/inf too): the second level of Q3_K.
template <int N, int NMAX>
QM_DEV float make_qx_exact(const float* x, const float* w, signed char* L) {
    float mx = 0, amax = 0;
    for (int i = 0; i < N; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            mx = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < N; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = (float)(-NMAX) / mx;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < N; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < NMAX - 1 ? l : NMAX - 1;
        l = l > -NMAX ? l : -NMAX;
        L[i] = (signed char)(l + NMAX);
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    float scale = suml2 != 0.f ? sumlx / suml2 : 0.f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        float c = 0.1f * (float)is;
        c = (float)NMAX + c;
        iscale = -c / mx;
        sumlx = 0;
        suml2 = 0;
        for (int i = 0; i < N; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = l < NMAX - 1 ? l : NMAX - 1;
            l = l > -NMAX ? l : -NMAX;
            sumlx += w[i] * x[i] * (float)l;
            suml2 += w[i] * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < N; ++i) {
                int l = nearest_int(iscale * x[i]);
                l = l < NMAX - 1 ? l : NMAX - 1;
                l = l > -NMAX ? l : -NMAX;
                L[i] = (signed char)(NMAX + l);
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

// make_q3_quants(do_rmse = true): Q3_K without an imatrix. L = NMAX + level (0 for an all-zero group).
template <int N, int NMAX>
QM_DEV float make_q3(const float* x, u8* Lout) {
    float mx = 0, amax = 0;
    for (int i = 0; i < N; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            mx = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < N; ++i) Lout[i] = 0;
        return 0.f;
    }
    int L[N];
    float iscale = (float)(-NMAX) / mx;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < N; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < NMAX - 1 ? l : NMAX - 1;
        l = l > -NMAX ? l : -NMAX;
        L[i] = l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < N; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)L[i] * (float)L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = new_l < NMAX - 1 ? new_l : NMAX - 1;
                new_l = new_l > -NMAX ? new_l : -NMAX;
                if (new_l != L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < N; ++i) Lout[i] = (u8)(L[i] + NMAX);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// make_qp_quants: the super-block scales of the imatrix paths (L in uint8_t, as C stores it).
template <int N>
QM_DEV float make_qp(int nmax, const float* x, u8* L, const float* qw) {
    float mx = 0;
    for (int i = 0; i < N; ++i) mx = mx > x[i] ? mx : x[i];
    if (mx < GROUP_MAX_EPS) {
        for (int i = 0; i < N; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = (float)nmax / mx;
    for (int i = 0; i < N; ++i) L[i] = (u8)nearest_int(iscale * x[i]);
    float scale = 1.f / iscale;
    float best_mse = 0;
    for (int i = 0; i < N; ++i) {
        float diff = x[i] - scale * (float)L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float c = 0.1f * (float)is;
        c = c + (float)nmax;
        float iscale_is = c / mx;
        float scale_is = 1.f / iscale_is;
        float mse = 0;
        for (int i = 0; i < N; ++i) {
            int l = nearest_int(iscale_is * x[i]);
            l = l < nmax ? l : nmax;
            float diff = x[i] - scale_is * (float)l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < N; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (u8)l;
        sumlx += qw[i] * x[i] * (float)l;
        suml2 += qw[i] * (float)l * (float)l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < N; ++i) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * (float)L[i];
            float sl2 = suml2 - w * (float)L[i] * (float)L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = new_l < nmax ? new_l : nmax;
                if (new_l != (int)L[i]) {
                    slx += w * x[i] * (float)new_l;
                    sl2 += w * (float)new_l * (float)new_l;
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
// per-type search (one sub-block) and finish (one super-block)
// ------------------------------------------------------------------------------------------------
struct Args {
    const float* x;       // [nsub * SUB] weights of this launch (whole rows)
    const float* qw;      // imatrix [n_per_row] (imatrix paths and error weights), else unused
    const float* act;     // act_mean [n_per_row] (error mode with bias), else unused
    float* sumx2;         // per super-block sum of x^2 (imatrix paths of Q2_K..Q5_K)
    float* s_scale;       // per sub-block scale
    float* s_min;         // per sub-block min (the_min) or unused
    float* s_sw;          // per sub-block weight sum (imatrix paths)
    u8* L;                // per weight levels
    u8* out;              // block bytes (bytes mode)
    double* err;          // per super-block sum w e^2 (error mode)
    double* ref;          // per super-block sum w x^2
    double* bias;         // per super-block sum a e
    int sb_per_row;       // super-blocks per row
    int has_qw;           // error mode: weight errors by qw
    int has_act;          // error mode: compute bias
};

template <int SUB>
QM_DEV void load_vec(const float* p, float* v) {
#ifdef QM_CUDA  // 16-byte loads (the driver passes 16-byte aligned buffers)
    QM_UNROLL
    for (int i = 0; i < SUB; i += 4) {
        float4 q = *(const float4*)(p + i);
        v[i] = q.x;
        v[i + 1] = q.y;
        v[i + 2] = q.z;
        v[i + 3] = q.w;
    }
#else
    for (int i = 0; i < SUB; ++i) v[i] = p[i];
#endif
}

template <int SUB>
QM_DEV void load_sub(const Args& a, i64 sub, float* x, float* qw, bool need_qw) {
    load_vec<SUB>(a.x + sub * SUB, x);
    if (need_qw) {
        const int sub_per_row = a.sb_per_row * (QK_K / SUB);
        load_vec<SUB>(a.qw + (i64)(sub % sub_per_row) * SUB, qw);
    }
}

QM_DEV void store_L(const Args& a, i64 base, const u8* L, int n) {
    for (int i = 0; i < n; ++i) a.L[base + i] = L[i];
}

// sum of x^2 over one super-block, in loop order
QM_DEV void sb_sumx2(const Args& a, i64 sb) {
    const float* xp = a.x + sb * QK_K;
    float s = 0;
    for (int j = 0; j < QK_K; ++j) s += xp[j] * xp[j];
    a.sumx2[sb] = s;
}

// Q2_K: 16 groups of 16, levels 0..3
template <bool IMAT>
QM_DEV void search_q2k(const Args& a, i64 sub) {
    float x[16], qw[16], w[16];
    u8 L[16];
    load_sub<16>(a, sub, x, qw, IMAT);
    float the_min, scale;
    if (IMAT) {
        float sigma2 = a.sumx2[sub / 16] / (float)QK_K;
        float sw = 0;
        QM_UNROLL
        for (int l = 0; l < 16; ++l) {
            w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
        }
        for (int l = 0; l < 16; ++l) sw += w[l];
        a.s_sw[sub] = sw;
        scale = make_qkx<16, 3, false>(x, w, -0.9f, 0.05f, 36, &the_min, L);
    } else {
        QM_UNROLL
        for (int l = 0; l < 16; ++l) w[l] = fabsf(x[l]);
        scale = make_qkx<16, 3, true>(x, w, -0.5f, 0.1f, 15, &the_min, L);
    }
    a.s_scale[sub] = scale;
    a.s_min[sub] = the_min;
    store_L(a, sub * 16, L, 16);
}

template <bool IMAT>
QM_DEV void build_q2k(const Args& a, i64 sb, const float* x, u8* L, u8* y) {
    // y: scales[16] qs[64] d[2] dmin[2]
    float scales[16], mins[16];
    for (int j = 0; j < 16; ++j) {
        scales[j] = a.s_scale[sb * 16 + j];
        mins[j] = a.s_min[sb * 16 + j];
    }
    u8* sc = y;
    if (IMAT) {
        float sw[16];
        u8 Ls[16], Lm[16];
        for (int j = 0; j < 16; ++j) sw[j] = a.s_sw[sb * 16 + j];
        float dm = make_qp<16>(15, scales, Ls, sw);
        float mm = make_qp<16>(15, mins, Lm, sw);
        wr_fp16(y + 80, fp32_to_fp16(dm));
        wr_fp16(y + 82, fp32_to_fp16(mm));
        for (int j = 0; j < 16; ++j) sc[j] = (u8)(Ls[j] | (Lm[j] << 4));
    } else {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 16; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) sc[j] = (u8)nearest_int(iscale * scales[j]);
            wr_fp16(y + 80, fp32_to_fp16(max_scale / 15.f));
        } else {
            for (int j = 0; j < 16; ++j) sc[j] = 0;
            wr_fp16(y + 80, fp32_to_fp16(0.f));
        }
        if (max_min > 0) {
            float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) {
                int l = nearest_int(iscale * mins[j]);
                sc[j] = (u8)(sc[j] | (l << 4));
            }
            wr_fp16(y + 82, fp32_to_fp16(max_min / 15.f));
        } else {
            wr_fp16(y + 82, fp32_to_fp16(0.f));
        }
    }
    float dm = rd_fp16(y + 80), mm = rd_fp16(y + 82);
    for (int j = 0; j < 16; ++j) {
        const float d = dm * (float)(sc[j] & 0xF);
        if (!(d != 0.f)) continue;
        const float m = mm * (float)(sc[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int((x[16 * j + ii] + m) / d);
            l = l < 3 ? l : 3;
            l = l > 0 ? l : 0;
            L[16 * j + ii] = (u8)l;
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            y[16 + j / 4 + l] = (u8)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

QM_DEV void deq_q2k(const u8* b, float* yv) {
    const float d = rd_fp16(b + 80), mn = rd_fp16(b + 82);
    const u8* q = b + 16;
    int is = 0;
    float* y = yv;
    for (int n = 0; n < QK_K; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            u8 sc = b[is++];
            float dl = d * (float)(sc & 0xF), ml = mn * (float)(sc >> 4);
            for (int l = 0; l < 16; ++l) *y++ = dl * (float)((q[l] >> shift) & 3) - ml;
            sc = b[is++];
            dl = d * (float)(sc & 0xF);
            ml = mn * (float)(sc >> 4);
            for (int l = 0; l < 16; ++l) *y++ = dl * (float)((q[l + 16] >> shift) & 3) - ml;
            shift += 2;
        }
        q += 32;
    }
}

// Q3_K: 16 groups of 16, signed levels -4..3, 6-bit signed group scales
template <bool IMAT>
QM_DEV void search_q3k(const Args& a, i64 sub) {
    float x[16], qw[16], w[16];
    u8 L[16];
    load_sub<16>(a, sub, x, qw, IMAT);
    float scale;
    if (IMAT) {
        float sigma2 = (2.f * a.sumx2[sub / 16]) / (float)QK_K;
        QM_UNROLL
        for (int l = 0; l < 16; ++l) w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
        float sumw = 0;
        for (int l = 0; l < 16; ++l) sumw += w[l];
        a.s_sw[sub] = sumw;
        scale = make_qx_fast<16, 4>(x, w, L);
    } else {
        scale = make_q3<16, 4>(x, L);
    }
    a.s_scale[sub] = scale;
    store_L(a, sub * 16, L, 16);
}

QM_DEV void pack_q3_scale(u8* s, int j, int l) {
    if (j < 8) {
        s[j] = (u8)(l & 0xF);
    } else {
        s[j - 8] = (u8)(s[j - 8] | ((l & 0xF) << 4));
    }
    l >>= 4;
    s[j % 4 + 8] = (u8)(s[j % 4 + 8] | (l << (2 * (j / 4))));
}

template <bool IMAT>
QM_DEV void build_q3k(const Args& a, i64 sb, const float* x, u8* L, u8* y) {
    // y: hmask[32] qs[64] scales[12] d[2]
    float scales[16];
    for (int j = 0; j < 16; ++j) scales[j] = a.s_scale[sb * 16 + j];
    u8* s = y + 96;
    for (int j = 0; j < 12; ++j) s[j] = 0;
    if (IMAT) {
        float sw[16];
        signed char Ls[16];
        for (int j = 0; j < 16; ++j) sw[j] = a.s_sw[sb * 16 + j];
        float d_block = make_qx_exact<16, 32>(scales, sw, Ls);
        for (int j = 0; j < 16; ++j) pack_q3_scale(s, j, (int)Ls[j]);
        wr_fp16(y + 108, fp32_to_fp16(d_block));
    } else {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            float sc = fabsf(scales[j]);
            if (sc > amax) {
                amax = sc;
                max_scale = scales[j];
            }
        }
        if (max_scale != 0.f) {
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                int l = (signed char)nearest_int(iscale * scales[j]);
                l = l < 31 ? l : 31;
                l = l > -32 ? l : -32;
                l = (signed char)(l + 32);
                pack_q3_scale(s, j, l);
            }
            wr_fp16(y + 108, fp32_to_fp16(1.f / iscale));
        } else {
            wr_fp16(y + 108, fp32_to_fp16(0.f));
        }
    }
    const float dall = rd_fp16(y + 108);
    for (int j = 0; j < 16; ++j) {
        int sc = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
        sc = (signed char)((sc | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        float d = dall * (float)sc;
        if (!(d != 0.f)) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = l < 3 ? l : 3;
            l = l > -4 ? l : -4;
            L[16 * j + ii] = (u8)(l + 4);
        }
    }
    u8* hmask = y;
    for (int j = 0; j < 32; ++j) hmask[j] = 0;
    int m = 0;
    u8 hm = 1;
    for (int j = 0; j < QK_K; ++j) {
        if (L[j] > 3) {
            hmask[m] = (u8)(hmask[m] | hm);
            L[j] = (u8)(L[j] - 4);
        }
        if (++m == QK_K / 8) {
            m = 0;
            hm = (u8)(hm << 1);
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            y[32 + j / 4 + l] = (u8)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

QM_DEV void deq_q3k(const u8* b, float* yv) {
    const u8* hm = b;
    const u8* q = b + 32;
    const u8* sb = b + 96;
    const float d_all = rd_fp16(b + 108);
    // the 16 six-bit scales, as dequantize_row_q3_K unpacks them
    int scales[16];
    for (int j = 0; j < 16; ++j) {
        int lo = j < 8 ? (sb[j] & 0xF) : (sb[j - 8] >> 4);
        int hi = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
        scales[j] = (signed char)(lo | (hi << 4));
    }
    int is = 0;
    u8 mm = 1;
    float* y = yv;
    for (int n = 0; n < QK_K; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            float dl = d_all * (float)(scales[is++] - 32);
            for (int l = 0; l < 16; ++l) *y++ = dl * (float)((int)((q[l] >> shift) & 3) - ((hm[l] & mm) ? 0 : 4));
            dl = d_all * (float)(scales[is++] - 32);
            for (int l = 0; l < 16; ++l) *y++ = dl * (float)((int)((q[l + 16] >> shift) & 3) - ((hm[l + 16] & mm) ? 0 : 4));
            shift += 2;
            mm = (u8)(mm << 1);
        }
        q += 32;
    }
}

// Q4_K / Q5_K: 8 groups of 32 with 6-bit scales and mins
template <int NMAX, bool IMAT>
QM_DEV void search_q45k(const Args& a, i64 sub) {
    float x[32], qw[32], w[32];
    u8 L[32];
    load_sub<32>(a, sub, x, qw, IMAT);
    float the_min, scale;
    if (IMAT) {
        float sigma2 = (2.f * a.sumx2[sub / 8]) / (float)QK_K;
        QM_UNROLL
        for (int l = 0; l < 32; ++l) w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
        float sumw = 0;
        QM_UNROLL
        for (int l = 0; l < 32; ++l) sumw += w[l];
        a.s_sw[sub] = sumw;
        scale = make_qkx<32, NMAX, false>(x, w, -0.9f, 0.05f, 36, &the_min, L);
    } else {
        float sum_x2 = 0;
        QM_UNROLL
        for (int l = 0; l < 32; ++l) sum_x2 += x[l] * x[l];
        float av_x = sqrtf(sum_x2 / 32.f);
        QM_UNROLL
        for (int l = 0; l < 32; ++l) w[l] = av_x + fabsf(x[l]);
        if (NMAX == 15) {
            scale = make_qkx<32, NMAX, false>(x, w, -1.f, 0.1f, 20, &the_min, L);
        } else {
            scale = make_qkx<32, NMAX, false>(x, w, -0.5f, 0.1f, 15, &the_min, L);
        }
    }
    a.s_scale[sub] = scale;
    a.s_min[sub] = the_min;
    store_L(a, sub * 32, L, 32);
}

QM_DEV void get_scale_min_k4(int j, const u8* q, u8* d, u8* m) {
    if (j < 4) {
        *d = (u8)(q[j] & 63);
        *m = (u8)(q[j + 4] & 63);
    } else {
        *d = (u8)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (u8)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

template <int NMAX, bool IMAT>
QM_DEV void build_q45k(const Args& a, i64 sb, const float* x, u8* L, u8* y) {
    // y: d[2] dmin[2] scales[12] (Q5_K: qh[32]) qs[128]
    float scales[8], mins[8];
    u8 ls8[8], lm8[8];
    for (int j = 0; j < 8; ++j) {
        scales[j] = a.s_scale[sb * 8 + j];
        mins[j] = a.s_min[sb * 8 + j];
    }
    float d_block, m_block;
    if (IMAT) {
        float sw[8];
        for (int j = 0; j < 8; ++j) sw[j] = a.s_sw[sb * 8 + j];
        d_block = make_qp<8>(63, scales, ls8, sw);
        m_block = make_qp<8>(63, mins, lm8, sw);
        if (NMAX == 31) {
            for (int j = 0; j < 8; ++j) {
                ls8[j] = ls8[j] < 63 ? ls8[j] : 63;
                lm8[j] = lm8[j] < 63 ? lm8[j] : 63;
            }
        }
    } else {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            u8 ls = (u8)nearest_int(inv_scale * scales[j]);
            u8 lm = (u8)nearest_int(inv_min * mins[j]);
            ls8[j] = ls < 63 ? ls : 63;
            lm8[j] = lm < 63 ? lm : 63;
        }
        d_block = max_scale / 63.f;
        m_block = max_min / 63.f;
    }
    u8* s = y + 4;
    for (int j = 0; j < 8; ++j) {
        u8 ls = ls8[j], lm = lm8[j];
        if (j < 4) {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (u8)((ls & 0xF) | ((lm & 0xF) << 4));
            s[j - 4] = (u8)(s[j - 4] | ((ls >> 4) << 6));
            s[j - 0] = (u8)(s[j - 0] | ((lm >> 4) << 6));
        }
    }
    wr_fp16(y, fp32_to_fp16(d_block));
    wr_fp16(y + 2, fp32_to_fp16(m_block));
    const float dd = rd_fp16(y), dmn = rd_fp16(y + 2);
    for (int j = 0; j < 8; ++j) {
        u8 sc, m;
        get_scale_min_k4(j, s, &sc, &m);
        const float d = dd * (float)sc;
        if (!(d != 0.f)) continue;
        const float dm = dmn * (float)m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            l = l < NMAX ? l : NMAX;
            l = l > 0 ? l : 0;
            L[32 * j + ii] = (u8)l;
        }
    }
    if (NMAX == 15) {
        u8* q = y + 16;
        for (int j = 0; j < QK_K; j += 64) {
            for (int l = 0; l < 32; ++l) q[l] = (u8)(L[j + l] | (L[j + l + 32] << 4));
            q += 32;
        }
    } else {
        u8* qh = y + 16;
        u8* ql = y + 48;
        for (int j = 0; j < 32; ++j) qh[j] = 0;
        u8 m1 = 1, m2 = 2;
        for (int n = 0; n < QK_K; n += 64) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n + j];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] = (u8)(qh[j] | m1);
                }
                int l2 = L[n + j + 32];
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] = (u8)(qh[j] | m2);
                }
                ql[j] = (u8)(l1 | (l2 << 4));
            }
            m1 = (u8)(m1 << 2);
            m2 = (u8)(m2 << 2);
            ql += 32;
        }
    }
}

template <int NMAX>
QM_DEV void deq_q45k(const u8* b, float* yv) {
    const float d = rd_fp16(b), mn = rd_fp16(b + 2);
    const u8* s = b + 4;
    const u8* qh = b + 16;
    const u8* q = NMAX == 15 ? b + 16 : b + 48;
    int is = 0;
    u8 sc, m;
    u8 u1 = 1, u2 = 2;
    float* y = yv;
    for (int j = 0; j < QK_K; j += 64) {
        get_scale_min_k4(is + 0, s, &sc, &m);
        const float d1 = d * (float)sc, m1 = mn * (float)m;
        get_scale_min_k4(is + 1, s, &sc, &m);
        const float d2 = d * (float)sc, m2 = mn * (float)m;
        if (NMAX == 15) {
            for (int l = 0; l < 32; ++l) *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (float)(q[l] >> 4) - m2;
        } else {
            for (int l = 0; l < 32; ++l) *y++ = d1 * (float)((q[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (float)((q[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
            u1 = (u8)(u1 << 2);
            u2 = (u8)(u2 << 2);
        }
        q += 32;
        is += 2;
    }
}

// Q6_K: 16 groups of 16, levels -32..31, int8 group scales
template <bool IMAT>
QM_DEV void search_q6k(const Args& a, i64 sub) {
    float x[16], qw[16], w[16];
    u8 L[16];
    load_sub<16>(a, sub, x, qw, IMAT);
    QM_UNROLL
    for (int l = 0; l < 16; ++l) w[l] = IMAT ? qw[l] : x[l] * x[l];
    a.s_scale[sub] = make_qx_fast<16, 32>(x, w, L);
    store_L(a, sub * 16, L, 16);
}

template <bool IMAT>
QM_DEV void build_q6k(const Args& a, i64 sb, const float* x, u8* L, u8* y) {
    // y: ql[128] qh[64] scales[16] (int8) d[2]
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int j = 0; j < 16; ++j) {
        scales[j] = a.s_scale[sb * 16 + j];
        float as = fabsf(scales[j]);
        if (as > max_abs_scale) {
            max_abs_scale = as;
            max_scale = scales[j];
        }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
        for (int i = 0; i < 210; ++i) y[i] = 0;
        return;
    }
    float iscale = -128.f / max_scale;
    wr_fp16(y + 208, fp32_to_fp16(1.f / iscale));
    signed char* sc = (signed char*)(y + 192);
    for (int j = 0; j < 16; ++j) {
        int l = nearest_int(iscale * scales[j]);
        sc[j] = (signed char)(l < 127 ? l : 127);
    }
    const float dd = rd_fp16(y + 208);
    for (int j = 0; j < 16; ++j) {
        float d = dd * (float)sc[j];
        if (!(d != 0.f)) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = l < 31 ? l : 31;
            l = l > -32 ? l : -32;
            L[16 * j + ii] = (u8)(l + 32);
        }
    }
    u8* ql = y;
    u8* qh = y + 128;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const u8 q1 = L[j + l + 0] & 0xF;
            const u8 q2 = L[j + l + 32] & 0xF;
            const u8 q3 = L[j + l + 64] & 0xF;
            const u8 q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (u8)(q1 | (q3 << 4));
            ql[l + 32] = (u8)(q2 | (q4 << 4));
            qh[l] = (u8)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                         ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

QM_DEV void deq_q6k(const u8* b, float* yv) {
    const float d = rd_fp16(b + 208);
    const u8* ql = b;
    const u8* qh = b + 128;
    const signed char* sc = (const signed char*)(b + 192);
    float* y = yv;
    for (int n = 0; n < QK_K; n += 128) {
        for (int l = 0; l < 32; ++l) {
            int is = l / 16;
            const int q1 = (signed char)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = (signed char)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = (signed char)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = (signed char)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l + 0] = d * (float)sc[is + 0] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// finish one super-block: build the block bytes (x and L read and L rewritten in place in global memory,
// which keeps the thread's local memory to the block itself), then store them or accumulate the errors
template <typename T>
QM_DEV void finish_sb(const Args& a, i64 sb, int mode) {
    enum { TS = T::TS };
    u8 y[TS];
    const float* xp = a.x + sb * QK_K;
    T::build(a, sb, xp, a.L + sb * QK_K, y);
    if (mode == 0) {
        u8* op = a.out + sb * TS;
        for (int i = 0; i < TS; ++i) op[i] = y[i];
        return;
    }
    float yv[QK_K];
    T::deq(y, yv);
    const i64 col0 = (i64)(sb % a.sb_per_row) * QK_K;
    double se = 0, sx = 0, sa = 0;
    for (int i = 0; i < QK_K; ++i) {
        double xi = (double)xp[i];
        double e = (double)yv[i] - xi;
        double wi = a.has_qw ? (double)a.qw[col0 + i] : 1.0;
        se += wi * e * e;
        sx += wi * xi * xi;
        if (a.has_act) sa += (double)a.act[col0 + i] * e;
    }
    a.err[sb] = se;
    a.ref[sb] = sx;
    if (a.has_act) a.bias[sb] = sa;
}

// ------------------------------------------------------------------------------------------------
// entry points: CUDA kernels, or host loops over the same bodies (the CPU check of this arithmetic)
// ------------------------------------------------------------------------------------------------
#define QM_TYPE(NAME, TSZ, SEARCH, BUILD, DEQ)                                                          \
    struct NAME {                                                                                        \
        enum { TS = TSZ };                                                                               \
        static QM_MEMBER void search(const Args& a, i64 i) { SEARCH(a, i); }                            \
        static QM_MEMBER void build(const Args& a, i64 sb, const float* x, u8* L, u8* y) { BUILD(a, sb, x, L, y); } \
        static QM_MEMBER void deq(const u8* b, float* y) { DEQ(b, y); }                                  \
    };

QM_TYPE(T_q2k_ref, 84, search_q2k<false>, build_q2k<false>, deq_q2k)
QM_TYPE(T_q2k_imat, 84, search_q2k<true>, build_q2k<true>, deq_q2k)
QM_TYPE(T_q3k_ref, 110, search_q3k<false>, build_q3k<false>, deq_q3k)
QM_TYPE(T_q3k_imat, 110, search_q3k<true>, build_q3k<true>, deq_q3k)
#define QM_S4R search_q45k<15, false>
#define QM_S4I search_q45k<15, true>
#define QM_S5R search_q45k<31, false>
#define QM_S5I search_q45k<31, true>
#define QM_B4R build_q45k<15, false>
#define QM_B4I build_q45k<15, true>
#define QM_B5R build_q45k<31, false>
#define QM_B5I build_q45k<31, true>
QM_TYPE(T_q4k_ref, 144, QM_S4R, QM_B4R, deq_q45k<15>)
QM_TYPE(T_q4k_imat, 144, QM_S4I, QM_B4I, deq_q45k<15>)
QM_TYPE(T_q5k_ref, 176, QM_S5R, QM_B5R, deq_q45k<31>)
QM_TYPE(T_q5k_imat, 176, QM_S5I, QM_B5I, deq_q45k<31>)
QM_TYPE(T_q6k_ref, 210, search_q6k<false>, build_q6k<false>, deq_q6k)
QM_TYPE(T_q6k_imat, 210, search_q6k<true>, build_q6k<true>, deq_q6k)

#define QM_FOR_TYPES(X) \
    X(q2k_ref) X(q2k_imat) X(q3k_ref) X(q3k_imat) X(q4k_ref) X(q4k_imat) X(q5k_ref) X(q5k_imat) X(q6k_ref) X(q6k_imat)

#ifdef QM_CUDA

#ifndef QM_SEARCH_THREADS
#define QM_SEARCH_THREADS 128
#endif

#define QM_KERNELS(NAME)                                                                                \
    QM_GLOBAL void __launch_bounds__(QM_SEARCH_THREADS) qm_search_##NAME(const Args* ap, int n) {       \
        i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;                                              \
        if (i < n) T_##NAME::search(*ap, i);                                                             \
    }                                                                                                    \
    QM_GLOBAL void __launch_bounds__(64) qm_finish_##NAME(const Args* ap, int n, int mode) {            \
        i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;                                              \
        if (i < n) finish_sb<T_##NAME>(*ap, i, mode);                                                    \
    }
#ifdef QM_ONLY  // one type and path per NVRTC program: smaller programs, compiled in parallel
#define QM_KERNELS_EXPANDED(NAME) QM_KERNELS(NAME)
QM_KERNELS_EXPANDED(QM_ONLY)
#else
QM_FOR_TYPES(QM_KERNELS)
#endif

QM_GLOBAL void qm_sumx2(const Args* ap, int n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) sb_sumx2(*ap, i);
}

#else

#define QM_HOST(NAME)                                                                                   \
    extern "C" void qm_search_##NAME(const Args* ap, int n) {                                           \
        for (i64 i = 0; i < n; ++i) T_##NAME::search(*ap, i);                                            \
    }                                                                                                    \
    extern "C" void qm_finish_##NAME(const Args* ap, int n, int mode) {                                 \
        for (i64 i = 0; i < n; ++i) finish_sb<T_##NAME>(*ap, i, mode);                                   \
    }
QM_FOR_TYPES(QM_HOST)

extern "C" void qm_sumx2(const Args* ap, int n) {
    for (i64 i = 0; i < n; ++i) sb_sumx2(*ap, i);
}

#endif
