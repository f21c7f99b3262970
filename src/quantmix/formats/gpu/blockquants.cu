// quantmix block-quant kernels, byte-exact with ggml-quants.c: the k-quants (Q2_K .. Q6_K), the 32-weight
// block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4) and IQ4_XS. (The codebook types are iqgrids.cu.)
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
// Work split (one fused kernel per type and path, in phases separated by barriers):
//   search: one thread per sub-block (16 or 32 weights): the per-group scale search of the type
//           (make_qkx2/3_quants, make_qx_quants, make_q3_quants, iq4_nl's 15 tries). Writes the group's
//           scale, min and weight sum, and its quant levels L (one byte per weight) to shared memory.
//   finish: one thread per super-block (256 weights; for the 32-weight types the block itself, SBW = 32):
//           the super-block scales (make_qp_quants, ...),
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

#ifndef QM_RINT  // 1: rintf (one instruction); 0: two additions of 1.5*2^23. Both are nearest_int here.
#define QM_RINT 1
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
// the fused kernel: one block of TPB threads = TPB consecutive groups (sub-blocks) = TPB/G super-blocks
// ------------------------------------------------------------------------------------------------
#define TPB 128

struct Args {
    const float* x;       // [nsub * SUB] weights of this launch (whole rows)
    const float* qw;      // imatrix [n_per_row] (quantizer weights and error weights), else unused
    const float* act;     // act_mean [n_per_row] (error mode with bias), else unused
    u8* out;              // block bytes (bytes mode)
    double* err;          // per super-block sum w e^2 (error mode)
    double* ref;          // per super-block sum w x^2
    double* bias;         // per super-block sum a e
    float* rowx2;         // per row sequential sum of x^2 (qm_kq_rowsq writes it; Q4_0..Q5_1 with an imatrix)
    int sb_per_row;       // super-blocks per row (a super-block: SBW weights, 256 or 32)
    int n_per_row;        // weights per row
    int has_qw;           // imatrix given (quantizer and error weights)
    int has_act;          // error mode: compute the bias
};

template <int SUB, int SBW_ = QK_K>
struct Smem {
    enum { SBW = SBW_, G = SBW_ / SUB, NSB = TPB / (SBW_ / SUB) };
    float x[TPB][SUB + 1];  // +1: conflict-free column access by the group threads
    u8 L[NSB][SBW_];        // levels, super-block element order
    float scale[TPB], mn[TPB], sw[TPB];
    float deff[TPB], meff[TPB];  // the dequantizer's per-group factors (also those of the requantization)
    float sumx2[NSB];
    u8 hdr[NSB][32];        // per type: scale bytes, fp16 d / dmin, flags
    double e_err[TPB], e_ref[TPB], e_bias[TPB];
};

template <int SUB, int SBW = QK_K>
QM_DEV void load_qw(const Args& a, i64 sub, float* qw) {
    const int sub_per_row = a.sb_per_row * (SBW / SUB);
    const float* p = a.qw + (i64)(sub % sub_per_row) * SUB;
#ifdef QM_CUDA  // 16-byte loads (the driver passes 16-byte aligned buffers)
    QM_UNROLL
    for (int i = 0; i < SUB; i += 4) {
        float4 q = *(const float4*)(p + i);
        qw[i] = q.x;
        qw[i + 1] = q.y;
        qw[i + 2] = q.z;
        qw[i + 3] = q.w;
    }
#else
    for (int i = 0; i < SUB; ++i) qw[i] = p[i];
#endif
}

template <int SUB, int SBW = QK_K>
QM_DEV void group_x(const Smem<SUB, SBW>& sm, int t, float* x) {
    QM_UNROLL
    for (int i = 0; i < SUB; ++i) x[i] = sm.x[t][i];
}

template <int SUB, int SBW = QK_K>
QM_DEV void put_L(Smem<SUB, SBW>& sm, int t, const u8* L) {
    const int G = SBW / SUB;
    u8* p = sm.L[t / G] + SUB * (t % G);
    for (int i = 0; i < SUB; ++i) p[i] = L[i];
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

QM_DEV void get_scale_min_k4(int j, const u8* q, u8* d, u8* m) {
    if (j < 4) {
        *d = (u8)(q[j] & 63);
        *m = (u8)(q[j + 4] & 63);
    } else {
        *d = (u8)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (u8)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

template <int SUB, int SBW>
QM_DEV void load_x_block(Smem<SUB, SBW>& sm, const float* xb, int t, int nloc) {
    for (int e = 4 * t; e < nloc * SUB; e += 4 * TPB) {
#ifdef QM_CUDA
        float4 v = *(const float4*)(xb + e);
        float vv[4] = {v.x, v.y, v.z, v.w};
#else
        const float* vv = xb + e;
#endif
        for (int k = 0; k < 4; ++k) sm.x[(e + k) / SUB][(e + k) % SUB] = vv[k];
    }
}

// Types whose blocks need shared tables filled first (IQ4_NL, IQ4_XS) set INIT and define init(sm, t).
struct NoInit {
    enum { INIT = 0 };
};

// ---- Q2_K: 16 groups of 16, levels 0..3; block: scales[16] qs[64] d dmin -------------------------
template <bool IM>
struct Q2K : NoInit {
    enum { SUB = 16, TS = 84, SUMX2 = IM };
    typedef Smem<16> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[16], qw[16], w[16];
        u8 L[16];
        group_x<16>(sm, t, x);
        float the_min, scale;
        if (IM) {
            load_qw<16>(a, sub, qw);
            float sigma2 = sm.sumx2[t / 16] / (float)QK_K;
            QM_UNROLL
            for (int l = 0; l < 16; ++l) w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
            float sw = 0;
            for (int l = 0; l < 16; ++l) sw += w[l];
            sm.sw[t] = sw;
            scale = make_qkx<16, 3, false>(x, w, -0.9f, 0.05f, 36, &the_min, L);
        } else {
            QM_UNROLL
            for (int l = 0; l < 16; ++l) w[l] = fabsf(x[l]);
            scale = make_qkx<16, 3, true>(x, w, -0.5f, 0.1f, 15, &the_min, L);
        }
        sm.scale[t] = scale;
        sm.mn[t] = the_min;
        put_L<16>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        const int t0 = s * 16;
        u8* h = sm.hdr[s];  // [0..15] scale bytes, [16..19] d, dmin
        u8* sc = h;
        if (IM) {
            u8 Ls[16], Lm[16];
            float dm = make_qp<16>(15, sm.scale + t0, Ls, sm.sw + t0);
            float mm = make_qp<16>(15, sm.mn + t0, Lm, sm.sw + t0);
            wr_fp16(h + 16, fp32_to_fp16(dm));
            wr_fp16(h + 18, fp32_to_fp16(mm));
            for (int j = 0; j < 16; ++j) sc[j] = (u8)(Ls[j] | (Lm[j] << 4));
        } else {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 16; ++j) {
                if (sm.scale[t0 + j] > max_scale) max_scale = sm.scale[t0 + j];
                if (sm.mn[t0 + j] > max_min) max_min = sm.mn[t0 + j];
            }
            if (max_scale > 0) {
                float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; ++j) sc[j] = (u8)nearest_int(iscale * sm.scale[t0 + j]);
                wr_fp16(h + 16, fp32_to_fp16(max_scale / 15.f));
            } else {
                for (int j = 0; j < 16; ++j) sc[j] = 0;
                wr_fp16(h + 16, fp32_to_fp16(0.f));
            }
            if (max_min > 0) {
                float iscale = 15.f / max_min;
                for (int j = 0; j < 16; ++j) sc[j] = (u8)(sc[j] | (nearest_int(iscale * sm.mn[t0 + j]) << 4));
                wr_fp16(h + 18, fp32_to_fp16(max_min / 15.f));
            } else {
                wr_fp16(h + 18, fp32_to_fp16(0.f));
            }
        }
        const float dm = rd_fp16(h + 16), mm = rd_fp16(h + 18);
        for (int j = 0; j < 16; ++j) {
            sm.deff[t0 + j] = dm * (float)(sc[j] & 0xF);
            sm.meff[t0 + j] = mm * (float)(sc[j] >> 4);
        }
    }
    static QM_MEMBER void requant(S& sm, int t) {
        const float d = sm.deff[t], m = sm.meff[t];
        if (!(d != 0.f)) return;
        u8* p = sm.L[t / 16] + 16 * (t % 16);
        for (int i = 0; i < 16; ++i) {
            int l = nearest_int((sm.x[t][i] + m) / d);
            l = l < 3 ? l : 3;
            p[i] = (u8)(l > 0 ? l : 0);
        }
    }
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return sm.deff[t] * (float)sm.L[t / 16][16 * (t % 16) + i] - sm.meff[t];
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        if (k < 16) return sm.hdr[s][k];
        if (k >= 80) return sm.hdr[s][16 + (k - 80)];
        const u8* L = sm.L[s];
        const int q = k - 16, j = 128 * (q / 32), l = q % 32;
        return (u8)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
    }
};

// ---- Q3_K: 16 groups of 16, levels -4..3, 6-bit scales; block: hmask[32] qs[64] scales[12] d ---------
template <bool IM>
struct Q3K : NoInit {
    enum { SUB = 16, TS = 110, SUMX2 = IM };
    typedef Smem<16> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[16], qw[16], w[16];
        u8 L[16];
        group_x<16>(sm, t, x);
        float scale;
        if (IM) {
            load_qw<16>(a, sub, qw);
            float sigma2 = (2.f * sm.sumx2[t / 16]) / (float)QK_K;
            QM_UNROLL
            for (int l = 0; l < 16; ++l) w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
            float sumw = 0;
            for (int l = 0; l < 16; ++l) sumw += w[l];
            sm.sw[t] = sumw;
            scale = make_qx_fast<16, 4>(x, w, L);
        } else {
            scale = make_q3<16, 4>(x, L);
        }
        sm.scale[t] = scale;
        put_L<16>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        const int t0 = s * 16;
        u8* h = sm.hdr[s];  // [0..11] scale bytes, [12..13] d
        for (int j = 0; j < 12; ++j) h[j] = 0;
        if (IM) {
            // finite scales keep |iscale * x| <= 33, where the float path equals the integer one (any weights)
            bool finite = true;
            for (int j = 0; j < 16; ++j) finite = finite && fabsf(sm.scale[t0 + j]) <= 3.4028235e38f;
            signed char Ls[16];
            float d_block = finite ? make_qx_fast<16, 32>(sm.scale + t0, sm.sw + t0, (u8*)Ls)
                                   : make_qx_exact<16, 32>(sm.scale + t0, sm.sw + t0, Ls);
            for (int j = 0; j < 16; ++j) pack_q3_scale(h, j, (int)Ls[j]);
            wr_fp16(h + 12, fp32_to_fp16(d_block));
        } else {
            float max_scale = 0, amax = 0;
            for (int j = 0; j < 16; ++j) {
                float a = fabsf(sm.scale[t0 + j]);
                if (a > amax) {
                    amax = a;
                    max_scale = sm.scale[t0 + j];
                }
            }
            if (max_scale != 0.f) {
                float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; ++j) {
                    int l = (signed char)nearest_int(iscale * sm.scale[t0 + j]);
                    l = l < 31 ? l : 31;
                    l = l > -32 ? l : -32;
                    pack_q3_scale(h, j, (signed char)(l + 32));
                }
                wr_fp16(h + 12, fp32_to_fp16(1.f / iscale));
            } else {
                wr_fp16(h + 12, fp32_to_fp16(0.f));
            }
        }
        const float dall = rd_fp16(h + 12);
        for (int j = 0; j < 16; ++j) {
            int sc = j < 8 ? (h[j] & 0xF) : (h[j - 8] >> 4);
            sc = (signed char)((sc | (((h[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
            sm.deff[t0 + j] = dall * (float)sc;
        }
    }
    static QM_MEMBER void requant(S& sm, int t) {
        const float d = sm.deff[t];
        if (!(d != 0.f)) return;
        u8* p = sm.L[t / 16] + 16 * (t % 16);
        for (int i = 0; i < 16; ++i) {
            int l = nearest_int(sm.x[t][i] / d);
            l = l < 3 ? l : 3;
            p[i] = (u8)((l > -4 ? l : -4) + 4);
        }
    }
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return sm.deff[t] * (float)((int)sm.L[t / 16][16 * (t % 16) + i] - 4);
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        const u8* L = sm.L[s];
        if (k < 32) {  // hmask: bit b of byte m is the high bit of element 32*b + m
            int v = 0;
            for (int b = 0; b < 8; ++b) v |= (L[32 * b + k] > 3) << b;
            return (u8)v;
        }
        if (k < 96) {
            const int q = k - 32, j = 128 * (q / 32), l = q % 32;
            return (u8)((L[j + l] & 3) | ((L[j + l + 32] & 3) << 2) | ((L[j + l + 64] & 3) << 4) | ((L[j + l + 96] & 3) << 6));
        }
        return sm.hdr[s][k - 96];
    }
};

// ---- Q4_K / Q5_K: 8 groups of 32, 6-bit scales and mins; block: d dmin scales[12] (qh[32]) qs[128] ----
template <int NMAX, bool IM>
struct Q45K : NoInit {
    enum { SUB = 32, TS = NMAX == 15 ? 144 : 176, SUMX2 = IM };
    typedef Smem<32> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32], qw[32], w[32];
        u8 L[32];
        group_x<32>(sm, t, x);
        float the_min, scale;
        if (IM) {
            load_qw<32>(a, sub, qw);
            float sigma2 = (2.f * sm.sumx2[t / 8]) / (float)QK_K;
            QM_UNROLL
            for (int l = 0; l < 32; ++l) w[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
            float sumw = 0;
            QM_UNROLL
            for (int l = 0; l < 32; ++l) sumw += w[l];
            sm.sw[t] = sumw;
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
        sm.scale[t] = scale;
        sm.mn[t] = the_min;
        put_L<32>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        const int t0 = s * 8;
        u8* h = sm.hdr[s];  // the block's first 16 bytes: d dmin scales[12]
        u8 ls8[8], lm8[8];
        float d_block, m_block;
        if (IM) {
            d_block = make_qp<8>(63, sm.scale + t0, ls8, sm.sw + t0);
            m_block = make_qp<8>(63, sm.mn + t0, lm8, sm.sw + t0);
            if (NMAX == 31) {
                for (int j = 0; j < 8; ++j) {
                    ls8[j] = ls8[j] < 63 ? ls8[j] : 63;
                    lm8[j] = lm8[j] < 63 ? lm8[j] : 63;
                }
            }
        } else {
            float max_scale = 0, max_min = 0;
            for (int j = 0; j < 8; ++j) {
                if (sm.scale[t0 + j] > max_scale) max_scale = sm.scale[t0 + j];
                if (sm.mn[t0 + j] > max_min) max_min = sm.mn[t0 + j];
            }
            float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
            float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
            for (int j = 0; j < 8; ++j) {
                u8 ls = (u8)nearest_int(inv_scale * sm.scale[t0 + j]);
                u8 lm = (u8)nearest_int(inv_min * sm.mn[t0 + j]);
                ls8[j] = ls < 63 ? ls : 63;
                lm8[j] = lm < 63 ? lm : 63;
            }
            d_block = max_scale / 63.f;
            m_block = max_min / 63.f;
        }
        u8* sc = h + 4;
        for (int j = 0; j < 8; ++j) {
            const u8 ls = ls8[j], lm = lm8[j];
            if (j < 4) {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (u8)((ls & 0xF) | ((lm & 0xF) << 4));
                sc[j - 4] = (u8)(sc[j - 4] | ((ls >> 4) << 6));
                sc[j - 0] = (u8)(sc[j - 0] | ((lm >> 4) << 6));
            }
        }
        wr_fp16(h, fp32_to_fp16(d_block));
        wr_fp16(h + 2, fp32_to_fp16(m_block));
        const float dd = rd_fp16(h), dmn = rd_fp16(h + 2);
        for (int j = 0; j < 8; ++j) {
            u8 a, m;
            get_scale_min_k4(j, sc, &a, &m);
            sm.deff[t0 + j] = dd * (float)a;
            sm.meff[t0 + j] = dmn * (float)m;
        }
    }
    static QM_MEMBER void requant(S& sm, int t) {
        const float d = sm.deff[t], dm = sm.meff[t];
        if (!(d != 0.f)) return;
        u8* p = sm.L[t / 8] + 32 * (t % 8);
        for (int i = 0; i < 32; ++i) {
            int l = nearest_int((sm.x[t][i] + dm) / d);
            l = l < NMAX ? l : NMAX;
            p[i] = (u8)(l > 0 ? l : 0);
        }
    }
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return sm.deff[t] * (float)sm.L[t / 8][32 * (t % 8) + i] - sm.meff[t];
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        if (k < 16) return sm.hdr[s][k];
        const u8* L = sm.L[s];
        if (NMAX == 15) {
            const int q = k - 16, j = 64 * (q / 32), l = q % 32;
            return (u8)(L[j + l] | (L[j + l + 32] << 4));
        }
        if (k < 48) {  // qh: bits 2c, 2c+1 of byte l are the high bits of elements 64c + l, 64c + 32 + l
            const int l = k - 16;
            int v = 0;
            for (int c = 0; c < 4; ++c) v |= ((L[64 * c + l] > 15) << (2 * c)) | ((L[64 * c + 32 + l] > 15) << (2 * c + 1));
            return (u8)v;
        }
        const int q = k - 48, j = 64 * (q / 32), l = q % 32;
        return (u8)((L[j + l] & 0xF) | ((L[j + l + 32] & 0xF) << 4));
    }
};

// ---- Q6_K: 16 groups of 16, levels -32..31, int8 scales; block: ql[128] qh[64] scales[16] d -----------
template <bool IM>
struct Q6K : NoInit {
    enum { SUB = 16, TS = 210, SUMX2 = 0 };
    typedef Smem<16> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[16], w[16];
        u8 L[16];
        group_x<16>(sm, t, x);
        if (IM) {
            load_qw<16>(a, sub, w);
        } else {
            QM_UNROLL
            for (int l = 0; l < 16; ++l) w[l] = x[l] * x[l];
        }
        sm.scale[t] = make_qx_fast<16, 32>(x, w, L);
        put_L<16>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        const int t0 = s * 16;
        u8* h = sm.hdr[s];  // [0..15] int8 scales, [16..17] d, [18] all-zero block
        float max_scale = 0, max_abs_scale = 0;
        for (int j = 0; j < 16; ++j) {
            float as = fabsf(sm.scale[t0 + j]);
            if (as > max_abs_scale) {
                max_abs_scale = as;
                max_scale = sm.scale[t0 + j];
            }
        }
        h[18] = max_abs_scale < GROUP_MAX_EPS;
        if (h[18]) {  // C: memset(block, 0): every byte and every dequantized value 0
            for (int j = 0; j < 18; ++j) h[j] = 0;
            for (int j = 0; j < 16; ++j) sm.deff[t0 + j] = 0.f;
            return;
        }
        float iscale = -128.f / max_scale;
        wr_fp16(h + 16, fp32_to_fp16(1.f / iscale));
        for (int j = 0; j < 16; ++j) {
            int l = nearest_int(iscale * sm.scale[t0 + j]);
            h[j] = (u8)(signed char)(l < 127 ? l : 127);
        }
        const float dd = rd_fp16(h + 16);
        for (int j = 0; j < 16; ++j) sm.deff[t0 + j] = dd * (float)(signed char)h[j];
    }
    static QM_MEMBER void requant(S& sm, int t) {
        u8* p = sm.L[t / 16] + 16 * (t % 16);
        if (sm.hdr[t / 16][18]) {  // all-zero block: levels 0 (dequantized as 0 * (0 - 32))
            for (int i = 0; i < 16; ++i) p[i] = 0;
            return;
        }
        const float d = sm.deff[t];
        if (!(d != 0.f)) return;
        for (int i = 0; i < 16; ++i) {
            int l = nearest_int(sm.x[t][i] / d);
            l = l < 31 ? l : 31;
            p[i] = (u8)((l > -32 ? l : -32) + 32);
        }
    }
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return sm.deff[t] * (float)((int)(sm.L[t / 16][16 * (t % 16) + i] & 63) - 32);
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        const u8* L = sm.L[s];
        if (sm.hdr[s][18]) return 0;
        if (k < 128) {
            const int j = 128 * (k / 64), r = k % 64;
            const int l = r % 32, o = r < 32 ? 0 : 32;
            return (u8)((L[j + l + o] & 0xF) | ((L[j + l + o + 64] & 0xF) << 4));
        }
        if (k < 192) {
            const int q = k - 128, j = 128 * (q / 32), l = q % 32;
            return (u8)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
        }
        return sm.hdr[s][k - 192];
    }
};

// ================================================================================================
// the 32-weight block types (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1, IQ4_NL: a "super-block" is one block of 32,
// SBW = 32, one thread each) and IQ4_XS (8 blocks of 32 under one fp16 scale, SBW = 256)
// ================================================================================================

// C's (int) of a float as x86-64 computes it (cvttss2si): NaN and out-of-range values give INT_MIN.
// ggml's (int8_t)/(uint8_t) casts are this, then the low byte (an infinite x*id in a tiny block reads 0).
QM_DEV int x86_f2i(float v) { return (v >= -2147483648.f && v < 2147483648.f) ? (int)v : (int)0x80000000; }

// The row's sigma2 of ggml's quantize_row_q{4,5}_{0,1}_impl: (sequential sum of x^2 over the row) / n.
QM_DEV float row_sigma2(const Args& a, i64 sub) {
    return a.rowx2[sub / a.sb_per_row] / (float)a.n_per_row;
}

#ifdef QM_CUDA
#define QM_CONSTANT __constant__
#else
#define QM_CONSTANT static const
#endif
QM_CONSTANT signed char KV_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// ggml's best_index_int8(16, kvalues_iq4nl, x) as C runs it (binary search, ties to the upper value).
QM_DEV int best_index_iq4_ref(float x) {
    if (x <= (float)KV_IQ4NL[0]) return 0;
    if (x >= (float)KV_IQ4NL[15]) return 15;
    int ml = 0, mu = 15;
    while (mu - ml > 1) {
        const int mav = (ml + mu) / 2;
        if (x < (float)KV_IQ4NL[mav]) {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    return x - (float)KV_IQ4NL[mu - 1] < (float)KV_IQ4NL[mu] - x ? mu - 1 : mu;
}

// The same index by table: the midpoints between grid values are all multiples of 0.5, so the index is constant
// on each [k/2, (k+1)/2), and floor(2x) (exact) picks the interval. Checked against best_index_iq4_ref on every
// non-NaN float (4 278 190 082 values, 0 differ) when this was written; tests check the midpoints' neighbours.
// Both tables live in shared memory (each block fills them): 16 values in 16 banks, conflict-free.
struct IQ4Tables {
    u8 idx[484];  // interval k = floor(2x) + 254, clamped to 0..480
    float val[16];
};

QM_DEV void iq4_tables_init(IQ4Tables& tb, int t) {
    for (int k = t; k < 481; k += TPB) tb.idx[k] = (u8)best_index_iq4_ref((float)(k - 254) * 0.5f);
    if (t < 16) tb.val[t] = (float)KV_IQ4NL[t];
}

QM_DEV int iq4_index(const IQ4Tables& tb, float x) {
    if (x != x) return 15;
    float f = floorf(x + x);
    f = fminf(fmaxf(f, -254.f), 226.f);
    return tb.idx[(int)f + 254];
}

// The per-block scale search of quantize_row_iq4_nl_impl with ntry = 7 (its first loop), finite x.
QM_DEV float iq4_block_scale(const IQ4Tables& tb, const float* x, const float* w) {
    float amax = 0, mx = 0;
    for (int j = 0; j < 32; ++j) {
        const float ax = fabsf(x[j]);
        if (ax > amax) {
            amax = ax;
            mx = x[j];
        }
    }
    if (amax < GROUP_MAX_EPS) return 0.f;
    float d = -mx / (float)KV_IQ4NL[0];
    float id = 1.f / d;
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
        const float q = tb.val[iq4_index(tb, id * x[j])];
        sumqx += w[j] * q * x[j];
        sumq2 += w[j] * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
    float best = d * sumqx;
    for (int itry = -7; itry <= 7; ++itry) {
        id = (float)(itry + KV_IQ4NL[0]) / mx;
        sumqx = 0;
        sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            const float q = tb.val[iq4_index(tb, id * x[j])];
            sumqx += w[j] * q * x[j];
            sumq2 += w[j] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

// qw * sqrtf(sigma2 + x^2): the imatrix paths' quantizer weights.
QM_DEV void imat_weights(const float* qw, const float* x, float sigma2, float* w) {
    QM_UNROLL
    for (int j = 0; j < 32; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

// Q4_0 / Q5_0 qs: low nibbles of elements j and j+16; Q5_0 / Q5_1 qh: bit 4 of element i at bit i.
QM_DEV u8 pack_nibbles(const u8* L, int j) { return (u8)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)); }
QM_DEV u8 pack_fifth_bits(const u8* L, int byte) {
    int v = 0;
    for (int b = 0; b < 8; ++b) v |= ((L[8 * byte + b] & 0x10) >> 4) << b;
    return (u8)v;
}

// ---- Q8_0: d, 32 int8 (ignores the imatrix: IM only weights the errors) --------------------------
template <bool IM>
struct Q80 : NoInit {
    enum { SUB = 32, TS = 34, SUMX2 = 0 };
    typedef Smem<32, 32> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32];
        u8 L[32];
        group_x<32, 32>(sm, t, x);
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
        const float d = amax / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        for (int j = 0; j < 32; ++j) L[j] = (u8)x86_f2i(roundf(x[j] * id));
        sm.scale[t] = d;
        put_L<32, 32>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        wr_fp16(sm.hdr[s], fp32_to_fp16(sm.scale[s]));
        sm.deff[s] = rd_fp16(sm.hdr[s]);
    }
    static QM_MEMBER void requant(S&, int) {}
    static QM_MEMBER float deq(const S& sm, int t, int i) { return (float)(signed char)sm.L[t][i] * sm.deff[t]; }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) { return k < 2 ? sm.hdr[s][k] : sm.L[s][k - 2]; }
};

// ---- Q4_0 (NMAX 8) / Q5_0 (NMAX 16): d, [qh], qs; value = (L - NMAX) * d -------------------------
template <int NMAX, bool IM>
struct QSym : NoInit {
    enum { SUB = 32, TS = NMAX == 8 ? 18 : 22, SUMX2 = 0, MASK = 2 * NMAX - 1 };
    typedef Smem<32, 32> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32];
        u8 L[32];
        group_x<32, 32>(sm, t, x);
        float d;
        if (IM) {  // quantize_row_q{4,5}_0_impl: make_qx_quants(32, NMAX, rmse_type 1, weights)
            float qw[32], w[32];
            load_qw<32, 32>(a, sub, qw);
            imat_weights(qw, x, row_sigma2(a, sub), w);
            d = make_qx_fast<32, NMAX>(x, w, L);
        } else {  // quantize_row_q{4,5}_0_ref: d = max / -NMAX, L = MIN(MASK, (int8_t)(x*id + NMAX + 0.5))
            float amax = 0, mx = 0;
            for (int j = 0; j < 32; ++j) {
                if (amax < fabsf(x[j])) {
                    amax = fabsf(x[j]);
                    mx = x[j];
                }
            }
            d = mx / (float)(-NMAX);
            const float id = d != 0.f ? 1.f / d : 0.f;
            for (int j = 0; j < 32; ++j) {
                const float x0 = x[j] * id;
                const int xi = (signed char)x86_f2i(x0 + ((float)NMAX + 0.5f));
                L[j] = (u8)(xi < MASK ? xi : MASK);
            }
        }
        sm.scale[t] = d;
        put_L<32, 32>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        wr_fp16(sm.hdr[s], fp32_to_fp16(sm.scale[s]));
        sm.deff[s] = rd_fp16(sm.hdr[s]);
    }
    static QM_MEMBER void requant(S&, int) {}
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return (float)((int)(sm.L[t][i] & MASK) - NMAX) * sm.deff[t];
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        if (k < 2) return sm.hdr[s][k];
        const u8* L = sm.L[s];
        if (NMAX == 8) return (u8)(L[k - 2] | (L[k - 2 + 16] << 4));
        if (k < 6) return pack_fifth_bits(L, k - 2);
        return pack_nibbles(L, k - 6);
    }
};

// ---- Q4_1 (NMAX 15) / Q5_1 (NMAX 31): d, m, [qh], qs; value = L * d + m ---------------------------
template <int NMAX, bool IM>
struct QAff : NoInit {
    enum { SUB = 32, TS = NMAX == 15 ? 20 : 24, SUMX2 = 0 };
    typedef Smem<32, 32> S;
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32];
        u8 L[32];
        group_x<32, 32>(sm, t, x);
        float d, m;
        if (IM) {  // quantize_row_q{4,5}_1_impl: make_qkx3_quants(32, NMAX, weights, -0.9, 0.05, 36)
            float qw[32], w[32], the_min;
            load_qw<32, 32>(a, sub, qw);
            imat_weights(qw, x, row_sigma2(a, sub), w);
            d = make_qkx<32, NMAX, false>(x, w, -0.9f, 0.05f, 36, &the_min, L);
            m = -the_min;
        } else {  // quantize_row_q{4,5}_1_ref: d = (max - min) / NMAX, m = min
            float mn = 3.402823466e+38f, mx = -3.402823466e+38f;
            for (int j = 0; j < 32; ++j) {
                if (x[j] < mn) mn = x[j];
                if (x[j] > mx) mx = x[j];
            }
            d = (mx - mn) / (float)NMAX;
            const float id = d != 0.f ? 1.f / d : 0.f;
            m = mn;
            for (int j = 0; j < 32; ++j) {
                const float x0 = (x[j] - mn) * id;
                const int v = x86_f2i(x0 + 0.5f);
                if (NMAX == 15) {  // MIN(15, (int8_t)v)
                    const int xi = (signed char)v;
                    L[j] = (u8)(xi < 15 ? xi : 15);
                } else {  // (uint8_t)v
                    L[j] = (u8)v;
                }
            }
        }
        sm.scale[t] = d;
        sm.mn[t] = m;
        put_L<32, 32>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        wr_fp16(sm.hdr[s], fp32_to_fp16(sm.scale[s]));
        wr_fp16(sm.hdr[s] + 2, fp32_to_fp16(sm.mn[s]));
        sm.deff[s] = rd_fp16(sm.hdr[s]);
        sm.meff[s] = rd_fp16(sm.hdr[s] + 2);
    }
    static QM_MEMBER void requant(S&, int) {}
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return (float)(sm.L[t][i] & NMAX) * sm.deff[t] + sm.meff[t];
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        if (k < 4) return sm.hdr[s][k];
        const u8* L = sm.L[s];
        if (NMAX == 15) return pack_nibbles(L, k - 4);
        if (k < 8) return pack_fifth_bits(L, k - 4);
        return pack_nibbles(L, k - 8);
    }
};

// ---- MXFP4: e (e8m0), qs: 32 e2m1 codes under a power-of-two scale (quantize_row_mxfp4_ref; no imatrix) ----
QM_DEV float e8m0_half(int e) { return u2f(e < 2 ? 0x00200000u << e : (u32)(e - 1) << 23); }  // 2^(e-128)

template <bool IM>
struct MXFP4 : NoInit {
    enum { SUB = 32, TS = 17, SUMX2 = 0 };
    typedef Smem<32, 32> S;
    static QM_MEMBER float code(int i) {  // kvalues_mxfp4 (e2m1 doubled), without a table read
        const int m = i & 7;
        const int v = m < 4 ? m : (m < 6 ? 2 * m - 4 : 4 * m - 16);
        return (float)(i & 8 ? -v : v);
    }
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32];
        u8 L[32];
        group_x<32, 32>(sm, t, x);
        float amax = 0;
        for (int j = 0; j < 32; ++j) {
            if (amax < fabsf(x[j])) amax = fabsf(x[j]);
        }
        // floorf(log2f(amax)): log2 in double rounded to float (see formats/mxfp4.py for why this is log2f's)
        int e = 0;
        if (amax > 0.f) e = x86_f2i(floorf((float)log2((double)amax)) - 2.f + 127.f) & 0xFF;
        const float d = e8m0_half(e);
        for (int j = 0; j < 32; ++j) {  // best_index_mxfp4: the first code of least |kv*d - x|
            int best = 0;
            float best_err = fabsf(code(0) * d - x[j]);
            for (int i = 1; i < 16; ++i) {
                const float err = fabsf(code(i) * d - x[j]);
                if (err < best_err) {
                    best = i;
                    best_err = err;
                }
            }
            L[j] = (u8)best;
        }
        sm.hdr[t][0] = (u8)e;
        sm.deff[t] = d;
        put_L<32, 32>(sm, t, L);
    }
    static QM_MEMBER void sb_level(S&, int) {}
    static QM_MEMBER void requant(S&, int) {}
    static QM_MEMBER float deq(const S& sm, int t, int i) { return code(sm.L[t][i]) * sm.deff[t]; }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        return k < 1 ? sm.hdr[s][0] : (u8)(sm.L[s][k - 1] | (sm.L[s][k - 1 + 16] << 4));
    }
};

template <int SBW>
struct SmemIQ4 : Smem<32, SBW> {
    IQ4Tables tb;
};

// ---- IQ4_NL: d, qs on the kvalues_iq4nl grid (quantize_iq4_nl: ntry 7, with or without an imatrix) ----
template <bool IM>
struct IQ4NL {
    enum { SUB = 32, TS = 18, SUMX2 = 0, INIT = 1 };
    typedef SmemIQ4<32> S;
    static QM_MEMBER void init(S& sm, int t) { iq4_tables_init(sm.tb, t); }
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32], w[32];
        group_x<32, 32>(sm, t, x);
        float sigma2 = 0;
        for (int j = 0; j < 32; ++j) sigma2 += x[j] * x[j];
        sigma2 *= 2.f / 32.f;
        if (IM) {
            float qw[32];
            load_qw<32, 32>(a, sub, qw);
            imat_weights(qw, x, sigma2, w);
        } else {
            for (int j = 0; j < 32; ++j) w[j] = x[j] * x[j];
        }
        sm.scale[t] = iq4_block_scale(sm.tb, x, w);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        wr_fp16(sm.hdr[s], fp32_to_fp16(sm.scale[s]));
        sm.deff[s] = rd_fp16(sm.hdr[s]);
    }
    static QM_MEMBER void requant(S& sm, int t) {  // the levels of the unrounded scale
        const float d = sm.scale[t];
        const float id = d != 0.f ? 1.f / d : 0.f;
        for (int j = 0; j < 32; ++j) sm.L[t][j] = (u8)iq4_index(sm.tb, id * sm.x[t][j]);
    }
    static QM_MEMBER float deq(const S& sm, int t, int i) { return sm.deff[t] * sm.tb.val[sm.L[t][i]]; }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        return k < 2 ? sm.hdr[s][k] : (u8)(sm.L[s][k - 2] | (sm.L[s][k - 2 + 16] << 4));
    }
};

// ---- IQ4_XS: d, scales_h, scales_l[4], qs[128]: 8 blocks of 32, 6-bit block scales under an fp16 d ----
template <bool IM>
struct IQ4XS {
    enum { SUB = 32, TS = 136, SUMX2 = 1, INIT = 1 };
    typedef SmemIQ4<256> S;
    static QM_MEMBER void init(S& sm, int t) { iq4_tables_init(sm.tb, t); }
    static QM_MEMBER void search(const Args& a, S& sm, int t, i64 sub) {
        float x[32], w[32];
        group_x<32, 256>(sm, t, x);
        if (IM) {
            float qw[32];
            load_qw<32, 256>(a, sub, qw);
            imat_weights(qw, x, sm.sumx2[t / 8] * (2.f / 256.f), w);
        } else {
            for (int j = 0; j < 32; ++j) w[j] = x[j] * x[j];
        }
        sm.scale[t] = iq4_block_scale(sm.tb, x, w);
    }
    static QM_MEMBER void sb_level(S& sm, int s) {
        const int t0 = s * 8;
        u8* h = sm.hdr[s];  // d, scales_h, scales_l[4]
        float max_scale = 0, amax_scale = 0;
        for (int ib = 0; ib < 8; ++ib) {
            const float ad = fabsf(sm.scale[t0 + ib]);
            if (ad > amax_scale) {
                amax_scale = ad;
                max_scale = sm.scale[t0 + ib];
            }
        }
        const float d = -max_scale / 32.f;
        wr_fp16(h, fp32_to_fp16(d));
        const float id = d != 0.f ? 1.f / d : 0.f;
        const float d16 = rd_fp16(h);
        int sh = 0;
        for (int k = 4; k < 8; ++k) h[k] = 0;
        for (int ib = 0; ib < 8; ++ib) {
            int l = nearest_int(id * sm.scale[t0 + ib]);
            l = l < 31 ? l : 31;
            l = l > -32 ? l : -32;
            const float dl = d * (float)l;
            sm.mn[t0 + ib] = dl != 0.f ? 1.f / dl : 0.f;  // the requantization's idl
            sm.deff[t0 + ib] = d16 * (float)l;           // dequantize_row_iq4_xs: d * (ls - 32)
            const int ls = l + 32;
            h[4 + ib / 2] = (u8)(h[4 + ib / 2] | ((ls & 0xF) << (4 * (ib % 2))));
            sh |= (ls >> 4) << (2 * ib);
        }
        h[2] = (u8)(sh & 0xFF);
        h[3] = (u8)(sh >> 8);
    }
    static QM_MEMBER void requant(S& sm, int t) {
        u8* p = sm.L[t / 8] + 32 * (t % 8);
        const float idl = sm.mn[t];
        for (int j = 0; j < 32; ++j) p[j] = (u8)iq4_index(sm.tb, idl * sm.x[t][j]);
    }
    static QM_MEMBER float deq(const S& sm, int t, int i) {
        return sm.deff[t] * sm.tb.val[sm.L[t / 8][32 * (t % 8) + i]];
    }
    static QM_MEMBER u8 pack(const S& sm, int s, int k) {
        if (k < 8) return sm.hdr[s][k];
        const int q = k - 8, i = q / 16, j = q % 16;
        const u8* L = sm.L[s];
        return (u8)(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
    }
};

// ---- the phases of one block (separated by barriers on the GPU, plain loops on the host) ----------
#ifdef QM_CUDA
#define QM_PHASE(...)                  \
    {                                  \
        const int t = threadIdx.x;     \
        __VA_ARGS__                    \
    }                                  \
    __syncthreads();
#else
#define QM_PHASE(...)                   \
    for (int t = 0; t < TPB; ++t) {     \
        __VA_ARGS__                     \
    }
#endif

template <typename T>
QM_DEV void kq_block(const Args& a, typename T::S& sm, i64 blk, int nsub, int mode) {
    enum { SUB = T::SUB, SBW = T::S::SBW, G = T::S::SBW / T::SUB, TS = T::TS };
    const i64 s0 = blk * TPB;
    const int nloc = (int)((i64)nsub - s0 < TPB ? (i64)nsub - s0 : TPB);  // groups here (whole super-blocks)
    const float* xb = a.x + s0 * SUB;
    // 1. the block's weights into shared memory, coalesced (and the type's shared tables, if any)
    if constexpr (T::INIT) {
        QM_PHASE(T::init(sm, t); load_x_block(sm, xb, t, nloc);)
    } else {
        QM_PHASE(load_x_block(sm, xb, t, nloc);)
    }
    // 2. sum of x^2 per super-block, in element order (imatrix paths of Q2_K..Q5_K). Super-block work goes
    //    to threads 0..NSB-1 (one warp), not to the first thread of each group: a quarter of the issue slots.
    if (T::SUMX2) {
        QM_PHASE(
            if (t < nloc / G) {
                float s = 0;
                for (int e = 0; e < SBW; ++e) {
                    const float v = sm.x[t * G + e / SUB][e % SUB];
                    s += v * v;
                }
                sm.sumx2[t] = s;
            })
    }
    // 3. the scale search of each group
    QM_PHASE(if (t < nloc) T::search(a, sm, t, s0 + t);)
    // 4. super-block scales, fp16 d/dmin, the dequantizer's group factors
    QM_PHASE(if (t < nloc / G) T::sb_level(sm, t);)
    // 5. re-quantization with the final scales; in error mode, the errors of the dequantized group
    QM_PHASE(
        if (t < nloc) {
            T::requant(sm, t);
            if (mode == 1) {
                const i64 col0 = (((s0 + t) / G) % a.sb_per_row) * SBW + (t % G) * SUB;
                double se = 0, sx = 0, sa = 0;
                for (int i = 0; i < SUB; ++i) {
                    const double xi = (double)sm.x[t][i];
                    const double e = (double)T::deq(sm, t, i) - xi;
                    const double wi = a.has_qw ? (double)a.qw[col0 + i] : 1.0;
                    se += wi * e * e;
                    sx += wi * xi * xi;
                    if (a.has_act) sa += (double)a.act[col0 + i] * e;
                }
                sm.e_err[t] = se;
                sm.e_ref[t] = sx;
                sm.e_bias[t] = sa;
            }
        })
    // 6. the block bytes, coalesced (or the per-super-block error sums, groups added in order)
    if (mode == 0) {
        QM_PHASE(
            u8* ob = a.out + (s0 / G) * TS;
            for (int b = t; b < (nloc / G) * TS; b += TPB) ob[b] = T::pack(sm, b / TS, b % TS);)
    } else {
        QM_PHASE(
            if (t < nloc / G) {
                double se = 0, sx = 0, sa = 0;
                for (int j = 0; j < G; ++j) {
                    se += sm.e_err[t * G + j];
                    sx += sm.e_ref[t * G + j];
                    sa += sm.e_bias[t * G + j];
                }
                const i64 sb = s0 / G + t;
                a.err[sb] = se;
                a.ref[sb] = sx;
                if (a.has_act) a.bias[sb] = sa;
            })
    }
}

// ------------------------------------------------------------------------------------------------
// entry points: CUDA kernels, or host loops over the same block bodies (the CPU check of this arithmetic)
// ------------------------------------------------------------------------------------------------
typedef Q2K<false> T_q2k_ref;
typedef Q2K<true> T_q2k_imat;
typedef Q3K<false> T_q3k_ref;
typedef Q3K<true> T_q3k_imat;
typedef Q45K<15, false> T_q4k_ref;
typedef Q45K<15, true> T_q4k_imat;
typedef Q45K<31, false> T_q5k_ref;
typedef Q45K<31, true> T_q5k_imat;
typedef Q6K<false> T_q6k_ref;
typedef Q6K<true> T_q6k_imat;
typedef Q80<false> T_q8_0_ref;
typedef Q80<true> T_q8_0_imat;
typedef QSym<8, false> T_q4_0_ref;
typedef QSym<8, true> T_q4_0_imat;
typedef QSym<16, false> T_q5_0_ref;
typedef QSym<16, true> T_q5_0_imat;
typedef QAff<15, false> T_q4_1_ref;
typedef QAff<15, true> T_q4_1_imat;
typedef QAff<31, false> T_q5_1_ref;
typedef QAff<31, true> T_q5_1_imat;
typedef IQ4NL<false> T_iq4_nl_ref;
typedef IQ4NL<true> T_iq4_nl_imat;
typedef IQ4XS<false> T_iq4_xs_ref;
typedef IQ4XS<true> T_iq4_xs_imat;
typedef MXFP4<false> T_mxfp4_ref;
typedef MXFP4<true> T_mxfp4_imat;

#define QM_FOR_TYPES(X) \
    X(q2k_ref) X(q2k_imat) X(q3k_ref) X(q3k_imat) X(q4k_ref) X(q4k_imat) X(q5k_ref) X(q5k_imat) X(q6k_ref) X(q6k_imat) \
    X(q8_0_ref) X(q8_0_imat) X(q4_0_ref) X(q4_0_imat) X(q5_0_ref) X(q5_0_imat) X(q4_1_ref) X(q4_1_imat)          \
    X(q5_1_ref) X(q5_1_imat) X(iq4_nl_ref) X(iq4_nl_imat) X(iq4_xs_ref) X(iq4_xs_imat) X(mxfp4_ref) X(mxfp4_imat)

// qm_kq_rowsq: the sequential sum of x^2 of each row (sigma2 of the 32-weight types' imatrix paths), one
// thread per row, in element order as ggml adds it.
QM_DEV void rowsq_one(const Args& a, i64 r) {
    const float* p = a.x + r * (i64)a.n_per_row;
    float s = 0;
    for (int j = 0; j < a.n_per_row; ++j) s += p[j] * p[j];
    a.rowx2[r] = s;
}

#ifdef QM_CUDA

#define QM_ROWSQ_KERNEL                                                                          \
    QM_GLOBAL void __launch_bounds__(TPB) qm_kq_rowsq(const Args* ap, int nrows, int mode) {    \
        const i64 r = (i64)blockIdx.x * TPB + threadIdx.x;                                        \
        if (r < nrows) rowsq_one(*ap, r);                                                         \
    }

#define QM_KERNEL(NAME)                                                                          \
    QM_GLOBAL void __launch_bounds__(TPB) qm_kq_##NAME(const Args* ap, int nsub, int mode) {    \
        __shared__ T_##NAME::S sm;                                                                \
        kq_block<T_##NAME>(*ap, sm, blockIdx.x, nsub, mode);                                      \
    }

#if defined(QM_ROWSQ_ONLY)
QM_ROWSQ_KERNEL
#elif defined(QM_ONLY)  // one type and path per NVRTC program: smaller programs, compiled in parallel
#define QM_KERNEL_EXPANDED(NAME) QM_KERNEL(NAME)
QM_KERNEL_EXPANDED(QM_ONLY)
#else
QM_FOR_TYPES(QM_KERNEL)
QM_ROWSQ_KERNEL
#endif

#else

#define QM_HOST(NAME)                                                                            \
    extern "C" void qm_kq_##NAME(const Args* ap, int nsub, int mode) {                          \
        T_##NAME::S* sm = new T_##NAME::S;                                                        \
        for (i64 b = 0; b * TPB < nsub; ++b) kq_block<T_##NAME>(*ap, *sm, b, nsub, mode);         \
        delete sm;                                                                                \
    }
QM_FOR_TYPES(QM_HOST)
extern "C" void qm_kq_rowsq(const Args* ap, int nrows, int mode) {
    for (i64 r = 0; r < nrows; ++r) rowsq_one(*ap, r);
}
// For the tests: how many of x[0..n) get another IQ4 grid index from the table than from ggml's search.
extern "C" i64 qm_iq4_index_mismatches(const float* x, i64 n) {
    IQ4Tables* tb = new IQ4Tables;
    for (int t = 0; t < TPB; ++t) iq4_tables_init(*tb, t);
    i64 bad = 0;
    for (i64 i = 0; i < n; ++i) bad += iq4_index(*tb, x[i]) != best_index_iq4_ref(x[i]);
    delete tb;
    return bad;
}

#endif
