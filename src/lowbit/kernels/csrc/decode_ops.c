/* The small float32 operations of one Llama-style decode step, fused (AVX2 + FMA + OpenMP).
 *
 * Built with gemv_avx2.c into one library (lowbit/kernels/native.py). A decode step of a
 * small model runs about 25 torch operations per block besides its 7 matmuls, each a few
 * microseconds of dispatch for a few hundred floats of work. DecoderRuntime's native step
 * calls these instead: 4 calls per block.
 *
 * rmsnorm:  out = x / sqrt(mean(x^2) + eps) * w                  (Zhang & Sennrich, 2019)
 *           add_rmsnorm first does x += d in place (the residual add), then the same.
 * attend:   RoPE on q and k (Su et al., 2021; the runtime's "rotate half" form
 *           out[d] = x[d] cos[d] + x[(d + D/2) mod D] sin'[d], with sin' holding -sin in
 *           its first half), k and v written into the cache at position pos, then for every
 *           query head softmax(q k^T * scale) v over positions 0..pos. Query head h reads
 *           kv head h / G (grouped-query attention), heads in the order of q's columns.
 * silu_mul: out = g / (1 + exp(-g)) * u                           (SwiGLU, Shazeer, 2020)
 *           (exp: simd_avx2.h's exp8, about 1 ulp)
 * Every row of the batch is independent: x is [M, n], q [M, H * D], k and v [M, Hkv * D],
 * the caches [M, Hkv, max_len, D].
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd_avx2.h"

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* 1 / sqrt(mean(x^2) + eps) */
float lowbit_rms_inverse(const float *x, int64_t n, float eps) {
    return 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
}

static void rmsnorm_row(const float *x, int64_t n, const float *w, float eps, float *out) {
    float inv = lowbit_rms_inverse(x, n, eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* Rows split over the threads from 64 on (a prefill); a decode step's few rows run inline. */
void lowbit_rmsnorm(const float *x, int64_t M, int64_t n, const float *w, float eps, float *out) {
#pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * n, n, w, eps, out + m * n);
}

void lowbit_add_rmsnorm(float *x, const float *d, int64_t M, int64_t n, const float *w,
                        float eps, float *out) {
#pragma omp parallel for schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++) {
        float *xm = x + m * n;
        for (int64_t i = 0; i < n; i++) xm[i] += d[m * n + i];
        rmsnorm_row(xm, n, w, eps, out + m * n);
    }
}

void lowbit_silu_mul(const float *g, const float *u, int64_t count, float *out) {
    const int64_t chunk = 4096; /* floats per task: whole vectors, a page or more each */
#pragma omp parallel for schedule(static) if (count >= 16 * chunk)
    for (int64_t c = 0; c < count; c += chunk)
        silu_mul8(g + c, u + c, count - c < chunk ? count - c : chunk, out + c);
}

static void rope(const float *x, int64_t D, const float *cos, const float *sin, float *out) {
    int64_t half = D / 2; /* two loops: no integer division per element */
    for (int64_t d = 0; d < half; d++) out[d] = x[d] * cos[d] + x[d + half] * sin[d];
    for (int64_t d = half; d < D; d++) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

/* RoPE on q (in place) and k, k and v written into the caches at position pos. */
void lowbit_attend_write(float *q, const float *k, const float *v, int64_t M, int64_t H,
                         int64_t Hkv, int64_t D, int64_t pos, int64_t L, const float *cos,
                         const float *sin, float *kcache, float *vcache) {
    float tmp[512];
    for (int64_t m = 0; m < M; m++) {
        for (int64_t h = 0; h < H; h++) {
            float *qh = q + (m * H + h) * D;
            rope(qh, D, cos, sin, tmp);
            for (int64_t d = 0; d < D; d++) qh[d] = tmp[d];
        }
        for (int64_t h = 0; h < Hkv; h++) {
            float *kc = kcache + ((m * Hkv + h) * L + pos) * D;
            float *vc = vcache + ((m * Hkv + h) * L + pos) * D;
            rope(k + (m * Hkv + h) * D, D, cos, sin, kc);
            for (int64_t d = 0; d < D; d++) vc[d] = v[(m * Hkv + h) * D + d];
        }
    }
}

/* Attention of (row, query head) pairs mh in [mh0, mh1) over positions 0..pos. */
void lowbit_attend_heads(const float *q, int64_t H, int64_t Hkv, int64_t D, int64_t pos,
                         int64_t L, const float *kcache, const float *vcache, float scale,
                         float *out, float *scores, int64_t mh0, int64_t mh1) {
    const int64_t G = H / Hkv, T = pos + 1;
    for (int64_t mh = mh0; mh < mh1; mh++) {
        const int64_t m = mh / H, h = mh % H, kvh = h / G;
        const float *qh = q + mh * D;
        const float *kc = kcache + (m * Hkv + kvh) * L * D, *vc = vcache + (m * Hkv + kvh) * L * D;
        float *s = scores + mh * T, top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            s[t] = dot(qh, kc + t * D, D) * scale;
            top = s[t] > top ? s[t] : top;
        }
        for (int64_t t = 0; t < T; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        float *o = out + mh * D, inv = 1.0f / total;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float p = s[t] * inv, *vt = vc + t * D;
            for (int64_t d = 0; d < D; d++) o[d] += p * vt[d];
        }
    }
}

/* q: [M, H * D] (rotated in place); k, v: [M, Hkv * D]; caches [M, Hkv, L, D]; cos, sin:
 * [D] for this position; out: [M, H * D]; scores: scratch of M * H * (pos + 1) floats. */
void lowbit_attend(float *q, const float *k, const float *v, int64_t M, int64_t H,
                   int64_t Hkv, int64_t D, int64_t pos, int64_t L, const float *cos,
                   const float *sin, float *kcache, float *vcache, float scale, float *out,
                   float *scores) {
    lowbit_attend_write(q, k, v, M, H, Hkv, D, pos, L, cos, sin, kcache, vcache);
#pragma omp parallel for schedule(static) if (M * H * (pos + 1) * D >= 262144)
    for (int64_t mh = 0; mh < M * H; mh++)
        lowbit_attend_heads(q, H, Hkv, D, pos, L, kcache, vcache, scale, out, scores, mh,
                            mh + 1);
}
