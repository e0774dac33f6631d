/* y[M, N] = x[M, K] . W[N, K]^T (+ b[N]) in float32, for the few rows of a decode or verification pass.
 *
 * At M = 1..12 a linear layer is a stream over its weights: what matters is reading every weight once,
 * at full memory bandwidth, and using it for all M rows while it is in registers. oneDNN's and MKL's
 * general kernels re-read or re-pack per row block and cost 1.3-1.9x more at M = 6 than at M = 1 here
 * (2 cores, measured in jobs/bench_engine.py); this one costs about 1.2x.
 *
 * Shape of the loop: threads split the weight rows; each takes NR = 4 rows at a time and walks K in
 * 16-float vectors, keeping NR x MC accumulators in registers (MC <= 6 inputs per sweep; larger M sweeps
 * the same 4 rows again, now from L1/L2). Prefetching a few KB ahead keeps the memory stream busy.
 * GCC vector extensions: AVX-512 registers with -march=native on such CPUs, AVX2 pairs elsewhere.
 */
#include <stddef.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

#define NR 4         /* weight rows per tile */
#define MC 6         /* input rows per sweep: NR * MC accumulators + MC inputs + 1 weight fit 32 registers */
#define AHEAD 2048   /* prefetch distance, in floats along each weight row stream */

static inline __attribute__((always_inline)) float hsum(v16 v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* nr weight rows x mc inputs; inlined with constant nr and mc so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, const float *b, float *y,
                                                       int K, int N, const int nr, const int mc) {
    v16 acc[NR][MC];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) acc[r][m] = (v16){0};
    const int K16 = K & ~15;
    for (int k = 0; k < K16; k += 16) {
        v16 xv[MC];
        for (int m = 0; m < mc; m++) xv[m] = *(const v16 *)(x + (size_t)m * K + k);
        for (int r = 0; r < nr; r++) {
            const float *wr = w + (size_t)r * K + k;
            __builtin_prefetch(wr + AHEAD);
            v16 wv = *(const v16 *)wr;
            for (int m = 0; m < mc; m++) acc[r][m] += wv * xv[m];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) {
            float s = hsum(acc[r][m]);
            for (int k = K16; k < K; k++) s += w[(size_t)r * K + k] * x[(size_t)m * K + k];
            y[(size_t)m * N + r] = s + (b ? b[r] : 0.f);
        }
}

static void rows(const float *x, const float *w, const float *b, float *y, int K, int N, int nr, int mc) {
#define CASE(M) case M: if (nr == NR) tile(x, w, b, y, K, N, NR, M); else tile(x, w, b, y, K, N, 1, M); break;
    switch (mc) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) }
#undef CASE
}

void skinny_linear(const float *x, const float *w, const float *b, float *y, int M, int N, int K) {
    const int tiles = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        const int n0 = t * NR;
        if (N - n0 >= NR) {
            for (int m0 = 0; m0 < M; m0 += MC)
                rows(x + (size_t)m0 * K, w + (size_t)n0 * K, b ? b + n0 : 0, y + (size_t)m0 * N + n0, K, N, NR,
                     M - m0 < MC ? M - m0 : MC);
        } else {  /* the last N % NR rows, one at a time */
            for (int n = n0; n < N; n++)
                for (int m0 = 0; m0 < M; m0 += MC)
                    rows(x + (size_t)m0 * K, w + (size_t)n * K, b ? b + n : 0, y + (size_t)m0 * N + n, K, N, 1,
                         M - m0 < MC ? M - m0 : MC);
        }
    }
}
