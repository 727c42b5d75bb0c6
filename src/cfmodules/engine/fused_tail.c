/* Influence-map sums of a DCGAN tail, fused: one hybrid at a time, in cache.

   The tail after a swapped layer L (C_in channels, H x W):
       ConvTranspose2d(C_in -> C_mid, 4, stride 2, padding 1) [+ BatchNorm]  -> ReLU
       -> ConvTranspose2d(C_mid -> C_out, 4, stride 2, padding 1) -> Tanh, Sigmoid or nothing
   For the hybrid of channel c and pair p, the pre-activation after the first convolution
   is base[p] (Original 1's) plus channel c's contribution (the linear shortcut,
   cfmodules/engine/linear.py); this file does the rest for one hybrid while its data stay
   in cache: contribution + base + ReLU, the last convolution as a GEMM plus col2im, the
   output activation (act: 0 none, 1 Tanh, 2 Sigmoid),
   |hybrid - Original 1| averaged over colour, and the sum and sum of squares over pairs.

   Layouts (float32, C order). The 2H x 2W map after the first convolution is kept in
   "phase" layout (C_mid, 4, H, W): phase a*2+b, position (m, n) is pixel (2m+a, 2n+b).
   The 4H x 4W image is kept in "superphase" layout (C_out, 4, 4, H, W): [co, qy, qx, i, j]
   is pixel (4i+qy, 4j+qx). The caller permutes to and from these (cfmodules/engine/tail.py).

   Exact by design where it matters: every output value is a fixed sequence of float
   operations on its own inputs, independent of the other hybrids, of the thread and of
   the batch; a pixel whose inputs a swap does not change is bit for bit Original 1's, so
   its map value is exactly 0 (as in a full rerun). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
#define MR 12
#elif defined(__AVX__)
#define VW 8
#define MR 6
#else
#define VW 4
#define MR 6
#endif
#define NR (2 * VW)
#define INLINE static inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(4)));

static inline vf vload(const float *p) { return *(const vf *)p; }
static inline void vstore(float *p, vf v) { *(vf *)p = v; }
static inline vf vset(float x) { return (vf){0} + x; }
static inline vf vbcast(const float *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(*p);
#elif defined(__AVX__)
    return (vf)_mm256_broadcast_ss(p);
#else
    return vset(*p);
#endif
}
static inline vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

int cfm_vector_width(void) { return VW; }
int cfm_tile_rows(void) { return MR; }
int cfm_tile_cols(void) { return NR; }

/* Y[i, j] = sum_k A[k, i] B[k, j] on one MR x NR tile, k in order (each Y[i, j] depends
   only on column j of B: a column equal in two calls gives the same bits). */
static void gemm_tile(int K, const float *A, int lda, const float *B, int ldb, float *Y, int ldy) {
    vf c0[MR], c1[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) { c0[i] = vset(0.f); c1[i] = vset(0.f); }
    for (int k = 0; k < K; k++) {
        vf b0 = vload(B + (size_t)k * ldb), b1 = vload(B + (size_t)k * ldb + VW);
        const float *a = A + (size_t)k * lda;
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            vf ai = vbcast(a + i);
            c0[i] += ai * b0;
            c1[i] += ai * b1;
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
        vstore(Y + (size_t)i * ldy, c0[i]);
        vstore(Y + (size_t)i * ldy + VW, c1[i]);
    }
}

INLINE void gemm(int M_pad, int N_pad, int K, const float *A, const float *B, float *Y) {
    for (int j = 0; j < N_pad; j += NR)
        for (int i = 0; i < M_pad; i += MR)
            gemm_tile(K, A + i, M_pad, B + j, N_pad, Y + (size_t)i * N_pad + j, N_pad);
}

/* exp on [-80, 80] (Cephes expf: Cody-Waite reduction, degree-6 polynomial) */
static inline vf v_exp(vf x) {
    vf n = (x * vset(1.44269504088896341f) + vset(12582912.f)) - vset(12582912.f);
    vf r = x - n * vset(0.693359375f);
    r = r - n * vset(-2.12194440e-4f);
    vf z = r * r;
    vf p = vset(1.9875691500E-4f);
    p = p * r + vset(1.3981999507E-3f);
    p = p * r + vset(8.3334519073E-3f);
    p = p * r + vset(4.1665795894E-2f);
    p = p * r + vset(1.6666665459E-1f);
    p = p * r + vset(5.0000001201E-1f);
    p = p * z + r + vset(1.f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1); |x| clamped to 9, where float tanh is 1 (NaN stays) */
static inline vf v_tanh(vf x) {
    x = vselect(x < vset(-9.f), vset(-9.f), x);
    x = vselect(x > vset(9.f), vset(9.f), x);
    return vset(1.f) - vset(2.f) / (v_exp(x + x) + vset(1.f));
}

/* sigmoid(x) = 1 / (1 + exp(-x)); |x| clamped to 80, where float sigmoid is 1 or below
   1e-34 (NaN stays) */
static inline vf v_sigmoid(vf x) {
    x = vselect(x < vset(-80.f), vset(-80.f), x);
    x = vselect(x > vset(80.f), vset(80.f), x);
    return vset(1.f) / (vset(1.f) + v_exp(-x));
}

typedef struct {
    int C_in, C_mid, C_out, H, W, M_pad, N_pad;
} shape_t;

/* col2im of the last ConvT(k4, s2, p1) in output superphase layout, plus bias, then the
   output activation act (0 none, 1 tanh, 2 sigmoid).
   Y is (M_pad, N_pad): row (co, ky, kx), column (a, b, m, n) = position (2m+a, 2n+b).
   O is (C_out, 4, 4, H, W): O[co, qy, qx, i, j] is output pixel (4i+qy, 4j+qx). */
INLINE void col2im_act(const shape_t *s, const float *Y, const float *bias, float *O, int act) {
    const int H = s->H, W = s->W, HW = H * W;
    vi lane0, lanelast;  /* the first and the last lane */
    for (int l = 0; l < VW; l++) { lane0[l] = l == 0 ? -1 : 0; lanelast[l] = l == VW - 1 ? -1 : 0; }
    for (int co = 0; co < s->C_out; co++)
        for (int qy = 0; qy < 4; qy++)
            for (int qx = 0; qx < 4; qx++) {
                float *dst = O + (size_t)((co * 4 + qy) * 4 + qx) * HW;
                float b = bias ? bias[co] : 0.f;
                for (int i = 0; i < HW; i++) dst[i] = b;
                for (int ty = 0; ty < 2; ty++) {
                    int ky = ty == 0 ? (qy + 1) & 3 : (qy + 3) & 3;
                    int sy = ty == 0 ? (qy == 3 ? -1 : 0) : (qy == 0 ? 1 : 0);
                    for (int tx = 0; tx < 2; tx++) {
                        int kx = tx == 0 ? (qx + 1) & 3 : (qx + 3) & 3;
                        int sx = tx == 0 ? (qx == 3 ? -1 : 0) : (qx == 0 ? 1 : 0);
                        const float *src = Y + (size_t)((co * 4 + ky) * 4 + kx) * s->N_pad
                                           + (size_t)(ty * 2 + tx) * HW;
                        int i0 = sy > 0 ? sy : 0, i1 = sy < 0 ? H + sy : H;
                        int j0 = sx > 0 ? sx : 0, j1 = sx < 0 ? W + sx : W;
                        for (int i = i0; i < i1; i++) {
                            float *restrict d = dst + i * W;
                            const float *restrict q = src + (i - sy) * W - sx;
                            if (W % VW == 0) {  /* whole vectors; Y has a margin of VW floats */
                                for (int j = 0; j < W; j += VW) {
                                    vf v = vload(q + j);
                                    if (sx > 0 && j == 0) v = vselect(lane0, vset(0.f), v);
                                    if (sx < 0 && j + VW == W) v = vselect(lanelast, vset(0.f), v);
                                    vstore(d + j, vload(d + j) + v);
                                }
                            } else {
                                for (int j = j0; j < j1; j++) d[j] += q[j];
                            }
                        }
                    }
                }
            }
    size_t L = (size_t)s->C_out * 16 * HW;  /* a multiple of 16, so of VW */
    if (act == 1)
        for (size_t i = 0; i < L; i += VW) vstore(O + i, v_tanh(vload(O + i)));
    else if (act == 2)
        for (size_t i = 0; i < L; i += VW) vstore(O + i, v_sigmoid(vload(O + i)));
}

/* B = relu(base + the contribution of one channel's delta) in phase layout (C_mid, 4, H, W),
   rows of stride N_pad. dpad is the delta's channel, zero-padded: (H+2, W+2).
   w is (C_mid, 4 phases, 4 taps): phase a*2+b, tap ty*2+tx reads input row m+sy(a,ty),
   column n+sx(b,tx), with s(0, 0) = 0, s(0, 1) = -1, s(1, 0) = +1, s(1, 1) = 0. */
INLINE void fill_hybrid(const shape_t *s, const float *restrict dpad, const float *restrict w,
                        const float *restrict base, float *restrict B) {
    const int H = s->H, W = s->W, HW = H * W, W2 = W + 2;
    for (int o = 0; o < s->C_mid; o++)
        for (int ph = 0; ph < 4; ph++) {
            int a = ph >> 1, b = ph & 1;
            const float *wt = w + ((size_t)o * 4 + ph) * 4;
            const float w0 = wt[0], w1 = wt[1], w2 = wt[2], w3 = wt[3];
            int sy0 = a ? 1 : 0, sy1 = a ? 0 : -1, sx0 = b ? 1 : 0, sx1 = b ? 0 : -1;
            const float *bs = base + ((size_t)o * 4 + ph) * HW;
            float *dst = B + (size_t)o * s->N_pad + (size_t)ph * HW;
            for (int m = 0; m < H; m++) {
                const float *r0 = dpad + (m + sy0 + 1) * W2 + 1, *r1 = dpad + (m + sy1 + 1) * W2 + 1;
                const float *d00 = r0 + sx0, *d01 = r0 + sx1, *d10 = r1 + sx0, *d11 = r1 + sx1;
                const float *bm = bs + m * W;
                float *out = dst + m * W;
                int n = 0;
                for (; n + VW <= W; n += VW) {
                    vf v = vload(bm + n) + (vset(w0) * vload(d00 + n) + vset(w1) * vload(d01 + n)
                                            + vset(w2) * vload(d10 + n) + vset(w3) * vload(d11 + n));
                    vstore(out + n, vselect(v > vset(0.f), v, vset(0.f)));
                }
                for (; n < W; n++) {
                    float v = bm[n] + (w0 * d00[n] + w1 * d01[n] + w2 * d10[n] + w3 * d11[n]);
                    out[n] = v > 0.f ? v : 0.f;
                }
            }
        }
}

INLINE void fill_original(const shape_t *s, const float *base, float *B) {
    const int HW4 = 4 * s->H * s->W;
    for (int o = 0; o < s->C_mid; o++) {
        const float *bs = base + (size_t)o * HW4;
        float *dst = B + (size_t)o * s->N_pad;
        for (int i = 0; i < HW4; i++) dst[i] = bs[i] > 0.f ? bs[i] : 0.f;
    }
}

static float *alloc_zero(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

/* Y with a zeroed margin of 64 floats (>= VW) on both sides: col2im's shifted vector loads
   may read one float before or after it (that lane is then set to 0). */
#define MARGIN 64
static float *alloc_y(size_t n) {
    float *p = alloc_zero(n + 2 * MARGIN);
    return p ? p + MARGIN : NULL;
}
static void free_y(float *p) { if (p) free(p - MARGIN); }

/* The originals' images, (P, C_out, 4, 4, H, W), from their pre-activations
   base (P, C_mid, 4, H, W) in phase layout. */
int cfm_tail_images(int P, int C_mid, int C_out, int H, int W, int M_pad, int act,
                    const float *base, const float *A, const float *bias, float *img) {
    shape_t s = {0, C_mid, C_out, H, W, M_pad, 0};
    s.N_pad = (4 * H * W + NR - 1) / NR * NR;
    float *B = alloc_zero((size_t)C_mid * s.N_pad), *Y = alloc_y((size_t)M_pad * s.N_pad);
    if (!B || !Y) { free(B); free_y(Y); return -1; }
    const size_t per = (size_t)C_out * 16 * H * W;
    for (int p = 0; p < P; p++) {
        fill_original(&s, base + (size_t)p * C_mid * 4 * H * W, B);
        gemm(M_pad, s.N_pad, C_mid, A, B, Y);
        col2im_act(&s, Y, bias, img + (size_t)p * per, act);
    }
    free(B); free_y(Y);
    return 0;
}

INLINE int tail_sums(const shape_t s, int act, int U, const int64_t *units, int P,
                     const float *dpad, const float *w1, const float *base, const float *A,
                     const float *bias, const float *img, double *sums, double *sumsq) {
    const int C_in = s.C_in, C_mid = s.C_mid, C_out = s.C_out, H = s.H, W = s.W;
    const int M_pad = s.M_pad;
    const int HW = H * W, HW16 = 16 * HW;
    float *B = alloc_zero((size_t)C_mid * s.N_pad), *Y = alloc_y((size_t)M_pad * s.N_pad);
    float *O = alloc_zero((size_t)C_out * HW16), *map = alloc_zero(HW16);
    if (!B || !Y || !O || !map) { free(B); free_y(Y); free(O); free(map); return -1; }
    /* pairs outside, units inside: a pair's base (C_mid x 4HW floats) stays in cache for
       all the units; each unit's sums still run over the pairs in order */
    for (int p = 0; p < P; p++) {
        const float *bp = base + (size_t)p * C_mid * 4 * HW;
        const float *im = img + (size_t)p * C_out * HW16;
        for (int u = 0; u < U; u++) {
            const int64_t c = units[u];
            double *su = sums + (size_t)u * HW16, *qu = sumsq + (size_t)u * HW16;
            fill_hybrid(&s, dpad + ((size_t)p * C_in + c) * (H + 2) * (W + 2),
                        w1 + (size_t)c * C_mid * 16, bp, B);
            gemm(M_pad, s.N_pad, C_mid, A, B, Y);
            col2im_act(&s, Y, bias, O, act);
            for (int i = 0; i < HW16; i += VW) {
                vf acc = vset(0.f);
                for (int co = 0; co < C_out; co++) {
                    vf dv = vload(O + (size_t)co * HW16 + i) - vload(im + (size_t)co * HW16 + i);
                    acc += vselect(dv < vset(0.f), -dv, dv);
                }
                vstore(map + i, acc / vset((float)C_out));
            }
            for (int i = 0; i < HW16; i++) {
                double m = map[i];
                su[i] += m;
                qu[i] += m * m;
            }
        }
    }
    free(B); free_y(Y); free(O); free(map);
    return 0;
}

/* Sums over the pairs of the influence maps of units (channels of the layer):
   sums[u] += mean_co |hybrid - original|, sumsq[u] += its square; (U, 4, 4, H, W) float64.
   dpad (P, C_in, H+2, W+2); w1 (C_in, C_mid, 4, 4); base (P, C_mid, 4, H, W);
   A (C_mid, M_pad); img (P, C_out, 4, 4, H, W). Returns 0, or -1 if out of memory.
   Common sizes run a copy compiled for them (constant loop bounds: about 1.3x faster). */
int cfm_tail_sums(int U, const int64_t *units, int P, int C_in, int C_mid, int C_out,
                  int H, int W, int M_pad, int act, const float *dpad, const float *w1,
                  const float *base, const float *A, const float *bias, const float *img,
                  double *sums, double *sumsq) {
    const int N_pad = (4 * H * W + NR - 1) / NR * NR;
#define CFM_SIZE(h, w, co) \
    if (H == h && W == w && C_out == co) \
        return tail_sums((shape_t){C_in, C_mid, co, h, w, M_pad, N_pad}, act, U, units, P, \
                         dpad, w1, base, A, bias, img, sums, sumsq);
    CFM_SIZE(8, 8, 3) CFM_SIZE(16, 16, 3) CFM_SIZE(32, 32, 3)
    CFM_SIZE(8, 8, 1) CFM_SIZE(16, 16, 1) CFM_SIZE(32, 32, 1)
#undef CFM_SIZE
    return tail_sums((shape_t){C_in, C_mid, C_out, H, W, M_pad, N_pad}, act, U, units, P,
                     dpad, w1, base, A, bias, img, sums, sumsq);
}
