/* y[M, N] (+)= x[M, K] . W[N, K]^T (+ b[N]) in float32, for the few rows of a decode or verification pass;
 * W in float32, or in int8 with one float scale per output row (a draft's weights, as the paper deploys it).
 *
 * At M = 1..24 a linear layer is a stream over its weights: what matters is reading every weight once,
 * at full memory bandwidth, and using it for all M rows while it is in registers. oneDNN's and MKL's
 * general kernels re-read or re-pack per row block and cost 1.3-3x more at M = 6 than at M = 1 on the
 * 2-core machines we measure on (jobs/bench_engine.py); this one costs 1.0-1.2x.
 *
 * Shape of the loop: threads split the weight rows; each takes NR rows at a time and walks K one vector
 * at a time, keeping NR x MC accumulators in registers (MC <= 6 inputs per sweep; larger M sweeps the
 * same NR rows again, now from L1/L2). Prefetching 12 KB ahead keeps the memory stream busy.
 * The tile must fit the register file, or the accumulators spill and every multiply-add goes through
 * memory (measured on AMD Zen 3, AVX2: a 4 x 6 tile of 16-float vectors made M = 6 cost 5x M = 1):
 *   AVX-512, 32 registers: 16-float vectors, NR = 4: 24 accumulators + 4 weights + 1 input;
 *   otherwise (AVX2), 16 registers: 8-float vectors, NR = 2: 12 accumulators + 2 weights + 1 input.
 *
 * int8 weights: a quarter of the bytes, so a quarter of the stream. Each VW int8 weights are widened to floats
 * in registers (sign-extend, convert) and the row's scale is applied once to the finished dot product:
 * y = scale[n] * (x . q[n]) + b[n], the same as x . (scale[n] * q[n]) up to float rounding.
 */
#include <immintrin.h>
#include <stddef.h>

#include "simd.h"

#define NR (VW == 16 ? 4 : 2)  /* weight rows per tile */
#define MC 6                    /* input rows per sweep */
#define AHEAD 12288             /* prefetch distance in bytes (12 KB): the M = 6 pass cost 1.02-1.08x M = 1 with it,
                                 * 1.03-1.11x at 8 KB, 1.1-1.28x at 2-6 KB (12 layers of 768 wide, measured on Zen 3) */

static inline __attribute__((always_inline)) float hsum(vec v) {
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* VW weights from w (float32, or int8 when q8) starting at element i, as floats. The int8 widening is written
 * with intrinsics (one sign-extending load, one convert): GCC's generic vector conversion made it 5x slower. */
static inline __attribute__((always_inline)) vec load_w(const void *w, size_t i, const int q8) {
    if (!q8) return *(const vec *)((const float *)w + i);
    const signed char *p = (const signed char *)w + i;
#if VW == 16
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#endif
}

static inline __attribute__((always_inline)) float w_at(const void *w, size_t i, const int q8) {
    return q8 ? (float)((const signed char *)w)[i] : ((const float *)w)[i];
}

/* nr weight rows x mc inputs; inlined with constant nr, mc and q8 so that the accumulators stay in registers.
 * scale: NULL for float32 weights, else the nr rows' scales. */
static inline __attribute__((always_inline)) void tile(const float *x, const void *w, const float *scale, const float *b,
                                                       float *y, int K, int N, const int nr, const int mc, int accumulate,
                                                       const int q8) {
    vec acc[NR][MC];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) acc[r][m] = (vec){0};
    const int KV = K & ~(VW - 1);
    const size_t ahead = q8 ? AHEAD : AHEAD / 4;  /* the same 12 KB ahead, in elements */
    for (int k = 0; k < KV; k += VW) {
        vec wv[NR];
        for (int r = 0; r < nr; r++) {
            const size_t at = (size_t)r * K + k;
            __builtin_prefetch(q8 ? (const void *)((const signed char *)w + at + ahead) : (const void *)((const float *)w + at + ahead));
            wv[r] = load_w(w, at, q8);
        }
        for (int m = 0; m < mc; m++) {
            vec xv = *(const vec *)(x + (size_t)m * K + k);
            /* x in a register, used for nr multiply-adds; left alone, GCC folds it into each of them as a
             * memory operand: nr loads instead of one, and at M = 6 the load ports, not the FMAs, set the pace */
            if (nr > 1) __asm__("" : "+v"(xv));
            for (int r = 0; r < nr; r++) acc[r][m] += wv[r] * xv;
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) {
            float s = hsum(acc[r][m]);
            for (int k = KV; k < K; k++) s += w_at(w, (size_t)r * K + k, q8) * x[(size_t)m * K + k];
            if (q8) s *= scale[r];
            float *out = y + (size_t)m * N + r;
            *out = (accumulate ? *out : 0.f) + (s + (b ? b[r] : 0.f));  /* the residual add: x + linear(a) */
        }
}

static void rows(const float *x, const void *w, const float *scale, const float *b, float *y, int K, int N, int nr,
                 int mc, int acc) {
#define CASE(M) case M: \
    if (scale) { if (nr == NR) tile(x, w, scale, b, y, K, N, NR, M, acc, 1); else tile(x, w, scale, b, y, K, N, 1, M, acc, 1); } \
    else { if (nr == NR) tile(x, w, 0, b, y, K, N, NR, M, acc, 0); else tile(x, w, 0, b, y, K, N, 1, M, acc, 0); } \
    break;
    switch (mc) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) }
#undef CASE
}

/* accumulate = 1: y += x . W^T + b (y is read), e.g. a residual stream; 0: y = x . W^T + b.
 * scale = NULL: w is float32 [N, K]; else w is int8 [N, K] and scale float32 [N]. */
void skinny_linear_into(const float *x, const void *w, const float *scale, const float *b, float *y, int M, int N, int K,
                        int accumulate) {
    const int tiles = (N + NR - 1) / NR;
    const size_t esize = scale ? 1 : sizeof(float);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        const int n0 = t * NR;
        if (N - n0 >= NR) {
            for (int m0 = 0; m0 < M; m0 += MC)
                rows(x + (size_t)m0 * K, (const char *)w + (size_t)n0 * K * esize, scale ? scale + n0 : 0, b ? b + n0 : 0,
                     y + (size_t)m0 * N + n0, K, N, NR, M - m0 < MC ? M - m0 : MC, accumulate);
        } else {  /* the last N % NR rows, one at a time */
            for (int n = n0; n < N; n++)
                for (int m0 = 0; m0 < M; m0 += MC)
                    rows(x + (size_t)m0 * K, (const char *)w + (size_t)n * K * esize, scale ? scale + n : 0, b ? b + n : 0,
                         y + (size_t)m0 * N + n, K, N, 1, M - m0 < MC ? M - m0 : MC, accumulate);
        }
    }
}
