/* A whole Llama-style decode step in one call: every block, the final norm and the output
 * head over lowbit's packed weights (runtime/native_loop.py builds the descriptor).
 *
 * One OpenMP region per token. Small operations (RMSNorm, RoPE and the cache write, SiLU x
 * up, activation quantization) run on one thread (`omp single`); every linear and the
 * attention heads are split over all threads by rows / heads, with a barrier between the
 * stages that depend on each other. The step is DecoderRuntime's eager decode:
 *
 *   h = rmsnorm(x);  q, k, v = h Wq, h Wk, h Wv;  a = attend(rope(q), rope(k) -> cache, v)
 *   x += a Wo;  h = rmsnorm(x);  x += (silu(h Wg) * h Wu) Wd;   logits = rmsnorm(x) Wh
 *
 * Linears run float32 activations (the reference: the GEMVs of gemv_avx2.c and the small
 * loops below) or, with model->q8, int8 activations per block of 32 as llama.cpp's
 * Q8_0 x Q8_0 and Q4_0 x Q8_0 dot products (ggml-cpu/arch/x86/quants.c): the block's
 * scale d = max|x| / 127, codes round(x / d), integer block dot products with
 * vpdpbusd (AVX512-VNNI, built with target attributes and run only where the CPU has it).
 * vpdpbusd multiplies unsigned by signed bytes: int8 weights are offset by +128 (one XOR)
 * and the offset removed with each 4-input lane's code sum, 4-bit codes are unsigned
 * already and their -8 removed the same way.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_native.h"
#include "simd_avx2.h"

#define LB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

/* int8 activations of one vector, padded to kp = K rounded up to 64 with zeros. Per
 * 4-input lane l: dl[l] its block's scale, ls[l] the sum of its 4 codes, dls = dl * ls. */
typedef struct {
    int8_t *xq;
    float *dl, *dls;
    int32_t *ls;
} lb_q8;

static int64_t up64(int64_t k) { return (k + 63) / 64 * 64; }

int64_t lowbit_loop_has_vnni(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vnni");
    }
    return known;
}

/* Q8_0's quantization of x[0..K) (quantize_row_q8_0_ref, with round-half-even): whole
 * blocks 8 lanes at a time (cvtps rounds to nearest even, as nearbyintf), the rest scalar. */
void lowbit_q8_quantize(const float *x, int64_t K, int8_t *xq, float *dl, int32_t *ls,
                        float *dls) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < up64(K); b += 32) {
        float d;
        if (b + 32 <= K) {
            __m256 v[4], m = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(x + b + 8 * i);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            d = _mm_cvtss_f32(h) / 127.0f;
            const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
            __m256i c[4];
            for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                                 _mm256_packs_epi32(c[2], c[3]));
            _mm256_storeu_si256((__m256i *)(xq + b), _mm256_permutevar8x32_epi32(q, order));
        } else {
            float amax = 0.0f;
            for (int64_t k = b; k < b + 32 && k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
            d = amax / 127.0f;
            const float inv = d > 0.0f ? 1.0f / d : 0.0f;
            for (int64_t k = b; k < b + 32; k++)
                xq[k] = k < K ? (int8_t)nearbyintf(x[k] * inv) : 0;
        }
        for (int64_t l = b / 4; l < (b + 32) / 4; l++) {
            ls[l] = xq[4 * l] + xq[4 * l + 1] + xq[4 * l + 2] + xq[4 * l + 3];
            dl[l] = d;
            dls[l] = d * (float)ls[l];
        }
    }
}

static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* exp(x) for 8 floats: Cephes' expf (2^n e^r, degree-6 polynomial on |r| <= ln2 / 2,
 * about 1 ulp), as in avx_mathfun; the libm call per element costs more than the rest of
 * a block's small operations together. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* g = g / (1 + exp(-g)) * u (SwiGLU), 8 at a time. */
static void silu_mul8(float *g, const float *u, int64_t count) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i), one = _mm256_set1_ps(1.0f);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(u + i)));
    }
    for (; i < count; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static float f32_row(const float *x, const float *w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

/* sum_g s[g] sum_{k in g} x[k] q[k], groups of 32 (K a multiple of 32) */
static float i8g_row(const float *x, const int8_t *q, const float *s, int64_t K) {
    __m256 tot = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        const float *xg = x + 32 * g;
        const int8_t *qg = q + 32 * g;
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(xg), widen8(qg));
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8), widen8(qg + 8), a);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), widen8(qg + 16), a);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), widen8(qg + 24), a);
        tot = _mm256_fmadd_ps(a, _mm256_set1_ps(s[g]), tot);
    }
    return hsum8(tot);
}

static inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The scales of blocks 2c, 2c + 1 (two bf16 at p) in lanes 0-7 and 8-15. */
LB_VNNI static inline __m512 bf16_pair_lanes(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m512i b = _mm512_set1_epi32((int)v);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(
        0xFF00, _mm512_slli_epi32(b, 16), _mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u))));
}

/* Rows [n0, n1) of an LB_I8 / LB_I8G / LB_Q4R linear on int8 activations a (AVX512-VNNI):
 * per 64 inputs one vpdpbusd gives 16 lanes of 4-input integer dot products, lanes 0-7 of
 * the first 32-input block and 8-15 of the second; lane sums minus the code-sum offset,
 * times their block's scales, accumulate in float32. */
LB_VNNI static void q8_rows(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0,
                            int64_t n1) {
    const int64_t K = L->k, kind = L->kind;
    const int64_t kv = kind == LB_Q4R ? up64(K) : K / 64 * 64, G = kind == LB_Q4R ? kv / 32 : K / 32;
    const __m512i flip = _mm512_set1_epi8((char)0x80), low4 = _mm512_set1_epi8(0x0F);
    for (int64_t n = n0; n < n1; n++) {
        __m512 f = _mm512_setzero_ps();
        for (int64_t c = 0; c < kv / 64; c++) {
            const __m512i xv = _mm512_loadu_si512(a->xq + 64 * c);
            const __m512i lsum = _mm512_loadu_si512(a->ls + 16 * c);
            __m512 scale = _mm512_loadu_ps(a->dl + 16 * c);
            __m512i acc;
            if (kind == LB_Q4R) {
                const uint8_t *w = (const uint8_t *)L->w + n * L->ld + 32 * c;
                const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w));
                const __m512i both = _mm512_inserti64x4(b, _mm256_srli_epi16(_mm512_castsi512_si256(b), 4), 1);
                acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(both, low4), xv);
                acc = _mm512_sub_epi32(acc, _mm512_slli_epi32(lsum, 3));
                const uint16_t *s = (const uint16_t *)L->s + n * G + 2 * c;
                scale = _mm512_mul_ps(scale, bf16_pair_lanes(s));
                if (L->z)
                    f = _mm512_fmadd_ps(bf16_pair_lanes((const uint16_t *)L->z + n * G + 2 * c),
                                        _mm512_loadu_ps(a->dls + 16 * c), f);
            } else {
                const int8_t *w = (const int8_t *)L->w + n * L->ld + 64 * c;
                acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                          _mm512_xor_si512(_mm512_loadu_si512(w), flip), xv);
                acc = _mm512_sub_epi32(acc, _mm512_slli_epi32(lsum, 7));
                if (kind == LB_I8G) {
                    const float *s = (const float *)L->s + n * G + 2 * c;
                    scale = _mm512_mul_ps(scale, _mm512_permutexvar_ps(
                        _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                        _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)s)))));
                }
            }
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, f);
        }
        float t = _mm512_reduce_add_ps(f);
        if (kind != LB_Q4R) { /* inputs past the last 64: scalar */
            const int8_t *w = (const int8_t *)L->w + n * L->ld;
            for (int64_t k = kv; k < K; k++)
                t += a->dl[k / 4] * (float)(w[k] * a->xq[k]) *
                     (kind == LB_I8G ? ((const float *)L->s)[n * G + k / 32] : 1.0f);
        }
        if (kind == LB_I8) t *= ((const float *)L->s)[n];
        y[n] = t + (L->bias ? L->bias[n] : 0.0f);
    }
}

static void split(int64_t units, int t, int T, int64_t *a, int64_t *b) {
    *a = units * t / T;
    *b = units * (t + 1) / T;
}

/* What one input vector needs before the threads read it: int8 codes (q8) and each LB_I4T
 * consumer's prepared activations. Run on one thread. */
static void prepare(const float *x, const lb_linear *const *ls, int count, const lb_q8 *a) {
    if (a) lowbit_q8_quantize(x, ls[0]->k, a->xq, a->dl, a->ls, a->dls);
    for (int i = 0; i < count; i++)
        if (ls[i]->kind == LB_I4T)
            lowbit_int4_prepare(x, ls[i]->k, ls[i]->ld, ls[i]->kg, ls[i]->scratch);
}

/* Thread t of T computes its share of y = x W^T + b (a: int8 activations, or NULL). */
static void part(const lb_linear *L, const float *x, const lb_q8 *a, float *y, int t, int T) {
    int64_t u0, u1;
    const int64_t n = L->n, K = L->k;
    if (L->kind == LB_I4T) {
        split(lowbit_int4_units(L->np, L->block), t, T, &u0, &u1);
        lowbit_int4_gemv_range(x, K, L->w, L->np, L->ld, L->block, L->s, L->kg, L->bias, y, n,
                               L->scratch, u0, u1);
        return;
    }
    split((n + 3) / 4, t, T, &u0, &u1);
    const int64_t n0 = 4 * u0, n1 = 4 * u1 < n ? 4 * u1 : n;
    if (a && L->kind != LB_F32) {
        q8_rows(L, a, y, n0, n1);
        return;
    }
    if (L->kind == LB_Q4R) { /* only built for int8 activations (native_loop.py) */
        for (int64_t r = n0; r < n1; r++) y[r] = NAN;
        return;
    }
    if (L->kind == LB_I8) {
        lowbit_int8_gemv_range(x, K, L->w, L->ld, L->s, L->bias, y, n0, n1);
        return;
    }
    for (int64_t r = n0; r < n1; r++) {
        float v = L->kind == LB_F32 ? f32_row(x, (const float *)L->w + r * L->ld, K)
                                    : i8g_row(x, (const int8_t *)L->w + r * L->ld,
                                              (const float *)L->s + r * (K / 32), K);
        y[r] = v + (L->bias ? L->bias[r] : 0.0f);
    }
}

static int64_t kmax(const lb_model *m) {
    int64_t k = m->hidden > m->inter ? m->hidden : m->inter;
    return up64(k > m->heads * m->head_dim ? k : m->heads * m->head_dim);
}

/* Floats of model->work: the step's vectors, the attention scores, int8 activations. */
int64_t lowbit_loop_work_floats(const lb_model *m) {
    const int64_t hd = m->heads * m->head_dim, kd = m->kv_heads * m->head_dim;
    return 3 * m->hidden + 2 * hd + 2 * kd + 2 * m->inter + m->heads * m->max_len +
           kmax(m) / 4 * 4 + 64;
}

static lb_q8 carve_q8(float *p, int64_t kp) {
    lb_q8 a = {(int8_t *)p, p + kp / 4, p + kp / 2, (int32_t *)(p + 3 * kp / 4)};
    return a;
}

/* One decode step at position pos: embed (hidden floats) in, logits (vocab floats) out;
 * the caches get this position's k and v. */
void lowbit_decode_step(const lb_model *m, const float *embed, int64_t pos, float *logits) {
    const int64_t E = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim;
    float *x = m->work, *h = x + E, *o = h + E, *q = o + E, *att = q + H * D;
    float *k = att + H * D, *v = k + Hkv * D, *g = v + Hkv * D, *u = g + m->inter;
    float *scores = u + m->inter;
    const lb_q8 q8 = carve_q8(scores + H * m->max_len, kmax(m));
    const lb_q8 *a = m->q8 && lowbit_loop_has_vnni() ? &q8 : NULL; /* never AVX-512 without */
    const float *cos = m->cos + pos * D, *sin = m->sin + pos * D;
    memcpy(x, embed, E * sizeof(float));
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t h0, h1;
        split(H, t, T, &h0, &h1);
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lb_layer *L = m->layers + l;
#pragma omp single
            {
                if (l == 0) lowbit_rmsnorm(x, 1, E, L->in_norm, L->in_eps, h);
                else lowbit_add_rmsnorm(x, o, 1, E, L->in_norm, L->in_eps, h);
                const lb_linear *qkv[3] = {&L->q, &L->k, &L->v};
                prepare(h, qkv, 3, a);
            }
            part(&L->q, h, a, q, t, T);
            part(&L->k, h, a, k, t, T);
            part(&L->v, h, a, v, t, T);
#pragma omp barrier
#pragma omp single
            lowbit_attend_write(q, k, v, 1, H, Hkv, D, pos, m->max_len, cos, sin, L->kcache,
                                L->vcache);
            lowbit_attend_heads(q, H, Hkv, D, pos, m->max_len, L->kcache, L->vcache,
                                m->attn_scale, att, scores, h0, h1);
#pragma omp barrier
#pragma omp single
            {
                const lb_linear *os[1] = {&L->o};
                prepare(att, os, 1, a);
            }
            part(&L->o, att, a, o, t, T);
#pragma omp barrier
#pragma omp single
            {
                lowbit_add_rmsnorm(x, o, 1, E, L->post_norm, L->post_eps, h);
                const lb_linear *gu[2] = {&L->gate, &L->up};
                prepare(h, gu, 2, a);
            }
            part(&L->gate, h, a, g, t, T);
            part(&L->up, h, a, u, t, T);
#pragma omp barrier
#pragma omp single
            {
                silu_mul8(g, u, m->inter);
                const lb_linear *ds[1] = {&L->down};
                prepare(g, ds, 1, a);
            }
            part(&L->down, g, a, o, t, T);
#pragma omp barrier
        }
#pragma omp single
        {
            lowbit_add_rmsnorm(x, o, 1, E, m->final_norm, m->final_eps, h);
            const lb_linear *hs[1] = {m->head};
            prepare(h, hs, 1, a);
        }
        part(m->head, h, a, logits, t, T);
    }
}

/* One linear on its own (tests, the measured choice): y = x W^T + b, q8: int8 activations. */
void lowbit_linear_apply(const lb_linear *L, const float *x, float *y, int64_t q8) {
    q8 = q8 && lowbit_loop_has_vnni();
    float *buf = q8 ? malloc(up64(L->k) * sizeof(float) + 256) : NULL;
    const lb_q8 q = carve_q8(buf, up64(L->k));
    const lb_q8 *a = q8 ? &q : NULL;
    const lb_linear *ls[1] = {L};
    prepare(x, ls, 1, a);
#pragma omp parallel
    part(L, x, a, y, omp_get_thread_num(), omp_get_num_threads());
    free(buf);
}
