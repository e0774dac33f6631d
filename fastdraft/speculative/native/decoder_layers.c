/* All decoder layers of a Llama-family model for the few rows of a decode or verification pass, in one call.
 *
 * Why: at 1..24 rows the linears are a stream over the weights (skinny_linear.c), and what is left is ~25
 * small tensor ops per layer (norms, rope, cache writes, attention, SiLU) whose dispatch costs more than
 * their arithmetic: measured on 2 cores, ~20% of a 1-token pass and more of a 6-token one, and most of a
 * 1-layer draft's step. Here each of them is a loop over a few KB, so a pass costs about its weight read.
 *
 * Same arithmetic as transformers' LlamaDecoderLayer in float32 (order of additions aside): RMSNorm,
 * fused q|k|v projection (+ bias), per-head q/k RMSNorm (Qwen3), rotate-half rope from the model's own
 * cos/sin tables, grouped-query attention over the KV cache where query i of row b sees positions
 * <= offsets[b] + i, output projection and residual, RMSNorm, fused gate|up, SiLU(gate) * up, down and
 * residual. Weights are row-major [out, in], float32 or int8 with per-row scales; the cache is [layers, batch, kv_heads, capacity, head_dim].
 */
#include <math.h>
#include <stddef.h>

#include "simd.h"

void skinny_linear_into(const float *x, const void *w, const float *scale, const float *b, float *y, int M, int N, int K,
                        int accumulate);

typedef struct {
    const void *wqkv, *wo, *wgu, *wd;  /* float32, or int8 when the layer has scales */
    const float *bqkv, *bo, *ln1, *ln2, *q_norm, *k_norm;  /* bias and q/k norms may be NULL */
    const float *s_qkv, *s_o, *s_gu, *s_d;  /* int8 weights' per-row scales; NULL: the weights are float32 */
} Layer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, vocab;
    float eps, scale;
    const Layer *layer;
    const float *embed, *norm;  /* token embeddings [vocab, hidden] and the final norm's weight */
} Model;


/* e^x for VW floats at once: Cephes' expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp), because
 * the scalar expf of libm, one call per score and per SiLU, was a fifth of a 6-token pass's non-linear time.
 * x is clamped to [-87.3, 88.3]: far-negative scores give ~1e-38 instead of 0, which softmax cannot tell. */
static inline vec vexp(vec x) {
    const vec hi = (vec){0} + 88.3762626647949f, lo = (vec){0} - 87.3365447504f;
    ivec over = x > hi, under = x < lo;  /* lanes of -1 / 0; a cast between vector types keeps the bits */
    x = (vec)(((ivec)hi & over) | ((ivec)x & ~over));
    x = (vec)(((ivec)lo & under) | ((ivec)x & ~under));
    const vec magic = (vec){0} + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to the nearest integer */
    vec n = (x * 1.44269504088896341f + magic) - magic;
    vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vec)((__builtin_convertvector(n, ivec) + 127) << 23);  /* times 2^n, built in the exponent bits */
}

static void exp_inplace(float *x, int n) {
    int k = 0;
    for (; k + VW <= n; k += VW) *(vec *)(x + k) = vexp(*(const vec *)(x + k));
    for (; k < n; k++) x[k] = expf(x[k]);
}

static inline __attribute__((always_inline)) float hsum(vec v) {
    float s = 0.f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* s[j] = scale * q . K[j] for keys j < n. Four keys at a time: one dot product is a chain of hd / VW dependent
 * multiply-adds, and four chains in flight keep the FMA units busy (one at a time, a 6-token verification spent
 * a tenth of its time waiting on them at 160 cached positions). */
static void attention_scores(const float *q, const float *K, int n, int hd, float scale, float *s) {
    const int dv = hd & ~(VW - 1);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = K + (size_t)j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
        vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int d = 0; d < dv; d += VW) {
            const vec qv = *(const vec *)(q + d);
            a0 += qv * *(const vec *)(k0 + d);
            a1 += qv * *(const vec *)(k1 + d);
            a2 += qv * *(const vec *)(k2 + d);
            a3 += qv * *(const vec *)(k3 + d);
        }
        float t0 = hsum(a0), t1 = hsum(a1), t2 = hsum(a2), t3 = hsum(a3);
        for (int d = dv; d < hd; d++) t0 += q[d] * k0[d], t1 += q[d] * k1[d], t2 += q[d] * k2[d], t3 += q[d] * k3[d];
        s[j] = t0 * scale, s[j + 1] = t1 * scale, s[j + 2] = t2 * scale, s[j + 3] = t3 * scale;
    }
    for (; j < n; j++) {
        const float *k0 = K + (size_t)j * hd;
        vec a0 = {0};
        for (int d = 0; d < dv; d += VW) a0 += *(const vec *)(q + d) * *(const vec *)(k0 + d);
        float t0 = hsum(a0);
        for (int d = dv; d < hd; d++) t0 += q[d] * k0[d];
        s[j] = t0 * scale;
    }
}

/* out[0 .. nv * VW) = sum_j w[j] * V[j, 0 .. nv * VW): eight accumulators in registers, 8 / nv keys in flight. */
static inline __attribute__((always_inline)) void weighted_block(const float *w, const float *V, int n, int hd,
                                                                 float *out, const int nv) {
    const int u = 8 / nv;
    vec acc[8];
    for (int i = 0; i < 8; i++) acc[i] = (vec){0};
    int j = 0;
    for (; j + u <= n; j += u)
        for (int k = 0; k < u; k++)
            for (int i = 0; i < nv; i++) acc[k * nv + i] += w[j + k] * *(const vec *)(V + (size_t)(j + k) * hd + i * VW);
    for (; j < n; j++)
        for (int i = 0; i < nv; i++) acc[i] += w[j] * *(const vec *)(V + (size_t)j * hd + i * VW);
    for (int k = 1; k < u; k++)
        for (int i = 0; i < nv; i++) acc[i] += acc[k * nv + i];
    for (int i = 0; i < nv; i++) *(vec *)(out + i * VW) = acc[i];
}

/* out[hd] = sum_j w[j] * V[j, :] */
static void weighted_sum(const float *w, const float *V, int n, int hd, float *out) {
    int d = 0;
    for (; d + 8 * VW <= hd; d += 8 * VW) weighted_block(w, V + d, n, hd, out + d, 8);
    if (d + 4 * VW <= hd) weighted_block(w, V + d, n, hd, out + d, 4), d += 4 * VW;
    if (d + 2 * VW <= hd) weighted_block(w, V + d, n, hd, out + d, 2), d += 2 * VW;
    if (d + VW <= hd) weighted_block(w, V + d, n, hd, out + d, 1), d += VW;
    for (; d < hd; d++) {
        float a = 0.f;
        for (int j = 0; j < n; j++) a += w[j] * V[(size_t)j * hd + d];
        out[d] = a;
    }
}

static void rms_norm(const float *x, const float *w, float *y, int n, float eps) {
    double ss = 0.0;
    for (int k = 0; k < n; k++) ss += (double)x[k] * x[k];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int k = 0; k < n; k++) y[k] = w[k] * (x[k] * r);
}

/* x * cos + rotate_half(x) * sin, with the sign of rotate_half folded into the table (sin_signed). */
static void rope(float *x, const float *cos, const float *sin_signed, int n) {
    const int half = n / 2;
    float t[n];
    for (int d = 0; d < n; d++) t[d] = x[d] * cos[d] + x[d < half ? d + half : d - half] * sin_signed[d];
    for (int d = 0; d < n; d++) x[d] = t[d];
}

/* x[B * T, hidden] = final_norm(layers(embed[ids])): the token embeddings, every layer, the final norm (the head is
 * the caller's, applied to the rows it wants), because the per-call Python around them cost ~0.1 ms, a twentieth of
 * a small draft's step. Returns 0, or 1 + the first row whose id is outside the embedding table (nothing computed). */
int decoder_layers(const Model *m, const long long *ids, float *x, int B, int T, const int *offsets, const float *cos,
                    const float *sin_signed, float *kcache, float *vcache, int capacity, int kv_len,
                    float *h, float *qkv, float *att, float *gu, float *act, float *scores) {
    const int R = B * T, D = m->hidden, nq = m->heads, nkv = m->kv_heads, hd = m->head_dim, I = m->intermediate;
    const int QKV = (nq + 2 * nkv) * hd, group = nq / nkv;
    const size_t layer_stride = (size_t)B * nkv * capacity * hd;
    for (int r = 0; r < R; r++)
        if (ids[r] < 0 || ids[r] >= m->vocab) return r + 1;
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d++) x[(size_t)r * D + d] = m->embed[(size_t)ids[r] * D + d];
    for (int l = 0; l < m->layers; l++) {
        const Layer *L = &m->layer[l];
        float *K = kcache + l * layer_stride, *V = vcache + l * layer_stride;
        for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * D, L->ln1, h + (size_t)r * D, D, m->eps);
        skinny_linear_into(h, L->wqkv, L->s_qkv, L->bqkv, qkv, R, QKV, D, 0);
        /* q and k: optional per-head norm, then rope at each token's position; k and v into the cache. */
        for (int r = 0; r < R; r++) {
            const int b = r / T, pos = offsets[b] + r % T;
            float *row = qkv + (size_t)r * QKV;
            for (int j = 0; j < nq + nkv; j++) {
                float *v = row + j * hd;
                const float *norm = j < nq ? L->q_norm : L->k_norm;
                if (norm) rms_norm(v, norm, v, hd, m->eps);
                rope(v, cos + (size_t)pos * hd, sin_signed + (size_t)pos * hd, hd);
            }
            for (int g = 0; g < nkv; g++) {
                const size_t at = (((size_t)b * nkv + g) * capacity + pos) * hd;
                for (int d = 0; d < hd; d++) {
                    K[at + d] = row[(nq + g) * hd + d];
                    V[at + d] = row[(nq + nkv + g) * hd + d];
                }
            }
        }
        /* attention: one task per (row, token, head); softmax with the max subtracted, as SDPA does */
#pragma omp parallel for schedule(static)
        for (int task = 0; task < R * nq; task++) {
            const int r = task / nq, hq = task % nq, b = r / T, g = hq / group;
            const int visible = offsets[b] + r % T + 1;
            const float *q = qkv + (size_t)r * QKV + hq * hd;
            const float *Kb = K + ((size_t)b * nkv + g) * capacity * hd, *Vb = V + ((size_t)b * nkv + g) * capacity * hd;
            float *s = scores + (size_t)task * kv_len, *out = att + (size_t)r * nq * hd + hq * hd;
            attention_scores(q, Kb, visible, hd, m->scale, s);
            float top = -INFINITY;
            for (int j = 0; j < visible; j++) top = s[j] > top ? s[j] : top;
            for (int j = 0; j < visible; j++) s[j] -= top;
            exp_inplace(s, visible);
            float total = 0.f;
            for (int j = 0; j < visible; j++) total += s[j];
            weighted_sum(s, Vb, visible, hd, out);
            for (int d = 0; d < hd; d++) out[d] /= total;
        }
        skinny_linear_into(att, L->wo, L->s_o, L->bo, x, R, D, nq * hd, 1);  /* x += o_proj(att) */
        for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * D, L->ln2, h + (size_t)r * D, D, m->eps);
        skinny_linear_into(h, L->wgu, L->s_gu, NULL, gu, R, 2 * I, D, 0);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < R; r++) {  /* act = silu(gate) * up = gate / (1 + e^-gate) * up */
            const float *gate = gu + (size_t)r * 2 * I, *up = gate + I;
            float *out = act + (size_t)r * I;
            for (int i = 0; i < I; i++) out[i] = -gate[i];
            exp_inplace(out, I);
            for (int i = 0; i < I; i++) out[i] = gate[i] / (1.0f + out[i]) * up[i];
        }
        skinny_linear_into(act, L->wd, L->s_d, NULL, x, R, D, I, 1);  /* x += down_proj(act) */
    }
    for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * D, m->norm, x + (size_t)r * D, D, m->eps);
    return 0;
}
