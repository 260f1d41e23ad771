/* Causal self-attention of a prefill from position 0, float32 (AVX2 + FMA + OpenMP).
 *
 * One call per block replaces RoPE on q and k, the KV-cache writes and
 * scaled_dot_product_attention(q, k, v, is_causal=True) (Vaswani et al., 2017, eq. 1:
 * softmax(q k^T * scale) v, key t' visible to query t when t' <= t), with grouped-query
 * attention (query head h reads kv head h / G; Ainslie et al., 2023). RoPE is the runtime's
 * "rotate half" form (Su et al., 2021): out[d] = x[d] cos[t, d] + x[(d + D/2) mod D] sin[t, d],
 * sin holding -sin in its first half.
 *
 * Layouts (row-major): q [B, T, H * D], k and v [B, T, Hkv * D] as the projections write
 * them; cos and sin [T, D]; the caches [B, Hkv, L, D] (positions 0..T-1 written); out
 * [B, T, H * D], ready for the output projection. Scratch (caller's): the rotated, scaled
 * queries [B, H, T, D] and the rotated keys transposed [B, Hkv, D, Tp] (Tp = T rounded up
 * to 32).
 *
 * Work is split into tasks of QB query tokens times the G query heads of one kv head, so
 * each key and value row loaded serves G * QB queries; a task scores its keys 0..t_last
 * (4 queries x 16 keys per register block; AVX-512: 8 x 32), takes the exact softmax of
 * each row (max, exp, sum over the visible keys) and accumulates p v (2 queries x 32
 * dimensions per block; AVX-512: 4 x 64).
 * Tasks run largest first over the threads (later query blocks see more keys).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lowbit_native.h"
#include "simd_avx2.h"

#define QB 16 /* query tokens per task */
#define LB_AVX512 __attribute__((target("avx512f,avx512dq")))

static void rope_into(const float *x, int64_t D, const float *cos, const float *sin, float mul,
                      float *out) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) out[d] = (x[d] * cos[d] + x[d + half] * sin[d]) * mul;
    for (int64_t d = half; d < D; d++) out[d] = (x[d] * cos[d] + x[d - half] * sin[d]) * mul;
}

/* Scores of 4 queries (rows q, q + D, ...) against keys j..j+15 of kt [D, Tp]. */
static inline void score_block(const float *q, const float *kt, int64_t D, int64_t Tp,
                               float *s, int64_t ls) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
    __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    for (int64_t d = 0; d < D; d++) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * Tp), k1 = _mm256_loadu_ps(kt + d * Tp + 8);
        __m256 b = _mm256_broadcast_ss(q + d);
        a00 = _mm256_fmadd_ps(b, k0, a00), a01 = _mm256_fmadd_ps(b, k1, a01);
        b = _mm256_broadcast_ss(q + D + d);
        a10 = _mm256_fmadd_ps(b, k0, a10), a11 = _mm256_fmadd_ps(b, k1, a11);
        b = _mm256_broadcast_ss(q + 2 * D + d);
        a20 = _mm256_fmadd_ps(b, k0, a20), a21 = _mm256_fmadd_ps(b, k1, a21);
        b = _mm256_broadcast_ss(q + 3 * D + d);
        a30 = _mm256_fmadd_ps(b, k0, a30), a31 = _mm256_fmadd_ps(b, k1, a31);
    }
    _mm256_storeu_ps(s, a00), _mm256_storeu_ps(s + 8, a01);
    _mm256_storeu_ps(s + ls, a10), _mm256_storeu_ps(s + ls + 8, a11);
    _mm256_storeu_ps(s + 2 * ls, a20), _mm256_storeu_ps(s + 2 * ls + 8, a21);
    _mm256_storeu_ps(s + 3 * ls, a30), _mm256_storeu_ps(s + 3 * ls + 8, a31);
}

/* p = exp(s - max) over keys 0..n-1, zero for keys n..w-1 (w a multiple of 8); returns
 * 1 / sum. */
static float softmax_row(float *s, int64_t n, int64_t w) {
    __m256 top = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
    float m = -INFINITY, lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= w; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        if (j + 8 > n) {  /* the diagonal: keys past the query are masked */
            const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256 keep = _mm256_castsi256_ps(
                _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), idx));
            p = _mm256_and_ps(p, keep);
        }
        _mm256_storeu_ps(s + j, p);
        sum = _mm256_add_ps(sum, p);
    }
    return 1.0f / hsum8(sum);
}

/* out rows o0, o1 [D] = (p0 v, p1 v) * inv over keys 0..n-1 (v [.., D] rows). */
static void pv_pair(const float *p0, const float *p1, float inv0, float inv1, int64_t n,
                    const float *v, int64_t D, float *o0, float *o1) {
    for (int64_t d = 0; d < D; d += 32) {
        const int64_t w = D - d < 32 ? D - d : 32; /* 8, 16, 24 or 32 */
        __m256 x0 = _mm256_setzero_ps(), x1 = x0, x2 = x0, x3 = x0;
        __m256 y0 = x0, y1 = x0, y2 = x0, y3 = x0;
        for (int64_t j = 0; j < n; j++) {
            const float *vj = v + j * D + d;
            const __m256 b0 = _mm256_broadcast_ss(p0 + j), b1 = _mm256_broadcast_ss(p1 + j);
            __m256 t = _mm256_loadu_ps(vj);
            x0 = _mm256_fmadd_ps(b0, t, x0), y0 = _mm256_fmadd_ps(b1, t, y0);
            if (w > 8) {
                t = _mm256_loadu_ps(vj + 8);
                x1 = _mm256_fmadd_ps(b0, t, x1), y1 = _mm256_fmadd_ps(b1, t, y1);
            }
            if (w > 16) {
                t = _mm256_loadu_ps(vj + 16);
                x2 = _mm256_fmadd_ps(b0, t, x2), y2 = _mm256_fmadd_ps(b1, t, y2);
            }
            if (w > 24) {
                t = _mm256_loadu_ps(vj + 24);
                x3 = _mm256_fmadd_ps(b0, t, x3), y3 = _mm256_fmadd_ps(b1, t, y3);
            }
        }
        const __m256 i0 = _mm256_set1_ps(inv0), i1 = _mm256_set1_ps(inv1);
        __m256 xs[4] = {x0, x1, x2, x3}, ys[4] = {y0, y1, y2, y3};
        for (int64_t c = 0; c < w / 8; c++) {
            _mm256_storeu_ps(o0 + d + 8 * c, _mm256_mul_ps(xs[c], i0));
            _mm256_storeu_ps(o1 + d + 8 * c, _mm256_mul_ps(ys[c], i1));
        }
    }
}

/* AVX-512 (where lowbit_avx512_allowed): 8 queries x 32 keys per score block; 4 queries x
 * 64 dimensions per p v block. Same sums in the same order per output as the AVX2 ones. */
LB_AVX512 static void score_block_512(const float *q, const float *kt, int64_t D, int64_t Tp,
                                      float *s, int64_t ls) {
    __m512 a[8][2];
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m512 k0 = _mm512_loadu_ps(kt + d * Tp), k1 = _mm512_loadu_ps(kt + d * Tp + 16);
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            const __m512 b = _mm512_set1_ps(q[r * D + d]);
            a[r][0] = _mm512_fmadd_ps(b, k0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(b, k1, a[r][1]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_ps(s + r * ls, a[r][0]);
        _mm512_storeu_ps(s + r * ls + 16, a[r][1]);
    }
}

/* o_r[d0 .. d0 + 16 nv) = (p_r v)[..] * inv_r for the 4 rows r; nv is a constant at every
 * call (the accumulators stay in registers). */
static inline __attribute__((always_inline)) LB_AVX512 void pv_quad_lanes(
    const float *const *p, const float *inv, int64_t n, const float *v, int64_t D,
    float *const *o, int64_t d0, const int nv) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nv; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vj[4];
#pragma GCC unroll 4
        for (int c = 0; c < nv; c++) vj[c] = _mm512_loadu_ps(v + j * D + d0 + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512 b = _mm512_set1_ps(p[r][j]);
#pragma GCC unroll 4
            for (int c = 0; c < nv; c++) acc[r][c] = _mm512_fmadd_ps(b, vj[c], acc[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < nv; c++)
            _mm512_storeu_ps(o[r] + d0 + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
}

LB_AVX512 static void pv_quad_512(const float *const *p, const float *inv, int64_t n,
                                  const float *v, int64_t D, float *const *o) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) pv_quad_lanes(p, inv, n, v, D, o, d0, 4);
    for (; d0 < D; d0 += 16) pv_quad_lanes(p, inv, n, v, D, o, d0, 1);
}

/* One task: query tokens t0..t0+QB-1 (clipped to T) of the G heads of kv head (b, kvh). */
static void attend_task(const float *qs, const float *kt, const float *vc, int64_t T,
                        int64_t Tp, int64_t H, int64_t G, int64_t D, int64_t b, int64_t kvh,
                        int64_t t0, float *s, float *out, int wide) {
    const int64_t nq = T - t0 < QB ? T - t0 : QB, nk = t0 + nq, w = (nk + 31) & ~(int64_t)31;
    const int64_t rb = wide ? 8 : 4; /* query rows per score block */
    float inv[16 * QB], tail[8 * 256];
    for (int64_t g = 0; g < G; g++) {
        const float *qg = qs + ((b * H + kvh * G + g) * T + t0) * D;
        float *sg = s + g * QB * w;
        for (int64_t i = 0; i < nq; i += rb) {
            const float *qi = qg + i * D;
            if (i + rb > nq) { /* the last rows: zeros past the last token, never read back */
                for (int64_t x = 0; x < rb * D; x++) tail[x] = x < (nq - i) * D ? qi[x] : 0.0f;
                qi = tail;
            }
            if (wide)
                for (int64_t j = 0; j < w; j += 32) score_block_512(qi, kt + j, D, Tp, sg + i * w + j, w);
            else
                for (int64_t j = 0; j < w; j += 16) score_block(qi, kt + j, D, Tp, sg + i * w + j, w);
        }
        for (int64_t i = 0; i < nq; i++) inv[g * QB + i] = softmax_row(sg + i * w, t0 + i + 1, w);
    }
    for (int64_t g = 0; g < G; g++) {
        const float *sg = s + g * QB * w;
        const int64_t step = wide && D % 16 == 0 ? 4 : 2;
        for (int64_t i = 0; i < nq; i += step) {
            const float *p[4];
            float *o[4], iv[4];
            int64_t last = i;
            for (int64_t r = 0; r < step; r++) { /* rows past the last token repeat it */
                const int64_t ir = i + r < nq ? i + r : nq - 1;
                last = ir;
                p[r] = sg + ir * w, iv[r] = inv[g * QB + ir];
                o[r] = out + ((b * T + t0 + ir) * H + kvh * G + g) * D;
            }
            if (step == 4)
                pv_quad_512(p, iv, t0 + last + 1, vc, D, o);
            else
                pv_pair(p[0], p[1], iv[0], iv[1], t0 + last + 1, vc, D, o[0], o[1]);
        }
    }
}

/* See the header. Returns 0; -1 when D is not a multiple of 8 in 8..256, G > 16 or T > L;
 * -2 when a thread's score scratch could not be allocated. */
int lowbit_prefill_attention(const float *q, const float *k, const float *v, int64_t B,
                             int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t L,
                             const float *cos, const float *sin, float *kcache, float *vcache,
                             float scale, float *out, float *qs, float *kt) {
    const int64_t G = H / Hkv, Tp = (T + 31) & ~(int64_t)31;
    const int wide = (int)lowbit_avx512_allowed();
    if (D % 8 || D < 8 || D > 256 || G * Hkv != H || G > 16 || T > L) return -1;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t bt = 0; bt < B * T; bt++) {
            const int64_t b = bt / T, t = bt % T;
            const float *cs = cos + t * D, *sn = sin + t * D;
            for (int64_t h = 0; h < H; h++)
                rope_into(q + (bt * H + h) * D, D, cs, sn, scale, qs + ((b * H + h) * T + t) * D);
            for (int64_t h = 0; h < Hkv; h++) {
                float *kc = kcache + ((b * Hkv + h) * L + t) * D;
                float *vcr = vcache + ((b * Hkv + h) * L + t) * D;
                rope_into(k + (bt * Hkv + h) * D, D, cs, sn, 1.0f, kc);
                const float *vr = v + (bt * Hkv + h) * D;
                for (int64_t d = 0; d < D; d++) vcr[d] = vr[d];
            }
        }
        /* the rotated keys transposed, 32 positions at a time (their rows stay in L1),
         * zeros past T up to Tp */
        const int64_t tiles = Tp / 32;
#pragma omp for schedule(static)
        for (int64_t bt = 0; bt < B * Hkv * tiles; bt++) {
            const int64_t bh = bt / tiles, t0 = bt % tiles * 32;
            const float *kc = kcache + bh * L * D;
            float *kth = kt + bh * D * Tp;
            for (int64_t d = 0; d < D; d++)
                for (int64_t t = t0; t < t0 + 32; t++)
                    kth[d * Tp + t] = t < T ? kc[t * D + d] : 0.0f;
        }
    }
    const int64_t blocks = (T + QB - 1) / QB, tasks = B * Hkv * blocks;
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * G * QB * Tp);
        if (s == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t blk = blocks - 1 - task / (B * Hkv), bh = task % (B * Hkv);
            if (s != NULL)
                attend_task(qs, kt + bh * D * Tp, vcache + bh * L * D, T, Tp, H, G, D,
                            bh / Hkv, bh % Hkv, blk * QB, s, out, wide);
        }
        free(s);
    }
    return failed ? -2 : 0;
}
